"""The exportable RD4AD network (Deng & Li, CVPR 2022): frozen encoder, OCBE + decoder, anomaly map.

``forward(x)`` takes RGB images in [0, 1] (``[N, 3, S, S]``, ``S`` = the size the model was built for)
and returns ``(scores [N], maps [N, S, S])``, as the official ``test.py`` ``evaluation`` computes them
(``rd4ad_reference_v1.npz`` checks every step):

1. encoder taps layer1..3 (``self.backbone``, frozen, always in eval mode) and the student's decoder
   outputs paired with them (``self.student`` = :class:`~kdad.methods.rd4ad.networks.RD4ADStudent`);
2. per level ``1 - cos`` over channels (``cal_anomaly_map``), resampled **bilinear with
   align_corners=True** to ``S`` and summed (``amap_mode='a'``);
3. Gaussian blur with sigma 4 and scipy's ``reflect`` (= half-sample symmetric) boundary, radius 16
   (``gaussian_filter(sigma=4)``); the image score is the map's maximum.

The blur sigma is the constant :data:`BLUR_SIGMA` (the official 4), not the config's ``blur_sigma``,
whose default serves KDAD's gradient maps. The resampling is two products with fixed interpolation
matrices (:class:`~kdad.layers.MatrixResize`), so the exported graph has no interpolation op and runs
under oneDNN; ``forward`` has no numpy or data-dependent Python control flow (``to_static(full_graph=True)``).
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn

from kdad.backbones.base import Backbone
from kdad.layers import GaussianBlur2D, MatrixResize, image_max
from kdad.methods.base import AnomalyModel
from kdad.methods.rd4ad.loss import level_map
from kdad.methods.rd4ad.networks import RD4ADStudent, check_grid

DEFAULT_LAYERS: Tuple[str, ...] = ("layer1", "layer2", "layer3")
#: the official ``gaussian_filter(anomaly_map, sigma=4)``
BLUR_SIGMA = 4.0


class RD4ADModel(AnomalyModel):
    """RD4AD scorer: ``backbone`` (the encoder, frozen) and ``student`` (OCBE ``bn`` + ``decoder``)."""

    method = "rd4ad"

    def __init__(self, backbone: Backbone, image_size: int,
                 layers: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.backbone = backbone.freeze()
        self.backbone_name = backbone.name
        self.layers: List[str] = list(layers if layers is not None else DEFAULT_LAYERS)
        missing = [tap for tap in self.layers if tap not in backbone.taps]
        if len(self.layers) != 3 or missing:
            raise ValueError(f"RD4AD needs three encoder taps that the backbone computes, got {self.layers} "
                             f"(the backbone has {backbone.taps})")
        self.image_size = int(image_size)
        self.grid = self._probe_sizes()
        check_grid(self.grid, self.image_size)
        self.student = RD4ADStudent([backbone.channels(tap) for tap in self.layers], self.layers)
        size = (self.image_size, self.image_size)
        self.resizers = nn.LayerList([MatrixResize(grid, size, align_corners=True) for grid in self.grid])
        self.blur = GaussianBlur2D(BLUR_SIGMA, "symmetric")

    def _probe_sizes(self) -> List[Tuple[int, int]]:
        """``[(h, w)]`` of the taps at the model's input size (one forward of a 1-image zero batch)."""
        with paddle.no_grad():
            feats = self.backbone(paddle.zeros([1, 3, self.image_size, self.image_size], dtype="float32"))
        return [(int(feats[tap].shape[2]), int(feats[tap].shape[3])) for tap in self.layers]

    def train(self, mode: bool = True) -> RD4ADModel:  # the frozen encoder never leaves eval mode
        super().train(mode)
        self.backbone.eval()
        return self

    def encoder_features(self, x: paddle.Tensor) -> List[paddle.Tensor]:
        """The encoder's taps ``[layer1, layer2, layer3]`` of images ``x`` in [0, 1]."""
        feats = self.backbone(x)
        return [feats[tap] for tap in self.layers]

    def level_maps(self, teacher: Sequence[paddle.Tensor],
                   student: Sequence[paddle.Tensor]) -> List[paddle.Tensor]:
        """Per level ``1 - cos`` over channels at native resolution, ``[N, h_i, w_i]``."""
        return [level_map(t, s) for t, s in zip(teacher, student)]

    def combine(self, maps: Sequence[paddle.Tensor]) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """``(sum of the level maps resampled to S, its blur)``, both ``[N, S, S]``."""
        raw = self.resizers[0](maps[0])
        for resize, level in zip(self.resizers[1:], maps[1:]):
            raw = raw + resize(level)
        return raw, self.blur(raw)

    def forward(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        size = x.shape[-1]
        if isinstance(size, int) and size > 0 and size != self.image_size:
            raise ValueError(f"this RD4AD model was built for {self.image_size} px; got input of {size} px")
        teacher = self.encoder_features(x)
        maps = self.combine(self.level_maps(teacher, self.student(teacher)))[1]
        return image_max(maps), maps


def build_model(config: Mapping[str, Any]) -> RD4ADModel:
    """The untrained :class:`RD4ADModel` of ``config`` (keys ``backbone``, ``backbone_pretrained``,
    ``backbone_weights``, ``layers`` (empty: layer1-3), ``mvtec_img_size``, ``seed``: the student's
    initialisation is drawn after ``paddle.seed(seed)``, so a config always gives the same network)."""
    from kdad.backbones import build_backbone

    layers = list(config.get("layers") or DEFAULT_LAYERS)
    backbone = build_backbone(config["backbone"], layers, pretrained=bool(config["backbone_pretrained"]),
                              weights_path=config.get("backbone_weights") or None)
    paddle.seed(int(config["seed"]))
    return RD4ADModel(backbone, image_size=int(config["mvtec_img_size"]), layers=layers)

