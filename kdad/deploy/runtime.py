"""Paddle Inference deployment of exported KDAD models (``tools/infer.py``).

* Model files: ``--model_dir`` (``model.json`` first, then legacy ``model.pdmodel``; an export root
  holding ``score/``, ``heatmap/``, ``feature_map/`` picks ``--model_kind``, default ``score``) or
  explicit ``--model_file`` / ``--params_file``. The ``deploy.yaml`` beside the model gives the
  input size, threshold, blur and heatmap statistics, and which engines the model supports.
* Predictor (notes section 3.2): CPU threads; oneDNN on or really off (``disable_mkldnn()``); a
  model whose deploy.yaml says ``onednn: false`` (the gradient heatmap) always runs without oneDNN.
  GPU or TensorRT asked where unavailable: a warning, then CPU. Never ``enable_memory_optim`` (it
  breaks json models in Paddle 3.3.1).
* Images: exactly the training preprocessing (:func:`kdad.data.io.preprocess`). Results: score,
  OK/NG (``score > threshold``), heatmap panels (:mod:`kdad.visualize`: fixed colours from the
  deploy.yaml normal statistics, pixel threshold by its documented rule), ``results.csv`` and
  ``results.json``.

Shared with ``tools/predict.py`` (:mod:`kdad.engine.predictor`), so that both tools mean the same:

* input (:func:`list_images`): one image file, or every image file under a folder, sub-folders
  included (sorted by path; the output folder is left out when it lies inside);
* results (:data:`RESULT_COLUMNS`, :func:`write_results`): ``results.csv`` with the columns
  ``image, score, decision, threshold, map_max, anomalous_area, result_image`` and ``results.json``
  ``{"summary": {...}, "results": [rows with the same keys]}``. ``decision`` is ``NG`` iff
  ``score > threshold`` (a score that is not a finite number is ``NG`` too), else ``OK``, and empty
  when no threshold is known (infer without one); ``map_max`` is the map's maximum and
  ``anomalous_area`` the fraction of map pixels over the pixel threshold (empty for a score-only
  model); ``result_image`` is the panel's PNG (empty when none was written);
* ``--cpu_threads N``: N CPU math threads, ``0`` (the default) all cores; ``--batch_size`` >= 1;
  ``--threshold`` / ``--pixel_threshold`` finite numbers: all checked before a model is loaded.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from kdad.data.io import IMAGE_EXTENSIONS, ImageReadError, preprocess, read_image
from kdad.deploy.config import (
    DEPLOY_FILENAME,
    INPUT_NAME,
    MAP_KINDS,
    MODEL_KINDS,
    input_size,
    load_deploy_config,
    read_program_info,
)
from kdad.postprocess import blur
from kdad.utils import quiet
from kdad.utils.autolog import set_data_num
from kdad.visualize import (
    PIXEL_THRESHOLD_HELP,
    display_scale,
    map_maximum,
    over_threshold,
    result_panel,
    save_rgb,
)

MODEL_CANDIDATES = (("model.json", "model.pdiparams"), ("inference.json", "inference.pdiparams"),
                    ("model.pdmodel", "model.pdiparams"), ("inference.pdmodel", "inference.pdiparams"))
PRECISIONS = ("fp32", "fp16", "int8")
HEATMAP_DIR = "heatmaps"
CSV_NAME, JSON_NAME = "results.csv", "results.json"
#: the columns of results.csv and the keys of each results.json row, for infer.py and predict.py
RESULT_COLUMNS = ("image", "score", "decision", "threshold", "map_max", "anomalous_area", "result_image")


class InferenceError(ValueError):
    """A deployment problem reported as one clear line (models, inputs, engines)."""


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    print(message, flush=True)


def str2bool(value: Any) -> bool:
    """``True/False`` (any case), ``1/0``, ``yes/no``: the TIPC flag values."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off", "none", "null"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def finite_float(value: Any) -> float:
    """A float that is a real number (``nan``, ``inf`` are refused): thresholds."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def _integer(value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None


def positive_int(value: Any) -> int:
    """An integer >= 1 (``--batch_size``)."""
    number = _integer(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def non_negative_int(value: Any) -> int:
    """An integer >= 0 (``--cpu_threads``, 0 = all cores)."""
    number = _integer(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (all cores) or more, got {number}")
    return number


def cpu_thread_count(threads: int) -> int:
    """The number of CPU math threads of ``--cpu_threads``: ``threads``, or all cores for 0."""
    if int(threads) < 0:
        raise InferenceError(f"cpu_threads must be 0 (all cores) or more, got {threads}")
    return int(threads) or (os.cpu_count() or 1)


def check_run_options(batch_size: int, cpu_threads: int = 0, threshold: Optional[float] = None,
                      pixel_threshold: Optional[float] = None) -> None:
    """The options checked before anything is loaded (same rules as the argparse types)."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise InferenceError(f"batch_size must be an integer >= 1, got {batch_size}")
    if int(cpu_threads) != cpu_threads or cpu_threads < 0:
        raise InferenceError(f"cpu_threads must be 0 (all cores) or more, got {cpu_threads}")
    for name, value in (("threshold", threshold), ("pixel_threshold", pixel_threshold)):
        if value is not None and not math.isfinite(float(value)):
            raise InferenceError(f"{name} must be a finite number, got {value}")


# --- model files -----------------------------------------------------------------------------


def _find_model_in(folder: str) -> Optional[Tuple[str, str]]:
    for model_name, params_name in MODEL_CANDIDATES:
        if os.path.isfile(os.path.join(folder, model_name)):
            return os.path.join(folder, model_name), os.path.join(folder, params_name)
    return None


def resolve_model_files(model_dir: Optional[str] = None, model_file: Optional[str] = None,
                        params_file: Optional[str] = None,
                        model_kind: Optional[str] = None) -> Tuple[str, str]:
    """``(model_file, params_file)``, both existing, from a folder or explicit paths."""
    if model_file:
        if not os.path.isfile(model_file):
            json_file = os.path.splitext(model_file)[0] + ".json"
            if model_file.endswith(".pdmodel") and os.path.isfile(json_file):
                info(f"note: '{model_file}' does not exist; Paddle 3.x exports '{json_file}', using it")
                model_file = json_file
            else:
                raise FileNotFoundError(f"model file '{model_file}' does not exist")
        params_file = params_file or os.path.splitext(model_file)[0] + ".pdiparams"
    elif model_dir:
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model folder '{model_dir}' does not exist")
        folder = model_dir
        if model_kind and os.path.isdir(os.path.join(model_dir, model_kind)):
            folder = os.path.join(model_dir, model_kind)
        elif _find_model_in(model_dir) is None and os.path.isdir(os.path.join(model_dir, "score")):
            folder = os.path.join(model_dir, model_kind or "score")
            info(f"note: '{model_dir}' is an export folder; using its '{model_kind or 'score'}' model")
        found = _find_model_in(folder)
        if found is None:
            names = ", ".join(name for name, _ in MODEL_CANDIDATES)
            raise FileNotFoundError(f"no model file in '{folder}' (looked for {names}); "
                                    "export one with tools/export_model.py")
        model_file, default_params = found
        params_file = params_file or default_params
    else:
        raise InferenceError("no model given: pass --model_dir DIR or --model_file FILE [--params_file FILE]")
    if not os.path.isfile(params_file):
        raise FileNotFoundError(f"parameters file '{params_file}' does not exist (needed by '{model_file}')")
    return model_file, params_file


def check_model_against_deploy(model_file: str, deploy: Mapping[str, Any]) -> None:
    """Raise when the program's input (name, channels, size) disagrees with its deploy.yaml."""
    program = read_program_info(model_file)
    if program is None or not program["inputs"]:
        return  # legacy protobuf program: checked when it runs
    expected = [int(v) for v in deploy["input"]["shape"]]
    name = deploy["input"].get("name", INPUT_NAME)
    if name not in program["inputs"]:
        raise InferenceError(f"'{model_file}' has inputs {sorted(program['inputs'])} but its "
                             f"{DEPLOY_FILENAME} expects '{name}': the deploy config is another model's")
    got = program["inputs"][name]
    if len(got) != 4 or got[1] != expected[1] or got[2:] != expected[2:]:
        raise InferenceError(
            f"'{model_file}' takes input {got} but its {DEPLOY_FILENAME} says {expected} "
            f"(channels {expected[1]}, size {expected[2]}x{expected[3]}): re-export the model so that "
            "both come from the same checkpoint")


# --- predictors --------------------------------------------------------------------------------


@dataclass
class PredictorOptions:
    use_gpu: bool = False
    enable_mkldnn: bool = True
    cpu_threads: int = 2
    use_tensorrt: bool = False
    precision: str = "fp32"
    batch_size: int = 1
    gpu_mem_mb: int = 500
    gpu_id: int = 0


class PaddleRunner:
    """A Paddle Inference predictor: ``run(batch [N,3,S,S]) -> [outputs...]``."""

    def __init__(self, config: Any, predictor: Any, model_file: str) -> None:
        self.config = config
        self.predictor = predictor
        self.model_file = model_file
        self.input_name = predictor.get_input_names()[0]
        self.output_names = list(predictor.get_output_names())
        self._first_run = True

    def run(self, batch: np.ndarray) -> List[np.ndarray]:
        handle = self.predictor.get_input_handle(self.input_name)
        handle.reshape(list(batch.shape))
        handle.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        try:
            if self._first_run:  # oneDNN kernels print their checks on the first run: filtered
                self._first_run = False
                with quiet.native_stdout_filtered():
                    self.predictor.run()
            else:
                self.predictor.run()
        except Exception as error:  # noqa: BLE001 - Paddle raises several types; re-raised clearly
            raise InferenceError(f"running '{self.model_file}' on input {list(batch.shape)} failed: "
                                 f"{_last_line(error)}") from error
        return [self.predictor.get_output_handle(name).copy_to_cpu() for name in self.output_names]


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    useful = [line for line in lines if "Error" in line or "error" in line] or lines or [type(error).__name__]
    return useful[-1][:300]


def create_paddle_predictor(model_file: str, params_file: str, options: PredictorOptions,
                            deploy: Optional[Mapping[str, Any]] = None) -> PaddleRunner:
    """Build the Config as in notes section 3.2 and create the predictor."""
    import paddle
    from paddle import inference

    config = inference.Config(model_file, params_file)
    use_gpu = bool(options.use_gpu)
    if use_gpu and not paddle.device.is_compiled_with_cuda():
        warn("--use_gpu=True but this PaddlePaddle is a CPU-only build "
             "(paddle.device.is_compiled_with_cuda() is False): running on CPU")
        use_gpu = False
    elif use_gpu and paddle.device.cuda.device_count() == 0:
        warn("--use_gpu=True but no CUDA device is visible: running on CPU")
        use_gpu = False
    engine = dict((deploy or {}).get("engine") or {})
    if options.use_tensorrt and not use_gpu:
        warn("--use_tensorrt=True needs a GPU build of Paddle with TensorRT: ignored, running on CPU")
    if use_gpu:
        config.enable_use_gpu(int(options.gpu_mem_mb), int(options.gpu_id))
        if options.use_tensorrt:
            if tuple(inference.get_trt_compile_version()) == (0, 0, 0):
                warn("--use_tensorrt=True but this Paddle was compiled without TensorRT: ignored")
            elif engine.get("onnx") is False:  # gradient graph: no TensorRT conversion either
                warn("--use_tensorrt=True ignored: this model contains gradient ops")
            else:
                precision = {"fp16": inference.PrecisionType.Half,
                             "int8": inference.PrecisionType.Int8}.get(options.precision,
                                                                        inference.PrecisionType.Float32)
                config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=int(options.batch_size),
                                              min_subgraph_size=3, precision_mode=precision,
                                              use_static=False, use_calib_mode=False)
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(cpu_thread_count(options.cpu_threads))
        mkldnn = bool(options.enable_mkldnn)
        if mkldnn and engine.get("onednn") is False:
            info(f"oneDNN disabled for this {deploy.get('kind', '')} model although --enable_mkldnn=True: "
                 f"{engine.get('note', 'its deploy.yaml says onednn: false')}")
            mkldnn = False
        if mkldnn:
            config.enable_mkldnn()
            config.set_mkldnn_cache_capacity(10)
        else:
            config.disable_mkldnn()
        if options.precision != "fp32":
            warn(f"--precision={options.precision} is not supported on CPU for this model: running fp32")
    config.switch_ir_optim(True)
    config.switch_use_feed_fetch_ops(False)
    config.disable_glog_info()
    try:
        predictor = inference.create_predictor(config)
    except Exception as error:  # noqa: BLE001 - re-raised with the model name
        raise InferenceError(f"cannot create a Paddle Inference predictor for '{model_file}': "
                             f"{_last_line(error)}") from error
    return PaddleRunner(config, predictor, model_file)


def load_paddle_model(model_dir: Optional[str], model_file: Optional[str], params_file: Optional[str],
                      options: PredictorOptions, model_kind: Optional[str] = None
                      ) -> Tuple[PaddleRunner, Dict[str, Any]]:
    """Resolve files, read and check the deploy.yaml, create the predictor."""
    model_file, params_file = resolve_model_files(model_dir, model_file, params_file, model_kind)
    deploy = load_deploy_config(os.path.dirname(os.path.abspath(model_file)))
    if model_kind and deploy["kind"] != model_kind:
        raise InferenceError(f"--model_kind {model_kind} asked, but '{model_file}' is a "
                             f"{deploy['kind']} model")
    check_model_against_deploy(model_file, deploy)
    runner = create_paddle_predictor(model_file, params_file, options, deploy)
    expected_outputs = len(deploy.get("outputs") or [])
    if expected_outputs and len(runner.output_names) != expected_outputs:
        raise InferenceError(f"'{model_file}' has {len(runner.output_names)} outputs but its "
                             f"{DEPLOY_FILENAME} describes {expected_outputs}: re-export the model")
    return runner, deploy


# --- inputs ------------------------------------------------------------------------------------


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_images(path: str, exclude: Sequence[Optional[str]] = ()) -> List[str]:
    """One image file, or every image file (by extension) under a folder, sub-folders included,
    sorted; hidden folders (``.name``) and the folders in ``exclude`` (the output folder) are left out.
    The same for ``tools/infer.py`` and ``tools/predict.py``."""
    if not path:
        raise InferenceError("no input given: pass --input_file IMAGE_OR_FOLDER")
    supported = ", ".join(IMAGE_EXTENSIONS)
    if os.path.isfile(path):
        if not is_image_file(path):
            raise InferenceError(f"'{path}' is not an image file (supported: {supported})")
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"input '{path}' does not exist")
    skip = {os.path.realpath(folder) for folder in exclude if folder}
    found = []
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith(".")
                               and os.path.realpath(os.path.join(folder, name)) not in skip)
        found += [os.path.join(folder, name) for name in sorted(files) if is_image_file(name)]
    if not found:
        raise InferenceError(f"no images found: '{path}' and its sub-folders hold no image file "
                             f"(supported: {supported})")
    return found


def iter_batches(paths: Sequence[str], size: int, batch_size: int, skipped: List[Dict[str, str]]
                 ) -> Iterator[Tuple[List[str], List[np.ndarray], np.ndarray]]:
    """``(paths, original RGB images, preprocessed batch)``; unreadable files go to ``skipped``."""
    names: List[str] = []
    originals: List[np.ndarray] = []
    for path in paths:
        try:
            image = read_image(path)
        except ImageReadError as error:
            warn(f"skipped: {error}")
            skipped.append({"image": path, "error": str(error)})
            continue
        names.append(path)
        originals.append(image)
        if len(names) == batch_size:
            yield names, originals, np.stack([preprocess(im, size) for im in originals])
            names, originals = [], []
    if names:
        yield names, originals, np.stack([preprocess(im, size) for im in originals])


# --- results -----------------------------------------------------------------------------------


def decide(score: float, threshold: Optional[float]) -> str:
    """``NG`` iff ``score > threshold`` or the score is not a finite number, else ``OK``; no
    threshold: ``""``."""
    if threshold is None:
        return ""
    if not math.isfinite(score):
        return "NG"
    return "NG" if score > threshold else "OK"


def result_row(image: str, score: float, threshold: Optional[float], raw_map: Optional[np.ndarray] = None,
               pixel_threshold: Optional[float] = None, result_image: Optional[str] = None) -> Dict[str, Any]:
    """One row of :data:`RESULT_COLUMNS` (None where it does not apply)."""
    map_max = area = None
    if raw_map is not None:
        map_max = map_maximum(raw_map)[0]
        if pixel_threshold is not None:
            area = float(over_threshold(raw_map, pixel_threshold).mean())
    return {"image": image, "score": float(score), "decision": decide(score, threshold),
            "threshold": None if threshold is None else float(threshold), "map_max": map_max,
            "anomalous_area": area, "result_image": result_image}


def result_line(row: Mapping[str, Any]) -> str:
    """The console line of one result (both tools)."""
    if row["threshold"] is None:
        return f"{row['image']}: score {row['score']:.6g} (no threshold)"
    return f"{row['image']}: score {row['score']:.6g} -> {row['decision']} (threshold {row['threshold']:.6g})"


def summarize(images_found: int, results: List[Dict[str, Any]], skipped: List[Dict[str, str]],
              threshold: Optional[float], **extra: Any) -> Dict[str, Any]:
    """The ``summary`` of results.json (both tools)."""
    return {"images_found": images_found, "images_scored": len(results), "skipped": len(skipped),
            "ng": sum(r["decision"] == "NG" for r in results),
            "ok": sum(r["decision"] == "OK" for r in results),
            "threshold": None if threshold is None else float(threshold), **extra, "skipped_files": skipped}


def output_name(path: str, root: str) -> str:
    """A flat file stem for ``path`` (its path under the input folder, '/' -> '_')."""
    relative = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
    return os.path.splitext(relative)[0].replace(os.sep, "_").replace("/", "_")


def unique_output_name(path: str, root: str, used: Dict[str, int], suffix: str) -> str:
    """:func:`output_name` + ``suffix``, with ``_2``, ``_3`` ... when two inputs flatten alike."""
    stem = output_name(path, root)
    count = used.get(stem, 0)
    used[stem] = count + 1
    return f"{stem}{suffix}" if count == 0 else f"{stem}_{count + 1}{suffix}"


def holds_results(folder: str) -> bool:
    """Whether ``folder`` holds the results of an earlier predict/infer run."""
    if not os.path.isdir(folder):
        return False
    names = os.listdir(folder)
    return any(n in (CSV_NAME, JSON_NAME, HEATMAP_DIR) or n.endswith("_result.png") for n in names)


def fresh_output_dir(save_dir: str) -> str:
    """``save_dir``, or the first free ``save_dir/run_NNN`` when it holds an earlier run's results:
    a run never mixes its files with another's, and nothing earlier is overwritten."""
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise InferenceError(f"save_dir '{save_dir}' exists and is not a folder")
    if not holds_results(save_dir):
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
        info(f"note: '{save_dir}' already holds results of an earlier run (kept); writing to '{candidate}'")
        return candidate


def write_results(save_dir: str, results: List[Dict[str, Any]], summary: Mapping[str, Any]) -> None:
    """``results.csv`` (:data:`RESULT_COLUMNS`, empty cells for None) and ``results.json``."""
    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, CSV_NAME), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in results:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in RESULT_COLUMNS})
    with open(os.path.join(save_dir, JSON_NAME), "w", encoding="utf-8") as handle:
        json.dump({"summary": dict(summary), "results": [{key: row.get(key) for key in RESULT_COLUMNS}
                                                         for row in results]}, handle, indent=2)


def print_summary(summary: Mapping[str, Any], save_dir: Optional[str]) -> None:
    threshold = summary["threshold"]
    info(f"scored {summary['images_scored']} of {summary['images_found']} images "
         f"({summary['skipped']} unreadable, skipped); {summary['ok']} OK, {summary['ng']} NG "
         f"({'no threshold' if threshold is None else f'threshold {threshold:.6g}'})")
    if save_dir:
        info(f"results: {os.path.join(save_dir, CSV_NAME)} and {JSON_NAME}")


# --- heatmaps ----------------------------------------------------------------------------------


def heatmap_image(image: np.ndarray, heatmap: np.ndarray, score: float, threshold: Optional[float],
                  scale: Mapping[str, Any], name: str = "", display_size: int = 256) -> np.ndarray:
    """The panel of one image (:func:`kdad.visualize.result_panel`) with the run's fixed ``scale``
    (:func:`kdad.visualize.display_scale`). Without a colour range (no normal statistics) the image's
    own min..max is used and the panel says so (the caller warns once)."""
    low, high = scale.get("colour_low"), scale.get("colour_high")
    note = "fixed colour scale from held-out normal maps"
    if low is None or high is None:
        finite = np.asarray(heatmap, np.float64)[np.isfinite(heatmap)]
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 1.0
        high = high if high > low else low + max(abs(low), 1e-12)
        note = "per-image scale (no normal statistics: not comparable between images)"
    return result_panel(image, heatmap, score, threshold, low, high, scale.get("pixel_threshold"),
                        display_size=display_size, name=name,
                        pixel_note=scale.get("pixel_threshold_source", ""), scale_note=note)


def shown_name(path: str, root: str) -> str:
    """The name in a panel's title: the path under the input folder, or the file name."""
    return os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)


# --- the batch loop ----------------------------------------------------------------------------


Runner = Callable[[np.ndarray], List[np.ndarray]]


def predict_folder(run: Runner, deploy: Mapping[str, Any], input_path: str, batch_size: int = 1,
                   threshold: Optional[float] = None, save_dir: Optional[str] = None,
                   write_heatmaps: bool = True, times: Any = None, pixel_threshold: Optional[float] = None,
                   display_size: int = 256) -> Dict[str, Any]:
    """Score every image of ``input_path``; write results (and heatmap panels) to ``save_dir``."""
    check_run_options(batch_size, 0, threshold, pixel_threshold)
    paths = list_images(input_path, exclude=[save_dir])
    size = input_size(deploy)
    post = deploy.get("postprocess") or {}
    kind = deploy["kind"]
    calibrated = post.get("threshold")
    if calibrated is not None and not math.isfinite(float(calibrated)):
        raise InferenceError(f"the {DEPLOY_FILENAME} threshold is not a finite number ({calibrated}): "
                             "re-export the model, or pass --threshold T")
    if threshold is None:
        threshold = calibrated
        if threshold is None:
            warn("no threshold in the deploy.yaml and no --threshold: OK/NG decisions are left empty")
    statistics = post.get("heatmap_statistics")
    has_maps = kind in MAP_KINDS
    method = str((deploy.get("model_info") or {}).get("method") or "kdad")
    scale: Dict[str, Any] = {"pixel_threshold": None}
    if has_maps:
        try:
            scale = display_scale(method, statistics, threshold, calibrated, pixel_threshold)
        except ValueError as error:
            raise InferenceError(f"the {DEPLOY_FILENAME} heatmap statistics are unusable: {error}") from error
        if not statistics:
            warn("the deploy.yaml has no normal heatmap statistics: heatmaps are scaled per image "
                 "(not comparable between images)")
    sigma = float(post.get("blur_sigma") or 0.0)
    results: List[Dict[str, Any]] = []
    skipped: List[Dict[str, str]] = []
    used: Dict[str, int] = {}
    batches = iter_batches(paths, size, batch_size, skipped)
    while True:
        if times is not None:
            times.start()
        try:
            names, originals, batch = next(batches)
        except StopIteration:
            break
        if times is not None:
            times.stamp()
        outputs = run(batch)
        if times is not None:
            times.stamp()
        scores = np.asarray(outputs[0], dtype=np.float64).reshape(-1)
        if scores.shape[0] != len(names):
            raise InferenceError(f"the model returned {scores.shape[0]} scores for {len(names)} images")
        maps = blur(np.asarray(outputs[1]), sigma) if has_maps and len(outputs) > 1 else None
        for i, path in enumerate(names):
            score = float(scores[i])
            if not math.isfinite(score):
                warn(f"{path}: the score is {score}, not a number: marked NG")
            panel = None
            if maps is not None and save_dir and write_heatmaps:
                name = unique_output_name(path, input_path, used, ".png")
                panel = os.path.join(save_dir, HEATMAP_DIR, name)
                os.makedirs(os.path.dirname(panel), exist_ok=True)
                save_rgb(panel, heatmap_image(originals[i], maps[i], score, threshold, scale,
                                              shown_name(path, input_path), display_size))
            row = result_row(path, score, threshold, None if maps is None else maps[i],
                             scale.get("pixel_threshold"), panel)
            results.append(row)
            info(result_line(row))
        if times is not None:
            times.end(stamp=True)
    if not results:
        raise InferenceError(f"none of the {len(paths)} images in '{input_path}' could be read")
    if times is not None:
        set_data_num(times, len(results))  # the report's data_num counts images, not batches
    extra = {"model_kind": kind, "method": method}
    if has_maps:
        extra.update(scale)
    summary = summarize(len(paths), results, skipped, threshold, **extra)
    if save_dir:
        write_results(save_dir, results, summary)
    return {"results": results, "summary": summary}


# --- benchmark ---------------------------------------------------------------------------------


def autolog_model_name(deploy: Optional[Mapping[str, Any]] = None, model_path: Optional[str] = None) -> str:
    """The report's ``model_name``: ``<method>_<backbone>_<kind>`` from the deploy.yaml (e.g.
    ``kdad_vgg16_score``), else the model's folder name, else ``KDAD``."""
    deploy = deploy or {}
    info = deploy.get("model_info") or {}
    method = info.get("method")
    backbone = info.get("expert") or info.get("backbone")
    if method:
        return "_".join(str(part) for part in (method, backbone, deploy.get("kind")) if part)
    if model_path:
        folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
        return os.path.basename(os.path.normpath(folder)) or "KDAD"
    return "KDAD"


def wait_for_memory_sampler(autolog: Any, timeout: float = 60.0) -> bool:
    """Wait until upstream AutoLog's memory-sampling child has taken its first sample.

    Upstream starts that child (a spawned Python that imports paddle) in the constructor; until it is
    up it competes with the timed loop for the CPU. Returns True at once for a logger without one
    (:mod:`kdad.utils.autolog`), False when ``timeout`` seconds pass first.
    """
    queue = getattr(getattr(autolog, "get_mem", None), "mem_q", None)
    if queue is None or not hasattr(queue, "empty"):
        return True
    deadline = time.monotonic() + timeout
    while queue.empty():
        if time.monotonic() > deadline:
            warn(f"auto_log's memory sampler did not start within {timeout:g} s: timing anyway")
            return False
        time.sleep(0.05)
    return True


def make_autologger(config: Any, batch_size: int, precision: str, size: int, *,
                    deploy: Optional[Mapping[str, Any]] = None, model_path: Optional[str] = None,
                    gpu_ids: Optional[int] = None) -> Any:
    """``auto_log.AutoLogger`` when installed, else the compatible :mod:`kdad.utils.autolog`.

    Either way it logs through :func:`kdad.utils.autolog.report_logger` (each line once, although
    Paddle has a root-logger handler), is named after the deployed model (:func:`autolog_model_name`)
    and samples GPU ``gpu_ids`` (None on CPU). Returns once upstream's memory sampler is running, so
    create it before the warm-up: then neither the sampler's start nor the warm-up is timed.
    """
    from kdad.utils.autolog import report_logger

    try:
        from auto_log import AutoLogger
    except ImportError:
        from kdad.utils.autolog import AutoLogger
    autolog = AutoLogger(model_name=autolog_model_name(deploy, model_path), model_precision=precision,
                         batch_size=batch_size, data_shape=f"[3, {size}, {size}]", save_path=None,
                         inference_config=config, pids=os.getpid(), process_name=None, gpu_ids=gpu_ids,
                         time_keys=["preprocess_time", "inference_time", "postprocess_time"], warmup=0,
                         logger=report_logger())
    wait_for_memory_sampler(autolog)
    return autolog


def report_benchmark(autolog: Any) -> None:
    """Print the report; upstream AutoLog calls ``sys.exit(0)`` in ``report()``: carry on instead."""
    try:
        autolog.report()
    except SystemExit:
        pass


# --- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="KDAD Paddle Inference: scores, OK/NG and heatmaps.",
        epilog="results.csv / results.json columns: " + ", ".join(RESULT_COLUMNS) + " (the same as "
               "tools/predict.py; see kdad/deploy/runtime.py). decision: NG iff score > threshold.")
    parser.add_argument("--model_dir", default=None,
                        help="folder with model.json (or legacy model.pdmodel) and deploy.yaml, "
                             "or the export folder holding score/ heatmap/ feature_map/")
    parser.add_argument("--model_kind", default=None, choices=MODEL_KINDS,
                        help="with an export folder as --model_dir: which model (default score)")
    parser.add_argument("--model_file", default=None, help="model.json (or .pdmodel)")
    parser.add_argument("--params_file", default=None, help="model.pdiparams (default: beside model_file)")
    parser.add_argument("--input_file", default=None,
                        help="an image, or a folder: every image in it and in its sub-folders")
    parser.add_argument("--batch_size", type=positive_int, default=1)
    parser.add_argument("--use_gpu", type=str2bool, default=False)
    parser.add_argument("--use_tensorrt", type=str2bool, default=False)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--enable_mkldnn", type=str2bool, default=True,
                        help="oneDNN on CPU (forced off for models whose deploy.yaml says onednn: false)")
    parser.add_argument("--cpu_threads", type=non_negative_int, default=0,
                        help="CPU math threads, 0 (default): all cores")
    parser.add_argument("--enable_benchmark", "--benchmark", dest="enable_benchmark", type=str2bool,
                        default=False, help="print an auto_log benchmark report")
    parser.add_argument("--threshold", type=finite_float, default=None,
                        help="NG iff score > threshold (default: the deploy.yaml calibration threshold)")
    parser.add_argument("--pixel_threshold", type=finite_float, default=None,
                        help=PIXEL_THRESHOLD_HELP)
    parser.add_argument("--save_dir", default="output/inference", help="results.csv/json and heatmaps/")
    parser.add_argument("--save_heatmaps", type=str2bool, default=True)
    parser.add_argument("--display_size", type=positive_int, default=256,
                        help="size of each heatmap-panel tile (about display_size^2 pixels)")
    quiet.add_verbose_argument(parser)
    return parser


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Everything ``tools/infer.py`` does, for parsed ``args``; returns results and the runner."""
    pixel_threshold = getattr(args, "pixel_threshold", None)
    check_run_options(args.batch_size, args.cpu_threads, args.threshold, pixel_threshold)  # before loading
    options = PredictorOptions(use_gpu=args.use_gpu, enable_mkldnn=args.enable_mkldnn,
                               cpu_threads=args.cpu_threads, use_tensorrt=args.use_tensorrt,
                               precision=args.precision, batch_size=args.batch_size)
    list_images(args.input_file, exclude=[args.save_dir])  # a bad input fails before the predictor is made
    runner, deploy = load_paddle_model(args.model_dir, args.model_file, args.params_file, options,
                                       args.model_kind)
    info(f"model {runner.model_file} ({deploy['kind']}), oneDNN {runner.config.mkldnn_enabled()}, "
         f"{runner.config.cpu_math_library_num_threads()} CPU threads, batch size {args.batch_size}")
    autolog = None
    if args.enable_benchmark:
        size = input_size(deploy)
        # the logger first (upstream's starts a sampling process), then the untimed warm-up
        autolog = make_autologger(runner.config, args.batch_size, args.precision, size, deploy=deploy,
                                  model_path=runner.model_file,
                                  gpu_ids=options.gpu_id if runner.config.use_gpu() else None)
        runner.run(np.zeros((args.batch_size, 3, size, size), dtype=np.float32))  # warm-up, not timed
    save_dir = fresh_output_dir(args.save_dir) if args.save_dir else args.save_dir
    output = predict_folder(runner.run, deploy, args.input_file, args.batch_size, args.threshold,
                            save_dir, args.save_heatmaps, autolog.times if autolog else None,
                            pixel_threshold, getattr(args, "display_size", 256))
    if autolog is not None:
        report_benchmark(autolog)
    print_summary(output["summary"], save_dir)
    output["runner"] = runner
    output["deploy"] = deploy
    return output


def main(argv: List[str]) -> int:
    run(build_parser().parse_args(argv))
    return 0
