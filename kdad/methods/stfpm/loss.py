"""STFPM's formulas (Wang et al., BMVC 2021), one definition each, used by the loss and the map alike.

Faithful to the official code (github gdwang08/STFPM @ 2598a5e, ``main.py``: ``train_val()`` and
``test()``), which is what ``stfpm_reference_v1.npz`` checks:

* features are L2-normalised along channels, ``F.normalize(f, dim=1)`` (eps 1e-12);
* the per-position distance of a layer is the sum over channels of ``(t^ - s^)^2``. The paper writes
  ``0.5 * ||t^ - s^||^2`` for the map and ``1 / (2wh)`` for the loss; the code has no 1/2 in either,
  and the code is followed (the factor only rescales the loss, i.e. the effective learning rate of
  SGD, and the map, not its ranking);
* the training loss is the sum over layers of the mean over ``(N, H, W)`` of that distance.
"""

from __future__ import annotations

from typing import Sequence

import paddle
import paddle.nn.functional as F

#: ``F.normalize``'s eps (torch's and Paddle's default): ``f / max(||f||, eps)``
NORMALIZE_EPS = 1e-12


def normalize_channels(features: paddle.Tensor) -> paddle.Tensor:
    """``[N, C, H, W]`` divided by its L2 norm over channels (at least :data:`NORMALIZE_EPS`)."""
    return F.normalize(features, p=2, axis=1, epsilon=NORMALIZE_EPS)


def layer_distance(teacher: paddle.Tensor, student: paddle.Tensor) -> paddle.Tensor:
    """STFPM's per-position distance of one layer, ``sum_c (t^ - s^)^2``: two ``[N, C, H, W]`` ->
    ``[N, H, W]``."""
    diff = normalize_channels(teacher) - normalize_channels(student)
    return paddle.sum(diff * diff, axis=1)


def stfpm_loss(teacher: Sequence[paddle.Tensor], student: Sequence[paddle.Tensor]) -> paddle.Tensor:
    """The training loss: sum over the paired layers of the mean over ``(N, H, W)`` of
    :func:`layer_distance`."""
    if len(teacher) != len(student) or not teacher:
        raise ValueError(f"STFPM loss needs the same number (>= 1) of teacher and student layers, "
                         f"got {len(teacher)} and {len(student)}")
    total = paddle.mean(layer_distance(teacher[0], student[0]))
    for t, s in zip(teacher[1:], student[1:]):
        total = total + paddle.mean(layer_distance(t, s))
    return total
