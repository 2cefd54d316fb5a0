"""Fitting PatchCore: patch embeddings of the normal training images, then the coreset memory bank.

No training: the embeddings of all training patches (rows ordered image, y, x) are reduced by
greedy k-center selection (:mod:`kdad.methods.patchcore.coreset`) to ``coreset_ratio`` of them,
and the selected rows become the model's ``memory_bank``.

Config keys read here beyond kdad's table (with defaults, so an older config works):
``coreset_method`` (``"fast"`` | ``"exact"`` | ``"bruteforce"``), ``coreset_cell_size`` and
``coreset_probes`` (the cells of ``fast``, see :mod:`kdad.methods.patchcore.coreset`) and
``feature_engine`` (``"paddle_inference"``: the embedding network exported once to a temporary static
model and run by Paddle Inference with oneDNN: EfficientNet-Lite0 at 256 px 50 instead of 235 ms per
image on 2 cores, features equal to ~1e-6 relative; ``"dygraph"``: the model itself).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import paddle
import paddle.nn as nn

from kdad.methods.patchcore.coreset import DEFAULT_CELL_SIZE, DEFAULT_PROBES, select_coreset
from kdad.methods.patchcore.model import PatchcoreModel

FEATURE_ENGINES = ("paddle_inference", "dygraph")


class _PooledGraph(nn.Layer):
    """``x -> model.pooled_features(x)`` (for export; the bilinear resize stays in the dynamic graph
    because interpolation ops fail under oneDNN in Paddle 3.3.1)."""

    def __init__(self, model: PatchcoreModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: paddle.Tensor) -> List[paddle.Tensor]:
        return self.model.pooled_features(x)


class _InferenceEmbedder:
    """``model.pooled_features`` exported to a temporary static model and run by Paddle Inference
    with oneDNN; ``__call__`` returns the embedding (``model.combine`` in the dynamic graph)."""

    def __init__(self, model: PatchcoreModel, image_size: int, threads: int) -> None:
        from paddle import inference

        self._tmp = tempfile.TemporaryDirectory(prefix="kdad_patchcore_")
        prefix = os.path.join(self._tmp.name, "embed")
        self.model = model
        graph = _PooledGraph(model)
        graph.eval()
        spec = [paddle.static.InputSpec([None, 3, image_size, image_size], "float32", name="x")]
        paddle.jit.save(paddle.jit.to_static(graph, input_spec=spec, full_graph=True), prefix)
        model_file = prefix + (".json" if os.path.isfile(prefix + ".json") else ".pdmodel")
        config = inference.Config(model_file, prefix + ".pdiparams")
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(max(1, int(threads)))
        config.enable_mkldnn()
        config.switch_ir_optim(True)
        config.disable_glog_info()
        self.predictor = inference.create_predictor(config)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        handle = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        handle.reshape(list(images.shape))
        handle.copy_from_cpu(np.ascontiguousarray(images, dtype=np.float32))
        self.predictor.run()
        pooled = [paddle.to_tensor(self.predictor.get_output_handle(name).copy_to_cpu())
                  for name in self.predictor.get_output_names()]
        with paddle.no_grad():
            return self.model.combine(pooled).numpy()

    def close(self) -> None:
        self.predictor = None
        self._tmp.cleanup()


def _reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def patch_embeddings(model: PatchcoreModel, images: np.ndarray, batch_size: int = 16,
                     engine: str = "dygraph", threads: int = 2, log: Optional[Callable[[str], None]] = None,
                     info: Optional[Dict[str, Any]] = None) -> np.ndarray:
    """Embeddings of all patches of ``images [N, 3, S, S]`` (float32 in [0, 1]) as ``[N * h * w, D]``,
    rows ordered (image, y, x), computed ``batch_size`` images at a time.

    ``engine="paddle_inference"`` falls back to the dynamic graph (with a warning) when the export or
    the first batch fails; ``info["feature_engine"]`` tells which engine ran."""
    if engine not in FEATURE_ENGINES:
        raise ValueError(f"feature engine must be one of {FEATURE_ENGINES}, got {engine!r}")
    n, size = int(images.shape[0]), int(images.shape[-1])
    grid = size // model.feature_stride
    out = np.empty((n * grid * grid, model.feature_dim), dtype=np.float32)
    model.eval()
    batch_size = max(1, int(batch_size))

    def dygraph(batch: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            return model.embed(paddle.to_tensor(batch)).numpy()

    def fall_back(error: BaseException) -> None:
        warnings.warn(f"PatchCore features: Paddle Inference failed ({_reason(error)}); "
                      "using the dynamic graph", stacklevel=3)

    embedder: Optional[_InferenceEmbedder] = None
    if engine == "paddle_inference":
        try:
            embedder = _InferenceEmbedder(model, size, threads)
        except Exception as error:  # noqa: BLE001 - any export/predictor failure: the dynamic graph works
            fall_back(error)
    try:
        row = 0
        for lo in range(0, n, batch_size):
            batch = np.ascontiguousarray(images[lo:lo + batch_size], dtype=np.float32)
            emb = None
            if embedder is not None:
                try:
                    emb = embedder(batch)
                except Exception as error:  # noqa: BLE001 - only the first batch may fall back
                    if lo > 0:
                        raise
                    fall_back(error)
                    embedder.close()
                    embedder = None
            if emb is None:
                emb = dygraph(batch)
            if emb.shape[2] != grid or emb.shape[3] != grid:
                raise ValueError(f"embedding grid {list(emb.shape[2:])} differs from {size} // "
                                 f"{model.feature_stride} = {grid}: the image size must be a multiple of 32")
            rows = emb.transpose(0, 2, 3, 1).reshape(-1, emb.shape[1])
            out[row:row + rows.shape[0]] = rows
            row += rows.shape[0]
            if log is not None and (lo // batch_size) % 10 == 9:
                log(f"patchcore features: {min(lo + batch_size, n)}/{n} images")
        if info is not None:
            info["feature_engine"] = "paddle_inference" if embedder is not None else "dygraph"
    finally:
        if embedder is not None:
            embedder.close()
    return out


def fit_patchcore(model: PatchcoreModel, images: np.ndarray, config: Mapping[str, Any],
                  log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Fit ``model`` on normal ``images [N, 3, S, S]`` in [0, 1]: memory bank = coreset of all patch
    embeddings. Returns facts for the log and the checkpoint."""
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"PatchCore needs training images [N, 3, S, S], got shape {list(images.shape)}")
    method = str(config.get("coreset_method", "fast"))
    engine = str(config.get("feature_engine", "paddle_inference"))
    t0 = time.perf_counter()
    threads = int(config.get("cpu_threads", 0) or os.cpu_count() or 1)
    used: Dict[str, Any] = {}
    embedding = patch_embeddings(model, images, batch_size=int(config.get("eval_batch_size", 16)),
                                 engine=engine, threads=threads, log=log, info=used)
    t1 = time.perf_counter()
    idx, info = select_coreset(embedding, float(config["coreset_ratio"]), int(config["seed"]), method=method,
                               cell_size=int(config.get("coreset_cell_size", DEFAULT_CELL_SIZE)),
                               probes=int(config.get("coreset_probes", DEFAULT_PROBES)), log=log)
    t2 = time.perf_counter()
    model.set_memory_bank(embedding[idx])
    model.mark_fitted()
    facts = {"images": int(images.shape[0]), "feature_dim": int(model.feature_dim),
             "feature_engine": used.get("feature_engine", engine), "features_s": round(t1 - t0, 3),
             "coreset_s": round(t2 - t1, 3)}
    facts.update(info)
    if log is not None:
        log(f"patchcore: {info['patches']} patches -> memory bank {info['bank_size']} x {model.feature_dim} "
            f"({method} coreset, projection dim {info['projection_dim']}); features {t1 - t0:.1f} s, "
            f"coreset {t2 - t1:.1f} s")
    return facts
