"""RD4AD's training recipe for the shared epoch trainer (official ``main.py`` ``train()``).

The encoder stays frozen in eval mode; ``bn`` (OCBE) and ``decoder`` train together in train mode
(BatchNorm batch statistics) on :func:`~kdad.methods.rd4ad.loss.rd4ad_loss` of the encoder taps and the
decoder outputs, with ``Adam(lr, betas=(0.5, 0.999))`` (paper: lr 0.005, batch 16, 200 epochs, 256 px).
The student's input is the encoder's features, so with cached teacher features an epoch never runs the
encoder.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import paddle
import paddle.nn as nn

from kdad.methods.base import AnomalyModel, TrainingSpec, backbone_taps
from kdad.methods.rd4ad.loss import rd4ad_loss

#: the official Adam betas
ADAM_BETAS = (0.5, 0.999)


def student(model: AnomalyModel) -> nn.Layer:
    """The trained layer: OCBE + decoder (``model.student``)."""
    return model.student


def loss(model: AnomalyModel, student_layer: nn.Layer, x: paddle.Tensor,
         features: Dict[str, paddle.Tensor], rng: Any = None) -> paddle.Tensor:
    """:func:`rd4ad_loss` of the encoder taps and ``student_layer(features)`` (``x`` and ``rng`` unused)."""
    del rng
    del x
    teacher = [features[tap] for tap in model.layers]
    return rd4ad_loss(teacher, student_layer(teacher))


def optimizer(config: Mapping[str, Any], parameters: Sequence[paddle.Tensor]) -> paddle.optimizer.Optimizer:
    """``Adam(learning_rate, beta1=0.5, beta2=0.999)`` (epsilon 1e-8, no weight decay: torch's defaults)."""
    return paddle.optimizer.Adam(learning_rate=float(config["learning_rate"]), beta1=ADAM_BETAS[0],
                                 beta2=ADAM_BETAS[1], parameters=list(parameters))


#: no resume keys of its own: the engine already checks the backbone and its taps for every non-KDAD method
TRAINING = TrainingSpec(student=student, teacher_features=backbone_taps, loss=loss, optimizer=optimizer)
