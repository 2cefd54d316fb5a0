"""Paddle layers shared by the methods' exportable networks (in-graph post-processing).

Everything here runs inside the exported static graph, so Paddle Inference and onnxruntime give
the same maps as the dynamic model.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

BLUR_MODES = ("reflect", "symmetric")


def gaussian_kernel_1d(sigma: float, radius: int) -> np.ndarray:
    """Normalised 1-D Gaussian of ``2 * radius + 1`` taps."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def blur_radius(sigma: float) -> int:
    """``int(4 * sigma + 0.5)``: the radius of scipy's ``gaussian_filter`` (truncate 4) and of
    anomalib's blur (kernel ``2 * int(4 * sigma + 0.5) + 1``)."""
    return int(4.0 * float(sigma) + 0.5)


def _symmetric_pad(x: paddle.Tensor, pad: int, axis: int) -> paddle.Tensor:
    """Half-sample symmetric padding (``d c b a | a b c d``, scipy's ``reflect``) along ``axis``."""
    size = x.shape[axis]
    if pad > size:
        raise ValueError(f"symmetric blur padding {pad} exceeds the map size {size}")
    head = paddle.flip(paddle.slice(x, [axis], [0], [pad]), [axis])
    tail = paddle.flip(paddle.slice(x, [axis], [size - pad], [size]), [axis])
    return paddle.concat([head, x, tail], axis=axis)


class GaussianBlur2D(nn.Layer):
    """Separable Gaussian blur of maps ``[N, H, W]`` (returns the same shape).

    ``mode="reflect"``: whole-sample reflection (``d c b | a b c d``), kornia's and torch's
    ``reflect``, which anomalib's PaDiM/PatchCore use; ``mode="symmetric"``: half-sample symmetric,
    ``scipy.ndimage.gaussian_filter``'s default, which RD4AD and KDAD use. ``sigma <= 0``: identity.
    """

    def __init__(self, sigma: float, mode: str = "reflect") -> None:
        super().__init__()
        if mode not in BLUR_MODES:
            raise ValueError(f"blur mode must be one of {BLUR_MODES}, got {mode!r}")
        self.sigma = float(sigma)
        self.mode = mode
        self.radius = blur_radius(self.sigma) if self.sigma > 0 else 0
        self.kernel_values = (gaussian_kernel_1d(self.sigma, self.radius).tolist()
                              if self.sigma > 0 else [1.0])

    def forward(self, maps: paddle.Tensor) -> paddle.Tensor:
        if self.sigma <= 0 or math.isclose(self.sigma, 0.0):
            return maps
        r = self.radius
        x = maps.unsqueeze(1)
        k = paddle.to_tensor(self.kernel_values, dtype=maps.dtype)
        if self.mode == "reflect":
            x = F.pad(x, [r, r, r, r], mode="reflect")
        else:
            x = _symmetric_pad(_symmetric_pad(x, r, 2), r, 3)
        x = F.conv2d(x, k.reshape([1, 1, -1, 1]))
        x = F.conv2d(x, k.reshape([1, 1, 1, -1]))
        return x.squeeze(1)


def resize_maps(maps: paddle.Tensor, size: int, mode: str = "bilinear",
                align_corners: bool = False) -> paddle.Tensor:
    """``[N, h, w]`` -> ``[N, size, size]`` by ``F.interpolate``."""
    x = maps.unsqueeze(1)
    if mode == "nearest":
        x = F.interpolate(x, size=[size, size], mode="nearest")
    else:
        x = F.interpolate(x, size=[size, size], mode=mode, align_corners=align_corners)
    return x.squeeze(1)


def image_max(maps: paddle.Tensor) -> paddle.Tensor:
    """Per-image maximum of ``[N, H, W]`` maps: ``[N]`` (``paddle.max``: paddle2onnx 2.1.0 aborts on
    ``amax``)."""
    return paddle.max(maps.reshape([maps.shape[0], -1]), axis=1)
