"""Prediction on new images: anomaly score, OK/NG decision and a heatmap panel per image.

The OK/NG threshold is the checkpoint's calibrated one (held-out normal training images) unless
one is given; NG iff ``score > threshold``. Heatmaps are the method's anomaly maps (KDAD: the raw
gradient maps of :func:`kdad.methods.kdad.localization.localization_maps`) coloured with the fixed
normal-image scale of :mod:`kdad.visualize` (pixel threshold: ``map_statistics["p999"]`` unless given).

Outputs in ``save_dir`` (or, if it already holds results of an earlier run, in the first free
``save_dir/run_NNN``): ``<stem>_result.png`` per image, ``results.csv`` and ``results.json``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import paddle

from kdad.data.io import IMAGE_EXTENSIONS, ImageReadError, preprocess, read_image
from kdad.engine.common import predict_maps
from kdad.methods.kdad.localization import localization_maps
from kdad.utils.checkpoint import load_model
from kdad.visualize import colour_range, default_pixel_threshold, over_threshold, result_panel, save_rgb

RESULT_SUFFIX = "_result.png"
CSV_NAME, JSON_NAME = "results.csv", "results.json"
CSV_FIELDS = ("file", "score", "decision", "threshold", "result_image", "map_max", "anomalous_area")


def is_image_file(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def list_images(path: str) -> List[str]:
    """``path`` itself if it is an image file, else the image files directly in folder ``path``
    (sorted, not recursive; other files are ignored)."""
    if os.path.isfile(path):
        if not is_image_file(path):
            raise ValueError(f"'{path}' is not an image file (supported: {', '.join(IMAGE_EXTENSIONS)})")
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image path '{path}' does not exist")
    names = sorted(os.listdir(path))
    files = [os.path.join(path, n) for n in names
             if is_image_file(n) and os.path.isfile(os.path.join(path, n))]
    if not files:
        subfolders = [n for n in names if os.path.isdir(os.path.join(path, n))]
        hint = f"; sub-folders are not searched ({', '.join(subfolders[:5])})" if subfolders else ""
        raise ValueError(
            f"folder '{path}' holds no image file (supported: {', '.join(IMAGE_EXTENSIONS)}){hint}"
        )
    return files


def _holds_results(folder: str) -> bool:
    if not os.path.isdir(folder):
        return False
    return any(n in (CSV_NAME, JSON_NAME) or n.endswith(RESULT_SUFFIX) for n in os.listdir(folder))


def output_dir(save_dir: str) -> str:
    """``save_dir``, or the first free ``save_dir/run_NNN`` if ``save_dir`` holds earlier results."""
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ValueError(f"save_dir '{save_dir}' exists and is not a folder")
    if not _holds_results(save_dir):
        os.makedirs(save_dir, exist_ok=True)
        return save_dir
    number = 1
    while True:
        candidate = os.path.join(save_dir, f"run_{number:03d}")
        try:
            os.makedirs(candidate)
        except FileExistsError:
            number += 1
            continue
        print(f"note: '{save_dir}' already holds results of an earlier run (kept); writing to '{candidate}'")
        return candidate


def resolve_thresholds(
    calibration: Mapping[str, Any],
    model_path: str,
    threshold: Optional[float],
    pixel_threshold: Optional[float],
) -> Dict[str, Any]:
    """Image threshold, pixel threshold and colour range, with where each came from."""
    if threshold is None:
        threshold = calibration.get("threshold")
        source = "calibration"
        if threshold is None:
            raise ValueError(
                f"checkpoint '{model_path}' has no calibrated threshold (trained without held-out normal "
                "images, holdout_fraction 0); pass one with --threshold T (NG iff score > T)"
            )
    else:
        source = "argument"
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    stats = calibration.get("map_statistics")
    if pixel_threshold is None:
        if not stats:
            raise ValueError(
                f"checkpoint '{model_path}' has no normal map statistics to set the pixel threshold and "
                "colour scale; pass one with --pixel_threshold P (raw gradient-map units)"
            )
        pixel_threshold, pixel_source = default_pixel_threshold(stats), "calibration p999"
    else:
        pixel_source = "argument"
    if not math.isfinite(float(pixel_threshold)):
        raise ValueError(f"pixel_threshold must be a finite number, got {pixel_threshold}")
    low, high = colour_range(stats, float(pixel_threshold))
    return {"threshold": float(threshold), "threshold_source": source,
            "pixel_threshold": float(pixel_threshold), "pixel_threshold_source": pixel_source,
            "colour_low": low, "colour_high": high}


def _unique_name(path: str, used: Dict[str, int]) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    count = used.get(stem, 0)
    used[stem] = count + 1
    return f"{stem}{RESULT_SUFFIX}" if count == 0 else f"{stem}_{count + 1}{RESULT_SUFFIX}"


def _read_batch(paths: List[str], skipped: List[Dict[str, str]]) -> List[Tuple[str, np.ndarray]]:
    read = []
    for path in paths:
        try:
            read.append((path, read_image(path)))
        except ImageReadError as error:
            print(f"warning: skipping {error}", file=sys.stderr)
            skipped.append({"file": path, "error": str(error)})
    return read


def _write_tables(out_dir: str, results: List[Dict[str, Any]], header: Dict[str, Any]) -> None:
    with open(os.path.join(out_dir, CSV_NAME), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in results:
            writer.writerow({key: row[key] for key in CSV_FIELDS})
    with open(os.path.join(out_dir, JSON_NAME), "w", encoding="utf-8") as f:
        json.dump({**header, "results": results}, f, indent=2)


def predict(
    model_path: str,
    image_path_or_dir: str,
    save_dir: str,
    threshold: Optional[float] = None,
    pixel_threshold: Optional[float] = None,
    batch_size: int = 8,
    display_size: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """Score, decide and visualise every image of ``image_path_or_dir``; one dict per read image
    (``file, score, decision, threshold, result_image, map_max, anomalous_area``).

    ``display_size`` is the side of each panel tile (default: the model input size, at least 256).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = list_images(image_path_or_dir)
    model, checkpoint, config = load_model(model_path)
    limits = resolve_thresholds(checkpoint.get("calibration") or {}, model_path, threshold, pixel_threshold)
    size = int(config["mvtec_img_size"])
    display = int(display_size) if display_size else max(size, 256)
    existed = os.path.isdir(save_dir)
    out_dir = output_dir(save_dir)
    print(f"threshold {limits['threshold']:.6g} ({limits['threshold_source']}), pixel threshold "
          f"{limits['pixel_threshold']:.6g} ({limits['pixel_threshold_source']})")

    results: List[Dict[str, Any]] = []
    skipped: List[Dict[str, str]] = []
    used: Dict[str, int] = {}
    for start in range(0, len(paths), batch_size):
        batch = _read_batch(paths[start:start + batch_size], skipped)
        if not batch:
            continue
        inputs = np.stack([preprocess(image, size) for _, image in batch])
        if config["method"] == "kdad":
            scores, _, raw_maps = localization_maps(model, paddle.to_tensor(inputs), "gradients",
                                                    float(config["blur_sigma"]))
        else:
            scores, raw_maps = predict_maps(model, inputs, len(inputs))
        for (path, image), score, raw in zip(batch, scores, raw_maps):
            score = float(score)
            decision = "NG" if score > limits["threshold"] else "OK"
            panel_path = os.path.join(out_dir, _unique_name(path, used))
            save_rgb(panel_path, result_panel(
                image, raw, score, limits["threshold"], limits["colour_low"], limits["colour_high"],
                limits["pixel_threshold"], display, os.path.basename(path)))
            results.append({
                "file": path, "score": score, "decision": decision, "threshold": limits["threshold"],
                "result_image": panel_path, "map_max": float(raw.max()),
                "anomalous_area": float(over_threshold(raw, limits["pixel_threshold"]).mean()),
            })
            print(f"{path}: score {score:.6g} -> {decision} (threshold {limits['threshold']:.6g})")

    if not results:
        if out_dir != save_dir or not existed:
            os.rmdir(out_dir)  # created by this run and still empty
        raise ValueError(f"none of the {len(paths)} image file(s) in '{image_path_or_dir}' could be read "
                         f"({len(skipped)} skipped, see the warnings above)")
    _write_tables(out_dir, results, {"model_path": model_path, "input": image_path_or_dir, **limits,
                                     "skipped": skipped})
    n_ng = sum(r["decision"] == "NG" for r in results)
    print(f"{len(results)} image(s): {len(results) - n_ng} OK, {n_ng} NG, {len(skipped)} skipped; "
          f"results in '{out_dir}'")
    return results
