"""Fitting PaDiM: per-position Gaussian statistics of normal images (no training).

Embeddings are computed in batches and folded into running float64 statistics (Chan et al.'s
pairwise update of mean and centred second moments), so memory is bounded by the statistics
(``P * d * d`` float64) and one batch, whatever the number of images, and no cancellation
``E[xx^T] - mean mean^T`` occurs. Covariance uses ``1 / (N - 1)``; anomalib's
``MultiVariateGaussian`` (the reference of ``padim_reference_v1.npz``) then adds ``0.01 * I`` (the
paper's regulariser) and, before inverting, another ``1e-5 * I``: both are added here. The inverse is
computed in float64 in chunks of positions and stored as float32.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import numpy as np
import paddle

from kdad.methods.padim.model import PadimModel

#: the paper's regulariser and the one anomalib adds on top before inverting
COVARIANCE_EPS = 0.01
INVERSE_EPS = 1e-5

Log = Optional[Union[Callable[[str], Any], Any]]


def _single_thread_blas() -> contextlib.AbstractContextManager:
    """OpenBLAS's threads on thousands of small matrices are 10-20x slower than one thread on a busy
    CPU (measured on 2 loaded cores: 4096 inverses of 100x100, 43 s vs 2 s; 4096 products
    176x16 @ 16x176, 13 s vs 1.4 s); threadpoolctl (a scikit-learn dependency) limits it while
    accumulating and inverting; without it nothing changes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _say(log: Log, message: str) -> None:
    if log is None:
        return
    if hasattr(log, "info"):
        log.info(message)
    else:
        log(message)


class StreamingGaussian:
    """Running mean and centred second moments of ``[B, P, d]`` batches, in float64."""

    def __init__(self, positions: int, dim: int, chunk: int = 256) -> None:
        self.positions, self.dim, self.chunk = int(positions), int(dim), max(1, int(chunk))
        self.count = 0
        self.mean = np.zeros((self.positions, self.dim), dtype=np.float64)
        self.m2 = np.zeros((self.positions, self.dim, self.dim), dtype=np.float64)

    def update(self, batch: np.ndarray) -> None:
        """Fold in ``batch`` [B, P, d] (Chan's pairwise update; exact up to rounding)."""
        batch = np.asarray(batch, dtype=np.float64)
        if batch.ndim != 3 or batch.shape[1:] != (self.positions, self.dim):
            raise ValueError(f"expected a batch [B, {self.positions}, {self.dim}], got {list(batch.shape)}")
        n_b = batch.shape[0]
        if n_b == 0:
            return
        n_a, n = self.count, self.count + n_b
        mean_b = batch.mean(axis=0)  # [P, d]
        with _single_thread_blas():  # thousands of small products: threads only thrash (10x slower)
            for start in range(0, self.positions, self.chunk):
                stop = min(start + self.chunk, self.positions)
                centred = batch[:, start:stop].transpose(1, 0, 2) - mean_b[start:stop, None]  # [c, B, d]
                self.m2[start:stop] += np.matmul(centred.transpose(0, 2, 1), centred)
                if n_a:
                    delta = mean_b[start:stop] - self.mean[start:stop]
                    self.m2[start:stop] += (n_a * n_b / n) * (delta[:, :, None] * delta[:, None, :])
        self.mean += (n_b / n) * (mean_b - self.mean)
        self.count = n

    def covariance(self, positions: Optional[np.ndarray] = None, regularise: bool = True) -> np.ndarray:
        """Covariance ``[len(positions), d, d]`` (1/(N-1)), plus ``(0.01 + 1e-5) * I`` when ``regularise``."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.count}")
        m2 = self.m2 if positions is None else self.m2[np.asarray(positions)]
        cov = m2 / (self.count - 1)
        if regularise:
            cov = cov + (COVARIANCE_EPS + INVERSE_EPS) * np.eye(self.dim)
        return cov

    def inverse_chunks(self) -> Iterator[Tuple[int, int, np.ndarray]]:
        """``(start, stop, inv(cov + 0.01 I + 1e-5 I))`` for chunks of positions: float64 math,
        float32 result, so only one chunk of inverses exists at a time."""
        with _single_thread_blas():
            for start in range(0, self.positions, self.chunk):
                stop = min(start + self.chunk, self.positions)
                yield start, stop, np.linalg.inv(self.covariance(np.arange(start, stop))).astype(np.float32)


def iter_embeddings(model: PadimModel, images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Embeddings ``[B, P, d]`` (float32) of ``images`` [N, 3, S, S] in [0, 1], batch by batch."""
    model.eval()
    step = max(1, int(batch_size))
    with paddle.no_grad():
        for start in range(0, len(images), step):
            x = paddle.to_tensor(np.ascontiguousarray(images[start:start + step], dtype=np.float32))
            embedding = model.embedding(x).numpy()  # [B, d, h, w]
            yield embedding.reshape(embedding.shape[0], model.feature_dim, -1).transpose(0, 2, 1)


def accumulate_statistics(model: PadimModel, images: np.ndarray, batch_size: int) -> StreamingGaussian:
    """The running statistics of ``images`` under ``model``'s embedding."""
    stats = StreamingGaussian(model.positions, model.feature_dim)
    for batch in iter_embeddings(model, images, batch_size):
        stats.update(batch)
    return stats


def install_statistics(model: PadimModel, stats: StreamingGaussian) -> None:
    """Store mean and inverse covariance (float32) in ``model``'s buffers, chunk by chunk (in place:
    peak memory = the float64 moments + the buffers), and mark the model fitted."""
    if (stats.positions, stats.dim) != (model.positions, model.feature_dim):
        raise ValueError(f"statistics of {stats.positions} positions x {stats.dim} channels do not fit a "
                         f"model of {model.positions} x {model.feature_dim}")
    model.mean.set_value(stats.mean.astype(np.float32))
    for start, stop, inverse in stats.inverse_chunks():
        model.inv_covariance[start:stop] = paddle.to_tensor(inverse)
    model.mark_fitted()


def _check_images(images: np.ndarray, model: PadimModel) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"PaDiM fits on images [N, 3, S, S], got shape {list(images.shape)}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"PaDiM fits on float images in [0, 1], got dtype {images.dtype}")
    if images.shape[0] < 2:
        raise ValueError("PaDiM needs at least 2 normal training images for a covariance, "
                         f"got {images.shape[0]}")
    if images.shape[2] != model.image_size or images.shape[3] != model.image_size:
        raise ValueError(f"images are {images.shape[2]}x{images.shape[3]} px, the model was built for "
                         f"{model.image_size}x{model.image_size}")
    return images


def fit_padim(model: PadimModel, images: np.ndarray, config: Mapping[str, Any],
              log: Log = None) -> Dict[str, Any]:
    """Fit ``model`` on normal ``images`` [N, 3, S, S] (float32, [0, 1]); returns facts for the log."""
    images = _check_images(images, model)
    start = time.perf_counter()
    batch_size = int(config.get("eval_batch_size", 16) or 16)
    n, d, p = int(images.shape[0]), model.feature_dim, model.positions
    _say(log, f"PaDiM fit: {n} images, {model.backbone_name} {model.layers}, d={d}, {p} positions "
              f"({model.grid[0]}x{model.grid[1]}), statistics {model.statistics_mb:.1f} MB float32 "
              f"(running float64 moments {8.0 * p * d * d / 2 ** 20:.1f} MB)")
    stats = accumulate_statistics(model, images, batch_size)
    install_statistics(model, stats)
    seconds = time.perf_counter() - start
    _say(log, f"PaDiM fit done in {seconds:.1f} s")
    return {"num_images": n, "feature_dim": d, "positions": p, "grid": list(model.grid),
            "statistics_mb": round(model.statistics_mb, 3), "seconds": round(seconds, 3)}
