"""Reverse Distillation, RD4AD (Deng & Li, CVPR 2022): a frozen encoder, a one-class bottleneck and a
mirrored decoder trained to reproduce the encoder's layer1-3; anomaly map = summed ``1 - cos`` per level.
Faithful to the official code (github hq-deng/RD4AD, ``rd4ad_reference_v1.npz``)."""

from kdad.methods.base import MethodSpec
from kdad.methods.rd4ad.loss import level_map, loss_terms, rd4ad_loss
from kdad.methods.rd4ad.model import BLUR_SIGMA, RD4ADModel, build_model
from kdad.methods.rd4ad.networks import RD4ADStudent, student_state_from_official
from kdad.methods.rd4ad.train import TRAINING

METHOD = MethodSpec(
    name="rd4ad",
    summary="RD4AD: frozen encoder, one-class bottleneck + mirrored decoder trained with 1 - cos per "
            "level, map = sum of the level maps (bilinear), blur sigma 4, score = max",
    build_model=build_model,
    training=TRAINING,
)

__all__ = ["BLUR_SIGMA", "METHOD", "RD4ADModel", "RD4ADStudent", "TRAINING", "build_model", "level_map",
           "loss_terms", "rd4ad_loss", "student_state_from_official"]
