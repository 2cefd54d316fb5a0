"""One check shared by the methods' export tests: the exported scorer equals the dynamic model.

``paddle.jit.to_static(full_graph=True)`` + ``paddle.jit.save``; the saved graph has no interpolation op
(so it may run under oneDNN); Paddle Inference with oneDNN off and on (the whole batch and one image) and
paddle2onnx + onnxruntime give the dynamic model's scores (1e-4 relative) and maps (1e-4 of their
maximum)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import numpy as np
import paddle

from kdad.deploy.config import engine_support, read_program_info
from kdad.deploy.runtime import PredictorOptions, create_paddle_predictor


def assert_export_equals_dynamic(model: Any, x: np.ndarray, folder: Path, tolerance: float = 1e-4) -> None:
    """Export ``model`` (eval mode) for inputs like ``x [N, 3, S, S]`` into ``folder`` and compare."""
    model.eval()
    with paddle.no_grad():
        want_scores, want_maps = (t.numpy() for t in model(paddle.to_tensor(x)))
    size = int(x.shape[-1])
    spec = [paddle.static.InputSpec([None, 3, size, size], "float32", "x")]
    prefix = str(folder / "model")
    paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), prefix)
    model_file = prefix + ".json" if os.path.isfile(prefix + ".json") else prefix + ".pdmodel"
    info = read_program_info(model_file)
    if info is not None:  # no interpolation ops: the graph may run under oneDNN
        assert engine_support(info["ops"])["onednn"], info["ops"]

    def check(outputs: List[np.ndarray], what: str, rows: slice = slice(None)) -> None:
        assert len(outputs) == 2, what
        scores, maps = (outputs[0], outputs[1]) if outputs[0].ndim == 1 else (outputs[1], outputs[0])
        assert maps.shape == want_maps[rows].shape, what
        assert np.max(np.abs(scores - want_scores[rows]) / np.abs(want_scores[rows])) <= tolerance, what
        assert np.max(np.abs(maps - want_maps[rows])) <= tolerance * np.max(np.abs(want_maps[rows])), what

    for mkldnn in (False, True):
        runner = create_paddle_predictor(model_file, prefix + ".pdiparams",
                                         PredictorOptions(enable_mkldnn=mkldnn, cpu_threads=1))
        check(runner.run(x), f"Paddle Inference, oneDNN {mkldnn}")
        check(runner.run(x[1:2]), f"Paddle Inference, oneDNN {mkldnn}, one image", rows=slice(1, 2))
    onnx_file = str(folder / "model.onnx")
    command = [sys.executable, "-m", "paddle2onnx.command", "--model_dir", str(folder),
               "--model_filename", os.path.basename(model_file), "--params_filename", "model.pdiparams",
               "--save_file", onnx_file, "--opset_version", "13", "--optimize_tool", "None"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and os.path.isfile(onnx_file), (done.stdout + done.stderr)[-2000:]
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    check(session.run(None, {session.get_inputs()[0].name: x}), "onnxruntime")
