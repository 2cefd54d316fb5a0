"""KDAD speed benchmark: one command, one table, one JSON file.

    python benchmarks/bench_all.py                       # everything, VGG16 expert, 128x128, 2 threads
    python benchmarks/bench_all.py --parts score,heatmap --envs tuned --repeats 5
    python benchmarks/bench_all.py --expert efficientnet_lite0 --quick

Parts (each runs in its own subprocess, so environment variables, thread counts and peak memory are
isolated): ``setup`` (checkpoint + exported models), ``matmul`` (the machine's GEMM rate), ``flops``,
``score``, ``heatmap``, ``train``, ``memory``. ``matmul``, ``score``, ``heatmap`` and ``train`` run
once per environment of ``--envs``: ``default`` (paddle as installed) and ``tuned``
(``MKL_DEBUG_CPU_TYPE=5``). Results: a table on stdout and ``benchmarks/results/<timestamp>.json``
(plus ``.md``). Inside a part, engines are timed side by side (interleaved rounds) and medians are
reported. Every fast path is checked against the plain dynamic-graph result (``checks``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from benchmarks.common import (  # noqa: E402
    ENVIRONMENTS,
    REPO,
    git_commit,
    load_average,
    log,
    machine_info,
    part_env,
    write_json,
)

PARTS = ("setup", "matmul", "flops", "score", "heatmap", "train", "memory")
PER_ENV_PARTS = ("matmul", "score", "heatmap", "train")
TRAIN_VARIANTS = ("dygraph cached", "static cached", "dygraph uncached", "static uncached",
                  "static + PI-oneDNN expert (uncached)")
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")

TARGETS = {"score_fraction_of_matmul": 0.80, "train_images_per_s": 12.0, "heatmap_ms": 400.0,
           "memory_mb": 3 * 1024}


def _csv(kind):
    def parse(text: str):
        return [kind(v) for v in str(text).split(",") if str(v).strip()]
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", type=_csv(str), default=list(PARTS), help=f"comma list of {PARTS}")
    p.add_argument("--envs", type=_csv(str), default=["default", "tuned"], help="comma list of default,tuned")
    p.add_argument("--expert", default="vgg16", choices=("vgg16", "efficientnet_lite0"))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed rounds for scoring and matmul")
    p.add_argument("--batches", type=_csv(int), default=[1, 8], help="scoring batch sizes")
    p.add_argument("--heatmap_batches", type=_csv(int), default=[1, 8])
    p.add_argument("--heatmap_repeats", type=int, default=5)
    p.add_argument("--smoothgrad_samples", type=int, default=50, help="0 skips SmoothGrad")
    p.add_argument("--smoothgrad_repeats", type=int, default=2)
    p.add_argument("--train_batch", type=int, default=64)
    p.add_argument("--train_repeats", type=int, default=3)
    p.add_argument("--train_variants", type=_csv(str), default=list(TRAIN_VARIANTS))
    p.add_argument("--epoch_images", type=int, default=762)
    p.add_argument("--memory_epochs", type=int, default=1)
    p.add_argument("--memory_env", default="tuned", help="environment of the memory run (speed only)")
    p.add_argument("--skip_openvino", action="store_true")
    p.add_argument("--skip_cache_timing", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny repeats, for trying the suite out")
    p.add_argument("--work_dir", default=os.path.join(RESULTS_DIR, "work"))
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<timestamp>.json)")
    p.add_argument("--wait_load", type=float, default=None,
                   help="before starting, wait until the 1-minute load average is below this")
    p.add_argument("--wait_minutes", type=float, default=60.0)
    p.add_argument("--part_timeout", type=float, default=1800.0, help="seconds per part subprocess")
    p.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_env", default="default", help=argparse.SUPPRESS)
    p.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_checkpoint", default=None, help=argparse.SUPPRESS)
    return p


# --- child side --------------------------------------------------------------------------------


def run_part(args) -> Dict[str, Any]:
    from benchmarks.common import init_paddle

    init_paddle(args.threads)
    name = args._part
    if name == "setup":
        from benchmarks.common import export_dir, gpu_available, make_checkpoint

        checkpoint = make_checkpoint(args.work_dir, args.expert, args.size)
        folder = export_dir(args.work_dir, checkpoint)
        return {"checkpoint": checkpoint, "export_dir": folder, "gpu": gpu_available()}
    if name == "matmul":
        from benchmarks.matmul_rate import measure

        return {"matmul": measure(repeats=args.repeats)}
    if name == "flops":
        from benchmarks.flops import model_flops
        from kdad.config import load_config
        from kdad.methods.kdad.model import build_model

        model = build_model(load_config(None, {"pretrain": False, "expert": args.expert,
                                               "mvtec_img_size": args.size}))
        return {"flops": model_flops(model, args.size)}
    if name == "score":
        from benchmarks.bench_score import run

        return run(args, args._checkpoint)
    if name == "heatmap":
        from benchmarks.bench_heatmap import run

        return run(args, args._checkpoint)
    if name == "train":
        from benchmarks.bench_train import run

        return run(args)
    if name == "memory":
        from benchmarks.bench_memory import run

        return run(args)
    raise ValueError(f"unknown part {name}")


# --- parent side -------------------------------------------------------------------------------


def _child_argv(args, part: str, env_name: str, out: str, checkpoint: Optional[str]) -> List[str]:
    argv = [sys.executable, "-m", "benchmarks.bench_all", "--_part", part, "--_env", env_name, "--_out", out,
            "--expert", args.expert, "--size", str(args.size), "--threads", str(args.threads),
            "--repeats", str(args.repeats), "--batches", ",".join(map(str, args.batches)),
            "--heatmap_batches", ",".join(map(str, args.heatmap_batches)),
            "--heatmap_repeats", str(args.heatmap_repeats), "--smoothgrad_samples", str(args.smoothgrad_samples),
            "--smoothgrad_repeats", str(args.smoothgrad_repeats), "--train_batch", str(args.train_batch),
            "--train_repeats", str(args.train_repeats), "--train_variants", ",".join(args.train_variants),
            "--epoch_images", str(args.epoch_images), "--memory_epochs", str(args.memory_epochs),
            "--work_dir", args.work_dir, "--part_timeout", str(args.part_timeout)]
    if args.skip_openvino:
        argv.append("--skip_openvino")
    if args.skip_cache_timing:
        argv.append("--skip_cache_timing")
    if args.gpu:
        argv.append("--gpu")
    if checkpoint:
        argv += ["--_checkpoint", checkpoint]
    return argv


def spawn(args, part: str, env_name: str, checkpoint: Optional[str]) -> Dict[str, Any]:
    out = os.path.join(args.work_dir, "parts", f"{part}_{env_name}_{os.getpid()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
        os.remove(out)
    load_before = load_average()
    log(f"part {part} [{env_name}] (load {load_before})")
    start = time.time()
    try:
        done = subprocess.run(_child_argv(args, part, env_name, out, checkpoint), cwd=REPO,
                              env=part_env(env_name, args.threads), timeout=args.part_timeout,
                              capture_output=True, text=True, check=False)
        returncode, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as error:
        returncode, stderr = "timeout", str(error.stderr or "")[-2000:]
    seconds = time.time() - start
    result: Dict[str, Any] = {"part": part, "env": env_name, "seconds": round(seconds, 1),
                              "load_before": load_before, "load_after": load_average()}
    if returncode == 0 and os.path.isfile(out):
        with open(out, encoding="utf-8") as handle:
            result.update(json.load(handle))
    else:
        lines = [line for line in (stderr or "").splitlines() if line.strip() and "Warning" not in line]
        result["error"] = f"exit {returncode}: " + " | ".join(lines[-6:])[-1200:]
        log(f"part {part} [{env_name}] FAILED: {result['error']}")
    for r in result.get("rows", []):
        r["env"] = env_name
    log(f"part {part} [{env_name}] done in {seconds:.0f}s")
    return result


def wait_for_quiet(limit: float, minutes: float) -> Dict[str, Any]:
    start = time.time()
    while True:
        load = load_average()
        if not load or load[0] < limit:
            return {"waited_s": round(time.time() - start), "load": load, "quiet": True}
        if time.time() - start > minutes * 60:
            return {"waited_s": round(time.time() - start), "load": load, "quiet": False}
        log(f"waiting for load < {limit}: now {load}")
        time.sleep(30)


# --- analysis ------------------------------------------------------------------------------------


def reference_rate(matmul_parts: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    best = None
    for part in matmul_parts:
        for m in part.get("matmul", []):
            if best is None or m["gflops_per_s"] > best["gflops_per_s"]:
                best = dict(m, env=part["env"])
    return best


def task_flops(task: str, engine: str, flops: Dict[str, Any], r: Dict[str, Any]) -> Optional[float]:
    if not flops:
        return None
    if task == "score" or task.startswith("heatmap: feature map"):
        return flops["score"]
    if task in ("heatmap: gradients", "heatmap: gbp"):
        return flops["heatmap"]
    if task == "heatmap: smooth_grad":
        return flops["heatmap"] * (int(r.get("samples", 0)) + 1)
    if task == "train":
        return flops["train_cached"] if r.get("cached") else flops["train_uncached"]
    if task == "train: cache":
        return flops["expert_forward"]
    return None


def annotate(rows: List[Dict[str, Any]], flops: Dict[str, Any], rate: Optional[Dict[str, Any]]) -> None:
    for r in rows:
        f = task_flops(r["task"], r["engine"], flops, r)
        if f is None or "ms_per_image" not in r:
            continue
        r["gflop_per_image"] = f / 1e9
        r["achieved_gflops_per_s"] = f / (r["ms_per_image"] / 1000.0) / 1e9
        if rate:
            r["floor_ms_per_image"] = f / (rate["gflops_per_s"] * 1e9) * 1000.0
            r["fraction_of_matmul_rate"] = r["achieved_gflops_per_s"] / rate["gflops_per_s"]


def _passed_checks(checks: List[Dict[str, Any]]) -> Dict[str, bool]:
    return {c["check"]: c["passed"] for c in checks}


def evaluate_targets(rows: List[Dict[str, Any]], checks: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets, each met or missed by how much, from the measured rows."""
    targets = []
    ok = _passed_checks(checks)

    def check_ok(prefix: str, engine: str) -> bool:
        names = [n for n in ok if n.startswith(prefix) and engine in n]
        return all(ok[n] for n in names) if names else True

    # 1. scoring in Paddle Inference >= 80% of the matmul rate
    pi = [r for r in rows if r["task"] == "score" and r["engine"].startswith("PI") and "fraction_of_matmul_rate" in r
          and "GPU" not in r["engine"] and check_ok("score:", r["engine"])]
    if pi:
        best = max(pi, key=lambda r: r["fraction_of_matmul_rate"])
        need = TARGETS["score_fraction_of_matmul"]
        targets.append(_target(
            "scoring in Paddle Inference >= 80% of the measured matmul rate",
            best["fraction_of_matmul_rate"] >= need,
            f"{100 * best['fraction_of_matmul_rate']:.0f}% ({best['engine']}, batch {best['batch']}, {best['env']}: "
            f"{best['ms_per_image']:.1f} ms/img, {best['achieved_gflops_per_s']:.0f} GFLOP/s)",
            None if best["fraction_of_matmul_rate"] >= need else
            f"{100 * (need - best['fraction_of_matmul_rate']):.0f} points short; needs "
            f"{best['floor_ms_per_image'] / need:.1f} ms/img"))
    # 2. Paddle Inference not slower than onnxruntime on the same exported model
    for env in sorted({r["env"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows if r["task"] == "score" and r["batch"]}):
            sel = {r["engine"]: r for r in rows if r["task"] == "score" and r["env"] == env and r["batch"] == batch
                   and "ms_per_image" in r}
            if "onnxruntime" not in sel:
                continue
            candidates = [r for name, r in sel.items() if name.startswith("PI") and "GPU" not in name]
            if not candidates:
                continue
            best = min(candidates, key=lambda r: r["ms_per_image"])
            ort = sel["onnxruntime"]
            met = best["ms_per_image"] <= ort["ms_per_image"]
            targets.append(_target(
                f"Paddle Inference not slower than onnxruntime (batch {batch}, {env})", met,
                f"{best['engine']} {best['ms_per_image']:.1f} vs onnxruntime {ort['ms_per_image']:.1f} ms/img",
                None if met else f"{best['ms_per_image'] - ort['ms_per_image']:.1f} ms/img "
                                 f"({100 * (best['ms_per_image'] / ort['ms_per_image'] - 1):.0f}%) slower"))
    # 3. training >= 12 images/s at batch 64 (result-identical paths), uncached beside it
    train = [r for r in rows if r["task"] == "train" and "images_per_s" in r and r.get("result_identical", True)]
    if train:
        cached = [r for r in train if r.get("cached")]
        uncached = [r for r in rows if r["task"] == "train" and "images_per_s" in r and not r.get("cached")]
        best = max(cached or train, key=lambda r: r["images_per_s"])
        best_unc = max(uncached, key=lambda r: r["images_per_s"]) if uncached else None
        need = TARGETS["train_images_per_s"]
        targets.append(_target(
            "training >= 12 images/s at batch 64", best["images_per_s"] >= need,
            f"{best['images_per_s']:.1f} img/s ({best['engine']}, {best['env']}); uncached best "
            + (f"{best_unc['images_per_s']:.1f} img/s ({best_unc['engine']}, {best_unc['env']})" if best_unc else "n/a"),
            None if best["images_per_s"] >= need else
            f"{need - best['images_per_s']:.1f} img/s short ({100 * (1 - best['images_per_s'] / need):.0f}%)"))
    # 4. gradient heatmap <= 400 ms per image
    heat = [r for r in rows if r["task"] == "heatmap: gradients" and "ms_per_image" in r
            and check_ok("heatmap gradients:", r["engine"])]
    if heat:
        best = min(heat, key=lambda r: r["ms_per_image"])
        best1 = min([r for r in heat if r["batch"] == 1] or heat, key=lambda r: r["ms_per_image"])
        need = TARGETS["heatmap_ms"]
        targets.append(_target(
            "gradient heatmap <= 400 ms per image (best engine)", best["ms_per_image"] <= need,
            f"{best['ms_per_image']:.0f} ms/img ({best['engine']}, batch {best['batch']}, {best['env']}); "
            f"batch 1: {best1['ms_per_image']:.0f} ms ({best1['engine']})",
            None if best["ms_per_image"] <= need else f"{best['ms_per_image'] - need:.0f} ms/img over"))
    # 5. peak memory < 3 GB
    mem = [r for r in rows if r["task"] == "memory" and "peak_rss_mb" in r]
    if mem:
        peak = max(r["peak_rss_mb"] for r in mem)
        need = TARGETS["memory_mb"]
        targets.append(_target("peak memory of training on 762 images < 3 GB", peak < need,
                               f"{peak:.0f} MB", None if peak < need else f"{peak - need:.0f} MB over"))
    return targets


def _target(name: str, met: bool, measured: str, miss: Optional[str]) -> Dict[str, Any]:
    return {"target": name, "met": bool(met), "measured": measured, "missed_by": miss}


# --- table ---------------------------------------------------------------------------------------


def _fmt(value, digits=1, suffix=""):
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return ""
    return f"{value:.{digits}f}{suffix}"


def table_rows(rows: List[Dict[str, Any]]) -> List[List[str]]:
    out = []
    order = {"score": 0, "heatmap: gradients": 1, "heatmap: gbp": 2, "heatmap: smooth_grad": 3,
             "heatmap: feature map (forward only)": 4, "train": 5, "train: cache": 6, "train: data": 7, "memory": 8}
    for r in sorted(rows, key=lambda r: (order.get(r["task"], 99), r["task"], r.get("batch", 0), r.get("env", ""))):
        note = r.get("note", "")
        if r["task"] == "train":
            note = f"epoch of {r['epoch_images']} images: {r['epoch_s']:.0f} s" + \
                   ("" if r.get("result_identical", True) else "; not result-identical")
        elif r["task"] == "train: cache":
            note = f"one-off per {r['epoch_images']} images: {r['epoch_s']:.0f} s"
        elif r["task"] == "heatmap: smooth_grad":
            note = f"{r.get('samples')} noisy samples per image"
        elif r["task"] == "memory":
            note = f"{r['epochs']} epoch, {r['train_seconds']:.0f} s; target < {r['target_mb']} MB"
        out.append([
            r["task"], r["engine"], r.get("env", ""), str(r.get("batch", "")) if r.get("batch") else "",
            _fmt(r.get("ms_per_image")), _fmt(r.get("images_per_s"), 2), _fmt(r.get("floor_ms_per_image")),
            _fmt(100 * r["fraction_of_matmul_rate"], 0, "%") if "fraction_of_matmul_rate" in r else "",
            _fmt(r.get("peak_rss_mb"), 0) if r["task"] == "memory" else "", note])
    return out


HEADER = ["task", "engine", "env", "batch", "ms/img", "img/s", "floor ms/img", "% matmul rate", "peak MB", "note"]


def render_text(rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEADER)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(HEADER), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render_markdown(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def report(result: Dict[str, Any]) -> str:
    parts = []
    m = result["machine"]
    parts.append(f"Machine: {m['cpu']}, {m['logical_cpus']} CPUs ({', '.join(m['cpu_flags'])}), "
                 f"{m['memory_gb']} GB; Paddle {m['versions'].get('paddle')}, onnxruntime "
                 f"{m['versions'].get('onnxruntime')}; {result['threads']} threads; {result['size']}x{result['size']}; "
                 f"expert {result['expert']}")
    c = result["commit"]
    parts.append(f"Commit: {c['short']}{' (+ uncommitted changes)' if c['dirty'] else ''}; "
                 f"load average at start {result['load_start']}, at end {result['load_end']}")
    rate = result.get("matmul_reference")
    if rate:
        parts.append(f"Matmul reference rate: {rate['gflops_per_s']:.1f} GFLOP/s ({rate['library']}, "
                     f"{rate['shape']}, {rate['env']} env)")
    for p in result["parts"]:
        for mm in p.get("matmul", []):
            parts.append(f"  matmul {p['env']:>7}  {mm['library']:<6} {mm['shape']:<42} {mm['gflops_per_s']:7.1f} GFLOP/s")
    f = result.get("flops")
    if f:
        parts.append(f"FLOPs per image: expert {f['expert_forward'] / 1e9:.2f} G, cloner {f['cloner_forward'] / 1e9:.3f} G, "
                     f"score {f['score'] / 1e9:.2f} G, heatmap {f['heatmap'] / 1e9:.2f} G, "
                     f"train cached {f['train_cached'] / 1e9:.2f} G, uncached {f['train_uncached'] / 1e9:.2f} G")
    parts.append("")
    parts.append(render_text(table_rows(result["rows"])))
    parts.append("")
    parts.append("Checks (fast paths against the plain dynamic graph):")
    for ch in result["checks"]:
        extras = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in ch.items() if k not in ("check", "passed", "note", "criterion", "known_wrong"))
        status = "PASS" if ch["passed"] else ("WRONG, not offered" if ch.get("known_wrong") else "FAIL")
        parts.append(f"  [{status}] {ch['check']}: {extras}")
    parts.append("")
    parts.append("Targets:")
    for t in result["targets"]:
        parts.append(f"  [{'MET ' if t['met'] else 'MISS'}] {t['target']}: {t['measured']}"
                     + (f" -- missed by {t['missed_by']}" if t["missed_by"] else ""))
    errors = [p for p in result["parts"] if p.get("error")]
    for p in errors:
        parts.append(f"  part {p['part']} [{p['env']}] failed: {p['error']}")
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.work_dir = os.path.abspath(args.work_dir)
    if args._part:
        result = run_part(args)
        write_json(args._out, result)
        return 0
    if args.quick:
        args.repeats, args.heatmap_repeats, args.smoothgrad_repeats, args.train_repeats = 2, 1, 1, 1
        args.smoothgrad_samples = min(args.smoothgrad_samples, 4)
        args.epoch_images = args.epoch_images
    unknown = [p for p in args.parts if p not in PARTS] + [e for e in args.envs if e not in ENVIRONMENTS]
    if unknown:
        raise SystemExit(f"unknown parts/environments: {unknown}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join(RESULTS_DIR, f"{stamp}.json")
    os.makedirs(args.work_dir, exist_ok=True)
    waited = wait_for_quiet(args.wait_load, args.wait_minutes) if args.wait_load else None
    result: Dict[str, Any] = {
        "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv and sys.argv[0] else "bench_all.py"]
                            + (argv if argv is not None else sys.argv[1:])),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(), "commit": git_commit(),
        "expert": args.expert, "size": args.size, "threads": args.threads, "load_start": load_average(),
        "wait": waited, "environments": {k: ENVIRONMENTS[k] for k in args.envs}, "parts": [], "rows": [],
        "checks": []}
    checkpoint = None
    needs_model = any(p in args.parts for p in ("score", "heatmap"))
    setup_env = "tuned" if "tuned" in args.envs else args.envs[0]
    if "setup" in args.parts or needs_model:
        setup = spawn(args, "setup", setup_env, None)
        result["parts"].append(setup)
        checkpoint = setup.get("checkpoint")
        if setup.get("gpu"):
            args.gpu = True
    for part in ("flops", "matmul", "score", "heatmap", "train", "memory"):
        if part not in args.parts:
            continue
        if part in ("score", "heatmap") and not checkpoint:
            continue
        envs = args.envs if part in PER_ENV_PARTS else [args.memory_env if part == "memory" else setup_env]
        for env_name in envs:
            res = spawn(args, part, env_name, checkpoint)
            result["parts"].append(res)
            result["rows"] += res.get("rows", [])
            for ch in res.get("checks", []):
                ch["env"] = env_name
                ch["check"] = f"{ch['check']} [{env_name}]"
                result["checks"].append(ch)
            if part == "flops" and "flops" in res:
                result["flops"] = res["flops"]
    result["matmul_reference"] = reference_rate([p for p in result["parts"] if p["part"] == "matmul"])
    annotate(result["rows"], {k: v for k, v in (result.get("flops") or {}).items()}, result["matmul_reference"])
    result["targets"] = evaluate_targets(result["rows"], result["checks"])
    result["load_end"] = load_average()
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    text = report(result)
    result["markdown_table"] = render_markdown(table_rows(result["rows"]))
    write_json(out, result)
    with open(os.path.splitext(out)[0] + ".md", "w", encoding="utf-8") as handle:
        handle.write("```\n" + text + "\n```\n\n" + result["markdown_table"] + "\n")
    print(text)
    print(f"\nJSON: {out}")
    return 0 if all(ch["passed"] or ch.get("known_wrong") for ch in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
