"""Shared helpers of the benchmark suite: environment, timing, peak memory, checkpoints, rows.

Every benchmark part runs in its own subprocess (``bench_all.py`` starts them), so thread counts and
environment variables that must be set before ``import paddle`` (``MKL_DEBUG_CPU_TYPE``) apply, and
the peak memory of one part does not leak into another. Import this module *before* paddle.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from kdad.utils.memory import peak_rss_mb  # noqa: E402,F401 - the benchmarks' peak memory

# Environments a part can run in. "default": paddle as installed. "tuned": Intel MKL (which
# Paddle's CPU wheel uses for GEMM in its native conv/matmul kernels) told to use its AVX2 code
# path on this AMD CPU; without it MKLML takes a slow generic path on non-Intel CPUs.
ENVIRONMENTS: Dict[str, Dict[str, str]] = {
    "default": {"MKL_DEBUG_CPU_TYPE": ""},  # Paddle as installed: empty also stops kdad setting it
    "tuned": {"MKL_DEBUG_CPU_TYPE": "5"},
}


def thread_env(threads: int) -> Dict[str, str]:
    n = str(int(threads))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
            "FLAGS_cpu_deterministic": "false", "GLOG_minloglevel": "2", "GLOG_v": "0",
            "PYTHONWARNINGS": "ignore"}


def part_env(env_name: str, threads: int) -> Dict[str, str]:
    """The full environment of a benchmark subprocess."""
    env = {key: value for key, value in os.environ.items() if key not in ENVIRONMENTS["tuned"]}
    env.update(thread_env(threads))
    env.update(ENVIRONMENTS[env_name])
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def init_paddle(threads: int):
    """Import paddle with ``threads`` CPU math threads (dygraph), quietly."""
    import warnings

    warnings.filterwarnings("ignore")
    import paddle

    paddle.set_device("cpu")
    paddle.base.core.set_num_threads(int(threads))
    return paddle


def gpu_available() -> bool:
    try:
        import paddle

        return bool(paddle.device.is_compiled_with_cuda()) and paddle.device.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - any failure means no GPU
        return False


# --- timing ----------------------------------------------------------------------------------


def interleaved_timing(functions: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
                       ) -> Dict[str, Dict[str, Any]]:
    """Time several callables side by side: warm-up each, then ``repeats`` rounds of one call each.

    Interleaving spreads slow drifts of a shared machine over all of them equally. Returns
    ``name -> {"median_s", "min_s", "times_s"}``.
    """
    for function in functions.values():
        for _ in range(warmup):
            function()
    times: Dict[str, List[float]] = {name: [] for name in functions}
    for _ in range(max(1, int(repeats))):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(values), "min_s": min(values), "times_s": values}
            for name, values in times.items()}


def load_average() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# --- machine ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> List[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    except OSError:
        pass
    return []


def _mem_total_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def git_commit() -> Dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  check=False).stdout.strip()
        except OSError:
            return ""

    status = run("status", "--porcelain")
    return {"commit": run("rev-parse", "HEAD"), "short": run("rev-parse", "--short", "HEAD"),
            "dirty": bool(status), "dirty_files": len(status.splitlines()) if status else 0}


def machine_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "cpu_flags": _cpu_flags(),
        "memory_gb": _mem_total_gb(), "python": platform.python_version(),
        "platform": platform.platform(),
    }
    versions = {}
    for name in ("paddle", "numpy", "onnxruntime", "paddle2onnx", "scipy"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001
            versions[name] = None
    info["versions"] = versions
    return info


# --- checkpoints -------------------------------------------------------------------------------


def make_checkpoint(work_dir: str, expert: str, size: int = 128, n_train: int = 16) -> str:
    """A real trainer checkpoint for benchmarking: 1 epoch on a small generated texture class.

    ``pretrain=False`` (a random expert, saved beside the checkpoint): expert weights do not change
    speed. Reused when it already exists.
    """
    out = os.path.join(work_dir, f"ckpt_{expert}_{size}")
    final = os.path.join(out, "synthetic", "model_final.pdparams")
    if os.path.isfile(final):
        return final
    from kdad.config import load_config
    from kdad.data.synthetic import generate_synthetic_class
    from kdad.engine.trainer import train

    data_root = os.path.join(work_dir, f"data_{size}_{n_train}")
    if not os.path.isdir(os.path.join(data_root, "synthetic")):
        generate_synthetic_class(data_root, "synthetic", kind="texture", size=size, n_train=n_train)
    config = load_config(None, {
        "dataset_root": data_root, "normal_class": "synthetic", "num_epochs": 1, "mvtec_img_size": size,
        "pretrain": False, "expert": expert, "save_dir": out, "log_dir": os.path.join(out, "logs"),
        "progress_bar": False, "batch_size": 16, "save_every": 0, "overwrite": True,
    })
    path = train(config)
    if not path or not os.path.isfile(path):
        raise RuntimeError("the trainer did not write a checkpoint")
    return path


def export_dir(work_dir: str, checkpoint: str) -> str:
    """``kdad.export.export_model`` of ``checkpoint`` (score, heatmap, feature_map), cached."""
    folder = os.path.join(os.path.dirname(checkpoint), "export")
    heatmap_yaml = os.path.join(folder, "heatmap", "deploy.yaml")
    current = os.path.isfile(heatmap_yaml) and "heatmap_backward" in open(heatmap_yaml, encoding="utf-8").read()
    if current and all(os.path.isfile(os.path.join(folder, kind, "model.json"))
                       for kind in ("score", "heatmap", "feature_map")):
        return folder
    from kdad.export import export_model

    export_model(checkpoint, folder, overwrite=True)  # a stale or partial export is replaced
    return folder


def random_images(n: int, size: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)


# --- rows and results ----------------------------------------------------------------------------


def row(task: str, engine: str, batch: int, timing: Optional[Mapping[str, Any]], images: int,
        **extra: Any) -> Dict[str, Any]:
    """One table row: per-image time and throughput from a timing of one call on ``images`` images."""
    result: Dict[str, Any] = {"task": task, "engine": engine, "batch": batch}
    if timing is not None:
        median = float(timing["median_s"])
        result.update({
            "ms_per_image": 1000.0 * median / images, "images_per_s": images / median,
            "median_s": median, "min_s": float(timing["min_s"]), "repeats": len(timing["times_s"]),
        })
    result.update(extra)
    return result


def write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    if isinstance(value, set):
        return sorted(value)
    return str(value)


def max_rel_diff(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = max(float(np.abs(b).max()), 1e-12)
    return float(np.abs(a - b).max() / scale)


def rel_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))


def check(name: str, passed: bool, **values: Any) -> Dict[str, Any]:
    return {"check": name, "passed": bool(passed), **values}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def args_list(values: Optional[Sequence[Any]]) -> List[Any]:
    return list(values or [])
