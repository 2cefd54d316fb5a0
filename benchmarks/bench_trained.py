"""Training speed of the trained methods (STFPM, RD4AD, CFlow-AD, DRAEM, optionally KDAD) beside the
FLOP floor.

For each method (model built from its config, ``backbone: efficientnet_lite0`` by default, the
method's image size and batch size unless overridden):

* FLOPs per image, counted with forward hooks on every ``Conv2D``, ``Conv2DTranspose`` and ``Linear``
  that runs (``benchmarks/flops.py``: ``count_layers``): the teacher forward
  (``training.teacher_features``; DRAEM has none) and the student forward (``training.loss``, or for
  CFlow-AD ``training.step``: every fiber batch of one image batch). A conv costs
  ``2 * C_out * H_out * W_out * C_in/groups * kh * kw``, a transposed conv
  ``2 * C_in * H_in * W_in * C_out/groups * kh * kw``, a linear layer ``2 * rows * in * out`` (one
  multiply and one add per MAC); BatchNorm, activations, the flows' permutations and log-determinants,
  the loss, DRAEM's anomaly simulator and the optimiser are left out;
* training FLOPs per image: *cached* = student forward + weight gradients (trainable weights) + data
  gradients (layers whose input needs a gradient: not the first conv of a student that takes the
  image, nor RD4AD's fusion convs on the teacher's features, nor a flow's first coupling on the
  fibers); a layer whose output does not reach the loss has no backward. That is ``3 x student
  forward`` less the data gradients not needed. *uncached* adds the teacher forward. A method whose
  input is new every step (DRAEM: ``cacheable=False``) has only the *uncached* row;
* the machine's matrix-multiply rate (``benchmarks/matmul_rate.measure``, the highest rate of any
  library and shape, measured in this run) and the floor = FLOPs / rate (ms/img and img/s);
* measured img/s of the trainer's step (:func:`kdad.engine.trainer._train`): batch to tensor, teacher
  features from the numpy cache (*cached*, made beforehand by ``cache_teacher_features``) or
  ``training.teacher_features`` every step (*uncached*), ``training.loss`` (DRAEM's simulation
  included), ``float(loss)``, ``backward``, ``optimizer.step``, ``clear_grad`` (CFlow-AD:
  ``training.step``, its fiber-batch Adam steps). The variants share one model and are timed side by
  side (interleaved rounds, warm-up steps excluded, median of ``--steps``);
* peak RSS: each method runs in its own subprocess (with ``--threads`` math threads), so it is the
  method's own.

    python benchmarks/bench_trained.py                                  # stfpm, rd4ad at 256 px
    python benchmarks/bench_trained.py --methods stfpm,rd4ad,kdad --json out.json
    python benchmarks/bench_trained.py --image_size 128 --batch_size 8 --steps 2   # a quick check
    python benchmarks/bench_trained.py --methods cflow,draem --image_size 128 --batch_size 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.common import (  # noqa: E402 - common imports no paddle
    git_commit,
    init_paddle,
    interleaved_timing,
    load_average,
    log,
    machine_info,
    peak_rss_mb,
    random_images,
    thread_env,
    write_json,
)

METHODS = ("stfpm", "rd4ad", "cflow", "draem", "kdad")
VARIANTS = ("cached", "uncached")
COLUMNS = ("method", "backbone", "size", "batch", "variant", "GFLOP/img", "floor img/s", "measured img/s",
           "% of floor")


# --- FLOPs ------------------------------------------------------------------------------------------

def training_flops(model: Any, training: Any, student: Any, images: Any, config: Any) -> Dict[str, Any]:
    """FLOPs per image of the teacher forward, the student forward and its gradients, counted on one
    training batch ``images`` (eval mode, gradients enabled so the hooks see which tensors need them).

    A ``loss`` method: a layer's backward runs only if its output reaches the loss (checked with
    ``paddle.grad``). A ``step`` method (CFlow-AD) optimises inside the call, so the step itself is
    counted (every fiber batch of the image batch, each once) and every counted layer is taken to
    reach its loss (true of the flows: each fiber batch's loss is the flow's output)."""
    import numpy as np
    import paddle

    from benchmarks.flops import count_layers, drop_outputs

    model.eval()
    count = int(images.shape[0])
    x = paddle.to_tensor(images)
    teacher, feats = count_layers(model, lambda: training.teacher_features(model, x))
    drop_outputs(teacher)
    feats = {key: value.detach() for key, value in feats.items()}
    rng = np.random.default_rng(0)
    with paddle.enable_grad():
        if training.step is not None:
            optimizer = training.optimizer(config, student.parameters())
            records, _ = count_layers(student, lambda: training.step(model, student, x, feats, rng, optimizer))
            reaches_loss = {id(r): True for r in records}
        else:
            records, loss = count_layers(student, lambda: training.loss(model, student, x, feats, rng))
            graded = [r for r in records if not r["output"].stop_gradient]
            grads = paddle.grad([loss], [r["output"] for r in graded], allow_unused=True) if graded else []
            reaches_loss = {id(r): g is not None for r, g in zip(graded, grads)}
    for r in records:
        r["reaches_loss"] = reaches_loss.get(id(r), False)
    drop_outputs(records)
    forward = sum(r["flops"] for r in records) / count
    data_grads = sum(r["flops"] for r in records if r["reaches_loss"] and r["input_needs_grad"]) / count
    weight_grads = sum(r["flops"] for r in records if r["reaches_loss"] and r["weight_trained"]) / count
    teacher_forward = sum(r["flops"] for r in teacher) / count
    cached = forward + data_grads + weight_grads
    kinds = sorted({r["kind"] for r in records})
    return {
        "teacher_forward": teacher_forward, "student_forward": forward, "student_data_grads": data_grads,
        "student_weight_grads": weight_grads, "train_cached": cached, "train_uncached": cached + teacher_forward,
        "teacher_layers": len({r["layer"] for r in teacher}), "student_layers": len({r["layer"] for r in records}),
        "student_layer_kinds": kinds, "student_calls": len(records),
        "student_calls_without_data_grad": sum(not (r["reaches_loss"] and r["input_needs_grad"])
                                               for r in records),
    }


# --- one method (in its own process) ------------------------------------------------------------------

def method_config(method: str, backbone: str, image_size: Optional[int], batch_size: Optional[int]) -> Any:
    """The method's config: its defaults (image size, batch size, learning rate) unless overridden."""
    from kdad.config import load_config

    overrides: Dict[str, Any] = {"method": method}
    overrides["expert" if method == "kdad" else "backbone"] = backbone
    if image_size:
        overrides["mvtec_img_size"] = int(image_size)
    if batch_size:
        overrides["batch_size"] = int(batch_size)
    return load_config(None, overrides)


def bench_method(method: str, backbone: str, image_size: Optional[int], batch_size: Optional[int],
                 steps: int, warmup: int, variants: List[str]) -> Dict[str, Any]:
    """FLOPs, cache time and the measured training steps of one method (no floor: the caller's rate)."""
    import numpy as np
    import paddle

    from kdad.engine.common import backbone_of
    from kdad.engine.trainer import cache_teacher_features
    from kdad.registry import get_method

    config = method_config(method, backbone, image_size, batch_size)
    size, batch = int(config["mvtec_img_size"]), int(config["batch_size"])
    spec = get_method(method)
    training = spec.training
    if training is None:
        raise ValueError(f"method '{method}' is not trained (it has no TrainingSpec)")
    if not training.cacheable:  # the teacher's input (or the whole input) changes every step
        variants = ["uncached"]
    log(f"{method}: building the model ({backbone}, {size} px, batch {batch})")
    model = spec.build_model(config)
    if training.prepare is not None:
        training.prepare(model, config)
    student = training.student(model)
    optimizer = training.optimizer(config, student.parameters())
    images = random_images(batch, size, seed=1)
    # FLOPs per image: one image for a loss (per-image cost), the whole batch for a step method (its
    # fiber batches depend on the batch)
    flops = training_flops(model, training, student, images if training.step is not None else images[:1],
                           config)

    cached: Dict[str, Any] = {}
    cache_s = 0.0
    if "cached" in variants:
        model.eval()  # as the trainer: the cache is made in eval mode, once
        started = time.perf_counter()
        cached = cache_teacher_features(training, model, images, int(config["eval_batch_size"]))
        cache_s = time.perf_counter() - started
    model.train()
    rng = np.random.default_rng(0)
    losses: Dict[str, List[float]] = {name: [] for name in variants}

    def step(name: str) -> None:
        index = rng.permutation(batch)
        x = paddle.to_tensor(images[index])
        if name == "cached":
            feats = {key: paddle.to_tensor(value[index]) for key, value in cached.items()}
        else:
            feats = training.teacher_features(model, x)
        if training.step is not None:  # the method's own optimiser steps
            losses[name].append(float(training.step(model, student, x, feats, rng, optimizer)))
            return
        loss = training.loss(model, student, x, feats, rng)
        losses[name].append(float(loss))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()

    log(f"{method}: {warmup} warm-up + {steps} timed steps of each of {variants}")
    timings = interleaved_timing({name: (lambda name=name: step(name)) for name in variants},
                                 repeats=steps, warmup=warmup)
    rows = []
    for name in variants:
        timing = timings[name]
        rows.append({
            "method": method, "backbone": backbone_of(config), "image_size": size, "batch": batch,
            "variant": name, "learning_rate": float(config["learning_rate"]),
            "train_gflop_per_image": flops[f"train_{name}"] / 1e9,
            "measured_images_per_s": batch / timing["median_s"],
            "measured_ms_per_image": 1000.0 * timing["median_s"] / batch,
            "median_s": timing["median_s"], "min_s": timing["min_s"], "times_s": timing["times_s"],
            "warmup_steps": warmup, "losses": losses[name],
            "losses_finite": bool(np.isfinite(losses[name]).all()),
        })
    return {"method": method, "flops": flops, "cache_s": cache_s, "cache_images": batch,
            "cached_mb": sum(value.nbytes for value in cached.values()) / 2 ** 20,
            "peak_rss_mb": peak_rss_mb(), "rows": rows}


def child_main(args: argparse.Namespace) -> int:
    """Run one method and write its result as JSON (the parent process reads it)."""
    import kdad  # noqa: F401 - before paddle: sets MKL_DEBUG_CPU_TYPE on AMD CPUs, as kdad's tools get

    init_paddle(args.threads)
    result = bench_method(args.child, args.backbone, args.image_size, args.batch_size, args.steps,
                          args.warmup, args.variants)
    write_json(args.child_out, result)
    return 0


# --- the parent: matmul rate, one subprocess per method, the table --------------------------------------

def run_child(method: str, args: argparse.Namespace, folder: str) -> Dict[str, Any]:
    """``bench_method`` of ``method`` in a subprocess with ``--threads`` math threads."""
    out = os.path.join(folder, f"{method}.json")
    command = [sys.executable, os.path.abspath(__file__), "--child", method, "--child_out", out,
               "--backbone", args.backbone, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--variants", ",".join(args.variants)]
    if args.image_size:
        command += ["--image_size", str(args.image_size)]
    if args.batch_size:
        command += ["--batch_size", str(args.batch_size)]
    env = dict(os.environ)
    env.update(thread_env(args.threads))
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, cwd=REPO, check=False)
    if completed.returncode != 0 or not os.path.isfile(out):
        return {"method": method, "error": f"exit code {completed.returncode}", "rows": []}
    with open(out, encoding="utf-8") as handle:
        result = json.load(handle)
    result["wall_s"] = time.perf_counter() - started
    return result


def add_floor(result: Dict[str, Any], rate: float) -> None:
    """Floor ms/img and img/s at ``rate`` FLOP/s, and the measured fraction of it, on every row."""
    for r in result["rows"]:
        flops = r["train_gflop_per_image"] * 1e9
        r["floor_ms_per_image"] = flops / rate * 1000.0
        r["floor_images_per_s"] = rate / flops if flops else float("inf")
        r["percent_of_floor"] = 100.0 * r["measured_images_per_s"] / r["floor_images_per_s"]
        r["peak_rss_mb"] = result["peak_rss_mb"]


def table(results: List[Dict[str, Any]]) -> List[str]:
    """The markdown table of every row."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for result in results:
        for r in result["rows"]:
            cells = [r["method"], r["backbone"], str(r["image_size"]), str(r["batch"]), r["variant"],
                     f"{r['train_gflop_per_image']:.3g}", f"{r['floor_images_per_s']:.3g}",
                     f"{r['measured_images_per_s']:.3g}", f"{r['percent_of_floor']:.0f}%"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def details(result: Dict[str, Any]) -> str:
    """One line of a method's FLOP breakdown, cache time and memory."""
    f = result["flops"]
    g = 1e9
    cache = (f"teacher cache {1000.0 * result['cache_s'] / result['cache_images']:.0f} ms/img "
             f"({result['cached_mb']:.0f} MB for {result['cache_images']} images)" if result["cache_s"]
             else "nothing cached")
    return (f"{result['method']}: teacher forward {f['teacher_forward'] / g:.3g} GFLOP/img "
            f"({f['teacher_layers']} layers), student forward {f['student_forward'] / g:.3g} "
            f"({f['student_layers']} layers: {', '.join(f['student_layer_kinds'])}; {f['student_calls']} calls), "
            f"data grads {f['student_data_grads'] / g:.3g} ({f['student_calls_without_data_grad']} calls without), "
            f"weight grads {f['student_weight_grads'] / g:.3g}; {cache}; peak RSS {result['peak_rss_mb']:.0f} MB; "
            f"losses finite: {all(r['losses_finite'] for r in result['rows'])}")


def _csv(text: str) -> List[str]:
    return [value.strip() for value in str(text).split(",") if value.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", type=_csv, default=["stfpm", "rd4ad"], help=f"comma list of {METHODS}")
    parser.add_argument("--backbone", default="efficientnet_lite0",
                        help="teacher backbone (KDAD: the expert)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="input size (default: the method's, 256 for STFPM/RD4AD, 128 for KDAD)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="training batch (default: the method's, STFPM 32, RD4AD 16, KDAD 64)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--variants", type=_csv, default=list(VARIANTS), help="cached,uncached")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--matmul_repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the rows and FLOP details as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS] + [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown method or variant {unknown}; methods: {METHODS}, variants: {VARIANTS}")
    os.environ.update(thread_env(args.threads))  # before numpy and paddle are imported
    if args.child:
        return child_main(args)
    import kdad  # noqa: F401 - before paddle (MKL_DEBUG_CPU_TYPE on AMD CPUs)
    from benchmarks.matmul_rate import measure

    init_paddle(args.threads)
    load_before = load_average()
    log("measuring the matrix-multiply rate")
    rates = measure(repeats=args.matmul_repeats)
    rate = max(r["gflops_per_s"] for r in rates) * 1e9
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods:
            result = run_child(method, args, folder)
            if "error" not in result:
                add_floor(result, rate)
            results.append(result)
    load_after = load_average()
    best = {lib: max(r["gflops_per_s"] for r in rates if r["library"] == lib) for lib in ("numpy", "paddle")}
    print(f"matmul reference rate {rate / 1e9:.1f} GFLOP/s (max over shapes: numpy {best['numpy']:.1f}, paddle "
          f"{best['paddle']:.1f}); {args.threads} threads; load average before {load_before}, after {load_after}")
    for line in table([r for r in results if "error" not in r]):
        print(line)
    for result in results:
        print(details(result) if "error" not in result else f"{result['method']}: FAILED ({result['error']})")
    if args.json:
        write_json(args.json, {"command": [sys.executable, *sys.argv], "machine": machine_info(),
                               "git": git_commit(), "threads": args.threads, "load_before": load_before,
                               "load_after": load_after, "matmul_gflops": rate / 1e9, "matmul": rates,
                               "results": results,
                               "rows": [r for result in results for r in result["rows"]]})
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
