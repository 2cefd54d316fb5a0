"""Paddle layers shared by the methods' exportable networks (in-graph post-processing).

Everything here runs inside the exported static graph, so Paddle Inference and onnxruntime give
the same maps as the dynamic model.
"""

from __future__ import annotations

import math
from typing import List

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


def nearest_indices(size_in: int, size_out: int) -> List[int]:
    """Source index of every output index of ``F.interpolate(mode="nearest")`` (torch's legacy
    nearest, Paddle's with align_corners False): ``floor(dst * in / out)`` in float32, clipped."""
    scale = np.float32(size_in) / np.float32(size_out)
    src = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, size_in - 1).tolist()


def bilinear_matrix(size_in: int, size_out: int, align_corners: bool = False) -> np.ndarray:
    """``[size_out, size_in]`` float32 matrix ``R`` with ``R @ v`` = 1-D linear interpolation of ``v``
    as ``F.interpolate(mode="bilinear", align_corners=...)``: half-pixel centres with clamped edges
    (False), or the end samples aligned (True, ``src = dst * (in - 1) / (out - 1)``)."""
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    if align_corners:
        src = np.arange(size_out) * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    else:
        src = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = src - low
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix.astype(np.float32)


class MatrixResize(nn.Layer):
    """Bilinear resampling of maps ``[N, h, w]`` -> ``[N, H, W]`` as two products with fixed
    interpolation matrices (:func:`bilinear_matrix`): the values of ``F.interpolate(mode="bilinear")``
    without an interpolation op, so the exported graph runs under oneDNN in Paddle Inference 3.3.1
    (its interpolation ops fail there)."""

    def __init__(self, size_in: tuple, size_out: tuple, align_corners: bool = False) -> None:
        super().__init__()
        self.size_in, self.size_out = tuple(size_in), tuple(size_out)
        self.rows = bilinear_matrix(self.size_in[0], self.size_out[0], align_corners).tolist()
        self.cols = bilinear_matrix(self.size_in[1], self.size_out[1], align_corners).tolist()

    def forward(self, maps: paddle.Tensor) -> paddle.Tensor:
        rows = paddle.to_tensor(self.rows, dtype=maps.dtype)  # [H, h]
        cols = paddle.to_tensor(self.cols, dtype=maps.dtype)  # [W, w]
        return paddle.matmul(paddle.matmul(rows, maps), cols, transpose_y=True)


def image_max(maps: paddle.Tensor) -> paddle.Tensor:
    """Per-image maximum of ``[N, H, W]`` maps: ``[N]`` (``paddle.max``: paddle2onnx 2.1.0 aborts on
    ``amax``)."""
    return paddle.max(maps.reshape([maps.shape[0], -1]), axis=1)
