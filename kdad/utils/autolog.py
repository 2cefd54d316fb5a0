"""A dependency-free benchmark logger compatible with ``auto_log.AutoLogger`` (AutoLog 1.2.0).

Same constructor, ``.times`` API (``start`` / ``stamp`` / ``end``) and ``report()`` lines as the
upstream package, which TIPC logs are parsed against. Differences, on purpose:

* ``report()`` returns instead of calling ``sys.exit(0)`` (set ``exit_after_report=True`` to get
  upstream's behaviour);
* memory is the peak resident set size of this process (:func:`kdad.utils.memory.peak_rss_mb`), not
  a sampling subprocess; GPU memory and utilisation come from ``nvidia-smi`` when ``gpu_ids`` is set;
* an empty time list gives 0.0 instead of an error; an optional ``per_image`` line divides the mean
  batch times by the batch size (off by default, so the block is line-for-line upstream's);
* ``data_num`` can be set to the number of images (:func:`set_data_num`); upstream counts ``end()``
  calls, i.e. batches;
* the default logger (:func:`report_logger`) is a stand-alone logger named ``root``, not the real
  root logger: Paddle installs a handler on the root logger, and upstream's logger, which adds its
  own handler there, prints every report line twice.

:func:`report_logger` and :func:`set_data_num` work with upstream's ``AutoLogger`` too (pass
``logger=report_logger()``), which is how :mod:`kdad.deploy.runtime` uses either.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from kdad.utils.memory import peak_rss_mb

DEFAULT_TIME_KEYS = ("preprocess_time", "inference_time", "postprocess_time")


class Times:
    """Stamps per iteration: ``start()``, one ``stamp()`` per phase, ``end()``."""

    def __init__(self, keys: Sequence[str] = DEFAULT_TIME_KEYS, warmup: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self.keys: List[str] = list(keys)
        self.warmup = int(warmup)
        self.clock = clock
        self.times: Dict[str, List[float]] = {key: [] for key in self.keys}
        self.total_time: List[float] = []
        self.time_stamps: List[float] = []
        self.stamp_count = 0
        self.data_num: Optional[int] = None  # reported data_num; None: the number of end() calls

    def reset(self) -> None:
        self.times = {key: [] for key in self.keys}
        self.total_time = []
        self.init()

    def init(self) -> None:
        self.stamp_count = 0
        self.time_stamps = []

    def start(self, stamp: bool = True) -> None:
        self.init()
        if stamp:
            self.time_stamps.append(self.clock())

    def stamp(self) -> None:
        """Close the current phase: its duration goes to key ``(count - 1) % len(keys)``."""
        if not self.time_stamps:
            self.start()
        self.stamp_count += 1
        self.time_stamps.append(self.clock())
        if self.stamp_count > len(self.keys):  # upstream quirk: extra stamps grow the key list
            self.keys.append(f"stamps_{self.stamp_count}")
        key = self.keys[(self.stamp_count - 1) % len(self.keys)]
        self.times.setdefault(key, []).append(self.time_stamps[-1] - self.time_stamps[-2])

    def end(self, stamp: bool = False) -> None:
        if stamp:
            self.stamp()
        if self.time_stamps:
            self.total_time.append(self.time_stamps[-1] - self.time_stamps[0])
        self.init()

    def _reduce(self, values: List[float], mode: Optional[str]) -> Any:
        if mode is None:
            return values
        if values and len(values) <= self.warmup:
            raise ValueError(f"{len(values)} time stamps; they must be more than warmup ({self.warmup})")
        kept = values[self.warmup:]
        if not kept:
            return 0.0
        return float(np.mean(kept)) if mode == "mean" else float(np.sum(kept))

    def value(self, key: Optional[Sequence[str]] = None, mode: Optional[str] = None) -> Dict[str, Any]:
        """Per-key ``mean`` / ``sum`` (after ``warmup`` entries) or raw lists (``mode=None``)."""
        for name in key or []:
            if name not in self.keys:
                raise KeyError(f"unknown time key {name!r}; keys are {self.keys}")
        return {name: self._reduce(self.times.get(name, []), mode) for name in self.keys}

    def _num_counts(self) -> int:
        """The report's ``data_num``: :attr:`data_num` when set, else the number of ``end()`` calls."""
        return self.data_num if self.data_num is not None else len(self.total_time)

    def _report_total_time(self, mode: str = "avg") -> Any:
        if mode == "avg":
            return self._reduce(self.total_time, "mean")
        if mode == "sum":
            return self._reduce(self.total_time, "sum")
        return self.total_time


def _run(command: Sequence[str]) -> Optional[str]:
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def os_version() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as handle:
            fields = dict(line.rstrip("\n").split("=", 1) for line in handle if "=" in line)
        name, version = fields.get("NAME", "").strip('"'), fields.get("VERSION_ID", "").strip('"')
        return f"{name} {version}".strip()
    except OSError:
        return f"{platform.system()} {platform.release()}"


def cuda_version() -> Optional[str]:
    out = _run(["nvcc", "--version"])
    match = re.search(r"release ([\d.]+)", out or "")
    return match.group(1) if match else None


def cudnn_version() -> Optional[str]:
    for header in ("/usr/include/cudnn_version.h", "/usr/local/cuda/include/cudnn_version.h",
                   "/usr/include/cudnn.h", "/usr/local/cuda/include/cudnn.h"):
        try:
            with open(header, encoding="utf-8", errors="ignore") as handle:
                text = handle.read()
        except OSError:
            continue
        parts = [re.search(rf"#define CUDNN_{name}\s+(\d+)", text)
                 for name in ("MAJOR", "MINOR", "PATCHLEVEL")]
        if all(parts):
            return ".".join(p.group(1) for p in parts)
    return None


def driver_version() -> Optional[str]:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.strip().splitlines()[0] if out and out.strip() else None


def gpu_memory(gpu_id: int) -> tuple:
    """``(used MB, utilisation %)`` of GPU ``gpu_id`` from nvidia-smi, or ``(None, None)``."""
    out = _run(["nvidia-smi", "--query-gpu=index,memory.used,utilization.gpu",
                "--format=csv,noheader,nounits"])
    for line in (out or "").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 3 and fields[0] == str(gpu_id):
            return float(fields[1]), float(fields[2])
    return None, None


def set_data_num(times: Any, count: int) -> None:
    """Make the report's ``data_num`` ``count`` (e.g. images) for this module's or upstream's ``Times``.

    Upstream reports the number of ``end()`` calls, which is the number of batches when a batch is
    timed as one iteration; its ``Times`` has no setting for it, so its ``_num_counts`` is replaced
    on that instance.
    """
    if isinstance(times, Times):
        times.data_num = int(count)
    else:
        times._num_counts = lambda: int(count)


def report_logger(save_path: Optional[str] = None) -> logging.Logger:
    """A stand-alone logger named ``root`` with upstream's line format, on stdout (and ``save_path``).

    It is not the real root logger and has no parent, so a handler that Paddle (or anything else)
    put on the root logger never sees its records: each report line is printed once. A new logger
    is made per call, so repeated reports do not stack handlers.
    """
    logger = logging.Logger("root", level=logging.DEBUG)
    formatter = logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s",
                                  datefmt="%Y/%m/%d %H:%M:%S")
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if save_path:
        os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
        handlers.append(logging.FileHandler(save_path, mode="w"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def parse_config(config: Any, precision: str) -> Dict[str, Any]:
    """``config_status`` from a Paddle Inference Config, a dict or None."""
    keys = ("runtime_device", "ir_optim", "enable_tensorrt", "enable_mkldnn", "cpu_math_library_num_threads")
    if config is None:
        status: Dict[str, Any] = {key: "None" for key in keys}
    elif isinstance(config, dict):
        status = {key: config.get(key) for key in keys}
    else:
        status = {
            "runtime_device": "gpu" if config.use_gpu() else "cpu",
            "ir_optim": config.ir_optim(),
            "enable_tensorrt": config.tensorrt_engine_enabled(),
            "enable_mkldnn": config.mkldnn_enabled(),
            "cpu_math_library_num_threads": config.cpu_math_library_num_threads(),
        }
    status["precision"] = precision
    return status


class AutoLogger:
    """Benchmark logger with ``auto_log.AutoLogger``'s interface and report format."""

    def __init__(self, model_name: str, model_precision: str = "fp32", batch_size: int = 1,
                 data_shape: Any = "dynamic", save_path: Optional[str] = None, inference_config: Any = None,
                 pids: Union[int, Sequence[int], None] = None, process_name: Optional[str] = None,
                 gpu_ids: Union[int, str, None] = None,
                 time_keys: Sequence[str] = DEFAULT_TIME_KEYS, warmup: int = 0,
                 logger: Optional[logging.Logger] = None, exit_after_report: bool = False,
                 per_image: bool = False, clock: Callable[[], float] = time.time, **kwargs: Any) -> None:
        import paddle

        self.model_name = model_name
        self.precision = model_precision
        self.batch_size = batch_size
        self.data_shape = data_shape
        self.pids = pids if pids is not None else os.getpid()
        self.process_name = process_name
        if gpu_ids == "auto":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            gpu_ids = int(visible[0]) if visible[:1].isdigit() else 0
        self.gpu_ids = gpu_ids
        self.logger = logger or report_logger(save_path)
        self.config_status = parse_config(inference_config, model_precision)
        self.paddle_version = paddle.__version__
        self.paddle_commit = (getattr(paddle, "__git_commit__", None)
                              or getattr(paddle.version, "commit", None))
        self.autolog_version = 1.0
        self.time_keys = list(time_keys)
        self.times = Times(list(time_keys), warmup=warmup, clock=clock)
        self.exit_after_report = exit_after_report
        self.per_image = per_image

    def get_env_info(self) -> Dict[str, Any]:
        return {"OS_version": os_version(), "CUDA_version": cuda_version(),
                "CUDNN_version": cudnn_version(), "drivier_version": driver_version()}

    def report(self, identifier: Optional[str] = None) -> None:
        """Log the Env/Paddle/Conf/Model/Data/Perf blocks (upstream's order and labels)."""
        p = f"[{identifier}]" if identifier else ""
        env = self.get_env_info()
        status = self.config_status
        gpu_rss, gpu_util = (gpu_memory(int(self.gpu_ids)) if self.gpu_ids is not None else (None, None))
        means = self.times.value(mode="mean")
        ms = {key: round(float(means.get(key, 0.0)) * 1000, 4) for key in self.time_keys}
        info = self.logger.info
        info("\n")
        info("---------------------- Env info ----------------------")
        for key in ("OS_version", "CUDA_version", "CUDNN_version", "drivier_version"):
            info(f"{p} {key}: {env[key]}")
        info("---------------------- Paddle info ----------------------")
        info(f"{p} paddle_version: {self.paddle_version}")
        info(f"{p} paddle_commit: {self.paddle_commit}")
        info(f"{p} log_api_version: {self.autolog_version}")
        info("----------------------- Conf info -----------------------")
        info(f"{p} runtime_device: {status['runtime_device']}")
        info(f"{p} ir_optim: {status['ir_optim']}")
        info(f"{p} enable_memory_optim: True")
        info(f"{p} enable_tensorrt: {status['enable_tensorrt']}")
        info(f"{p} enable_mkldnn: {status['enable_mkldnn']}")
        info(f"{p} cpu_math_library_num_threads: {status['cpu_math_library_num_threads']}")
        info("----------------------- Model info ----------------------")
        info(f"{p} model_name: {self.model_name}")
        info(f"{p} precision: {self.precision}")
        info("----------------------- Data info -----------------------")
        info(f"{p} batch_size: {self.batch_size}")
        info(f"{p} input_shape: {self.data_shape}")
        info(f"{p} data_num: {self.times._num_counts()}")
        info("----------------------- Perf info -----------------------")
        info(f"{p} cpu_rss(MB): {round(peak_rss_mb(), 4)}, gpu_rss(MB): {gpu_rss}, gpu_util: {gpu_util}%")
        info(f"{p} total time spent(s): {round(float(self.times._report_total_time('sum')), 4)}")
        info(f"{p} " + ", ".join(f"{key}(ms): {value}" for key, value in ms.items()))
        if self.per_image and self.batch_size:
            info(f"{p} per_image " + ", ".join(
                f"{key}(ms): {round(value / float(self.batch_size), 4)}" for key, value in ms.items()))
        if self.exit_after_report:
            sys.exit(0)
