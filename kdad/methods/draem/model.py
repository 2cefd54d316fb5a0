"""The exportable DRAEM network (Zavrtanik et al., ICCV 2021): both subnetworks and the official scoring.

``forward(x)`` takes RGB images in [0, 1] (``[N, 3, S, S]``, ``S`` = the size the model was built for,
the project's input contract) and returns ``(scores [N], maps [N, S, S])`` as the official
``test_DRAEM.py`` (``draem_reference_v1.npz`` checks every step):

1. the channels are flipped to **BGR**: the official code reads images with ``cv2.imread`` and never
   converts them, so its networks were trained and tested on BGR in [0, 1] (:func:`rgb_to_bgr`);
2. ``rec = model(x)`` (reconstructive subnetwork), ``logits = model_seg(cat([rec, x]))``
   (discriminative subnetwork), :class:`~kdad.methods.draem.networks.DRAEMNetworks`;
3. map = ``softmax(logits)[:, 1]``, the anomaly probability per pixel (:func:`anomaly_probability`);
4. score = max of the map's 21x21 average pooling, stride 1, zero padding 10 counted in the mean
   (torch's ``count_include_pad=True``, Paddle's ``exclusive=False``): :func:`image_score`.

The map is not blurred (the official pixel metrics use it as is). No ImageNet backbone:
``backbone_name`` is ``"none"`` and there is no ``self.backbone``, so checkpoints hold every weight
(``networks.*``). ``forward`` has no numpy or data-dependent Python control flow
(``paddle.jit.to_static(full_graph=True)``; paddle2onnx 2.1.0 converts it).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import paddle
import paddle.nn.functional as F

from kdad.layers import image_max
from kdad.methods.base import AnomalyModel
from kdad.methods.draem.networks import (
    DISCRIMINATIVE_WIDTH,
    RECONSTRUCTIVE_WIDTH,
    DRAEMNetworks,
    check_size,
    official_init,
)

#: ``avg_pool2d(out_mask_sm[:, 1:], 21, stride=1, padding=21 // 2)`` of ``test_DRAEM.py``
SCORE_POOL = 21


def rgb_to_bgr(x: paddle.Tensor) -> paddle.Tensor:
    """Reverse the channel order of ``[N, 3, H, W]`` (RGB <-> BGR; it is its own inverse)."""
    return paddle.concat([x[:, 2:3], x[:, 1:2], x[:, 0:1]], axis=1)


def anomaly_probability(logits: paddle.Tensor) -> paddle.Tensor:
    """``softmax(logits, 1)[:, 1]``: ``[N, 2, H, W]`` -> ``[N, H, W]``."""
    return F.softmax(logits, axis=1)[:, 1]


def image_score(maps: paddle.Tensor) -> paddle.Tensor:
    """Max of the 21x21 mean (stride 1, padding 10, padded zeros counted) of ``[N, H, W]`` maps: ``[N]``."""
    pooled = F.avg_pool2d(maps.unsqueeze(1), SCORE_POOL, stride=1, padding=SCORE_POOL // 2, exclusive=False)
    return image_max(pooled.squeeze(1))


class DRAEMModel(AnomalyModel):
    """DRAEM scorer: ``networks`` = reconstructive ``model`` + discriminative ``model_seg`` (``base_widths``:
    the official 128 and 64, which :func:`build_model` always uses; narrower ones are for tests)."""

    method = "draem"
    backbone_name = "none"

    def __init__(self, image_size: int,
                 base_widths: Tuple[int, int] = (RECONSTRUCTIVE_WIDTH, DISCRIMINATIVE_WIDTH)) -> None:
        super().__init__()
        self.image_size = check_size(image_size)
        self.networks = DRAEMNetworks(self.image_size, base_widths)

    def describe(self) -> Dict[str, Any]:
        """What an export records about the network (no backbone; the official widths; BGR inside)."""
        return {"backbone": self.backbone_name, "pretrain": False, "layers": [],
                "base_widths": [int(self.networks.model.encoder.block1[0].weight.shape[0]),
                                int(self.networks.model_seg.encoder_segment.block1[0].weight.shape[0])],
                "channel_order": "RGB in, flipped to BGR inside (the official networks' order)"}

    def forward(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        height, width = x.shape[-2], x.shape[-1]
        for size in (height, width):
            if isinstance(size, int) and size > 0 and size != self.image_size:
                raise ValueError(f"this DRAEM model was built for {self.image_size} px; got input of "
                                 f"{height}x{width} px")
        rec, logits = self.networks(rgb_to_bgr(x))
        maps = anomaly_probability(logits)
        return image_score(maps), maps


def build_model(config: Mapping[str, Any]) -> DRAEMModel:
    """The untrained :class:`DRAEMModel` of ``config`` (``mvtec_img_size``, a multiple of 32; ``seed``:
    the official initialisation is drawn from it, so a config always gives the same network;
    ``draem_width``: the reconstructive base width, the discriminative one is half: paper 128 / 64)."""
    width = int(config.get("draem_width", RECONSTRUCTIVE_WIDTH) or RECONSTRUCTIVE_WIDTH)
    if width < 2 or width % 2:
        raise ValueError(f"draem_width must be an even number >= 2 (paper: {RECONSTRUCTIVE_WIDTH}), "
                         f"got {width}")
    with paddle.LazyGuard():  # every value is set by official_init: skip Paddle's own 97M random draws
        model = DRAEMModel(int(config["mvtec_img_size"]), (width, width // 2))
    official_init(model.networks, int(config["seed"]))
    return model
