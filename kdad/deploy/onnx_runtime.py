"""ONNX deployment of forward-only KDAD models (``deploy/onnx/convert.py``, ``infer_onnx.py``).

Conversion runs paddle2onnx 2.1.0 in a *subprocess*: on an unsupported op (any ``*_grad``, i.e. the
gradient heatmap model) it aborts the whole process with SIGABRT. ``--optimize_tool None`` is
always passed (the default, polygraphy, pip-installs packages at run time). The result is
``model.onnx`` plus a copy of the ``deploy.yaml`` (with an ``onnx`` section) in the output folder.
onnxruntime then runs it with the same preprocessing and result files as :mod:`kdad.deploy.runtime`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from kdad.deploy.config import (
    DEPLOY_FILENAME,
    MODEL_KINDS,
    input_size,
    load_deploy_config,
    write_deploy_config,
)
from kdad.deploy.runtime import (
    RESULT_COLUMNS,
    InferenceError,
    check_run_options,
    cpu_thread_count,
    finite_float,
    info,
    list_images,
    make_autologger,
    non_negative_int,
    positive_int,
    predict_folder,
    print_summary,
    report_benchmark,
    resolve_model_files,
    str2bool,
)
from kdad.utils import quiet
from kdad.visualize import PIXEL_THRESHOLD_HELP

ONNX_FILENAME = "model.onnx"


class OnnxConversionError(InferenceError):
    """paddle2onnx could not convert the model."""


def convert_to_onnx(model_dir: str, save_dir: Optional[str] = None, opset_version: int = 13,
                    model_kind: Optional[str] = None, timeout: float = 1800.0) -> str:
    """Convert the Paddle model of ``model_dir`` to ``<save_dir>/model.onnx``; returns its path."""
    model_file, params_file = resolve_model_files(model_dir=model_dir, model_kind=model_kind)
    folder = os.path.dirname(os.path.abspath(model_file))
    deploy = load_deploy_config(folder)
    if deploy["engine"].get("onnx") is False:
        raise OnnxConversionError(
            f"the {deploy['kind']} model in '{folder}' is not convertible to ONNX: "
            f"{deploy['engine'].get('note', 'its deploy.yaml says onnx: false')}. Run this one with Paddle "
            "Inference (--enable_mkldnn=False), or export the heatmap with the default "
            "--heatmap_backward explicit, which converts")
    save_dir = os.path.abspath(save_dir or folder)
    os.makedirs(save_dir, exist_ok=True)  # paddle2onnx creates only one missing level
    onnx_path = os.path.join(save_dir, ONNX_FILENAME)
    command = [sys.executable, "-m", "paddle2onnx.command", "--model_dir", folder,
               "--model_filename", os.path.basename(model_file),
               "--params_filename", os.path.basename(params_file), "--save_file", onnx_path,
               "--opset_version", str(int(opset_version)), "--enable_onnx_checker", "True",
               "--optimize_tool", "None"]
    env = dict(os.environ, POLYGRAPHY_AUTOINSTALL_DEPS="0")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as error:
        raise OnnxConversionError(f"paddle2onnx did not finish within {timeout:.0f} s") from error
    output = (done.stdout or "") + (done.stderr or "")
    if done.returncode != 0 or not os.path.isfile(onnx_path):
        how = "aborted (SIGABRT)" if done.returncode in (-6, 134) else f"exit code {done.returncode}"
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if "[ERROR]" in line or line.startswith(("Error", "FatalError"))]
        tail = " | ".join(errors[-3:] or lines[-3:])
        raise OnnxConversionError(f"'{model_file}' is not convertible to ONNX: paddle2onnx {how}: {tail}")
    used = re.findall(r"opset_version\s*=\s*(\d+)", output)
    deploy["onnx"] = {"model": ONNX_FILENAME, "opset_version": int(used[-1]) if used else int(opset_version),
                      "converter": _paddle2onnx_version(), "source_model": os.path.abspath(model_file)}
    write_deploy_config(save_dir, deploy)
    return onnx_path


def _paddle2onnx_version() -> str:
    try:
        import paddle2onnx

        return f"paddle2onnx {paddle2onnx.__version__}"
    except (ImportError, AttributeError):
        return "paddle2onnx"


ONNX_OPTIMIZATION_LEVELS = ("basic", "extended", "all")


def onnx_optimization(deploy: Dict[str, Any]) -> str:
    """The onnxruntime optimisation level an exported model's ``deploy.yaml`` asks for (default ``all``)."""
    return str((deploy.get("engine") or {}).get("onnx_optimization", "all"))


class OnnxRunner:
    """onnxruntime session on CPU: ``run(batch [N,3,S,S]) -> [outputs...]``.

    ``optimization``: onnxruntime's graph optimisation level (``all``, its default; an exported
    ``deploy.yaml`` may ask for less under ``engine.onnx_optimization``, as KDAD's gradient heatmap
    does: its ReLU masks must see the dynamic model's activations)."""

    def __init__(self, onnx_file: str, threads: int = 2, optimization: str = "all") -> None:
        import onnxruntime as ort

        if optimization not in ONNX_OPTIMIZATION_LEVELS:
            raise InferenceError(f"onnx optimization level must be one of {ONNX_OPTIMIZATION_LEVELS}, "
                                 f"got {optimization!r}")
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
        options.intra_op_num_threads = cpu_thread_count(threads)  # 0: all cores
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # no "unused initializer" warnings
        try:
            self.session = ort.InferenceSession(onnx_file, sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - re-raised with the file name
            raise InferenceError(f"onnxruntime cannot load '{onnx_file}': {error}") from error
        self.onnx_file = onnx_file
        self.input = self.session.get_inputs()[0]

    def run(self, batch: np.ndarray) -> List[np.ndarray]:
        return self.session.run(None, {self.input.name: np.ascontiguousarray(batch, dtype=np.float32)})


def load_onnx_model(model_dir: Optional[str] = None, onnx_file: Optional[str] = None,
                    threads: int = 2) -> Tuple[OnnxRunner, Dict[str, Any]]:
    """Find ``model.onnx`` and its ``deploy.yaml``; check the input shape against it."""
    if not onnx_file:
        if not model_dir:
            raise InferenceError("no model given: pass --model_dir DIR (with model.onnx) or --onnx_file FILE")
        onnx_file = os.path.join(model_dir, ONNX_FILENAME)
    if not os.path.isfile(onnx_file):
        raise FileNotFoundError(f"ONNX model '{onnx_file}' does not exist; "
                                "create it with deploy/onnx/convert.py")
    deploy = load_deploy_config(os.path.dirname(os.path.abspath(onnx_file)))
    runner = OnnxRunner(onnx_file, threads, onnx_optimization(deploy))
    expected = [int(v) for v in deploy["input"]["shape"]]
    got = list(runner.input.shape)
    if len(got) != 4 or got[1:] != expected[1:]:
        raise InferenceError(f"'{onnx_file}' takes input {got} but its {DEPLOY_FILENAME} says {expected}")
    if len(runner.session.get_outputs()) != len(deploy.get("outputs") or [None]):
        raise InferenceError(f"'{onnx_file}' does not have the outputs its {DEPLOY_FILENAME} describes")
    return runner, deploy


# --- command lines -----------------------------------------------------------------------------


def convert_main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description="Convert an exported KDAD model to ONNX (paddle2onnx).")
    quiet.add_verbose_argument(parser)
    parser.add_argument("--model_dir", required=True,
                        help="exported model folder (e.g. <export>/score) or the export folder")
    parser.add_argument("--model_kind", default=None, choices=MODEL_KINDS,
                        help="with an export folder: which model (default score)")
    parser.add_argument("--save_dir", default=None, help="output folder (default: the model folder)")
    parser.add_argument("--opset_version", type=int, default=13,
                        help="minimum opset; paddle2onnx raises it when an op needs more")
    args = parser.parse_args(argv)
    path = convert_to_onnx(args.model_dir, args.save_dir, args.opset_version, args.model_kind)
    info(f"ONNX model: {path} (deploy.yaml beside it)")
    return 0


def infer_main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        description="KDAD inference with onnxruntime (results as infer.py).",
        epilog="results.csv / results.json columns: " + ", ".join(RESULT_COLUMNS) + " (as tools/infer.py).")
    parser.add_argument("--model_dir", default=None, help="folder with model.onnx and deploy.yaml")
    parser.add_argument("--onnx_file", default=None, help="model.onnx (deploy.yaml beside it)")
    parser.add_argument("--input_file", required=True,
                        help="an image, or a folder: every image in it and in its sub-folders")
    parser.add_argument("--batch_size", type=positive_int, default=1)
    parser.add_argument("--cpu_threads", type=non_negative_int, default=0,
                        help="CPU threads, 0 (default): all cores")
    parser.add_argument("--threshold", type=finite_float, default=None, help="NG iff score > threshold")
    parser.add_argument("--pixel_threshold", type=finite_float, default=None,
                        help=PIXEL_THRESHOLD_HELP)
    parser.add_argument("--save_dir", default="output/inference_onnx", help="results.csv/json and heatmaps/")
    parser.add_argument("--save_heatmaps", type=str2bool, default=True)
    parser.add_argument("--display_size", type=positive_int, default=256,
                        help="size of each heatmap-panel tile (about display_size^2 pixels)")
    parser.add_argument("--enable_benchmark", "--benchmark", dest="enable_benchmark", type=str2bool,
                        default=False, help="print an auto_log benchmark report")
    quiet.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    check_run_options(args.batch_size, args.cpu_threads, args.threshold, args.pixel_threshold)
    list_images(args.input_file, exclude=[args.save_dir])  # a bad input fails before the model loads
    runner, deploy = load_onnx_model(args.model_dir, args.onnx_file, args.cpu_threads)
    size = input_size(deploy)
    info(f"ONNX model {runner.onnx_file} ({deploy['kind']}, input {size}x{size}), "
         f"onnxruntime CPU, {cpu_thread_count(args.cpu_threads)} threads, batch size {args.batch_size}")
    autolog = None
    if args.enable_benchmark:  # the logger first (its sampler starts), then the untimed warm-up
        status = {"runtime_device": "cpu (onnxruntime)", "ir_optim": True, "enable_tensorrt": False,
                  "enable_mkldnn": False,
                  "cpu_math_library_num_threads": cpu_thread_count(args.cpu_threads)}
        autolog = make_autologger(status, args.batch_size, "fp32", size, deploy=deploy,
                                  model_path=runner.onnx_file)
        runner.run(np.zeros((args.batch_size, 3, size, size), dtype=np.float32))  # warm-up, not timed
    output = predict_folder(runner.run, deploy, args.input_file, args.batch_size, args.threshold,
                            args.save_dir, args.save_heatmaps, autolog.times if autolog else None,
                            args.pixel_threshold, args.display_size)
    if autolog is not None:
        report_benchmark(autolog)
    print_summary(output["summary"], args.save_dir)
    return 0
