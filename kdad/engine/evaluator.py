"""Evaluation on the test set: image AUROC, localization maps and pixel metrics, val logs."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import paddle

from kdad.config import require_dataset
from kdad.data import list_folder
from kdad.engine.common import (
    backbone_of,
    class_dir,
    class_name,
    dataset,
    exclude_recorded,
    log_path,
    predict_maps,
    score_images,
    set_cpu_threads,
    test_samples,
)
from kdad.methods.kdad.localization import localization_maps
from kdad.metrics import compute_all
from kdad.utils.checkpoint import list_epoch_checkpoints, load_checkpoint, load_model, run_id

METRIC_ORDER = ("image_auroc", "image_f1_max", "paper_localization_auc", "pixel_auroc", "aupro")


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def evaluate_model(model: Any, config: Mapping[str, Any],
                   samples: Optional[List[Any]] = None) -> Dict[str, Any]:
    """Metrics of ``model`` on ``samples`` (default: the test split of ``config``); no threshold is
    chosen here."""
    data = dataset(test_samples(config) if samples is None else samples, config)
    images, labels = data.images(), data.labels
    batch = int(config["eval_batch_size"])
    t0 = time.time()
    if config["method"] != "kdad":
        scores, maps = predict_maps(model, images, batch)
        has_mask = data.has_masks.astype(bool)
        if config["dataset_name"] == "folder" or not config["localization_test"] \
                or not has_mask[labels == 1].any():
            metrics = compute_all(labels, scores)
        else:
            metrics = compute_all(labels, scores, masks=data.masks(), maps=maps, has_mask=has_mask)
    elif not config["localization_test"]:
        scores = score_images(model, images, batch)
        metrics = compute_all(labels, scores)
    else:
        scores_list: List[np.ndarray] = []
        paper_list: List[np.ndarray] = []
        raw_list: List[np.ndarray] = []
        for start in range(0, len(images), batch):
            s, paper, raw = localization_maps(
                model, paddle.to_tensor(images[start:start + batch]), config["localization_method"],
                float(config["blur_sigma"]), int(config["smoothgrad_samples"]),
                float(config["smoothgrad_sigma"]),
            )
            scores_list.append(s)
            paper_list.append(paper)
            raw_list.append(raw)
        scores = np.concatenate(scores_list)
        has_mask = data.has_masks.astype(bool)
        if config["dataset_name"] == "folder" or not has_mask[labels == 1].any():
            metrics = compute_all(labels, scores)
        else:
            metrics = compute_all(labels, scores, masks=data.masks(), maps=np.concatenate(raw_list),
                                  paper_maps=np.concatenate(paper_list), has_mask=has_mask)
    metrics = {key: float(value) for key, value in metrics.items()}
    return {
        "metrics": metrics,
        "num_test_images": int(len(labels)),
        "num_defective": int(labels.sum()),
        "seconds": round(time.time() - t0, 2),
        "scores": scores.tolist(),
        "labels": labels.tolist(),
        "files": [s.path for s in data.samples],
    }


def write_val_log(config: Mapping[str, Any], result: Mapping[str, Any], model_desc: str) -> str:
    """Write ``logs/<class>_val.log`` (one ``key: value`` per line) and its JSON twin."""
    name = class_name(config)
    path = log_path(config, "val")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    kdad = config["method"] == "kdad"
    lines = [
        f"class: {name}",
        f"method: {config['method']}",
        f"model: {model_desc}",
        f"backbone: {backbone_of(config)}",
        f"pretrain: {config['pretrain'] if kdad else config['backbone_pretrained']}",
    ]
    if kdad:
        lines.append(f"expert: {config['expert']}")
    map_kind = config["localization_method"] if kdad else "anomaly_map"
    lines += [
        f"localization_method: {map_kind if config['localization_test'] else 'none'}",
        f"image_size: {config['mvtec_img_size']}",
        f"test_images: {result['num_test_images']}",
        f"defective_images: {result['num_defective']}",
    ]
    metrics = result["metrics"]
    for key in METRIC_ORDER:
        if key in metrics:
            lines.append(f"{key}: {metrics[key]:.4f}")
    lines.append(f"eval_seconds: {result['seconds']}")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    summary = {key: value for key, value in result.items() if key not in ("scores", "labels", "files")}
    summary.update({"class": name, "method": config["method"], "model": model_desc,
                    "backbone": backbone_of(config)})
    if kdad:
        summary["expert"] = config["expert"]
    with open(path[:-4] + ".json", "w", encoding="utf-8") as handle:
        json.dump({**summary, "per_image": [
            {"file": f, "label": int(lab), "score": float(s)}
            for f, lab, s in zip(result["files"], result["labels"], result["scores"])]}, handle, indent=1)
    return path


def checkpoint_test_samples(path: str, state: Mapping[str, Any], config: Mapping[str, Any]
                            ) -> Tuple[List[Any], List[str]]:
    """``(test samples, warnings)`` for checkpoint ``path``: never an image the checkpoint records as
    trained on or held out for calibration. For the folder dataset the test images are the good
    images outside the recorded split (whatever seed is set now) and every defective image."""
    warnings: List[str] = []
    trained_class = state["config"].get("normal_class")
    if trained_class is not None and trained_class != config["normal_class"]:
        warnings.append(f"'{path}' was trained on class '{trained_class}' but is evaluated on class "
                        f"'{config['normal_class']}'")
    record = state.get("split")
    if config["dataset_name"] == "folder":
        if record and record.get("dataset_name") == "folder":
            folder = require_dataset(config)
            samples, _ = exclude_recorded(list_folder(folder, config["good_dir"], config["defect_dir"]),
                                          record, config)
            return samples, warnings
        warnings.append(f"'{path}' records no folder-dataset split (an older checkpoint or another dataset): "
                        "the test part is computed from the seed and fractions of the configuration and may "
                        "hold images it was trained on")
        return test_samples(config), warnings
    samples, excluded = exclude_recorded(test_samples(config), record, config)
    if excluded:
        warnings.append(f"{len(excluded)} test image(s) left out: '{path}' was trained or calibrated on them "
                        f"(e.g. {excluded[0].path})")
    if not samples:
        raise ValueError(f"no test image is left for '{path}': every one was trained on or held out")
    return samples, warnings


def evaluate_checkpoint(model_path: str, config: Mapping[str, Any]) -> Dict[str, Any]:
    """Evaluate a checkpoint; the result's ``config`` is the effective one (networks from the file).
    Images the checkpoint was trained or calibrated on are never scored
    (:func:`checkpoint_test_samples`)."""
    model, state, effective = load_model(model_path, config)
    samples, warnings = checkpoint_test_samples(model_path, state, effective)
    for warning in warnings:
        _warn(warning)
    result = evaluate_model(model, effective, samples)
    result["config"] = effective
    if warnings:
        result["warnings"] = warnings
    return result


def evaluate_average(folder: str, config: Mapping[str, Any], from_epoch: int) -> Dict[str, Any]:
    """The paper's protocol: the mean of each metric over the periodic checkpoints (every
    ``save_every`` epochs) from ``from_epoch`` on. No checkpoint is selected."""
    checkpoints = [(e, p) for e, p in list_epoch_checkpoints(folder) if e >= from_epoch]
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoint_epoch_*.pdparams with epoch >= {from_epoch} in '{folder}'")
    runs: Dict[Optional[str], List[int]] = {}
    for epoch, path in checkpoints:  # averaging only within one run
        runs.setdefault(run_id(load_checkpoint(path)), []).append(epoch)
    if len(runs) > 1:
        listed = "; ".join(f"run {rid or '(no run id, older version)'}: epochs {epochs}"
                           for rid, epochs in runs.items())
        raise ValueError(f"the checkpoints in '{folder}' belong to {len(runs)} different runs ({listed}); "
                         "only the checkpoints of one run are averaged: keep one run per folder")
    results = [evaluate_checkpoint(path, config) for _, path in checkpoints]
    keys = results[0]["metrics"].keys()
    averaged = {key: float(np.mean([r["metrics"][key] for r in results])) for key in keys}
    last = dict(results[-1])
    last["metrics"] = averaged
    last["averaged_epochs"] = [e for e, _ in checkpoints]
    last["per_checkpoint"] = [{"epoch": e, "metrics": r["metrics"]}
                              for (e, _), r in zip(checkpoints, results)]
    # per-image scores differ per checkpoint: the averaged result carries none
    last["scores"], last["labels"], last["files"] = [], [], []
    return last


def run_test(config: Mapping[str, Any], model_path: Optional[str], average: bool = False) -> Dict[str, Any]:
    """Evaluate and write the val logs; returns the result."""
    set_cpu_threads(int(config["cpu_threads"]))
    if average:
        folder = model_path if model_path and os.path.isdir(model_path) else class_dir(config)
        result = evaluate_average(folder, config, int(config["average_from_epoch"]))
        epochs = result["averaged_epochs"]
        desc = (f"average of {len(epochs)} checkpoints, epochs {epochs[0]}..{epochs[-1]} "
                f"(paper protocol) in {folder}")
    else:
        if not model_path:
            raise ValueError("--model_path is required (or --average_checkpoints)")
        result = evaluate_checkpoint(model_path, config)
        desc = f"{model_path} (final model, no checkpoint selection)"
    result["log_path"] = write_val_log(result.pop("config"), result, desc)
    return result
