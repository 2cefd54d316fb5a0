"""Scoring speed of the methods (PaDiM, PatchCore, STFPM, RD4AD, CFlow-AD, DRAEM) beside the floor,
and what their fitted or trained state costs.

For each checkpoint: FLOPs per image (every convolution, transposed convolution and linear layer the
exported model's forward runs, counted with forward hooks: backbone, students, decoders, flows,
U-Nets, blur; plus the method's own products: PaDiM's per-position Mahalanobis ``P * 2 d^2``,
PatchCore's patch-to-bank distances ``P * 2 M D`` and the re-weighting's bank row ``2 M D``;
element-wise work such as the flows' permutations and log-likelihoods is left out), the machine's
matrix-multiply rate measured in the same run, the floor (FLOPs / rate), and the measured ms per
image of the exported model in Paddle Inference (oneDNN on and off) and onnxruntime at the chosen
batch sizes; plus the size of the fitted state (statistics / memory bank) and, when the checkpoint
records it, the fit time.

    python benchmarks/bench_methods.py --checkpoint padim=RUN/padim/magnetic_tile/model_final.pdparams \
        --checkpoint patchcore=RUN/patchcore/magnetic_tile/model_final.pdparams --batch_sizes 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402


def method_flops(method: str, model: Any) -> Dict[str, float]:
    """FLOPs per image of a fitted or trained model: its layers (hooks) and the method's products."""
    import paddle

    from benchmarks.flops import conv_flops

    size = int(model.image_size)
    if method == "kdad":
        raise ValueError("KDAD's scoring and heatmap costs are benchmarks/bench_all.py's (a gradient map)")
    convs = sum(r["flops"] for r in conv_flops(model, model, size))  # every counted layer of the forward
    state = {key: list(value.shape) for key, value in model.state_dict().items()}
    if method == "padim":
        positions, d, _ = state["inv_covariance"]
        extra = positions * 2.0 * d * d
    elif method == "patchcore":
        bank, dim = state["memory_bank"]
        with paddle.no_grad():
            taps = model.backbone(paddle.zeros([1, 3, size, size]))
        first = taps[model.backbone.taps[0]]
        positions = int(first.shape[2]) * int(first.shape[3])
        extra = positions * 2.0 * bank * dim + 2.0 * bank * dim
    else:  # a trained method: its networks are all counted layers
        extra = 0.0
    return {"conv": float(convs), "method": float(extra), "total": float(convs + extra)}


def state_megabytes(model: Any) -> float:
    """Size of the fitted (non-backbone) state in float32."""
    return sum(int(np.prod(v.shape)) * 4 for k, v in model.state_dict().items()
               if not k.startswith("backbone.")) / 2 ** 20


def time_ms(run, batch: np.ndarray, repeats: int) -> float:
    run(batch)
    run(batch)
    started = time.perf_counter()
    for _ in range(repeats):
        run(batch)
    return 1000.0 * (time.perf_counter() - started) / (repeats * len(batch))


def bench_checkpoint(method: str, checkpoint: str, batch_sizes: List[int], threads: int, repeats: int,
                     rate: float) -> Dict[str, Any]:
    from kdad.deploy.config import load_deploy_config
    from kdad.deploy.onnx_runtime import OnnxRunner, convert_to_onnx
    from kdad.deploy.runtime import PredictorOptions, create_paddle_predictor
    from kdad.engine.common import backbone_of
    from kdad.export import export_model
    from kdad.utils.checkpoint import load_checkpoint, load_model

    model, state, config = load_model(checkpoint)
    flops = method_flops(method, model)
    row: Dict[str, Any] = {"method": method, "backbone": backbone_of(config),
                           "image_size": int(config["mvtec_img_size"]), "gflop_per_image": flops["total"] / 1e9,
                           "method_gflop": flops["method"] / 1e9, "floor_ms": flops["total"] / rate * 1000.0,
                           "state_mb": round(state_megabytes(model), 1),
                           "fit_seconds": (load_checkpoint(checkpoint).get("fit") or {}).get("fit_seconds")}
    size = row["image_size"]
    with tempfile.TemporaryDirectory() as folder:
        model_dir = export_model(checkpoint, folder)["anomaly_map"]
        model_file = os.path.join(model_dir, "model.json")
        params_file = os.path.join(model_dir, "model.pdiparams")
        onnx_file = convert_to_onnx(model_dir, os.path.join(folder, "onnx"))
        engines = {
            "pi_native": create_paddle_predictor(model_file, params_file,
                                                 PredictorOptions(enable_mkldnn=False, cpu_threads=threads)).run,
            "onnxruntime": OnnxRunner(onnx_file, threads).run,
        }
        if load_deploy_config(model_dir)["engine"].get("onednn"):  # e.g. not with interpolation ops
            engines["pi_onednn"] = create_paddle_predictor(
                model_file, params_file, PredictorOptions(enable_mkldnn=True, cpu_threads=threads)).run
        rng = np.random.default_rng(0)
        for batch_size in batch_sizes:
            batch = rng.random((batch_size, 3, size, size), dtype=np.float32)
            for name, run in engines.items():
                row[f"{name}_b{batch_size}_ms"] = round(time_ms(run, batch, repeats), 2)
    del state
    return row


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="METHOD=PATH")
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    from benchmarks.common import init_paddle, load_average
    from benchmarks.matmul_rate import measure

    init_paddle(args.threads)
    load_before = load_average()
    rates = measure(repeats=5)
    rate = max(r["gflops_per_s"] for r in rates) * 1e9
    batch_sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    rows = []
    for item in args.checkpoint:
        method, path = item.split("=", 1)
        rows.append(bench_checkpoint(method.strip(), path.strip(), batch_sizes, args.threads, args.repeats,
                                     rate))
    print(f"matmul reference rate {rate / 1e9:.1f} GFLOP/s (max over numpy/paddle shapes); "
          f"load average before {load_before}, after {load_average()}")
    columns = ["method", "backbone", "image_size", "gflop_per_image", "method_gflop", "floor_ms", "state_mb",
               "fit_seconds"] + [f"{e}_b{b}_ms" for b in batch_sizes for e in ("pi_onednn", "pi_native",
                                                                                  "onnxruntime")]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c)) for c in columns]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"matmul_gflops": rate / 1e9, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
