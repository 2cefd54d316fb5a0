"""DRAEM's training recipe for the shared epoch trainer (official ``train_DRAEM.py``, VitjanZ/DRAEM
@ 2dbf673).

Per batch (:func:`training_loss`): the clean RGB images in [0, 1] go through the anomaly simulator
(:func:`~kdad.methods.draem.simulator.simulate_batch`, every draw from the trainer's per-batch
``numpy`` generator), both images and augmented images are flipped to BGR (what the official networks
see, :func:`~kdad.methods.draem.model.rgb_to_bgr`), the two subnetworks run in train mode (BatchNorm
batch statistics) on the augmented batch and the loss is
:func:`~kdad.methods.draem.loss.draem_loss` ``= MSE + (1 - SSIM) + focal``. The focal loss' gradient
reaches the reconstructive subnetwork too (the official code does not detach ``rec`` in training).

There is no teacher: ``teacher_features`` is ``{}`` and nothing is cached (``cacheable=False``: the input
is re-simulated every batch). :func:`prepare` loads the anomaly sources once before the first epoch
(``anomaly_source_path`` or generated textures) and keeps them on the model as a plain attribute
(``model.anomaly_sources``; not state, not exported).

Optimiser (:func:`make_optimizer`): ``Adam(lr)`` (torch's defaults: betas 0.9/0.999, eps 1e-8, no weight
decay; the official two parameter groups share one learning rate) with the official
``MultiStepLR(milestones=[0.8 E, 0.9 E], gamma=0.2)`` over ``E = num_epochs`` epochs
(:class:`paddle.optimizer.lr.MultiStepDecay`, stepped once per epoch by the trainer). Note: the code's
``gamma`` is **0.2** (the learning rate becomes 0.2x, then 0.04x); the paper's text and
``docs/methods.md`` say x0.1; the code is followed (:data:`LR_DECAY`). Paper recipe: lr 1e-4, batch 8,
700 epochs, 256 px (milestones 560, 630).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
import paddle
import paddle.nn as nn

from kdad.methods.base import AnomalyModel, TrainingSpec
from kdad.methods.draem.loss import draem_loss
from kdad.methods.draem.model import rgb_to_bgr
from kdad.methods.draem.simulator import anomaly_sources_from_config, simulate_batch

#: the official ``MultiStepLR``'s ``gamma`` and its milestones as fractions of the epochs
LR_DECAY = 0.2
LR_MILESTONES = (0.8, 0.9)


def student_of(model: AnomalyModel) -> nn.Layer:
    """The trained layer: both subnetworks (``model.networks``)."""
    return model.networks


def teacher_features(model: AnomalyModel, x: paddle.Tensor) -> Dict[str, paddle.Tensor]:
    """No teacher: ``{}``."""
    del model, x
    return {}


def prepare(model: AnomalyModel, config: Mapping[str, Any]) -> None:
    """Load (``anomaly_source_path``) or generate the anomaly sources once, as ``model.anomaly_sources``."""
    model.anomaly_sources = anomaly_sources_from_config(config, model.image_size)


def training_loss(model: AnomalyModel, student: nn.Layer, x: paddle.Tensor,
                  features: Mapping[str, paddle.Tensor], rng: np.random.Generator) -> paddle.Tensor:
    """The official training loss of a batch ``x`` (``[N, 3, S, S]`` RGB in [0, 1]): simulate anomalies
    with ``rng``, run ``student`` (``model.networks`` or its data-parallel wrapper) on the augmented
    BGR batch, ``MSE + (1 - SSIM) + focal`` against the clean BGR batch and the masks."""
    del features
    sources = getattr(model, "anomaly_sources", None)
    if sources is None:
        raise RuntimeError("DRAEM training needs its anomaly sources: call TRAINING.prepare(model, config) "
                           "before the first batch")
    targets, augmented, masks = simulate_batch(np.asarray(x.numpy(), dtype=np.float32), sources, rng)
    target = rgb_to_bgr(paddle.to_tensor(targets))
    rec, logits = student(rgb_to_bgr(paddle.to_tensor(augmented)))
    return draem_loss(rec, target, logits, paddle.to_tensor(masks))


def milestones(num_epochs: int) -> List[int]:
    """The epochs (0-based, counted by the trainer's per-epoch steps) from which the learning rate is
    decayed: ``round(0.8 E)``, ``round(0.9 E)`` (560 and 630 for 700), kept strictly increasing."""
    out: List[int] = []
    for fraction in LR_MILESTONES:
        epoch = max(1, int(round(fraction * int(num_epochs))))
        out.append(max(epoch, out[-1] + 1) if out else epoch)
    return out


def make_optimizer(config: Mapping[str, Any],
                   parameters: Sequence[paddle.Tensor]) -> paddle.optimizer.Optimizer:
    """``Adam`` over the trainable parameters (Paddle's BatchNorm statistics, ``stop_gradient``, are left
    out) with the official multi-step schedule (:func:`milestones`, :data:`LR_DECAY`)."""
    schedule = paddle.optimizer.lr.MultiStepDecay(learning_rate=float(config["learning_rate"]),
                                                  milestones=milestones(int(config["num_epochs"])),
                                                  gamma=LR_DECAY)
    trainable = [param for param in parameters if not param.stop_gradient]
    return paddle.optimizer.Adam(learning_rate=schedule, beta1=0.9, beta2=0.999, epsilon=1e-8,
                                 parameters=trainable)


TRAINING = TrainingSpec(
    student=student_of,
    teacher_features=teacher_features,
    loss=training_loss,
    optimizer=make_optimizer,
    resume_keys=("anomaly_source_path", "draem_width"),
    cacheable=False,
    prepare=prepare,
)
