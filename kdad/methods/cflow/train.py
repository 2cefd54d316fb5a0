"""CFlow-AD's training recipe for the shared epoch trainer (official ``train.py`` ``train_meta_epoch``).

Faithful to the official code (github gudovskiy/cflow-ad @ b2ebf9e): the encoder is frozen; per image
batch and per tap, the ``B*H*W`` fibers (image, row, column) and their positional conditions are put in a
random order (``torch.randperm`` there, ``rng.permutation`` here: the trainer's seeded generator) and cut
into ``E // N`` fiber batches of ``N`` (config ``fiber_batch``, paper 256; the remainder is dropped);
**every fiber batch is one optimiser step** on ``mean(-logsigmoid(log_prob))`` of that decoder.

How that fits the shared trainer: CFlow's ``TrainingSpec`` gives ``step`` (:func:`train_step`) instead
of a loss, and takes all the fiber steps of an image batch with the trainer's optimiser. The decoders
share no parameter and Adam's state is per parameter, so the
steps of different taps commute: step ``k`` here updates every decoder that has a ``k``-th fiber batch
at once (one backward of the sum of their batch means), which gives each decoder exactly the official
sequence of updates. Decoders without a batch in a step have no gradient (cleared to ``None``, torch's
``zero_grad()``), so Adam leaves them alone. The returned value (what the trainer logs and checks) is
the official printed "train loss": the mean loss of all fibers of the image batch, each computed before
its own step. After the last epoch :func:`finalize` sets the map's fixed normaliser.

Differences from the official loop, all outside the fiber steps themselves:

* learning rate: the official cosine schedule over ``meta_epochs`` (25) with a linear warm-up over the
  first 2 meta epochs from ``lr/10``; one official meta epoch is ``sub_epochs`` = 8 passes over the data,
  i.e. 8 trainer epochs here (:class:`CFlowSchedule`). The trainer steps it once per epoch, so the
  warm-up rises per epoch (its value at the epoch's start) instead of per image batch;
* the official loader drops an incomplete last image batch (``drop_last=True``) and asserts that every
  tap has at least ``N`` fibers; the shared trainer keeps the last batch, and a tap with fewer than ``N``
  fibers in a batch makes one fiber batch of all of them;
* with ``world_size > 1`` every process steps on its own batch's fibers, its gradients averaged over
  the processes after each backward (:func:`kdad.utils.distributed.average_gradients`; the trainer
  does not wrap the flows in ``paddle.DataParallel``, whose reducer allows one forward per backward and
  no flow left without a gradient); per tap, every process takes the fewest fiber batches any process
  has, so all take the same steps on the same flows.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
import paddle
import paddle.nn as nn

from kdad.methods.base import AnomalyModel, TrainingSpec, backbone_taps
from kdad.methods.cflow.loss import fibers, log_likelihood, nll
from kdad.methods.cflow.model import FIBER_BATCH, set_reference_maxima
from kdad.utils.distributed import agreed_minimum, all_finite, average_gradients

#: the official schedule (``main.py``): sub-epochs per meta epoch, warm-up meta epochs, decay rate
SUB_EPOCHS = 8
WARM_META_EPOCHS = 2
LR_DECAY_RATE = 0.1


class CFlowSchedule(paddle.optimizer.lr.LRScheduler):
    """The official learning rate (``adjust_learning_rate`` + ``warmup_learning_rate`` with
    ``lr_cosine`` and ``lr_warm``), indexed by trainer epoch ``e`` (meta epoch ``e // SUB_EPOCHS``):
    warm-up ``lr/10 -> cos(2)`` linear over the first ``2 * SUB_EPOCHS`` epochs, then
    ``eta_min + (lr - eta_min) * (1 + cos(pi * meta / meta_epochs)) / 2``, ``eta_min = lr * 0.1**3``."""

    def __init__(self, learning_rate: float, num_epochs: int, sub_epochs: int = SUB_EPOCHS,
                 warm_meta_epochs: int = WARM_META_EPOCHS, last_epoch: int = -1) -> None:
        self.sub_epochs = int(sub_epochs)
        self.meta_epochs = max(1, math.ceil(int(num_epochs) / self.sub_epochs))
        self.warm_meta_epochs = int(warm_meta_epochs)
        super().__init__(learning_rate=float(learning_rate), last_epoch=last_epoch)

    def cosine(self, meta_epoch: int) -> float:
        eta_min = self.base_lr * LR_DECAY_RATE ** 3
        cosine = math.cos(math.pi * meta_epoch / self.meta_epochs)
        return eta_min + (self.base_lr - eta_min) * (1 + cosine) / 2

    def get_lr(self) -> float:
        epoch = max(0, int(self.last_epoch))
        meta_epoch = epoch // self.sub_epochs
        if meta_epoch < self.warm_meta_epochs:
            start, end = self.base_lr / 10.0, self.cosine(self.warm_meta_epochs)
            progress = epoch / (self.warm_meta_epochs * self.sub_epochs)
            return start + progress * (end - start)
        return self.cosine(meta_epoch)


def student(model: AnomalyModel) -> nn.Layer:
    """The trained layer: the decoders (``model.decoders``)."""
    return model.decoders


def fiber_batches(count: int, size: int, rng: np.random.Generator) -> List[np.ndarray]:
    """The official fiber batches of ``count`` fibers: ``rng.permutation(count)`` cut into ``count // size``
    batches of ``size`` (the remainder dropped); one batch of all fibers when ``count < size``."""
    perm = rng.permutation(count)
    if count < size:
        return [perm]
    return [perm[f * size:(f + 1) * size] for f in range(count // size)]


def train_step(model: AnomalyModel, student_layer: nn.Layer, x: Any, features: Dict[str, paddle.Tensor],
               rng: np.random.Generator, optimizer: paddle.optimizer.Optimizer) -> float:
    """Every fiber step of one image batch (the trainer's ``TrainingSpec.step``); returns the mean loss
    of all the batch's fibers, each computed before its own step (the official printed "train loss").
    Stops at the first non-finite fiber-batch loss, before its step, and returns it."""
    del x
    size = int(getattr(model, "fiber_batch", FIBER_BATCH))
    taps = []  # per tap: fibers [E, C], conditions [E, P], the fiber batches
    for index, tap in enumerate(model.layers):
        feature = features[tap]
        e_r = fibers(feature)
        c_r = paddle.tile(model.position_encoding(index), [int(feature.shape[0]), 1])  # (image, row, column)
        taps.append((e_r, c_r, fiber_batches(int(e_r.shape[0]), size, rng)))
    # data parallel: every rank takes the same steps on the same flows (the fewest fiber batches of any rank)
    counts = agreed_minimum([len(batches) for _, _, batches in taps])
    taps = [(e_r, c_r, batches[:n]) for (e_r, c_r, batches), n in zip(taps, counts)]
    steps = max(counts)
    total, count = 0.0, 0
    for step in range(steps):
        optimizer.clear_grad(set_to_zero=False)  # torch's zero_grad(): decoders without a batch stay put
        step_loss = None
        for index, (e_r, c_r, batches) in enumerate(taps):
            if step >= len(batches):
                continue
            idx = paddle.to_tensor(batches[step])
            z, log_jac_det = student_layer(index, paddle.gather(e_r, idx), paddle.gather(c_r, idx))
            fiber_loss = nll(log_likelihood(z, log_jac_det))
            total += float(paddle.sum(fiber_loss))
            count += int(fiber_loss.shape[0])
            batch_loss = paddle.mean(fiber_loss)
            step_loss = batch_loss if step_loss is None else step_loss + batch_loss
        value = float(step_loss)
        if not all_finite(value):
            return value if not math.isfinite(value) else math.nan  # the trainer reports it; no step taken
        step_loss.backward()
        average_gradients(student_layer.parameters())
        optimizer.step()
    optimizer.clear_grad(set_to_zero=False)
    return total / count


def finalize(model: AnomalyModel, train_images: Any, config: Mapping[str, Any]) -> None:
    """After training: the fixed map normaliser from the training images (:func:`set_reference_maxima`)."""
    set_reference_maxima(model, train_images, int(config["eval_batch_size"]))


def optimizer(config: Mapping[str, Any], parameters: Sequence[paddle.Tensor]) -> paddle.optimizer.Optimizer:
    """``Adam(learning_rate)`` (paper 2e-4; torch's defaults betas (0.9, 0.999), eps 1e-8) with the
    official schedule (:class:`CFlowSchedule` over ``num_epochs``)."""
    schedule = CFlowSchedule(float(config["learning_rate"]), int(config["num_epochs"]))
    return paddle.optimizer.Adam(learning_rate=schedule, beta1=0.9, beta2=0.999, epsilon=1e-8,
                                 parameters=list(parameters))


TRAINING = TrainingSpec(student=student, teacher_features=backbone_taps, optimizer=optimizer,
                        step=train_step, finalize=finalize, data_parallel=False)
