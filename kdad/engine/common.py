"""Helpers shared by the loops: seeding, datasets from a config, batched scoring."""

from __future__ import annotations

import os
import random
from typing import Any, List, Mapping, Tuple

import numpy as np
import paddle

from kdad.config import require_dataset
from kdad.data import AnomalyDataset, Sample, list_folder, list_mvtec, split_holdout


def set_cpu_threads(threads: int, processes: int = 1) -> int:
    """CPU math threads of the dynamic graph (Paddle's default is 1); 0 shares all cores among
    ``processes``. Returns the number set."""
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 1) // max(1, processes))
    paddle.base.core.set_num_threads(int(threads))
    return int(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def train_samples(config: Mapping[str, Any]) -> List[Sample]:
    """Normal training images (``train/good`` or the folder dataset's good folder)."""
    folder = require_dataset(config)
    if config["dataset_name"] == "folder":
        return [s for s in list_folder(folder, config["good_dir"], config["defect_dir"]) if s.label == 0]
    return list_mvtec(config["dataset_root"], config["normal_class"], "train")


def test_samples(config: Mapping[str, Any]) -> List[Sample]:
    folder = require_dataset(config)
    if config["dataset_name"] == "folder":
        return list_folder(folder, config["good_dir"], config["defect_dir"])
    return list_mvtec(config["dataset_root"], config["normal_class"], "test",
                      require_masks=bool(config["require_masks"]))


def split_train(config: Mapping[str, Any]) -> Tuple[List[Sample], List[Sample]]:
    """``(train, holdout)``: a documented fraction of the normal images is held out for calibration."""
    samples = train_samples(config)
    train_idx, holdout_idx = split_holdout(len(samples), float(config["holdout_fraction"]),
                                           int(config["seed"]))
    return [samples[i] for i in train_idx], [samples[i] for i in holdout_idx]


def dataset(samples: List[Sample], config: Mapping[str, Any]) -> AnomalyDataset:
    return AnomalyDataset(samples, int(config["mvtec_img_size"]))


def class_name(config: Mapping[str, Any]) -> str:
    return config["normal_class"] or "folder"


def class_dir(config: Mapping[str, Any]) -> str:
    """Where a run's checkpoints go: ``<save_dir>/<class>`` for KDAD (as always), and
    ``<save_dir>/<method>/<class>`` for the other methods, so methods never share files."""
    if config["method"] == "kdad":
        return os.path.join(config["save_dir"], class_name(config))
    return os.path.join(config["save_dir"], config["method"], class_name(config))


def log_path(config: Mapping[str, Any], kind: str) -> str:
    """``<log_dir>/<class>_<kind>.log`` for KDAD, ``<log_dir>/<method>/<class>_<kind>.log`` otherwise."""
    folder = config["log_dir"] if config["method"] == "kdad" else os.path.join(config["log_dir"],
                                                                                 config["method"])
    return os.path.join(folder, f"{class_name(config)}_{kind}.log")


@paddle.no_grad()
def predict_maps(model: Any, images: np.ndarray, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(scores [N], maps [N, S, S])`` of a method's exportable model, computed in batches."""
    model.eval()
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
        s, m = model(paddle.to_tensor(images[start:start + batch_size]))
        scores.append(s.numpy())
        maps.append(m.numpy())
    if not scores:
        size = images.shape[-1] if images.ndim == 4 else 0
        return np.zeros(0, np.float32), np.zeros((0, size, size), np.float32)
    return np.concatenate(scores), np.concatenate(maps)


@paddle.no_grad()
def score_images(model: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Anomaly scores of ``images`` [N,3,H,W] in [0, 1], computed in batches."""
    model.eval()
    scores = [model.score(paddle.to_tensor(images[i:i + batch_size])).numpy()
              for i in range(0, len(images), batch_size)]
    return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
