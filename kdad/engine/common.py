"""Helpers shared by the loops: seeding, datasets from a config, batched scoring."""

from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import paddle

from kdad.config import require_dataset
from kdad.data import AnomalyDataset, Sample, list_folder, list_mvtec, split_holdout
from kdad.data.datasets import split_folder_good


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


def _folder_split(config: Mapping[str, Any]) -> Dict[str, List[Sample]]:
    """The folder dataset's good images split into train / holdout / test (seeded, never
    overlapping: :func:`kdad.data.datasets.split_folder_good`); ``defect`` are the defective ones."""
    folder = require_dataset(config)
    samples = list_folder(folder, config["good_dir"], config["defect_dir"])
    good = [s for s in samples if s.label == 0]
    train_idx, holdout_idx, test_idx = split_folder_good(
        len(good), float(config["test_fraction"]), float(config["holdout_fraction"]), int(config["seed"]))
    return {"train": [good[i] for i in train_idx], "holdout": [good[i] for i in holdout_idx],
            "test": [good[i] for i in test_idx], "defect": [s for s in samples if s.label == 1]}


def train_samples(config: Mapping[str, Any]) -> List[Sample]:
    """Normal training images, hold-out included (``train/good``; for the folder dataset the good
    images outside the test part)."""
    if config["dataset_name"] == "folder":
        split = _folder_split(config)
        return sorted(split["train"] + split["holdout"], key=lambda s: s.path)
    require_dataset(config)
    return list_mvtec(config["dataset_root"], config["normal_class"], "train")


def test_samples(config: Mapping[str, Any]) -> List[Sample]:
    """The test set: MVTec ``test/``; for the folder dataset the test part of the good images
    (``test_fraction``, never trained on or calibrated with) and every defective image."""
    if config["dataset_name"] == "folder":
        split = _folder_split(config)
        return split["test"] + split["defect"]
    require_dataset(config)
    return list_mvtec(config["dataset_root"], config["normal_class"], "test",
                      require_masks=bool(config["require_masks"]))


def split_train(config: Mapping[str, Any]) -> Tuple[List[Sample], List[Sample]]:
    """``(train, holdout)``: a documented fraction of the normal images is held out for calibration."""
    if config["dataset_name"] == "folder":
        split = _folder_split(config)
        return split["train"], split["holdout"]
    samples = train_samples(config)
    train_idx, holdout_idx = split_holdout(len(samples), float(config["holdout_fraction"]),
                                           int(config["seed"]))
    return [samples[i] for i in train_idx], [samples[i] for i in holdout_idx]


def relative_name(sample: Sample, config: Mapping[str, Any]) -> str:
    """``sample``'s path relative to the class folder (``dataset_root/normal_class``), with ``/``."""
    folder = os.path.join(config["dataset_root"], config["normal_class"])
    return os.path.relpath(os.path.abspath(sample.path), os.path.abspath(folder)).replace(os.sep, "/")


def split_record(config: Mapping[str, Any], train: List[Sample], holdout: List[Sample]) -> Dict[str, Any]:
    """What a checkpoint records of its data split: the seed and fractions, and the file names
    (relative to the class folder) trained on and held out for calibration; for the folder dataset
    also the good images kept for the test set."""
    record: Dict[str, Any] = {
        "dataset_name": config["dataset_name"],
        "class_folder": os.path.abspath(os.path.join(config["dataset_root"], config["normal_class"])),
        "seed": int(config["seed"]), "holdout_fraction": float(config["holdout_fraction"]),
        "train": [relative_name(s, config) for s in train],
        "holdout": [relative_name(s, config) for s in holdout],
    }
    if config["dataset_name"] == "folder":
        record["test_fraction"] = float(config["test_fraction"])
        record["test_good"] = [relative_name(s, config) for s in _folder_split(config)["test"]]
    return record


def compare_split(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """The differences between two split records' file lists (empty when the same images are
    trained on and held out)."""
    problems = []
    for part in ("train", "holdout"):
        before, now = set(recorded.get(part) or []), set(current.get(part) or [])
        if before != now:
            added, missing = sorted(now - before), sorted(before - now)
            what = []
            if added:
                what.append(f"{len(added)} new (e.g. {added[0]})")
            if missing:
                what.append(f"{len(missing)} missing (e.g. {missing[0]})")
            problems.append(f"{part} images: {', '.join(what)}")
    return problems


def exclude_recorded(samples: List[Sample], record: Optional[Mapping[str, Any]],
                     config: Mapping[str, Any]) -> Tuple[List[Sample], List[Sample]]:
    """``(kept, excluded)``: ``samples`` without the images ``record`` (a checkpoint's split) says
    were trained on or held out for calibration (compared by name in the class folder)."""
    if not record:
        return list(samples), []
    used = set(record.get("train") or []) | set(record.get("holdout") or [])
    kept, excluded = [], []
    for sample in samples:
        (excluded if relative_name(sample, config) in used else kept).append(sample)
    return kept, excluded


def dataset(samples: List[Sample], config: Mapping[str, Any]) -> AnomalyDataset:
    return AnomalyDataset(samples, int(config["mvtec_img_size"]))


def backbone_of(config: Mapping[str, Any]) -> str:
    """The backbone a run of ``config`` uses, as logs and checkpoints name it: KDAD's expert, "none" for
    a method without one (DRAEM), else ``backbone``."""
    if config["method"] == "kdad":
        return str(config["expert"])
    from kdad.registry import get_method

    return str(config["backbone"]) if get_method(config["method"]).uses_backbone else "none"


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
