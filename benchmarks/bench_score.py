"""Scoring ms per image: dynamic graph, Paddle Inference (oneDNN on / off, OpenVINO), onnxruntime.

All engines run the checkpoint's exported ``score/`` model (``kdad.export``) or, for the dynamic
graph, :meth:`KDADModel.score`, at batch 1 and 8, timed side by side (interleaved). Every engine's
scores are compared with the dynamic graph's on the same images (``checks``).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

from benchmarks import engines
from benchmarks.common import check, export_dir, interleaved_timing, log, peak_rss_mb, random_images, row

SCORE_TOL = 1e-4  # relative to max(1, |score|); oneDNN / ORT differ from the dygraph by ~1e-6


def run(args, checkpoint: str) -> Dict[str, Any]:
    import paddle

    from kdad.utils.checkpoint import load_model

    model, _, config = load_model(checkpoint)
    size = int(config["mvtec_img_size"])
    folder = export_dir(args.work_dir, checkpoint)
    score_file = os.path.join(folder, "score", "model.json")

    runners: Dict[str, Any] = {}

    def dygraph(batch):
        with paddle.no_grad():
            return [model.score(paddle.to_tensor(batch)).numpy()]

    runners["dygraph"] = dygraph
    runners["PI oneDNN"] = engines.paddle_inference(score_file, True, args.threads)
    runners["PI native (oneDNN off)"] = engines.paddle_inference(score_file, False, args.threads)
    notes: Dict[str, str] = {}
    if not args.skip_openvino:
        try:
            runners["PI OpenVINO"] = engines.paddle_inference_openvino(score_file, args.threads)
        except Exception as error:  # noqa: BLE001 - optional engine
            notes["PI OpenVINO"] = f"unavailable: {str(error).strip().splitlines()[-1][:160]}"
    try:
        onnx_file = engines.onnx_model(os.path.join(folder, "score"), os.path.join(folder, "score_onnx"))
        runners["onnxruntime"] = engines.onnxruntime(onnx_file, args.threads)
    except Exception as error:  # noqa: BLE001 - reported in the table
        notes["onnxruntime"] = f"conversion failed: {str(error)[:200]}"
    if args.gpu:
        runners["dygraph GPU"] = _gpu_dygraph(checkpoint)
        runners["PI GPU"] = engines.paddle_inference(score_file, False, args.threads, use_gpu=True)

    checks: List[Dict[str, Any]] = []
    probe = random_images(8, size, seed=5)
    reference = dygraph(probe)[0]
    for name, runner in runners.items():
        if name == "dygraph":
            continue
        got = runner(probe)[0]
        diff = float(abs(got - reference).max())
        checks.append(check(f"score: {name} vs dygraph (8 images)", diff <= SCORE_TOL * max(1.0, float(abs(reference).max())),
                            max_abs_diff=diff, reference_max=float(abs(reference).max())))

    rows = []
    for batch in args.batches:
        images = random_images(batch, size, seed=10 + batch)
        functions = {name: (lambda runner=runner, images=images: runner(images)) for name, runner in runners.items()}
        log(f"score: timing {len(functions)} engines at batch {batch}, {args.repeats} repeats")
        timings = interleaved_timing(functions, repeats=args.repeats, warmup=1)
        for name in runners:
            rows.append(row("score", name, batch, timings[name], batch))
    for name, note in notes.items():
        rows.append(row("score", name, 0, None, 1, note=note))
    return {"rows": rows, "checks": checks, "peak_rss_mb": peak_rss_mb()}


def _gpu_dygraph(checkpoint: str):
    """A second copy of the model on the GPU (the CPU rows keep theirs)."""
    import paddle

    from kdad.utils.checkpoint import load_model

    gpu_model = load_model(checkpoint)[0]
    gpu_model.to("gpu")

    def run(batch):
        with paddle.no_grad():
            return [gpu_model.score(paddle.to_tensor(batch, place=paddle.CUDAPlace(0))).numpy()]

    return run
