"""Backbone weights: torch checkpoints read without torch, shape checks, atomic saves, the cache.

Conv weights are OIHW in both frameworks and copied as they are; only ``nn.Linear`` weights would
need a transpose (torch ``[out, in]``, Paddle ``[in, out]``), and the VGG16 expert keeps no
``Linear`` layer: torchvision's ``classifier.*`` keys are dropped.
"""

from __future__ import annotations

import os
import tempfile
from typing import List, Mapping, Sequence

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
