"""Prediction on new images: anomaly score, OK/NG decision and a heatmap panel per image.

The OK/NG threshold is the checkpoint's calibrated one (held-out normal training images) unless
one is given; NG iff ``score > threshold``. Heatmaps are the method's anomaly maps (KDAD: the raw
gradient maps of :func:`kdad.methods.kdad.localization.localization_maps`) in the panels of
:mod:`kdad.visualize`: fixed colours from the calibration's normal statistics and the documented pixel
threshold (:func:`kdad.visualize.pixel_threshold_rule`: the image threshold where the score is the
map's maximum, else the largest held-out normal map value) unless one is given.

Input, results and options mean what they mean for ``tools/infer.py`` (:mod:`kdad.deploy.runtime`):
an image or every image under a folder (sub-folders included), ``results.csv`` / ``results.json``
with :data:`kdad.deploy.runtime.RESULT_COLUMNS`, ``cpu_threads`` 0 = all cores.

Outputs in ``save_dir`` (or, if it already holds results of an earlier run, in the first free
``save_dir/run_NNN``): ``<name>_result.png`` per image (``name``: its path under the input folder,
``/`` -> ``_``), ``results.csv`` and ``results.json``.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import paddle

from kdad.data.io import ImageReadError, preprocess, read_image
from kdad.deploy.runtime import (
    CSV_NAME,
    JSON_NAME,
    InferenceError,
    check_run_options,
    fresh_output_dir,
    is_image_file,
    list_images,
    print_summary,
    result_line,
    result_row,
    shown_name,
    summarize,
    unique_output_name,
    write_results,
)
from kdad.engine.common import predict_maps, set_cpu_threads
from kdad.methods.kdad.localization import localization_maps
from kdad.utils.checkpoint import load_model
from kdad.visualize import display_scale, result_panel, save_rgb

RESULT_SUFFIX = "_result.png"
__all__ = ["CSV_NAME", "JSON_NAME", "RESULT_SUFFIX", "is_image_file", "list_images", "output_dir",
           "predict", "resolve_thresholds"]


def output_dir(save_dir: str) -> str:
    """``save_dir``, or the first free ``save_dir/run_NNN`` (the deploy runtime's rule, shared)."""
    try:
        return fresh_output_dir(save_dir)
    except InferenceError as error:
        raise ValueError(str(error)) from None


def resolve_thresholds(
    calibration: Mapping[str, Any],
    model_path: str,
    threshold: Optional[float],
    pixel_threshold: Optional[float],
    method: str = "kdad",
) -> Dict[str, Any]:
    """Image threshold, pixel threshold and colour range, with where each came from (the pixel
    threshold and colours by :func:`kdad.visualize.display_scale`, as the deploy runtime does)."""
    if threshold is None:
        threshold = calibration.get("threshold")
        source = "calibration"
        if threshold is None:
            if not calibration:  # checkpoint_latest / checkpoint_epoch_N: saved before calibration
                why = ("it is an intermediate training checkpoint, written before the calibration at the end "
                       "of training: use model_final.pdparams of the finished run, or")
            else:
                why = f"{calibration.get('note') or 'trained without held-out normal images'};"
            raise ValueError(
                f"checkpoint '{model_path}' has no calibrated threshold ({why} pass one with --threshold T "
                "(NG iff score > T))"
            )
    else:
        source = "argument"
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    if pixel_threshold is not None and not math.isfinite(float(pixel_threshold)):
        raise ValueError(f"pixel_threshold must be a finite number, got {pixel_threshold}")
    stats = calibration.get("map_statistics")
    scale = display_scale(method, stats, float(threshold), calibration.get("threshold"), pixel_threshold)
    if scale["pixel_threshold"] is None:
        raise ValueError(
            f"checkpoint '{model_path}' has no normal map statistics to set the pixel threshold and "
            "colour scale; pass one with --pixel_threshold P (in the units of the method's map)"
        )
    return {"threshold": float(threshold), "threshold_source": source, **scale}


def _read_batch(paths: List[str], skipped: List[Dict[str, str]]) -> List[Tuple[str, np.ndarray]]:
    read = []
    for path in paths:
        try:
            read.append((path, read_image(path)))
        except ImageReadError as error:
            print(f"warning: skipping {error}", file=sys.stderr)
            skipped.append({"image": path, "error": str(error)})
    return read


def predict(
    model_path: str,
    image_path_or_dir: str,
    save_dir: str,
    threshold: Optional[float] = None,
    pixel_threshold: Optional[float] = None,
    batch_size: int = 8,
    display_size: Optional[int] = None,
    cpu_threads: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """Score, decide and visualise every image of ``image_path_or_dir`` (an image, or every image
    under a folder); one dict per read image with :data:`kdad.deploy.runtime.RESULT_COLUMNS`.

    ``display_size`` sets the panel tiles (about ``display_size ** 2`` pixels each, default: the model
    input size, at least 256); ``cpu_threads``: CPU math threads, 0 all cores, None Paddle's setting.
    """
    check_run_options(batch_size, cpu_threads or 0, threshold, pixel_threshold)  # before loading
    if display_size is not None and int(display_size) < 1:
        raise ValueError(f"display_size must be at least 1, got {display_size}")
    paths = list_images(image_path_or_dir, exclude=[save_dir])
    if cpu_threads is not None:
        set_cpu_threads(int(cpu_threads))
    model, checkpoint, config = load_model(model_path)
    limits = resolve_thresholds(checkpoint.get("calibration") or {}, model_path, threshold, pixel_threshold,
                                str(config["method"]))
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
            if not math.isfinite(score):
                print(f"warning: {path}: the score is {score}, not a number: marked NG", file=sys.stderr)
            name = unique_output_name(path, image_path_or_dir, used, RESULT_SUFFIX)
            panel_path = os.path.join(out_dir, name)
            save_rgb(panel_path, result_panel(
                image, raw, score, limits["threshold"], limits["colour_low"], limits["colour_high"],
                limits["pixel_threshold"], display, shown_name(path, image_path_or_dir),
                pixel_note=limits["pixel_threshold_source"]))
            row = result_row(path, score, limits["threshold"], raw, limits["pixel_threshold"], panel_path)
            results.append(row)
            print(result_line(row))

    if not results:
        if out_dir != save_dir or not existed:
            os.rmdir(out_dir)  # created by this run and still empty
        raise ValueError(f"none of the {len(paths)} image file(s) in '{image_path_or_dir}' could be read "
                         f"({len(skipped)} skipped, see the warnings above)")
    facts = {key: value for key, value in limits.items() if key != "threshold"}
    summary = summarize(len(paths), results, skipped, limits["threshold"], model_path=model_path,
                        input=image_path_or_dir, method=str(config["method"]), **facts)
    write_results(out_dir, results, summary)
    print_summary(summary, out_dir)
    return results
