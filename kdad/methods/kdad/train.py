"""KDAD's training recipe for the shared epoch trainer: Adam on the cloner, the loss of
:mod:`kdad.methods.kdad.loss` against the frozen expert's loss taps (cacheable)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import paddle
import paddle.nn as nn

from kdad.methods.base import TrainingSpec
from kdad.methods.kdad.loss import training_loss
from kdad.methods.kdad.model import KDADModel


def kdad_loss(model: KDADModel, student: nn.Layer, x: paddle.Tensor,
              teacher_features: Dict[Any, paddle.Tensor], rng: Any = None) -> paddle.Tensor:
    """KDAD's loss of a batch (no randomness: ``rng`` unused)."""
    del rng
    return training_loss(student(x), teacher_features, model.loss_taps, model.lamda, model.direction_only)


def adam(config: Mapping[str, Any], parameters: Sequence[paddle.Tensor]) -> paddle.optimizer.Optimizer:
    """The original code's optimiser: Adam with Paddle's (= torch's) default betas."""
    return paddle.optimizer.Adam(learning_rate=float(config["learning_rate"]), parameters=parameters)


TRAINING = TrainingSpec(
    student=lambda model: model.cloner,
    teacher_features=lambda model, x: model.expert_loss_features(x),
    loss=kdad_loss,
    optimizer=adam,
    resume_keys=("expert", "pretrain", "equal_network_size", "use_bias", "lamda", "direction_loss_only"),
)
