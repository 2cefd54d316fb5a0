"""The golden fixtures' weight rule (``../shared/golden/README.md``), shared by the golden tests."""

from __future__ import annotations

from typing import Dict, List, Tuple

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
