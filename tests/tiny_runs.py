"""The tiny KDAD run the run-folder and misuse tests share (random 32 px expert, 2 epochs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdad.config import Config, load_config

CLASS = "tex"


def tiny_config(data: Path, out: Path, **overrides: Any) -> Config:
    """A config training class ``tex`` of ``data`` into ``out/out`` (logs in ``out/logs``)."""
    values = {
        "dataset_root": str(data), "normal_class": CLASS, "pretrain": False, "mvtec_img_size": 32,
        "batch_size": 4, "num_epochs": 2, "save_every": 1, "progress_bar": False, "eval_batch_size": 32,
        "save_dir": str(out / "out"), "log_dir": str(out / "logs"), "cpu_threads": 1,
    }
    values.update(overrides)
    return load_config(None, values)
