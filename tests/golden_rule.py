"""The golden fixtures' weight rule (``../shared/golden/README.md``), shared by the golden tests."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np


def rule_weights(spec: List[Tuple[str, Tuple[int, ...]]], seed: int, gain: float) -> Dict[str, np.ndarray]:
    """One numpy generator over the key list -> {torch key: float16-exact float32 array}."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in spec:
        name = key.rsplit(".", 1)[-1]
        if name == "running_var" or (name == "weight" and len(shape) == 1):
            values = rng.uniform(0.5, 1.5, shape)
        elif name in ("bias", "running_mean"):
            values = rng.normal(0.0, 0.1, shape)
        else:
            values = rng.normal(0.0, np.sqrt(gain / int(np.prod(shape[1:]))), shape)
        out[key] = values.astype(np.float16).astype(np.float32)
    return out


# --- mapping and comparisons shared by the golden tests ---------------------------------------------------

#: torch BatchNorm buffer names -> Paddle's
BN_RENAME = {"running_mean": "_mean", "running_var": "_variance"}


def paddle_key(torch_key: str) -> str:
    """The Paddle state-dict key of a torch key (only BatchNorm buffers are renamed)."""
    head, name = torch_key.rsplit(".", 1)
    return f"{head}.{BN_RENAME.get(name, name)}"


def max_rel(got: Any, expected: Any) -> float:
    """Largest element-wise relative difference."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(got - expected) / np.abs(expected)))


def l2_rel(got: Any, expected: Any) -> float:
    """``|got - expected| / |expected|`` in the L2 norm."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def max_abs_of_max(got: Any, expected: Any) -> float:
    """Largest absolute difference as a fraction of the largest expected magnitude."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
