"""STFPM (Wang et al., BMVC 2021): student-teacher feature pyramid matching. Faithful to the official
code (github gdwang08/STFPM @ 2598a5e, ``main.py``; ``stfpm_reference_v1.npz``)."""

from kdad.methods.base import MethodSpec
from kdad.methods.stfpm.loss import layer_distance, stfpm_loss
from kdad.methods.stfpm.model import STFPMModel, build_model
from kdad.methods.stfpm.train import TRAINING

METHOD = MethodSpec(
    name="stfpm",
    summary="STFPM: a randomly initialised student regresses the frozen teacher's normalised layer1-3 "
            "features (SGD); map = product over layers of the squared feature distance, score = max",
    build_model=build_model,
    training=TRAINING,
)

__all__ = ["METHOD", "STFPMModel", "TRAINING", "build_model", "layer_distance", "stfpm_loss"]
