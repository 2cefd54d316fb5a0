"""CFlow-AD's conditional normalising flows: FrEIA's ``AllInOneBlock`` and ``SequenceINN`` in Paddle.

Faithful to FrEIA @ cc5cf5eb (github vislearn/FrEIA: ``modules/all_in_one_block.py``,
``framework/sequence_inn.py``) as CFlow-AD's ``freia_cflow_head`` (github gudovskiy/cflow-ad @ b2ebf9e,
``model.py``) builds it: ``AllInOneBlock(cond=0, cond_shape=(128,), subnet_constructor=subnet_fc,
affine_clamping=1.9, global_affine_type='SOFTPLUS', permute_soft=True)`` on feature vectors ("fibers").
``cflow_reference_v1.npz`` checks it. One block on fibers ``x [..., C]`` with condition ``c [..., P]``:

* split ``x1 = x[..., :C - C//2]``, ``x2 = x[..., C - C//2:]``; ``a = 0.1 * subnet(cat(x1, c))``;
* affine coupling with soft clamping: ``s = clamp * tanh(a[..., :C//2])``,
  ``x2 = x2 * exp(s) + a[..., C//2:]``, log-determinant ``sum(s)``;
* global affine (``SOFTPLUS``): ``g = 0.1 * softplus(global_scale, beta=0.5)`` (torch's threshold 20), then
  the soft permutation ``x = (cat(x1, x2) * g + global_offset) @ w_perm^T``, log-determinant ``+ sum(log g)``.

The inverse runs the same steps backwards with ``w_perm_inv`` (= ``w_perm^T``). ``w_perm`` and
``w_perm_inv`` are fixed buffers (FrEIA: parameters with ``requires_grad=False``); ``global_scale``,
``global_offset`` and the subnet are trained. Names equal FrEIA's ``state_dict`` keys
(``module_list.{k}.global_scale``, ``...w_perm``, ``...subnet.0.weight``); only the ``Linear`` weights are
stored transposed (Paddle ``[in, out]``, torch ``[out, in]``). Fibers may have any leading dimensions
(``[n, C]`` in training, ``[N, H*W, C]`` in the exported model). Initialisation as FrEIA and torch:
``global_scale`` such that ``g = 1``, ``global_offset = 0``, ``w_perm`` a random rotation
(``scipy.stats.special_ortho_group``, drawn from a seeded numpy generator instead of numpy's global one),
``Linear`` layers uniform in ``+-1/sqrt(fan_in)`` (torch's default).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn

#: CFlow-AD's settings (``main.py``: ``clamp_alpha``, ``condition_vec``; ``config.py``: ``coupling_blocks``)
CLAMP_ALPHA = 1.9
CONDITION_VEC = 128
COUPLING_BLOCKS = 8
#: FrEIA's ``SOFTPLUS`` global affine: ``0.1 * Softplus(beta=0.5)`` (torch's threshold 20)
GLOBAL_SCALE_FACTOR = 0.1
SOFTPLUS_BETA = 0.5
SOFTPLUS_THRESHOLD = 20.0
#: FrEIA scales the subnet's output by 0.1 before the coupling
COUPLING_SCALE = 0.1


def global_scale_init(global_affine_init: float = 1.0) -> float:
    """FrEIA's initial ``global_scale`` (pre-activation) for which ``g = global_affine_init``."""
    return 2.0 * math.log(math.exp(0.5 * 10.0 * global_affine_init) - 1.0)


def softplus(a: paddle.Tensor, beta: float, threshold: float) -> paddle.Tensor:
    """torch's ``Softplus(beta, threshold)``: ``log1p(exp(beta * a)) / beta``, ``a`` where ``beta * a >
    threshold``. Written out because paddle2onnx 2.1.0 refuses Paddle's ``softplus`` op (any attributes)."""
    scaled = beta * a
    return paddle.where(scaled > threshold, a, paddle.log1p(paddle.exp(scaled)) / beta)


def _torch_linear(in_features: int, out_features: int) -> nn.Linear:
    """``Linear`` with torch's default initialisation (weight and bias uniform in ``+-1/sqrt(in)``)."""
    bound = 1.0 / math.sqrt(in_features)
    init = nn.initializer.Uniform(-bound, bound)
    return nn.Linear(in_features, out_features, weight_attr=paddle.ParamAttr(initializer=init),
                     bias_attr=paddle.ParamAttr(initializer=nn.initializer.Uniform(-bound, bound)))


def subnet_fc(dims_in: int, dims_out: int) -> nn.Sequential:
    """CFlow-AD's ``subnet_fc``: ``Linear(d, 2d), ReLU, Linear(2d, dims_out)``."""
    return nn.Sequential(_torch_linear(dims_in, 2 * dims_in), nn.ReLU(), _torch_linear(2 * dims_in, dims_out))


def random_rotation(channels: int, rng: np.random.Generator) -> np.ndarray:
    """FrEIA's soft permutation: a random rotation (``special_ortho_group``), float64 ``[C, C]``."""
    from scipy.stats import special_ortho_group
    from threadpoolctl import threadpool_limits

    if channels == 1:
        return np.ones((1, 1))
    with threadpool_limits(1, "blas"):  # LAPACK's threads only fight each other on a busy machine
        return special_ortho_group.rvs(channels, random_state=rng)


class AllInOneBlock(nn.Layer):
    """One FrEIA ``AllInOneBlock`` (SOFTPLUS global affine, soft permutation, conditional coupling).

    ``rng`` draws ``w_perm``; ``None`` leaves it zero, for weights that are loaded right after."""

    def __init__(self, channels: int, condition_channels: int = CONDITION_VEC, clamp: float = CLAMP_ALPHA,
                 rng: Optional[np.random.Generator] = None) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"an AllInOneBlock needs at least 2 channels, got {channels}")
        self.channels = int(channels)
        self.condition_channels = int(condition_channels)
        self.splits = [self.channels - self.channels // 2, self.channels // 2]
        self.clamp = float(clamp)
        self.global_scale = self.create_parameter(
            [1, self.channels], default_initializer=nn.initializer.Constant(global_scale_init()))
        self.global_offset = self.create_parameter(
            [1, self.channels], default_initializer=nn.initializer.Constant(0.0))
        w = random_rotation(self.channels, rng) if rng is not None else np.zeros((self.channels,) * 2)
        dtype = paddle.get_default_dtype()  # that of the parameters
        self.register_buffer("w_perm", paddle.to_tensor(w, dtype=dtype), persistable=True)
        self.register_buffer("w_perm_inv", paddle.to_tensor(np.ascontiguousarray(w.T), dtype=dtype),
                             persistable=True)
        self.subnet = subnet_fc(self.splits[0] + self.condition_channels, 2 * self.splits[1])

    def scale(self) -> paddle.Tensor:
        """The global affine scale ``g = 0.1 * softplus(global_scale, beta=0.5)``, ``[1, C]``."""
        return GLOBAL_SCALE_FACTOR * softplus(self.global_scale, SOFTPLUS_BETA, SOFTPLUS_THRESHOLD)

    def coupling(self, x1: paddle.Tensor, c: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """``(s, t)`` of the affine coupling: ``s = clamp * tanh(a[:C//2])``, ``t = a[C//2:]``,
        ``a = 0.1 * subnet(cat(x1, c))``."""
        a = self.subnet(paddle.concat([x1, c], axis=-1)) * COUPLING_SCALE
        a_s, a_t = paddle.split(a, [self.splits[1], self.splits[1]], axis=-1)
        return self.clamp * paddle.tanh(a_s), a_t

    def forward(self, x: paddle.Tensor, c: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """``x [..., C]``, ``c [..., P]`` -> ``(y [..., C], log|det J| [...])``."""
        x1, x2 = paddle.split(x, self.splits, axis=-1)
        s, t = self.coupling(x1, c)
        x2 = x2 * paddle.exp(s) + t
        log_jac_det = paddle.sum(s, axis=-1)
        g = self.scale()
        y = paddle.matmul(paddle.concat([x1, x2], axis=-1) * g + self.global_offset, self.w_perm,
                          transpose_y=True)
        return y, log_jac_det + paddle.sum(paddle.log(g))

    def inverse(self, y: paddle.Tensor, c: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """FrEIA's ``rev=True``: ``y [..., C]`` -> ``(x [..., C], log|det J^-1| [...])``."""
        g = self.scale()
        x = (paddle.matmul(y, self.w_perm_inv, transpose_y=True) - self.global_offset) / g
        x1, x2 = paddle.split(x, self.splits, axis=-1)
        s, t = self.coupling(x1, c)
        x2 = (x2 - t) * paddle.exp(-s)
        return paddle.concat([x1, x2], axis=-1), -paddle.sum(s, axis=-1) - paddle.sum(paddle.log(g))


class ConditionalFlow(nn.Layer):
    """FrEIA's ``SequenceINN`` of ``blocks`` :class:`AllInOneBlock` (``module_list``), every block
    conditioned on the same ``c``; the log-determinants add up (``jac = j + jac``, as FrEIA)."""

    def __init__(self, channels: int, condition_channels: int = CONDITION_VEC, blocks: int = COUPLING_BLOCKS,
                 clamp: float = CLAMP_ALPHA, rng: Optional[np.random.Generator] = None) -> None:
        super().__init__()
        self.channels = int(channels)
        self.module_list = nn.LayerList([AllInOneBlock(channels, condition_channels, clamp, rng)
                                         for _ in range(int(blocks))])

    def forward(self, x: paddle.Tensor, c: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """``x [..., C]`` -> ``(z [..., C], log|det dz/dx| [...])``."""
        log_jac_det = None
        for block in self.module_list:
            x, j = block(x, c)
            log_jac_det = j if log_jac_det is None else j + log_jac_det
        return x, log_jac_det

    def inverse(self, z: paddle.Tensor, c: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """``z [..., C]`` -> ``(x [..., C], log|det dx/dz| [...])`` (the blocks in reverse order)."""
        log_jac_det = None
        for block in reversed(list(self.module_list)):
            z, j = block.inverse(z, c)
            log_jac_det = j if log_jac_det is None else j + log_jac_det
        return z, log_jac_det


class CFlowDecoders(nn.LayerList):
    """The official ``decoders`` list: one :class:`ConditionalFlow` per encoder tap (what CFlow-AD trains).

    ``forward(index, x, c)`` runs decoder ``index`` (so a data-parallel wrapper can call it)."""

    def __init__(self, channels: Sequence[int], condition_channels: int = CONDITION_VEC,
                 blocks: int = COUPLING_BLOCKS, clamp: float = CLAMP_ALPHA,
                 rng: Optional[np.random.Generator] = None) -> None:
        super().__init__([ConditionalFlow(int(c), condition_channels, blocks, clamp, rng) for c in channels])
        self.channels: List[int] = [int(c) for c in channels]
        self.condition_channels = int(condition_channels)

    def forward(self, index: int, x: paddle.Tensor, c: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        return self[index](x, c)
