"""Greedy k-center coreset selection for PatchCore's memory bank, in bounded time and memory on a CPU.

The selection PatchCore uses is anomalib's ``KCenterGreedy`` (Sener & Savarese 2018): project the
patch features with a sparse random matrix (dimension from the Johnson-Lindenstrauss bound,
``eps = 0.9``), start at a random patch, then repeatedly add the patch farthest from those already
chosen. :func:`greedy_exact` is that loop as the reference does it: the running minimum distance of
every patch, updated by one ``[N, k]`` matrix-vector product per pick. That costs ``picks x N x k``
and streams the whole matrix from memory at every pick, so it is memory-bandwidth bound and
quadratic in the training set: Magnetic Tile at 128 px (195k patches, 19.5k picks) took 745 s on
2 loaded cores at k = 152; at 256 px (780k patches, 78k picks) it would take hours.

:func:`greedy_cells` computes the same greedy with lazy, batched updates: the patches are split
into cells (recursive 2-means bisection); each cell keeps an upper bound of its largest minimum
distance and catches up with the centres chosen since its last update only when it holds the
largest bound, with one GEMM for all of them (cache-friendly, compute-bound instead of
bandwidth-bound). Centres are left out for a cell only when the triangle inequality proves they
cannot lower any of its distances, so the picks are the exact greedy's up to float rounding of
near-ties (Magnetic Tile 128 px, D = 152: the same 19,507 patches, 36 s instead of 745 s). This is
``method="exact"``; its cost is still quadratic (about 20x the 128 px time at 256 px).

Pruning alone cannot make it linear: CNN patch features fill their space so evenly that a cell's
radius is as large as the distances between cells (measured: 97 % of the work remained). ``fast``
(the default) therefore lets each new centre update only its own cell and the ``probes`` cells with
the nearest centroids (an inverted-file search, as approximate nearest-neighbour indexes do), so a
pick costs at most ``(probes + 1) x cell_size x k`` whatever the training set size; a patch is only
compared with centres chosen near its own cell. ``fast`` also skips the random projection when the
features have fewer dimensions than the JL bound (it would add dimensions and distortion; projecting
to fewer dimensions than the features cost far more covering radius than it saved time: 152 -> 96
dims gave radius 18.6 instead of 16.1).

Measured on Magnetic Tile, EfficientNet-Lite0 (D = 152), 2 shared cores, covering radius (the
k-center objective) of the 10 % coreset at 128 px: exact 15.88; fast with (cell_size, probes)
(1024, 16) 16.08 (+1.3 %) in 12 s, (1024, 32) 15.93 in 17 s, (1024, 8) 16.48, (4096, 8) 16.05 in
25-34 s, (512, 16) 16.23; a random 10 % subset 28.0. At 256 px (780k patches, 78k picks) fast
(1024, 16) takes about 60 s.

Memory: the features once more (a centred float32 copy) plus ``O(N)`` vectors; the largest
temporary is ``256 x cell_size`` floats.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import numpy as np

COMPUTE_DTYPE = np.float32
#: rows per block when projecting / assigning (bounds temporaries to ~block x k floats)
ROW_BLOCK = 65536
#: cell size of the ``fast`` method: each pick reads at most this many rows
DEFAULT_CELL_SIZE = 1024
#: cells (besides its own) a new centre of the ``fast`` method is compared with
DEFAULT_PROBES = 16
#: ``bruteforce``: the reference loop :func:`greedy_exact` on the same projection as ``exact``
CORESET_METHODS = ("fast", "exact", "bruteforce")


def jl_min_dim(n_samples: int, eps: float = 0.9) -> int:
    """The Johnson-Lindenstrauss dimension ``4 ln(n) / (eps^2 / 2 - eps^3 / 3)`` (as anomalib, truncated)."""
    return int(4.0 * math.log(max(int(n_samples), 1)) / (eps ** 2 / 2.0 - eps ** 3 / 3.0))


def sparse_random_projection(n_features: int, n_components: int, rng: np.random.Generator) -> np.ndarray:
    """A ``[n_components, n_features]`` very sparse random matrix (Li et al. 2006, density
    ``1/sqrt(n_features)``, entries ``+-sqrt(1/density)/sqrt(n_components)``), the distribution
    anomalib's ``SparseRandomProjection`` draws from."""
    density = 1.0 / math.sqrt(n_features)
    signs = rng.integers(0, 2, size=(n_components, n_features)).astype(np.float32) * 2.0 - 1.0
    if density < 1.0:
        signs *= rng.random((n_components, n_features)) < density
        scale = math.sqrt(1.0 / density) / math.sqrt(n_components)
    else:
        scale = 1.0 / math.sqrt(n_components)
    return (signs * np.float32(scale)).astype(np.float32)


def project(features: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """``features [N, D] @ projection[k, D]^T`` in row blocks, float32."""
    out = np.empty((features.shape[0], projection.shape[0]), dtype=COMPUTE_DTYPE)
    proj_t = np.ascontiguousarray(projection.T, dtype=COMPUTE_DTYPE)
    for start in range(0, features.shape[0], ROW_BLOCK):
        block = np.asarray(features[start:start + ROW_BLOCK], dtype=COMPUTE_DTYPE)
        np.matmul(block, proj_t, out=out[start:start + ROW_BLOCK])
    return out


def row_norms_sq(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


class _Distances:
    """Squared distances (expansion form, clamped at 0) of rows ``[lo, hi)`` of ``x`` to one row.

    The rows are centred first (distances do not change): the expansion ``|x|^2 - 2 x.c + |c|^2``
    then subtracts numbers of the size of the distances, not of the feature norms, so float32 keeps
    the digits the argmax needs (with raw WRN50-2 features only 94 % of the golden coreset matched,
    centred 100 %). ``overwrite`` centres ``x`` in place instead of copying it.
    """

    def __init__(self, x: np.ndarray, overwrite: bool = False) -> None:
        if not (overwrite and x.dtype == COMPUTE_DTYPE and x.flags.c_contiguous):
            x = np.array(x, dtype=COMPUTE_DTYPE, order="C")
        x -= x.mean(axis=0, dtype=np.float64).astype(COMPUTE_DTYPE)
        self.x = x
        self.sq = row_norms_sq(self.x)
        self.buf = np.empty(self.x.shape[0], dtype=COMPUTE_DTYPE)

    def to(self, center: int, lo: int = 0, hi: Optional[int] = None) -> np.ndarray:
        hi = self.x.shape[0] if hi is None else hi
        out = self.buf[lo:hi]
        np.dot(self.x[lo:hi], self.x[center], out=out)
        out *= -2.0
        out += self.sq[lo:hi]
        out += self.sq[center]
        np.maximum(out, 0.0, out=out)
        return out


def _one_blas_thread() -> ContextManager[Any]:
    """The greedy loops are matrix-vector products, bound by memory bandwidth: one BLAS thread is as
    fast as two on an idle machine and several times faster on a loaded one (measured: 2.1 vs 18 ms
    per step, 16k x 239, 2 busy cores), so they run single-threaded."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def greedy_exact(features: np.ndarray, n_select: int, start: int,
                 progress: Optional[Callable[[int], None]] = None, overwrite: bool = False) -> np.ndarray:
    """Greedy k-center on ``features [N, k]`` from ``start`` (included): ``n_select`` indices in
    selection order; each pick is the argmax (first on ties) of the minimum distance to the chosen set.
    ``overwrite``: ``features`` (float32, C order) may be centred in place instead of copied."""
    n = features.shape[0]
    n_select = int(min(max(n_select, 1), n))
    dist = _Distances(features, overwrite)
    selected = np.empty(n_select, dtype=np.int64)
    selected[0] = start
    with _one_blas_thread():
        min_d2 = dist.to(int(start)).copy()
        min_d2[start] = 0.0
        for i in range(1, n_select):
            pick = int(np.argmax(min_d2))
            selected[i] = pick
            np.minimum(min_d2, dist.to(pick), out=min_d2)
            min_d2[pick] = 0.0
            if progress is not None and i % 1024 == 0:
                progress(i)
    return selected


def _principal_direction(x: np.ndarray, rng: np.random.Generator, iters: int = 6) -> np.ndarray:
    """Leading principal direction of the rows of ``x`` (power iteration on the centred rows)."""
    centred = x - x.mean(axis=0)
    v = rng.standard_normal(x.shape[1]).astype(COMPUTE_DTYPE)
    for _ in range(iters):
        v = centred.T @ (centred @ v)
        v /= max(float(np.linalg.norm(v)), 1e-30)
    return v


def _split_plane(sample: np.ndarray, rng: np.random.Generator, iters: int = 4) -> Tuple[np.ndarray, float]:
    """A hyperplane ``x.w > t`` splitting ``sample`` by 2-means (started from the principal direction)."""
    v = _principal_direction(sample, rng)
    proj = sample @ v
    side = proj > float(proj.mean())
    w, t = v, float(proj.mean())
    for _ in range(iters):
        if side.all() or not side.any():
            break
        c1, c0 = sample[side].mean(axis=0), sample[~side].mean(axis=0)
        # nearer to c1 than to c0  <=>  x.(c1 - c0) > (|c1|^2 - |c0|^2) / 2
        w, t = c1 - c0, 0.5 * (float(c1 @ c1) - float(c0 @ c0))
        side = sample @ w > t
    return w.astype(COMPUTE_DTYPE), t


def partition_cells(x: np.ndarray, cell_size: int, rng: np.random.Generator,
                    sample: int = 8192) -> List[np.ndarray]:
    """Row indices of cells of at most ``cell_size`` rows: recursive 2-means bisection, each split fitted
    on at most ``sample`` rows of its node and applied to all of them (the median along the split
    direction when 2-means leaves a side under 10 %)."""
    cells: List[np.ndarray] = []
    stack = [np.arange(x.shape[0], dtype=np.int64)]
    while stack:
        idx = stack.pop()
        if idx.shape[0] <= cell_size:
            cells.append(idx)
            continue
        fit = idx if idx.shape[0] <= sample else idx[rng.integers(0, idx.shape[0], sample)]
        w, t = _split_plane(x[fit], rng)
        proj = x[idx] @ w
        side = proj > t
        if min(int(side.sum()), idx.shape[0] - int(side.sum())) < 0.1 * idx.shape[0]:
            side = proj > float(np.median(proj))
            if side.all() or not side.any():  # all projections equal: split by position
                side = np.arange(idx.shape[0]) >= idx.shape[0] // 2
        stack.extend([idx[~side], idx[side]])
    return cells


def _cell_geometry(x: np.ndarray, bounds: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Centroids ``[G, k]`` and radii ``[G]`` (largest member distance to the centroid) of the cells
    ``x[bounds[g]:bounds[g + 1]]``."""
    sizes = np.diff(bounds)
    sums = np.add.reduceat(x, bounds[:-1], axis=0, dtype=np.float64)
    centroids = (sums / sizes[:, None]).astype(COMPUTE_DTYPE)
    radii = np.empty(sizes.shape[0], dtype=np.float64)
    for g in range(sizes.shape[0]):
        diff = x[bounds[g]:bounds[g + 1]] - centroids[g]
        radii[g] = math.sqrt(float(np.einsum("ij,ij->i", diff, diff).max()))
    return centroids, radii


def greedy_cells(features: np.ndarray, n_select: int, start: int, cell_size: int = DEFAULT_CELL_SIZE,
                 probes: Optional[int] = DEFAULT_PROBES, seed: int = 0,
                 progress: Optional[Callable[[int], None]] = None) -> Tuple[np.ndarray, int]:
    """Greedy k-center with lazy, batched distance updates over cells: ``(indices in selection order,
    number of cells)``; the first pick is ``start``.

    The patches are split into cells of at most ``cell_size`` rows. Every cell keeps an upper bound of
    its largest minimum distance and how many of the chosen centres it has seen. The cell with the
    largest bound catches up with the centres chosen since (one ``[P, k] x [k, cell]`` GEMM instead of
    ``P`` matrix-vector products over all patches) and, if it still holds the largest value, gives the
    next pick. Centres that cannot lower any of its distances are left out (triangle inequality:
    distance to the cell's centroid minus its radius not below the cell's bound), and, when ``probes``
    is set, every centre whose own cell and ``probes`` nearest cells (by centroid) do not include this
    one. ``probes=None`` is the exact greedy (the same picks up to float rounding); a finite ``probes``
    is the approximation of ``fast`` (a patch is only compared with centres chosen near its cell).
    """
    n = features.shape[0]
    n_select = int(min(max(n_select, 1), n))
    rng = np.random.default_rng(seed)
    with _one_blas_thread():
        cells = partition_cells(np.asarray(features, dtype=COMPUTE_DTYPE), int(cell_size), rng)
    order = np.concatenate(cells)
    bounds = np.cumsum([0] + [c.shape[0] for c in cells])
    n_cells = len(cells)
    dist = _Distances(np.asarray(features, dtype=COMPUTE_DTYPE)[order], overwrite=True)  # a copy
    x, sq = dist.x, dist.sq
    centroids, radii = _cell_geometry(x, bounds)
    centroid_sq = row_norms_sq(centroids)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    picks = np.empty(n_select, dtype=np.int64)  # positions in the cell order
    picks[0] = position[start]
    seen = np.ones(n_cells, dtype=np.int64)  # picks[:seen[g]] are applied to cell g (the start: all)
    limited = probes is not None and int(probes) + 1 < n_cells
    near = int(probes) if limited else n_cells - 1
    probe_sets = np.zeros((n_select, near + 1), dtype=np.int32) if limited else None

    def catch_up(cell: int) -> None:
        lo, hi = int(bounds[cell]), int(bounds[cell + 1])
        new = picks[seen[cell]:chosen]
        if probe_sets is not None:
            new = new[(probe_sets[seen[cell]:chosen] == cell).any(axis=1)]
        seen[cell] = chosen
        if new.shape[0] == 0:
            return
        centres = x[new]
        d_cent = np.sqrt(np.maximum(sq[new] - 2.0 * (centres @ centroids[cell]) + centroid_sq[cell], 0.0))
        useful = d_cent - radii[cell] < math.sqrt(bound[cell]) * (1.0 + 1e-4) + 1e-6
        if not useful.all():
            new, centres = new[useful], centres[useful]
        local = min_d2[lo:hi]
        for part in range(0, new.shape[0], 256):  # bounds the [P, cell] temporary
            d2 = (centres[part:part + 256] * np.float32(-2.0)) @ x[lo:hi].T  # [P, cell]: -2 c.x
            d2 += sq[new[part:part + 256]][:, None]
            nearest = d2.min(axis=0) if d2.shape[0] > 1 else d2[0]
            nearest += sq[lo:hi]
            np.minimum(local, nearest, out=local)
        np.maximum(local, 0.0, out=local)
        bound[cell] = local.max()

    with _one_blas_thread():
        min_d2 = dist.to(int(picks[0])).copy()
        min_d2[picks[0]] = 0.0
        bound = np.maximum.reduceat(min_d2, bounds[:-1]).astype(np.float64)
        chosen = 1
        while chosen < n_select:
            cell = int(np.argmax(bound))
            if seen[cell] < chosen:
                catch_up(cell)
                if bound[cell] < bound.max():
                    continue
            lo, hi = int(bounds[cell]), int(bounds[cell + 1])
            pick = lo + int(np.argmax(min_d2[lo:hi]))
            min_d2[pick] = 0.0
            if probe_sets is not None:  # its own cell and the `near` cells with the nearest centroids
                d_cent = centroid_sq - 2.0 * (centroids @ x[pick])
                d_cent[cell] = -np.inf
                probe_sets[chosen] = np.argpartition(d_cent, near)[:near + 1]
            picks[chosen] = pick
            chosen += 1
            if progress is not None and chosen % 4096 == 0:
                progress(chosen)
    return order[picks], n_cells


def covering_radius(features: np.ndarray, selected: np.ndarray, block: int = 8192) -> float:
    """``max_i min_j |x_i - x_selected_j|``: the k-center objective of a selection (blocked GEMM)."""
    x = np.asarray(features, dtype=COMPUTE_DTYPE)
    mean = x.mean(axis=0, dtype=np.float64).astype(COMPUTE_DTYPE)
    centers = np.ascontiguousarray(x[selected]) - mean
    c_sq = row_norms_sq(centers)
    worst = 0.0
    with _one_blas_thread():
        for lo in range(0, x.shape[0], block):
            rows = x[lo:lo + block] - mean
            d2 = row_norms_sq(rows)[:, None] - 2.0 * (rows @ centers.T) + c_sq[None, :]
            worst = max(worst, float(np.maximum(d2.min(axis=1), 0.0).max()))
    return math.sqrt(worst)


def select_coreset(embedding: np.ndarray, ratio: float, seed: int, method: str = "fast",
                   cell_size: int = DEFAULT_CELL_SIZE, probes: int = DEFAULT_PROBES, eps: float = 0.9,
                   log: Optional[Callable[[str], None]] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Coreset indices of ``embedding [N, D]`` (``int(N * ratio)`` of them, selection order) and facts.

    ``exact``: anomalib's selection (projection to the JL dimension, exact greedy by
    :func:`greedy_cells` without probe limit); ``bruteforce``: the same with the reference loop
    :func:`greedy_exact`; ``fast``: :func:`greedy_cells` with ``probes``, on the projection only when
    ``D`` exceeds the JL dimension. One numpy generator seeded with ``seed`` draws the projection,
    then the start index (the projection is drawn for every method, so all start at the same patch).
    """
    if method not in CORESET_METHODS:
        raise ValueError(f"coreset method must be one of {CORESET_METHODS}, got {method!r}")
    n, dim = embedding.shape
    n_select = int(n * float(ratio))
    if n_select < 1:
        raise ValueError(f"coreset_ratio {ratio} keeps no patch of {n}")
    with _one_blas_thread():
        return _select_coreset(embedding, n_select, int(seed), method, cell_size, probes, eps, log)


def _select_coreset(embedding: np.ndarray, n_select: int, seed: int, method: str, cell_size: int, probes: int,
                    eps: float, log: Optional[Callable[[str], None]]) -> Tuple[np.ndarray, Dict[str, Any]]:
    n, dim = embedding.shape
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    k = jl_min_dim(n, eps)
    projection = sparse_random_projection(dim, k, rng)
    projected = method != "fast" or dim > k
    features = project(embedding, projection) if projected else np.asarray(embedding, dtype=COMPUTE_DTYPE)
    start = int(rng.integers(0, n))
    t1 = time.perf_counter()

    def progress(i: int) -> None:
        if log is not None:
            log(f"coreset: {i}/{n_select} picks, {time.perf_counter() - t1:.0f} s")

    cells = 1
    if method == "bruteforce":
        idx = greedy_exact(features, n_select, start, progress, overwrite=projected)
    else:
        idx, cells = greedy_cells(features, n_select, start, cell_size, None if method == "exact" else probes,
                                  seed=seed, progress=progress)
    t2 = time.perf_counter()
    info = {"coreset_method": method, "patches": int(n), "bank_size": int(idx.shape[0]),
            "projection_dim": int(k if projected else dim), "projected": bool(projected), "start": start,
            "cells": int(cells), "probes": None if method != "fast" else int(probes),
            "projection_s": round(t1 - t0, 3), "greedy_s": round(t2 - t1, 3)}
    return idx, info
