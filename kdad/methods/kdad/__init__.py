"""KDAD (Salehi et al., CVPR 2021): a frozen expert, a cloner trained to mimic its taps, the
distance of :mod:`kdad.methods.kdad.loss` as score, gradient maps for localization.

Its exportable networks are built by :mod:`kdad.export` (score, heatmap, feature_map graphs); its
training recipe (:mod:`kdad.methods.kdad.train`) runs in the shared epoch trainer
:func:`kdad.engine.trainer.train` (cached expert features, resumable).
"""

from kdad.methods.base import MethodSpec
from kdad.methods.kdad.model import build_model
from kdad.methods.kdad.train import TRAINING

METHOD = MethodSpec(
    name="kdad",
    summary="Multiresolution knowledge distillation: VGG16 (or EfficientNet-Lite0) expert, cloner, "
            "cosine + MSE distance over 4 taps, gradient localization",
    build_model=build_model,
    training=TRAINING,
    maps_blurred_in_graph=False,
)
