"""The one definition of the KDAD distance between cloner and expert features.

Training loss, anomaly score, localization objective and the exported scorer all call
:func:`per_image_distance`; nothing else in the package re-states the formula.
"""

from __future__ import annotations

from typing import Sequence

import paddle
import paddle.nn.functional as F


def cosine_mse_distance(
    cloner: paddle.Tensor, expert: paddle.Tensor, lamda: float, direction_only: bool = False
) -> paddle.Tensor:
    """``(1 - cos) + lamda * MSE`` along axis 1 (the vectors compared); the KDAD term itself."""
    term = 1.0 - F.cosine_similarity(cloner, expert, axis=1)
    if not direction_only:
        term = term + lamda * paddle.mean(paddle.square(cloner - expert), axis=1)
    return term


def per_image_distance(
    cloner_feats: Sequence[paddle.Tensor],
    expert_feats: Sequence[paddle.Tensor],
    taps: Sequence[int],
    lamda: float,
    direction_only: bool = False,
) -> paddle.Tensor:
    """Sum over ``taps`` of ``(1 - cos) + lamda * MSE`` per image, shape ``[N]``.

    Each tap is flattened per image; the cosine is taken between the flattened cloner and
    expert activations and the MSE is the mean squared difference over that tap's elements.
    ``direction_only`` drops the MSE term (the paper's direction-only variant).
    """
    total = None
    for tap in taps:
        term = cosine_mse_distance(paddle.flatten(cloner_feats[tap], start_axis=1),
                                   paddle.flatten(expert_feats[tap], start_axis=1), lamda, direction_only)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("taps must name at least one feature level")
    return total


def training_loss(
    cloner_feats: Sequence[paddle.Tensor],
    expert_feats: Sequence[paddle.Tensor],
    taps: Sequence[int],
    lamda: float,
    direction_only: bool = False,
) -> paddle.Tensor:
    """Batch mean of :func:`per_image_distance` (equals the original's batch-mean terms)."""
    return paddle.mean(per_image_distance(cloner_feats, expert_feats, taps, lamda, direction_only))
