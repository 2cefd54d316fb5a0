"""Per-position feature distance map: a fast, forward-only heatmap for deployment.

The map spreads the KDAD distance of :mod:`kdad.methods.kdad.loss` over positions instead of whole taps.
For every score tap ``t`` with cloner activation ``c_t`` and expert activation ``e_t``
(``[N, C_t, h_t, w_t]``, stride ``r_t = S / h_t``) and every position ``(i, j)``::

    d_t(i, j) = (1 - cos_C(c_t[:, :, i, j], e_t[:, :, i, j]))
                + lamda * mean_C((c_t[:, :, i, j] - e_t[:, :, i, j]) ** 2)

where ``cos_C`` is :func:`paddle.nn.functional.cosine_similarity` over the channel axis, the same
function (and the same ``eps``) the per-image distance uses over the flattened tap, and
``direction_only`` drops the MSE term as there. The map is ``sum_t up_{r_t}(d_t)``, where
``up_r`` is exact nearest (block) upsampling: cell ``(i, j)`` of a stride-``r`` tap fills the
``r x r`` input pixels ``[i*r, (i+1)*r) x [j*r, (j+1)*r)``. It is built from reshape and a
broadcast multiply by ones, so it is bit-exact and runs with oneDNN and in ONNX (``F.interpolate``
fails under oneDNN in Paddle 3.3.1).

Relation to the score: the spatial mean of a tap's MSE map is that tap's MSE term, while the cosine
is taken per position (the score takes it over the whole flattened tap), so the map is a
localisation of the score, not a decomposition of it. Blur (``blur_sigma``) is applied outside the
graph, as for gradient maps, with :func:`kdad.postprocess.blur`.
"""

from __future__ import annotations

from typing import Sequence

import paddle

from kdad.methods.kdad.loss import cosine_mse_distance


def upsample_blocks(maps: paddle.Tensor, size: int) -> paddle.Tensor:
    """Exact nearest upsampling ``[N, h, w] -> [N, size, size]`` (``size`` a multiple of ``h``, ``w``)."""
    height, width = int(maps.shape[-2]), int(maps.shape[-1])
    if size % height or size % width or size // height != size // width:
        raise ValueError(f"cannot upsample a {height}x{width} map to {size}x{size} by whole blocks")
    ratio = size // height
    if ratio == 1:
        return maps
    ones = paddle.ones([1, 1, ratio, 1, ratio], dtype=maps.dtype)
    blocks = paddle.unsqueeze(maps, [2, 4]) * ones  # [N, h, r, w, r]
    return paddle.reshape(blocks, [-1, size, size])


def tap_distance_map(cloner: paddle.Tensor, expert: paddle.Tensor, lamda: float,
                     direction_only: bool = False) -> paddle.Tensor:
    """``(1 - cos) + lamda * MSE`` over channels at each position: ``[N, C, h, w] -> [N, h, w]``."""
    return cosine_mse_distance(cloner, expert, lamda, direction_only)


def feature_distance_map(
    cloner_feats: Sequence[paddle.Tensor],
    expert_feats: Sequence[paddle.Tensor],
    taps: Sequence[int],
    lamda: float,
    direction_only: bool,
    size: int,
) -> paddle.Tensor:
    """Sum over ``taps`` of the block-upsampled per-position distances, ``[N, size, size]``."""
    total = None
    for tap in taps:
        term = upsample_blocks(tap_distance_map(cloner_feats[tap], expert_feats[tap], lamda,
                                                direction_only), size)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("taps must name at least one feature level")
    return total
