"""RD4AD's formulas (Deng & Li, CVPR 2022), one definition each, used by the loss and the map alike.

Faithful to the official code (github hq-deng/RD4AD @ 6554076), which ``rd4ad_reference_v1.npz`` checks:

* cosine similarity as torch's ``F.cosine_similarity`` (eps 1e-8): each vector divided by
  ``max(||v||, eps)`` first, then the dot product (robust to the huge activations of untrained
  networks, where ``||a||^2 * ||b||^2`` would overflow float32);
* ``main.py`` ``loss_fucntion``: per level, ``1 - cos`` of each image's *flattened* encoder and decoder
  maps (one cosine per image over C*H*W values, accumulated in float64: :data:`ACCUMULATE_DTYPE`),
  averaged over the batch, summed over the levels;
* ``test.py`` ``cal_anomaly_map``: per level ``1 - cos`` over channels at every position (the level map).
"""

from __future__ import annotations

from typing import List, Sequence

import paddle

#: torch ``F.cosine_similarity``'s eps: every norm is at least this
COSINE_EPS = 1e-8
#: the loss's per-image sums run over C*H*W values (1M for WRN50-2's layer1 at 256 px); Paddle 3.3.1's CPU
#: ``sum`` accumulates them in float32 one after another (relative error 9e-5 measured on 1M positive
#: values; torch's cascade sum: 1e-7), so the loss's cosines are computed in float64, the loss returned in
#: the features' dtype. The level maps sum over channels only (<= 1024 values) and stay in float32.
ACCUMULATE_DTYPE = "float64"


def cosine_similarity(a: paddle.Tensor, b: paddle.Tensor, axis: int) -> paddle.Tensor:
    """``sum(a / max(||a||, eps) * b / max(||b||, eps))`` along ``axis`` (torch's formula)."""
    def unit(v: paddle.Tensor) -> paddle.Tensor:
        squared = paddle.sum(v * v, axis=axis, keepdim=True)
        return v / paddle.sqrt(paddle.clip(squared, min=COSINE_EPS * COSINE_EPS))

    return paddle.sum(unit(a) * unit(b), axis=axis)


def level_map(teacher: paddle.Tensor, student: paddle.Tensor) -> paddle.Tensor:
    """One level's anomaly map: ``1 - cos`` over channels, ``[N, C, H, W]`` x2 -> ``[N, H, W]``."""
    return 1.0 - cosine_similarity(teacher, student, axis=1)


def loss_terms(teacher: Sequence[paddle.Tensor], student: Sequence[paddle.Tensor]) -> List[paddle.Tensor]:
    """Per level: the batch mean of ``1 - cos(flattened teacher map, flattened student map)``."""
    if len(teacher) != len(student) or not teacher:
        raise ValueError(f"RD4AD's loss needs the same number (>= 1) of encoder and decoder levels, "
                         f"got {len(teacher)} and {len(student)}")
    terms = []
    for t, s in zip(teacher, student):
        flat_t = t.reshape([t.shape[0], -1]).astype(ACCUMULATE_DTYPE)
        flat_s = s.reshape([s.shape[0], -1]).astype(ACCUMULATE_DTYPE)
        terms.append(paddle.mean(1.0 - cosine_similarity(flat_t, flat_s, axis=1)).astype(t.dtype))
    return terms


def rd4ad_loss(teacher: Sequence[paddle.Tensor], student: Sequence[paddle.Tensor]) -> paddle.Tensor:
    """The training loss (``loss_fucntion``): the sum of :func:`loss_terms`."""
    terms = loss_terms(teacher, student)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
