"""Post-processing shared by every method: map blur, OK/NG threshold, normal map statistics.

numpy/scipy only (no training code): used by the engine, the exporter and the deploy runtime.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
from scipy.ndimage import gaussian_filter


def blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each [H,W] map (scipy defaults: reflect border, truncate 4 sigma)."""
    if sigma <= 0:
        return maps.astype(np.float32)
    return np.stack([gaussian_filter(m.astype(np.float64), sigma=sigma) for m in maps]).astype(np.float32)


def threshold_from_normal_scores(scores: np.ndarray, false_reject_rate: float = 0.01) -> float:
    """OK/NG threshold from held-out normal scores: NG iff ``score > threshold``.

    The ``1 - false_reject_rate`` quantile with ``method="higher"``, so at most that fraction of
    the held-out normals is rejected.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("no normal scores to calibrate the threshold on")
    if not 0.0 <= false_reject_rate < 1.0:
        raise ValueError(f"false_reject_rate must be in [0, 1), got {false_reject_rate}")
    return float(np.quantile(scores, 1.0 - false_reject_rate, method="higher"))


def normal_map_statistics(maps: np.ndarray) -> Dict[str, float]:
    """Percentiles (p50, p99, p99.9) and max of all pixels of normal-image maps, for colour scaling."""
    values = np.asarray(maps, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no normal maps to compute statistics on")
    p50, p99, p999 = np.percentile(values, [50.0, 99.0, 99.9])
    return {"p50": float(p50), "p99": float(p99), "p999": float(p999), "max": float(values.max())}
