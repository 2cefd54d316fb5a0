"""CFlow-AD's formulas, one definition each: positional encoding, fibers, log-likelihood, loss.

Faithful to the official code (github gudovskiy/cflow-ad @ b2ebf9e), which ``cflow_reference_v1.npz``
checks:

* ``model.py`` ``positionalencoding2d(D, H, W)``: channels ``0..D/2-1`` encode the column (even: sin,
  odd: cos), channels ``D/2..D-1`` the row, with frequencies ``exp(-2i * ln(1e4) / (D/2))``
  (:func:`positionalencoding2d`);
* ``train.py``: fibers ordered (image, row, column), ``e.reshape(B, C, H*W).transpose(1, 2)``, the
  condition arranged the same way (:func:`fibers`);
* ``utils.py`` ``get_logp(C, z, logdet) = C * log(1 / sqrt(2 pi)) - 0.5 * sum(z**2) + logdet``; the
  per-dimension log-likelihood ``log_prob = logp / C`` (:func:`log_likelihood`);
* the loss of a fiber ``-logsigmoid(log_prob)`` (:func:`nll`), averaged over a fiber batch.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F

#: ``utils._GCONST_`` = ln(1 / sqrt(2 pi))
GCONST = -0.9189385332046727


def positionalencoding2d(channels: int, height: int, width: int) -> np.ndarray:
    """The official ``positionalencoding2d(D, H, W)``: float32 ``[D, H, W]`` (D a multiple of 4), with
    torch's float32 steps (frequencies, products, sin/cos each rounded to float32). torch's vectorised
    ``exp`` puts a few frequencies one float32 ulp away from numpy's; times positions up to 31 that moves
    the 32x32 encoding by up to 9.5e-7 (the golden tolerance is 1e-6; float64 steps would give 1.1e-6)."""
    if channels % 4 != 0:
        raise ValueError(f"the sin/cos positional encoding needs a multiple of 4 channels, got {channels}")
    half = channels // 2
    div_term = np.exp(np.arange(0.0, half, 2, dtype=np.float32) * np.float32(-(math.log(1e4) / half)))
    pos_w = np.arange(0.0, width, dtype=np.float32)[:, None] * div_term  # [W, D/4], float32 products
    pos_h = np.arange(0.0, height, dtype=np.float32)[:, None] * div_term
    out = np.zeros((channels, height, width), dtype=np.float32)
    out[0:half:2] = np.sin(pos_w).T[:, None, :]
    out[1:half:2] = np.cos(pos_w).T[:, None, :]
    out[half::2] = np.sin(pos_h).T[:, :, None]
    out[half + 1::2] = np.cos(pos_h).T[:, :, None]
    return out


def fibers(features: paddle.Tensor) -> paddle.Tensor:
    """``[B, C, H, W]`` -> ``[B*H*W, C]``, ordered (image, row, column)."""
    return features.flatten(2).transpose([0, 2, 1]).reshape([-1, features.shape[1]])


def get_logp(channels: int, z: paddle.Tensor, log_jac_det: paddle.Tensor) -> paddle.Tensor:
    """The official ``get_logp``: log-density of ``x`` under the flow with a standard normal base."""
    return channels * GCONST - 0.5 * paddle.sum(z ** 2, axis=-1) + log_jac_det


def log_likelihood(z: paddle.Tensor, log_jac_det: paddle.Tensor) -> paddle.Tensor:
    """``log_prob = get_logp(C, z, logdet) / C``: the log-likelihood per dimension of every fiber."""
    channels = int(z.shape[-1])
    return get_logp(channels, z, log_jac_det) / channels


def nll(log_prob: paddle.Tensor) -> paddle.Tensor:
    """The loss of every fiber, ``-logsigmoid(log_prob)`` (``train_meta_epoch``)."""
    return -F.log_sigmoid(log_prob)
