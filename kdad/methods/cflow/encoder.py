"""CFlow-AD's encoder: a kdad backbone, with the official ResNets' reflect padding.

Faithful to the official ``custom_models/resnet.py`` (github gudovskiy/cflow-ad @ b2ebf9e): its ResNets
(Wide-ResNet-50-2 in the paper) are torchvision's, loaded with torchvision's ImageNet weights, except that
``conv1`` (7x7) and every 3x3 convolution pad with ``padding_mode='reflect'`` (1x1 convolutions and the
max-pool as usual). :func:`build_encoder` builds :mod:`kdad.backbones`' ResNet and switches exactly
those convolutions (every convolution with a kernel larger than 1 and a non-zero padding) to reflect
padding in place, so parameter names and weight files stay those of the backbone. EfficientNet-Lite
backbones (not in the official code) are used as they are, with TensorFlow's ``SAME`` padding.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import paddle
import paddle.nn as nn

from kdad.backbones import Backbone, build_backbone

REFLECT = "reflect"


def use_reflect_padding(conv: nn.Conv2D) -> None:
    """Switch a built ``Conv2D`` (integer padding, NCHW) to ``padding_mode='reflect'`` in place, with the
    padding attributes Paddle's own constructor sets for that mode (the input is padded by ``F.pad``,
    the convolution itself pads nothing)."""
    padding = conv._padding
    if not isinstance(padding, int):
        raise TypeError(f"reflect padding needs an integer padding, got {padding!r}")
    with paddle.LazyGuard():  # the template's weights are never initialised
        template = nn.Conv2D(conv._in_channels, conv._out_channels, conv._kernel_size, stride=conv._stride,
                             padding=padding, dilation=conv._dilation, groups=conv._groups,
                             padding_mode=REFLECT, bias_attr=False)
    conv._padding_mode = REFLECT
    conv._reversed_padding_repeated_twice = list(template._reversed_padding_repeated_twice)
    conv._updated_padding = template._updated_padding
    conv._padding_algorithm = template._padding_algorithm


def reflect_convs(backbone: nn.Layer) -> List[str]:
    """Names of the convolutions the official ResNets pad with reflection: kernel > 1, padding > 0."""
    return [name for name, layer in backbone.named_sublayers()
            if isinstance(layer, nn.Conv2D) and max(layer._kernel_size) > 1 and layer._padding != 0]


def build_encoder(name: str, taps: Sequence[str], pretrained: bool = True,
                  weights_path: Optional[str] = None) -> Backbone:
    """The frozen encoder: ``build_backbone(...)``, ResNets switched to the official reflect padding."""
    from kdad.backbones.resnet import ResNetBackbone

    backbone = build_backbone(name, taps, pretrained=pretrained, weights_path=weights_path)
    if isinstance(backbone, ResNetBackbone):
        layers = dict(backbone.named_sublayers())
        for conv_name in reflect_convs(backbone):
            use_reflect_padding(layers[conv_name])
    return backbone
