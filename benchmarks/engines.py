"""Runners for every engine the suite times: ``run(batch [N,3,S,S] float32) -> [outputs...]``."""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Dict, List, Optional

import numpy as np

Runner = Callable[[np.ndarray], List[np.ndarray]]


def paddle_inference(model_file: str, enable_mkldnn: bool, threads: int, use_gpu: bool = False) -> Runner:
    """A Paddle Inference predictor built by the package (:func:`kdad.deploy.runtime.create_paddle_predictor`)."""
    from kdad.deploy.runtime import PredictorOptions, create_paddle_predictor

    options = PredictorOptions(use_gpu=use_gpu, enable_mkldnn=enable_mkldnn, cpu_threads=threads)
    runner = create_paddle_predictor(model_file, os.path.splitext(model_file)[0] + ".pdiparams", options)
    if not use_gpu and bool(runner.config.mkldnn_enabled()) != bool(enable_mkldnn):
        raise RuntimeError(f"oneDNN is {runner.config.mkldnn_enabled()} but {enable_mkldnn} was asked")
    return runner.run


def paddle_inference_openvino(model_file: str, threads: int) -> Runner:
    """Paddle Inference with its bundled OpenVINO engine (CPU, fp32)."""
    from paddle import inference

    config = inference.Config(model_file, os.path.splitext(model_file)[0] + ".pdiparams")
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(int(threads))
    config.enable_openvino_engine(inference.PrecisionType.Float32)
    config.switch_ir_optim(True)
    config.switch_use_feed_fetch_ops(False)
    config.disable_glog_info()
    predictor = inference.create_predictor(config)
    name = predictor.get_input_names()[0]
    outputs = predictor.get_output_names()

    def run(batch: np.ndarray) -> List[np.ndarray]:
        handle = predictor.get_input_handle(name)
        handle.reshape(list(batch.shape))
        handle.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        predictor.run()
        return [predictor.get_output_handle(o).copy_to_cpu() for o in outputs]

    return run


def onnx_model(model_dir: str, out_dir: str) -> str:
    """``model.onnx`` of an exported folder (``kdad.deploy.onnx_runtime.convert_to_onnx``), cached."""
    from kdad.deploy.onnx_runtime import ONNX_FILENAME, convert_to_onnx

    path = os.path.join(out_dir, ONNX_FILENAME)
    if os.path.isfile(path):
        return path
    return convert_to_onnx(model_dir, out_dir)


def onnxruntime(onnx_file: str, threads: int) -> Runner:
    from kdad.deploy.onnx_runtime import OnnxRunner

    return OnnxRunner(onnx_file, threads).run


def write_deploy_like(src_folder: str, dst_folder: str, engine: Dict[str, Any], note: str) -> None:
    """Give ``dst_folder`` (a hand-made heatmap model) a deploy.yaml: the exported heatmap model's,
    with its own engine section, so ``tools/infer.py`` and ``convert_to_onnx`` accept it."""
    from kdad.deploy.config import load_deploy_config, write_deploy_config

    deploy = dict(load_deploy_config(src_folder))
    deploy["engine"] = dict(engine)
    deploy["source"] = dict(deploy.get("source") or {}, note=note)
    write_deploy_config(dst_folder, deploy)


def remove(path: Optional[str]) -> None:
    if path and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
