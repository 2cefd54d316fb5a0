"""What every backbone is: a frozen feature extractor with named taps.

A :class:`Backbone` takes RGB images scaled to [0, 1] (``[N, 3, H, W]``), applies its own input
normalisation inside ``forward`` (so exported models take the same input whatever the backbone)
and returns ``{tap name: activation}`` for the taps it was built with. Every backbone names its
stage outputs ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32), so a method asks for ``layer2`` and
``layer3`` whatever the network; backbones may offer more taps (:attr:`Backbone.available_taps`).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import paddle
import paddle.nn as nn

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


class InputNormalize(nn.Layer):
    """``(x - mean) / std`` per channel for [0, 1] RGB input (constants, not parameters)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean_values = [float(v) for v in mean]
        self.std_values = [float(v) for v in std]

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        mean = paddle.to_tensor(self.mean_values, dtype=x.dtype).reshape([1, -1, 1, 1])
        std = paddle.to_tensor(self.std_values, dtype=x.dtype).reshape([1, -1, 1, 1])
        return (x - mean) / std


class Backbone(nn.Layer):
    """Base class. Subclasses set :attr:`name`, :attr:`taps` and the geometry tables and implement
    :meth:`extract` (normalised input -> all requested taps)."""

    name: str = ""
    #: tap name -> (channels, stride) for every tap the network offers
    geometry: Dict[str, Tuple[int, int]] = {}

    def __init__(self, taps: Sequence[str]) -> None:
        super().__init__()
        unknown = [tap for tap in taps if tap not in self.geometry]
        if unknown:
            raise ValueError(f"backbone '{self.name}' has no tap(s) {unknown}; "
                             f"available: {sorted(self.geometry)}")
        if not taps:
            raise ValueError(f"backbone '{self.name}': at least one tap is needed")
        self.taps: List[str] = list(taps)

    @property
    def available_taps(self) -> List[str]:
        return sorted(self.geometry)

    def channels(self, tap: str) -> int:
        return self.geometry[tap][0]

    def stride(self, tap: str) -> int:
        return self.geometry[tap][1]

    def freeze(self) -> Backbone:
        """Eval mode and no gradients for the parameters (d/dx still works)."""
        for param in self.parameters():
            param.stop_gradient = True
        self.eval()
        return self

    def forward(self, x: paddle.Tensor) -> Dict[str, paddle.Tensor]:
        return self.extract(x)

    def extract(self, x: paddle.Tensor) -> Dict[str, paddle.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
