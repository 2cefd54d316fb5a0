"""DRAEM's training loss, as the official ``loss.py`` and ``train_DRAEM.py`` (github VitjanZ/DRAEM @ 2dbf673).

``loss = MSE(rec, x) + (1 - SSIM(rec, x)) + focal(softmax(logits), mask)`` (:func:`loss_terms`), where

* :func:`ssim` is the official ``loss.ssim`` as ``SSIM()`` calls it: a Gaussian window of 11 taps with
  sigma 1.5 (float32, normalised), applied per channel (depthwise) with **zero padding 5**, constants
  ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with the range ``L`` picked from the data of the *first*
  argument (:func:`ssim_range`: ``max_val`` 255 if ``max > 128`` else 1, ``min_val`` -1 if
  ``min < -0.5`` else 0) and the mean of the SSIM map over batch, channels and pixels;
* :func:`focal_loss` is the official ``FocalLoss()`` (gamma 2, alpha 1 for every class, smooth 1e-5) on
  the softmax output: the one-hot target clamped to ``[smooth / (C - 1), 1 - smooth]``,
  ``pt = sum_c(onehot * p) + smooth``, ``-(1 - pt)^gamma log(pt)``, mean over pixels;
* :func:`l2_loss` is ``torch.nn.MSELoss()`` (mean of squared differences).

Every mean is accumulated in float64 (:func:`mean`), as accurate as torch's float32 reductions.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import paddle
import paddle.nn.functional as F

#: ``SSIM()``'s window: 11 taps (``window_size``), sigma 1.5 (``create_window``)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
#: ``FocalLoss()``'s defaults
FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5


def mean(t: paddle.Tensor) -> paddle.Tensor:
    """The mean of all elements, accumulated in float64 and returned in ``t``'s dtype: Paddle 3.3.1's
    float32 ``mean`` of the ~1.5M values of a 256-px batch is off by ~2e-4 relative (the golden
    ``evalmode_loss_l2``), where torch's pairwise float32 sum is accurate to ~1e-7."""
    return t.astype("float64").mean().astype(t.dtype)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The official ``create_window``: a float32 1-D Gaussian normalised to sum 1, its outer product."""
    taps = np.exp(-((np.arange(size) - size // 2) ** 2) / (2.0 * sigma ** 2)).astype(np.float32)
    taps = taps / taps.sum()
    return np.outer(taps, taps).astype(np.float32)


def ssim_range(img1: paddle.Tensor) -> paddle.Tensor:
    """The official data-dependent dynamic range ``L = max_val - min_val`` of ``img1`` (a scalar tensor)."""
    max_val = paddle.where(paddle.max(img1) > 128, paddle.full([], 255.0), paddle.full([], 1.0))
    min_val = paddle.where(paddle.min(img1) < -0.5, paddle.full([], -1.0), paddle.full([], 0.0))
    return (max_val - min_val).astype(img1.dtype)


def ssim_map(img1: paddle.Tensor, img2: paddle.Tensor, window_size: int = SSIM_WINDOW) -> paddle.Tensor:
    """The official SSIM map ``[N, C, H, W]`` of two ``[N, C, H, W]`` batches (zero padding)."""
    channels = int(img1.shape[1])
    window = paddle.to_tensor(gaussian_window(window_size), dtype=img1.dtype)
    window = window.reshape([1, 1, window_size, window_size]).expand([channels, 1, window_size, window_size])
    pad = window_size // 2

    def blur(t: paddle.Tensor) -> paddle.Tensor:
        return F.conv2d(t, window, padding=pad, groups=channels)

    mu1, mu2 = blur(img1), blur(img2)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = blur(img1 * img1) - mu1_sq
    sigma2_sq = blur(img2 * img2) - mu2_sq
    sigma12 = blur(img1 * img2) - mu1_mu2
    big_l = ssim_range(img1)
    c1 = (0.01 * big_l) ** 2
    c2 = (0.03 * big_l) ** 2
    v1 = 2.0 * sigma12 + c2
    v2 = sigma1_sq + sigma2_sq + c2
    return ((2 * mu1_mu2 + c1) * v1) / ((mu1_sq + mu2_sq + c1) * v2)


def ssim(img1: paddle.Tensor, img2: paddle.Tensor, window_size: int = SSIM_WINDOW) -> paddle.Tensor:
    """Mean SSIM of ``[N, C, H, W]`` batches (the official ``ssim(img1, img2, size_average=True)``)."""
    return mean(ssim_map(img1, img2, window_size))


def ssim_loss(rec: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
    """``SSIM()(rec, target)`` = ``1 - ssim(rec, target)`` (the range comes from ``rec``)."""
    return 1.0 - ssim(rec, target)


def focal_loss(probs: paddle.Tensor, target: paddle.Tensor, gamma: float = FOCAL_GAMMA,
               smooth: float = FOCAL_SMOOTH) -> paddle.Tensor:
    """``FocalLoss()(probs, target)``: ``probs`` ``[N, C, H, W]`` (softmax output), ``target``
    ``[N, 1, H, W]`` class indices as floats (truncated, as ``.long()``); alpha 1 for every class."""
    num_class = int(probs.shape[1])
    index = target.squeeze(1).astype("int64")
    one_hot = F.one_hot(index, num_class).transpose([0, 3, 1, 2]).astype(probs.dtype)
    one_hot = paddle.clip(one_hot, smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot * probs).sum(axis=1) + smooth
    return mean(-paddle.pow(1.0 - pt, gamma) * paddle.log(pt))


def l2_loss(rec: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
    """``MSELoss()(rec, target)``."""
    return mean((rec - target) ** 2)


def loss_terms(rec: paddle.Tensor, target: paddle.Tensor, logits: paddle.Tensor,
               mask: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """``(l2, ssim, focal)`` of ``train_DRAEM.py``: the reconstruction ``rec`` of the augmented input
    against the clean ``target``, the mask ``logits`` (softmax inside) against the 0/1 ``mask``."""
    return l2_loss(rec, target), ssim_loss(rec, target), focal_loss(F.softmax(logits, axis=1), mask)


def draem_loss(rec: paddle.Tensor, target: paddle.Tensor, logits: paddle.Tensor,
               mask: paddle.Tensor) -> paddle.Tensor:
    """``l2 + ssim + focal`` (:func:`loss_terms`)."""
    l2, structural, focal = loss_terms(rec, target, logits, mask)
    return l2 + structural + focal
