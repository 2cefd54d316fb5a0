"""One table of methods on one class (``tools/benchmark.py``).

For each chosen method: train or fit it (in a child process, so its wall time and peak memory are
its own; or reuse a given checkpoint), evaluate it on the test split (no selection on the test set),
export it, and time scoring in Paddle Inference and onnxruntime on the test images. Writes
``benchmark.json`` and ``benchmark.md`` and prints the Markdown table. Every row names the backbone
it was measured with.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from kdad.config import load_config, parse_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = {"kdad": "configs/efficientnet_lite0.yaml", "padim": "configs/padim.yaml",
                   "patchcore": "configs/patchcore.yaml", "stfpm": "configs/stfpm.yaml",
                   "rd4ad": "configs/rd4ad.yaml", "cflow": "configs/cflow.yaml",
                   "draem": "configs/draem.yaml"}
# the exported graph timed per method: the one that gives the evaluated maps (KDAD: gradient heatmap)
TIMED_KIND = {"kdad": "heatmap"}
COLUMNS = (("method", "method"), ("backbone", "backbone"), ("image_size", "size"),
           ("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"),
           ("image_f1_max", "F1-max"), ("train_seconds", "train/fit s"), ("epochs", "epochs"),
           ("pi_ms", "PI ms/img"), ("onnx_ms", "ORT ms/img"), ("model_mb", "model MB"),
           ("peak_memory_mb", "peak memory MB"))


def run_training(config_file: str, args: argparse.Namespace, method: str, out: str) -> Dict[str, Any]:
    """``tools/train.py`` in a child process: wall time and the child's own peak RSS
    (:func:`kdad.utils.memory.run_measured`: not the RSS this process had when it started the child)."""
    from kdad.utils.memory import run_measured

    command = [os.path.join(REPO, "tools", "train.py"), "--config", config_file,
               "--dataset_root", args.dataset_root, "--normal_class", args.normal_class,
               "--save_dir", os.path.join(out, "runs"), "-o", f"log_dir={os.path.join(out, 'logs')}",
               "-o", "progress_bar=False", "-o", f"method={method}",
               "-o", "overwrite=True"]  # the benchmark's own run folder: a rerun replaces it
    for item in args.override:
        command += ["-o", item]
    log_path = os.path.join(out, f"{method}_train_stdout.log")
    code, seconds, peak = run_measured(command, log_path, cwd=REPO)
    if code != 0:
        raise RuntimeError(f"training {method} failed (exit {code}); see {log_path}")
    return {"train_seconds": round(seconds, 1), "peak_memory_mb": None if peak is None else round(peak, 1)}


def time_runner(run, images: np.ndarray, batch_size: int, warmup: int = 2) -> float:
    """Median-free plain mean: ms per image over all ``images`` after ``warmup`` batches."""
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    for batch in batches[:warmup]:
        run(batch)
    started = time.perf_counter()
    for batch in batches:
        run(batch)
    return 1000.0 * (time.perf_counter() - started) / len(images)


def _folder_mb(folder: str) -> float:
    total = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
                if name.startswith("model.") and not name.endswith(".onnx"))
    return round(total / 2 ** 20, 2)


def benchmark_method(method: str, checkpoint: Optional[str], config_file: str, args: argparse.Namespace,
                     out: str) -> Dict[str, Any]:
    """Train/fit (unless ``checkpoint``), evaluate, export and time one method."""
    from kdad.data import AnomalyDataset, list_mvtec
    from kdad.deploy.onnx_runtime import OnnxRunner, convert_to_onnx
    from kdad.deploy.runtime import PredictorOptions, load_paddle_model
    from kdad.engine.evaluator import run_test
    from kdad.export import export_model
    from kdad.utils.checkpoint import load_checkpoint

    row: Dict[str, Any] = {"method": method}
    overrides = {"dataset_root": args.dataset_root, "normal_class": args.normal_class, "method": method,
                 "log_dir": os.path.join(out, "logs"), "save_dir": os.path.join(out, "runs"),
                 **parse_overrides(args.override)}
    config = load_config(config_file, overrides)
    if checkpoint is None:
        row.update(run_training(config_file, args, method, out))
        from kdad.engine.common import class_dir

        checkpoint = os.path.join(class_dir(config), "model_final.pdparams")
    else:
        row.update({"train_seconds": None, "peak_memory_mb": None, "note": f"reused {checkpoint}"})
    state = load_checkpoint(checkpoint)
    trained = state["config"]
    row["backbone"] = trained.get("expert") if method == "kdad" else state.get("backbone")
    row["image_size"] = int(trained["mvtec_img_size"])
    from kdad.registry import get_method

    trained_method = get_method(method).training is not None
    row["epochs"] = int(state.get("epoch", 0)) + 1 if trained_method else None  # fitted, not trained
    if row["train_seconds"] is None and state.get("fit"):
        row["train_seconds"] = state["fit"].get("fit_seconds")
    result = run_test(config, checkpoint)
    row.update({key: result["metrics"].get(key) for key in ("image_auroc", "pixel_auroc", "aupro",
                                                              "image_f1_max")})
    row["checkpoint"] = checkpoint
    kind = TIMED_KIND.get(method, "anomaly_map")
    folder = export_model(checkpoint, os.path.join(out, "export", method), kinds=[kind], overwrite=True)[kind]
    row["model_mb"] = _folder_mb(folder)
    images = AnomalyDataset(list_mvtec(args.dataset_root, args.normal_class, "test"),
                            row["image_size"]).images()[:args.timing_images]
    runner, _ = load_paddle_model(folder, None, None, PredictorOptions(enable_mkldnn=True,
                                                                         cpu_threads=args.threads))
    row["pi_ms"] = round(time_runner(runner.run, images, args.batch_size), 1)
    try:
        onnx_file = convert_to_onnx(folder, os.path.join(out, "onnx", method))
        row["onnx_ms"] = round(time_runner(OnnxRunner(onnx_file, args.threads).run, images,
                                           args.batch_size), 1)
    except Exception as error:  # noqa: BLE001 - reported in the table, not fatal
        row["onnx_ms"], row["onnx_error"] = None, str(error)[:200]
    row["timed_model"] = f"{kind} (batch {args.batch_size}, {args.threads} threads, {len(images)} images)"
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value <= 1.0 else f"{value:.1f}"
    return str(value)


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run methods on one class and print one table.")
    parser.add_argument("--dataset_root", required=True)
    parser.add_argument("--normal_class", required=True)
    parser.add_argument("--methods", default="kdad,padim,patchcore", help="comma-separated method names")
    parser.add_argument("--config", action="append", default=[], metavar="METHOD=FILE",
                        help=f"config per method (defaults: {DEFAULT_CONFIGS})")
    parser.add_argument("--model_path", action="append", default=[], metavar="METHOD=CKPT",
                        help="reuse a trained checkpoint instead of training (repeatable)")
    parser.add_argument("--save_dir", default="benchmark_output")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every method's training and evaluation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--timing_images", type=int, default=64)
    return parser


def _pairs(items: Sequence[str], what: str) -> Dict[str, str]:
    pairs = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what} '{item}' is not of the form METHOD=VALUE")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value.strip()
    return pairs


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    configs = {**DEFAULT_CONFIGS, **_pairs(args.config, "--config")}
    checkpoints = _pairs(args.model_path, "--model_path")
    unknown = [m for m in methods if m not in configs]
    if unknown:
        raise ValueError(f"no config for method(s) {unknown}: pass --config METHOD=FILE")
    os.makedirs(args.save_dir, exist_ok=True)
    rows = []
    for method in methods:
        print(f"== {method} ==", flush=True)
        rows.append(benchmark_method(method, checkpoints.get(method), configs[method], args,
                                     args.save_dir))
        print(markdown(rows[-1:]), flush=True)
    table = markdown(rows)
    with open(os.path.join(args.save_dir, "benchmark.json"), "w", encoding="utf-8") as handle:
        json.dump({"dataset_root": args.dataset_root, "normal_class": args.normal_class, "rows": rows},
                  handle, indent=1)
    with open(os.path.join(args.save_dir, "benchmark.md"), "w", encoding="utf-8") as handle:
        handle.write(f"# {args.normal_class}\n\n{table}\n")
    print(table)
    return 0
