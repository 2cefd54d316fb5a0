"""DRAEM's two U-Net-like subnetworks, as the official ``model_unet.py`` (github VitjanZ/DRAEM @ 2dbf673).

* :class:`ReconstructiveSubNetwork` (base width 128): an encoder of five double-conv blocks (widths
  1, 2, 4, 8, 8 x base; 2x2 max pooling between them) and a decoder without skip connections (four
  bilinear-2x-upsample + conv stages, each followed by a double conv, then a 3x3 output conv).
* :class:`DiscriminativeSubNetwork` (base width 64): an encoder of six double-conv blocks (widths 1, 2,
  4, 8, 8, 8 x base) and a decoder whose five upsampling stages each concatenate the encoder block of
  the same resolution (U-Net skips), then a 3x3 output conv with 2 channels (the mask logits).

Every conv is 3x3 with padding 1 and a bias; every BatchNorm is followed by ReLU. The sublayers carry the
official attribute names and ``nn.Sequential`` positions, so the state-dict keys map 1:1 onto the
official ones (:func:`official_to_paddle_key`): :class:`DRAEMNetworks` holds the official variables
``model`` and ``model_seg``, so the official ``model.encoder.block1.0.weight`` is
``model.encoder.block1.0.weight`` here (``networks.model.encoder.block1.0.weight`` in a
:class:`~kdad.methods.draem.model.DRAEMModel` checkpoint), with the same OIHW layout; BatchNorm
``running_mean`` / ``running_var`` are Paddle's ``_mean`` / ``_variance`` (298 keys, torch's
``num_batches_tracked`` aside). In the official
``nn.Sequential``\\ s the positions of ReLU, max-pooling and upsampling layers hold no parameters, exactly
as here. The official forward applies ``mp3`` where ``mp2`` would be expected; every max-pooling layer
is the same parameter-free ``MaxPool2d(2)``, so this changes nothing.

The official upsampling is ``nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)``. Here it
is :class:`BilinearUpsample2x`: the same values as two 2-D matrix products with a fixed interpolation
matrix (:func:`kdad.layers.bilinear_matrix`), so the exported graph has no interpolation op (those fail
under oneDNN in Paddle Inference 3.3.1). The products are taken on 2-D reshapes of the feature map:
Paddle Inference 3.3.1 with oneDNN computes a ``matmul`` of a 4-D convolution output with a constant
matrix wrongly (relative errors ~1; :class:`~kdad.layers.MatrixResize`'s form, fine on the 3-D maps
other methods give it). The matrices depend on the feature-map size, so the networks are built for one
input size ``S`` (a multiple of 32: the discriminative encoder halves five times).

BatchNorm layers follow torch's running-variance update
(:func:`kdad.batchnorm.use_unbiased_running_variance`).
Initialisation is the official ``weights_init`` (:func:`official_init`).
"""

from __future__ import annotations

from typing import List, Mapping, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from kdad.batchnorm import use_unbiased_running_variance
from kdad.layers import bilinear_matrix

#: the official base widths (``ReconstructiveSubNetwork(base_width=128)``,
#: ``DiscriminativeSubNetwork(base_channels=64)``)
RECONSTRUCTIVE_WIDTH = 128
DISCRIMINATIVE_WIDTH = 64
#: number of 2x poolings of the deeper (discriminative) encoder: the input size must be a multiple of 2**5
DEPTH = 5
#: official ``torch`` BatchNorm buffer names -> Paddle's
BN_RENAME = {"running_mean": "_mean", "running_var": "_variance"}


def check_size(image_size: int) -> int:
    """``image_size`` as an int; a clear error unless it is a positive multiple of 32."""
    size = int(image_size)
    if size <= 0 or size % 2 ** DEPTH:
        raise ValueError(f"DRAEM needs an input size that is a multiple of {2 ** DEPTH} (its discriminative "
                         f"encoder halves the resolution {DEPTH} times), got {image_size}")
    return size


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2D:
    """``nn.Conv2d(in, out, kernel_size=3, padding=1)`` (with bias), as every official conv."""
    return nn.Conv2D(in_channels, out_channels, kernel_size=3, padding=1)


def double_conv(in_channels: int, out_channels: int, mid_channels: int = 0) -> nn.Sequential:
    """``[conv, BN, ReLU, conv, BN, ReLU]`` (positions 0..5; parameters at 0, 1, 3, 4)."""
    mid = mid_channels or out_channels
    return nn.Sequential(conv3x3(in_channels, mid), nn.BatchNorm2D(mid), nn.ReLU(),
                         conv3x3(mid, out_channels), nn.BatchNorm2D(out_channels), nn.ReLU())


class BilinearUpsample2x(nn.Layer):
    """``nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)`` of ``[N, C, s, s]`` maps (``s``
    fixed at construction) as two products with the ``[s, 2s]`` interpolation matrix on 2-D reshapes:
    along the width, then (transposed) along the height."""

    def __init__(self, size_in: int) -> None:
        super().__init__()
        self.size_in = int(size_in)
        self.matrix = bilinear_matrix(self.size_in, 2 * self.size_in, align_corners=True).T.tolist()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        s, channels = self.size_in, x.shape[1]
        matrix = paddle.to_tensor(self.matrix, dtype=x.dtype)  # [s, 2s]
        wide = paddle.matmul(x.reshape([-1, s]), matrix).reshape([-1, channels, s, 2 * s])
        tall = paddle.matmul(wide.transpose([0, 1, 3, 2]).reshape([-1, s]), matrix)
        return tall.reshape([-1, channels, 2 * s, 2 * s]).transpose([0, 1, 3, 2])


def up_block(in_channels: int, out_channels: int, size_in: int) -> nn.Sequential:
    """``[Upsample(2x, bilinear, align_corners=True), conv, BN, ReLU]`` (parameters at 1, 2) for maps of
    ``size_in`` x ``size_in``."""
    return nn.Sequential(BilinearUpsample2x(size_in), conv3x3(in_channels, out_channels),
                         nn.BatchNorm2D(out_channels), nn.ReLU())


class Encoder(nn.Layer):
    """``block1`` .. ``block<n>`` with 2x2 max pooling between them; returns every block's output
    (the official ``EncoderReconstructive`` with ``widths`` 1,2,4,8,8 and ``EncoderDiscriminative`` with
    1,2,4,8,8,8 times the base width)."""

    def __init__(self, in_channels: int, widths: List[int]) -> None:
        super().__init__()
        self.num_blocks = len(widths)
        previous = in_channels
        for i, width in enumerate(widths):
            setattr(self, f"block{i + 1}", double_conv(previous, width))
            previous = width
        self.pool = nn.MaxPool2D(2)

    def forward(self, x: paddle.Tensor) -> List[paddle.Tensor]:
        outputs = [self.block1(x)]
        for i in range(1, self.num_blocks):
            outputs.append(getattr(self, f"block{i + 1}")(self.pool(outputs[-1])))
        return outputs


class DecoderReconstructive(nn.Layer):
    """The official ``DecoderReconstructive``: ``up1, db1, .., up4, db4, fin_out``, no skips."""

    def __init__(self, base: int, out_channels: int, image_size: int) -> None:
        super().__init__()
        s = image_size // 16
        self.up1, self.db1 = up_block(8 * base, 8 * base, s), double_conv(8 * base, 4 * base, 8 * base)
        self.up2, self.db2 = up_block(4 * base, 4 * base, 2 * s), double_conv(4 * base, 2 * base, 4 * base)
        self.up3, self.db3 = up_block(2 * base, 2 * base, 4 * s), double_conv(2 * base, base, 2 * base)
        self.up4, self.db4 = up_block(base, base, 8 * s), double_conv(base, base)
        self.fin_out = nn.Sequential(conv3x3(base, out_channels))

    def forward(self, b5: paddle.Tensor) -> paddle.Tensor:
        x = self.db1(self.up1(b5))
        x = self.db2(self.up2(x))
        x = self.db3(self.up3(x))
        x = self.db4(self.up4(x))
        return self.fin_out(x)


class DecoderDiscriminative(nn.Layer):
    """The official ``DecoderDiscriminative``: ``up_b, db_b, up1, db1, .., up4, db4, fin_out``; each
    upsampled map is concatenated (``[up, skip]``) with the encoder block of its resolution."""

    def __init__(self, base: int, out_channels: int, image_size: int) -> None:
        super().__init__()
        s = image_size // 32
        self.up_b, self.db_b = up_block(8 * base, 8 * base, s), double_conv(16 * base, 8 * base)
        self.up1, self.db1 = up_block(8 * base, 4 * base, 2 * s), double_conv(12 * base, 4 * base)
        self.up2, self.db2 = up_block(4 * base, 2 * base, 4 * s), double_conv(6 * base, 2 * base)
        self.up3, self.db3 = up_block(2 * base, base, 8 * s), double_conv(3 * base, base)
        self.up4, self.db4 = up_block(base, base, 16 * s), double_conv(2 * base, base)
        self.fin_out = nn.Sequential(conv3x3(base, out_channels))

    def forward(self, blocks: List[paddle.Tensor]) -> paddle.Tensor:
        b1, b2, b3, b4, b5, b6 = blocks
        x = self.db_b(paddle.concat([self.up_b(b6), b5], axis=1))
        x = self.db1(paddle.concat([self.up1(x), b4], axis=1))
        x = self.db2(paddle.concat([self.up2(x), b3], axis=1))
        x = self.db3(paddle.concat([self.up3(x), b2], axis=1))
        x = self.db4(paddle.concat([self.up4(x), b1], axis=1))
        return self.fin_out(x)


class ReconstructiveSubNetwork(nn.Layer):
    """The official ``ReconstructiveSubNetwork(in_channels=3, out_channels=3)`` (base width 128):
    ``encoder`` (five blocks) -> deepest block -> ``decoder`` -> the reconstruction."""

    def __init__(self, image_size: int, in_channels: int = 3, out_channels: int = 3,
                 base_width: int = RECONSTRUCTIVE_WIDTH) -> None:
        super().__init__()
        size = check_size(image_size)
        b = base_width
        self.encoder = Encoder(in_channels, [b, 2 * b, 4 * b, 8 * b, 8 * b])
        self.decoder = DecoderReconstructive(b, out_channels, size)
        use_unbiased_running_variance(self)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.decoder(self.encoder(x)[-1])


class DiscriminativeSubNetwork(nn.Layer):
    """The official ``DiscriminativeSubNetwork(in_channels=6, out_channels=2)`` (base width 64):
    ``encoder_segment`` (six blocks) -> ``decoder_segment`` with skips -> mask logits."""

    def __init__(self, image_size: int, in_channels: int = 6, out_channels: int = 2,
                 base_width: int = DISCRIMINATIVE_WIDTH) -> None:
        super().__init__()
        size = check_size(image_size)
        b = base_width
        self.encoder_segment = Encoder(in_channels, [b, 2 * b, 4 * b, 8 * b, 8 * b, 8 * b])
        self.decoder_segment = DecoderDiscriminative(b, out_channels, size)
        use_unbiased_running_variance(self)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.decoder_segment(self.encoder_segment(x))


class DRAEMNetworks(nn.Layer):
    """Both subnetworks under the official variable names: ``model`` (reconstructive) and ``model_seg``
    (discriminative). ``forward(x)`` of BGR images in [0, 1] returns ``(reconstruction, mask logits)``
    as ``train_DRAEM.py`` / ``test_DRAEM.py``: ``rec = model(x)``, ``logits = model_seg(cat([rec, x]))``.
    ``base_widths``: the official (128, 64); narrower ones only make cheap test networks of the same graph."""

    def __init__(self, image_size: int,
                 base_widths: Tuple[int, int] = (RECONSTRUCTIVE_WIDTH, DISCRIMINATIVE_WIDTH)) -> None:
        super().__init__()
        self.image_size = check_size(image_size)
        self.model = ReconstructiveSubNetwork(self.image_size, base_width=int(base_widths[0]))
        self.model_seg = DiscriminativeSubNetwork(self.image_size, base_width=int(base_widths[1]))

    def forward(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        rec = self.model(x)
        return rec, self.model_seg(paddle.concat([rec, x], axis=1))


def official_to_paddle_key(key: str) -> str:
    """An official ``state_dict`` key (``model.*`` / ``model_seg.*``, the fixture's ``weight_keys``) ->
    the key in :class:`DRAEMNetworks`' state dict: the same, BatchNorm buffers renamed."""
    head, name = key.rsplit(".", 1)
    return f"{head}.{BN_RENAME.get(name, name)}"


def state_from_official(weights: Mapping[str, np.ndarray]) -> dict:
    """``{official key: array}`` -> a :class:`DRAEMNetworks` state dict (layouts are identical: OIHW)."""
    return {official_to_paddle_key(key): value for key, value in weights.items()}


def official_init(layer: nn.Layer, seed: int) -> None:
    """The official ``weights_init`` (``train_DRAEM.py``), drawn from ``numpy.random.default_rng(seed)``
    in sublayer order: conv weights ``N(0, 0.02)``, conv biases torch's default
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``weights_init`` leaves them), BatchNorm weights
    ``N(1, 0.02)``, biases 0, running mean 0 and variance 1. Every value is set, so ``layer`` may have
    been built under ``paddle.LazyGuard``."""
    rng = np.random.default_rng(seed)

    def put(tensor: paddle.Tensor, value: np.ndarray) -> None:
        tensor.set_value(np.asarray(value, dtype=np.float32).reshape(tensor.shape))

    for sublayer in layer.sublayers(include_self=True):
        if isinstance(sublayer, nn.Conv2D):
            shape = list(sublayer.weight.shape)
            put(sublayer.weight, rng.normal(0.0, 0.02, shape))
            if sublayer.bias is not None:
                bound = 1.0 / np.sqrt(int(np.prod(shape[1:])))
                put(sublayer.bias, rng.uniform(-bound, bound, shape[0]))
        elif isinstance(sublayer, nn.BatchNorm2D):
            channels = sublayer.weight.shape[0]
            put(sublayer.weight, rng.normal(1.0, 0.02, channels))
            put(sublayer.bias, np.zeros(channels))
            put(sublayer._mean, np.zeros(channels))
            put(sublayer._variance, np.ones(channels))
