"""RD4AD's trained networks: the one-class bottleneck embedding (OCBE) and the mirrored decoder.

Faithful to the official code (github hq-deng/RD4AD @ 6554076), which ``rd4ad_reference_v1.npz`` checks:

* ``resnet.py`` ``BN_layer`` -> :class:`OCBE`: multi-scale fusion (encoder layer1 through two 3x3 stride-2
  conv+BN+ReLU, layer2 through one, both brought to layer3's grid) concatenated with layer3, then
  ``bn_layer``: one ResNet stage of 3 plain bottlenecks (the first with stride 2 and a 1x1 stride-2
  ``downsample``) that compresses the ``3 * C3`` channels to ``2 * C3`` at half layer3's resolution;
* ``de_resnet.py`` ``de_wide_resnet50_2`` -> :class:`Decoder`: three stages of 3, 4, 6 bottlenecks; the
  first block of each upsamples x2 with ``ConvTranspose2d(k=2, s=2, bias=False)`` in ``conv2`` and in the
  ``upsample`` shortcut; it returns the outputs of its layer3, layer2, layer1, paired with the encoder's
  layer1, layer2, layer3;
* initialisation as the official modules: every ``Conv2d`` Kaiming-normal with ``fan_out`` (std
  ``sqrt(2 / (out * k * k))``), every ``ConvTranspose2d`` torch's default (uniform with bound
  ``1 / sqrt(out * k * k)``: the official init loop matches ``nn.Conv2d`` only), BatchNorm 1 and 0.

Sizes from the encoder's tap channels ``(C1, C2, C3)``; every bottleneck has ``width = out / 2`` (Wide-
ResNet-50-2: ``width = 2 * planes``, ``out = 4 * planes``):

==============  ===================  ============================  ==========================
part            in -> out            width                         WRN50-2 (256, 512, 1024)
==============  ===================  ============================  ==========================
fusion conv1    C1 -> C2 (3x3, /2)                                 256 -> 512
fusion conv2    C2 -> C3 (3x3, /2)                                 512 -> 1024
fusion conv3    C2 -> C3 (3x3, /2)                                 512 -> 1024
bn_layer (x3)   3*C3 -> 2*C3 (/2)    C3                            3072 -> 2048, width 1024
decoder layer1  2*C3 -> C3 (x2)      C3 / 2, 3 blocks              2048 -> 1024, width 512
decoder layer2  C3 -> C2 (x2)        C2 / 2, 4 blocks              1024 -> 512, width 256
decoder layer3  C2 -> C1 (x2)        C1 / 2, 6 blocks              512 -> 256, width 128
==============  ===================  ============================  ==========================

For Wide-ResNet-50-2 this is exactly the official network, parameter for parameter, with the official
names (``bn.*`` and ``decoder.*`` map 1:1 onto :class:`RD4ADStudent`; only BatchNorm buffers are renamed,
:func:`student_state_from_official`). The same rule scales it to any backbone: EfficientNet-Lite0/1
(24, 40, 112) gives bn_layer 336 -> 224 (width 112) and decoder widths 56, 20, 12; Lite2 (24, 48, 120)
gives 360 -> 240 (width 120) and 60, 24, 12.

One departure, for a clean checkpoint: the official ``BN_layer`` also defines ``conv4`` (1x1, 4096 ->
2048) and ``bn4``, which its forward never uses (8.4M dead values for WRN50-2, gradient always zero). They
are not built here; :func:`student_state_from_official` skips their keys (:data:`UNUSED_OFFICIAL_PREFIXES`).
Every BatchNorm moves its running variance with torch's unbiased batch variance
(:func:`kdad.batchnorm.use_unbiased_running_variance`).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
import paddle.nn as nn

from kdad.batchnorm import use_unbiased_running_variance

#: every bottleneck's inner width / its output channels (Wide-ResNet-50-2: 2 * planes / (4 * planes))
WIDTH_RATIO = 0.5
#: bottlenecks per OCBE stage and per decoder stage (de_wide_resnet50_2: layers [3, 4, 6])
OCBE_BLOCKS = 3
DECODER_BLOCKS: Tuple[int, int, int] = (3, 4, 6)
#: official ``BN_layer`` modules that its forward never uses (not built; their keys are skipped on load)
UNUSED_OFFICIAL_PREFIXES: Tuple[str, ...] = ("bn.conv4.", "bn.bn4.")
#: torch BatchNorm buffer names -> Paddle's
BN_BUFFER_NAMES = {"running_mean": "_mean", "running_var": "_variance"}

Features = Union[Sequence[paddle.Tensor], Mapping[str, paddle.Tensor]]


def bottleneck_width(out_channels: int) -> int:
    """Inner width of a bottleneck with ``out_channels`` outputs (:data:`WIDTH_RATIO`, at least 1)."""
    return max(1, int(round(out_channels * WIDTH_RATIO)))


# --- layers with the official initialisation ---------------------------------------------------------

def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2D:
    """Bias-free ``Conv2d`` (padding ``k // 2``), Kaiming-normal ``fan_out`` as the official init loop."""
    fan_out = out_channels * kernel_size * kernel_size
    init = nn.initializer.KaimingNormal(fan_in=float(fan_out), nonlinearity="relu")
    return nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                     weight_attr=paddle.ParamAttr(initializer=init), bias_attr=False)


def deconv2x2(in_channels: int, out_channels: int) -> nn.Conv2DTranspose:
    """Bias-free ``ConvTranspose2d(k=2, s=2)`` (weight ``[in, out, 2, 2]``), torch's default init:
    uniform with bound ``1 / sqrt(out * 4)`` (torch's fan_in of this weight layout)."""
    bound = 1.0 / math.sqrt(out_channels * 4)
    init = nn.initializer.Uniform(-bound, bound)
    return nn.Conv2DTranspose(in_channels, out_channels, 2, stride=2,
                              weight_attr=paddle.ParamAttr(initializer=init), bias_attr=False)


class _Bottleneck(nn.Layer):
    """ResNet v1.5 bottleneck: 1x1 -> BN/ReLU -> ``conv2`` -> BN/ReLU -> 1x1 -> BN, plus the shortcut
    (identity, or the sublayer named ``shortcut_name`` when the shape changes), ReLU."""

    def __init__(self, in_channels: int, width: int, out_channels: int, conv2: nn.Layer,
                 shortcut_name: str, shortcut: Optional[nn.Layer]) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, width, 1)
        self.bn1 = nn.BatchNorm2D(width)
        self.conv2 = conv2
        self.bn2 = nn.BatchNorm2D(width)
        self.conv3 = conv(width, out_channels, 1)
        self.bn3 = nn.BatchNorm2D(out_channels)
        self.relu = nn.ReLU()
        self.shortcut_name = shortcut_name
        setattr(self, shortcut_name, shortcut)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = getattr(self, self.shortcut_name)
        return self.relu(out + (x if shortcut is None else shortcut(x)))


class Bottleneck(_Bottleneck):
    """The encoder-side bottleneck (``resnet.Bottleneck``, the OCBE's ``bn_layer``): the stride sits in
    the 3x3 ``conv2``; ``downsample`` = 1x1 conv (same stride) + BN when the shape changes."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int = 1) -> None:
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(conv(in_channels, out_channels, 1, stride),
                                       nn.BatchNorm2D(out_channels))
        super().__init__(in_channels, width, out_channels, conv(width, width, 3, stride), "downsample",
                         downsample)


class DeBottleneck(_Bottleneck):
    """The decoder's bottleneck (``de_resnet.Bottleneck``): an ``upsample`` block has a 2x2 stride-2
    transposed ``conv2`` and the shortcut ``upsample`` = transposed conv + BN; the others a 3x3 ``conv2``
    and the identity shortcut."""

    def __init__(self, in_channels: int, width: int, out_channels: int, upsample: bool = False) -> None:
        if not upsample and in_channels != out_channels:
            raise ValueError("a decoder bottleneck changes its channels only in an upsampling block")
        shortcut = (nn.Sequential(deconv2x2(in_channels, out_channels), nn.BatchNorm2D(out_channels))
                    if upsample else None)
        conv2 = deconv2x2(width, width) if upsample else conv(width, width, 3)
        super().__init__(in_channels, width, out_channels, conv2, "upsample", shortcut)


def check_channels(channels: Sequence[int]) -> Tuple[int, int, int]:
    values = tuple(int(c) for c in channels)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"RD4AD needs the channels of three encoder taps, got {list(channels)}")
    return values  # type: ignore[return-value]


class OCBE(nn.Layer):
    """One-class bottleneck embedding (official ``BN_layer``): ``[l1, l2, l3]`` -> ``[N, 2*C3, h3/2, w3/2]``.
    Sublayers in the official ``state_dict`` order: ``bn_layer``, ``conv1``/``bn1``, ``conv2``/``bn2``,
    ``conv3``/``bn3``."""

    def __init__(self, channels: Sequence[int], blocks: int = OCBE_BLOCKS) -> None:
        super().__init__()
        c1, c2, c3 = self.channels = check_channels(channels)
        self.out_channels = 2 * c3
        width = bottleneck_width(self.out_channels)
        stage = [Bottleneck(3 * c3, width, self.out_channels, stride=2)]
        stage += [Bottleneck(self.out_channels, width, self.out_channels) for _ in range(1, blocks)]
        self.bn_layer = nn.Sequential(*stage)
        self.conv1 = conv(c1, c2, 3, 2)
        self.bn1 = nn.BatchNorm2D(c2)
        self.relu = nn.ReLU()
        self.conv2 = conv(c2, c3, 3, 2)
        self.bn2 = nn.BatchNorm2D(c3)
        self.conv3 = conv(c2, c3, 3, 2)
        self.bn3 = nn.BatchNorm2D(c3)

    def forward(self, features: Sequence[paddle.Tensor]) -> paddle.Tensor:
        l1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(features[0]))))))
        l2 = self.relu(self.bn3(self.conv3(features[1])))
        return self.bn_layer(paddle.concat([l1, l2, features[2]], axis=1))


class Decoder(nn.Layer):
    """The mirrored encoder (official ``de_wide_resnet50_2``): ``[N, 2*C3, h, w]`` -> the outputs of its
    ``layer3``, ``layer2``, ``layer1`` (``C1`` at 8x, ``C2`` at 4x, ``C3`` at 2x the input grid)."""

    def __init__(self, channels: Sequence[int], blocks: Sequence[int] = DECODER_BLOCKS) -> None:
        super().__init__()
        c1, c2, c3 = self.channels = check_channels(channels)
        if len(blocks) != 3 or min(blocks) < 1:
            raise ValueError(f"the decoder needs three stages of >= 1 block, got {list(blocks)}")
        inputs, outputs = (2 * c3, c3, c2), (c3, c2, c1)
        for index, (cin, cout, count) in enumerate(zip(inputs, outputs, blocks)):
            width = bottleneck_width(cout)
            stage = [DeBottleneck(cin, width, cout, upsample=True)]
            stage += [DeBottleneck(cout, width, cout) for _ in range(1, count)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))

    def forward(self, x: paddle.Tensor) -> List[paddle.Tensor]:
        a = self.layer1(x)
        b = self.layer2(a)
        c = self.layer3(b)
        return [c, b, a]


class RD4ADStudent(nn.Layer):
    """What RD4AD trains: ``bn`` (:class:`OCBE`) and ``decoder`` (:class:`Decoder`), the official variable
    names. ``forward(features)`` takes the encoder's three taps (a list in ``taps`` order, or a dict
    ``{tap: tensor}``) and returns the three decoder outputs paired with them, in the same order."""

    def __init__(self, channels: Sequence[int], taps: Sequence[str] = ("layer1", "layer2", "layer3")) -> None:
        super().__init__()
        self.taps: List[str] = [str(tap) for tap in taps]
        if len(self.taps) != 3:
            raise ValueError(f"RD4AD's student pairs with three encoder taps, got {self.taps}")
        self.bn = OCBE(channels)
        self.decoder = Decoder(channels)
        use_unbiased_running_variance(self)

    def ordered(self, features: Features) -> List[paddle.Tensor]:
        if isinstance(features, Mapping):
            return [features[tap] for tap in self.taps]
        return list(features)

    def forward(self, features: Features) -> List[paddle.Tensor]:
        return self.decoder(self.bn(self.ordered(features)))


# --- sizes and official checkpoints ---------------------------------------------------------------------

def _half(size: int) -> int:
    """Output size of a 3x3 (padding 1) or 1x1 stride-2 convolution."""
    return (size + 1) // 2


def check_grid(sizes: Sequence[Tuple[int, int]], image_size: int) -> None:
    """The fusion convs must land on layer3's grid and the decoder (x2, x4, x8 of the bottleneck grid)
    on each tap's grid; else a ``ValueError`` naming the sizes."""
    (h1, w1), (h2, w2), (h3, w3) = [tuple(int(v) for v in size) for size in sizes]
    fused = [(_half(_half(h1)), _half(_half(w1))), (_half(h2), _half(w2))]
    bottom = (_half(h3), _half(w3))
    decoded = [(bottom[0] * k, bottom[1] * k) for k in (8, 4, 2)]
    taps = [(h1, w1), (h2, w2), (h3, w3)]
    if fused != [(h3, w3)] * 2 or decoded != taps:
        raise ValueError(f"RD4AD cannot mirror the encoder at {image_size} px: taps {taps} (the OCBE fuses "
                         f"them at {fused}, the decoder returns {decoded}); use an input size that is a "
                         "multiple of 32")


def student_state_from_official(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The official ``bn`` and ``decoder`` state dicts (keys prefixed ``bn.`` and ``decoder.``; other
    prefixes are ignored) -> :class:`RD4ADStudent` keys: BatchNorm buffers renamed (``running_mean`` ->
    ``_mean``, ``running_var`` -> ``_variance``), ``num_batches_tracked`` and the unused ``bn.conv4`` /
    ``bn.bn4`` dropped; every weight (``ConvTranspose2d``'s ``[in, out, kh, kw]`` too) as it is."""
    out: Dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not key.startswith(("bn.", "decoder.")) or key.startswith(UNUSED_OFFICIAL_PREFIXES):
            continue
        head, name = key.rsplit(".", 1)
        if name == "num_batches_tracked":
            continue
        out[f"{head}.{BN_BUFFER_NAMES.get(name, name)}"] = np.asarray(value, dtype=np.float32)
    return out
