"""STFPM training as the official ``train_val()`` (github gdwang08/STFPM @ 2598a5e, ``main.py``).

Teacher in eval mode under ``no_grad``, student in train mode (BatchNorm batch statistics, torch's
unbiased running-variance update), loss :func:`~kdad.methods.stfpm.loss.stfpm_loss` of the tapped
layers, and the official optimiser ``torch.optim.SGD(lr=0.4, momentum=0.9, weight_decay=1e-4)``.

Paddle's ``Momentum`` with a float ``weight_decay`` adds ``weight_decay * p`` to the gradient inside
the momentum op, before the velocity update (``v = mu * v + g + wd * p``; ``p -= lr * v``), which is
exactly torch's SGD with momentum (no dampening, no Nesterov; torch's first step sets ``v = g + wd * p``,
the same as ``mu * 0 + g + wd * p``). ``tests/test_stfpm.py`` checks two steps against that formula.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import paddle
import paddle.nn as nn

from kdad.methods.base import AnomalyModel, TrainingSpec, backbone_taps
from kdad.methods.stfpm.loss import stfpm_loss

#: the official SGD's momentum and weight decay (the learning rate, 0.4 in the paper, is ``learning_rate``)
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 1e-4


def student_of(model: AnomalyModel) -> nn.Layer:
    """The trained network: the student backbone."""
    return model.student


def training_loss(model: AnomalyModel, student: nn.Layer, x: paddle.Tensor,
                  teacher: Mapping[str, paddle.Tensor], rng: Any = None) -> paddle.Tensor:
    """The STFPM loss of a batch: ``teacher`` features against ``student(x)`` (``student`` may be a
    data-parallel wrapper of ``model.student``; ``rng`` unused: no randomness)."""
    del rng
    feats = student(x)
    return stfpm_loss([teacher[tap] for tap in model.layers], [feats[tap] for tap in model.layers])


def make_optimizer(config: Mapping[str, Any],
                   parameters: Sequence[paddle.Tensor]) -> paddle.optimizer.Optimizer:
    """The official SGD: momentum 0.9, L2 weight decay 1e-4 added to the gradient, ``learning_rate``.
    Tensors with ``stop_gradient`` (Paddle's BatchNorm statistics are parameters) are left out."""
    trainable = [param for param in parameters if not param.stop_gradient]
    return paddle.optimizer.Momentum(learning_rate=float(config["learning_rate"]), momentum=SGD_MOMENTUM,
                                     parameters=trainable, use_nesterov=False, weight_decay=SGD_WEIGHT_DECAY)


TRAINING = TrainingSpec(
    student=student_of,
    teacher_features=backbone_taps,
    loss=training_loss,
    optimizer=make_optimizer,
    resume_keys=("backbone", "backbone_pretrained", "layers"),
)
