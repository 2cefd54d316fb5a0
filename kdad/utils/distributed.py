"""Collective helpers for data-parallel training (``python -m paddle.distributed.launch``).

Every function is a no-op (or the local answer) in a single process. The trainer wraps a student in
``paddle.DataParallel``; a method whose optimiser steps do not fit that wrapper (CFlow-AD: several
forwards of different flows per backward, flows without a fiber batch in a step) averages its own
gradients with :func:`average_gradients` and agrees with the other ranks on how many steps to take.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Sequence

import paddle
import paddle.distributed as dist


def world_size() -> int:
    return int(dist.get_world_size())


def all_finite(value: float) -> bool:
    """Whether ``value`` is finite on every rank (all ranks stop together)."""
    bad = 0.0 if math.isfinite(value) else 1.0
    if world_size() > 1:
        flag = paddle.to_tensor([bad], dtype="float32")
        dist.all_reduce(flag)
        bad = float(flag.numpy().ravel()[0])
    return bad == 0.0


def agreed_minimum(values: Sequence[int]) -> List[int]:
    """Element-wise minimum of ``values`` over the ranks (e.g. the steps every rank can take)."""
    if world_size() <= 1:
        return [int(v) for v in values]
    tensor = paddle.to_tensor([int(v) for v in values], dtype="int64")
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return [int(v) for v in tensor.numpy().ravel()]


def average_gradients(parameters: Iterable[paddle.Tensor]) -> None:
    """Replace each gradient by its mean over the ranks (parameters without a gradient are skipped:
    every rank must have the same ones)."""
    size = world_size()
    if size <= 1:
        return
    for parameter in parameters:
        grad = parameter.grad
        if grad is None:
            continue
        dist.all_reduce(grad)  # in place: the sum over the ranks
        with paddle.no_grad():
            grad.scale_(1.0 / size)


def broadcast_parameters(layer: paddle.nn.Layer) -> None:
    """Give every rank rank 0's parameters and buffers (what ``paddle.DataParallel`` does on wrapping)."""
    if world_size() <= 1:
        return
    for tensor in list(layer.parameters()) + list(layer.buffers()):
        dist.broadcast(tensor, src=0)
