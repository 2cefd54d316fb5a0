"""VGG-style layer stacks shared by the VGG16 expert and the cloner.

A configuration is a list of channel counts and ``"M"`` (2x2 max-pool). Every conv yields one
*tap*: the output of its ReLU, or, when the conv is followed by a pool, the pool's output. For
VGG16 ``features`` this gives the paper's indices 1,4,6,9,11,13,16,18,20,23,25,27,30 and for the
cloner (BatchNorm after every conv not followed by a pool) 2,5,8,...,38.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import paddle
import paddle.nn as nn

CfgItem = Union[int, str]

VGG16_CFG: List[CfgItem] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                            512, 512, 512, "M"]
# The paper's cloner, configuration "B" of the original code.
CLONER_CFG_B: List[CfgItem] = [16, 16, "M", 16, 128, "M", 16, 16, 256, "M", 16, 16, 512, "M",
                               16, 16, 512, "M"]
# Configuration "A" (``equal_network_size``): the full VGG16 widths.
CLONER_CFG_A: List[CfgItem] = list(VGG16_CFG)


def make_vgg_layers(
    cfg: Sequence[CfgItem],
    batch_norm: bool,
    use_bias: bool,
    in_channels: int = 3,
) -> Tuple[nn.Sequential, List[int]]:
    """Build ``nn.Sequential`` from ``cfg`` and return it with its tap indices.

    With ``batch_norm`` a BatchNorm follows every conv except one directly before a pool (as in
    the original KDAD code). Conv weights are Xavier-uniform, biases zero.
    """
    layers: List[nn.Layer] = []
    taps: List[int] = []
    for position, item in enumerate(cfg):
        if item == "M":
            layers.append(nn.MaxPool2D(kernel_size=2, stride=2))
            taps.append(len(layers) - 1)
            continue
        if not isinstance(item, int) or item <= 0:
            raise ValueError(f"bad VGG configuration entry {item!r} at position {position}")
        followed_by_pool = position + 1 < len(cfg) and cfg[position + 1] == "M"
        conv = nn.Conv2D(
            in_channels, item, kernel_size=3, padding=1,
            weight_attr=paddle.ParamAttr(initializer=nn.initializer.XavierUniform()),
            bias_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)) if use_bias else False,
        )
        layers.append(conv)
        if batch_norm and not followed_by_pool:
            layers.append(nn.BatchNorm2D(item))
        layers.append(nn.ReLU())
        if not followed_by_pool:
            taps.append(len(layers) - 1)
        in_channels = item
    return nn.Sequential(*layers), taps


def tap_geometry(cfg: Sequence[CfgItem]) -> List[Tuple[int, int]]:
    """``(channels, stride)`` of each tap of ``cfg``, in tap order."""
    geometry: List[Tuple[int, int]] = []
    stride, channels = 1, 0
    for position, item in enumerate(cfg):
        if item == "M":
            stride *= 2
            geometry.append((channels, stride))
            continue
        channels = int(item)
        if not (position + 1 < len(cfg) and cfg[position + 1] == "M"):
            geometry.append((channels, stride))
    return geometry


def run_taps(features: nn.Sequential, taps: Sequence[int], x: paddle.Tensor) -> List[paddle.Tensor]:
    """Run ``features`` on ``x`` and collect the outputs at ``taps`` (stops after the last tap)."""
    outputs: List[paddle.Tensor] = []
    wanted = set(taps)
    last = max(taps)
    for index, layer in enumerate(features):
        x = layer(x)
        if index in wanted:
            outputs.append(x)
        if index == last:
            break
    return outputs
