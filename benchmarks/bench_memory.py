"""Peak memory of a real training run on 762 images of 128x128, in an isolated subprocess.

A generated texture class with 847 normal training images (``kdad.data.synthetic``): the trainer
holds out round(847 * 0.1) = 85 for calibration and trains on 762, the count of the target. The
child process runs ``kdad.engine.trainer.train`` for ``--memory_epochs`` epoch(s) with the default
config (batch 64, cached expert features, calibration with gradient maps at the end), then reports
its own peak RSS (``VmHWM``, :func:`kdad.utils.memory.peak_rss_mb`) and wall time. Nothing else
runs in that process, so the peak is the training run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Dict

from benchmarks.common import REPO, log, row

N_GENERATED = 847  # -> 762 training images + 85 held out
TARGET_MB = 3 * 1024

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {repo!r})
import warnings; warnings.filterwarnings("ignore")
import paddle
paddle.base.core.set_num_threads({threads})
from kdad.config import load_config
from kdad.engine.trainer import train
from kdad.utils.memory import peak_rss_mb
config = load_config(None, {overrides!r})
start = time.time()
path = train(config)
elapsed = time.time() - start
print("RESULT " + json.dumps({{"peak_rss_mb": peak_rss_mb(),
                              "seconds": elapsed, "checkpoint": path}}), flush=True)
"""


def run(args) -> Dict[str, Any]:
    from kdad.data.synthetic import generate_synthetic_class

    size = int(args.size)
    root = os.path.join(args.work_dir, f"memory_data_{size}_{N_GENERATED}")
    if not os.path.isfile(os.path.join(root, "synthetic", "train", "good", f"{N_GENERATED - 1:03d}.png")):
        log(f"memory: generating {N_GENERATED} training images of {size}x{size}")
        generate_synthetic_class(root, "synthetic", kind="texture", size=size, n_train=N_GENERATED,
                                 n_test_good=2, n_test_defect=1)
    out = os.path.join(args.work_dir, f"memory_run_{args.expert}")
    overrides = {"dataset_root": root, "normal_class": "synthetic", "num_epochs": int(args.memory_epochs),
                 "mvtec_img_size": size, "pretrain": False, "expert": args.expert, "save_dir": out,
                 "log_dir": os.path.join(out, "logs"), "progress_bar": False, "save_every": 0}
    code = CHILD.format(repo=REPO, threads=int(args.threads), overrides=overrides)
    log(f"memory: training {args.memory_epochs} epoch(s) on 762 images in a child process")
    start = time.time()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env=os.environ.copy(), timeout=args.part_timeout)
    wall = time.time() - start
    result = None
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    if done.returncode != 0 or result is None:
        tail = (done.stderr or done.stdout)[-1500:]
        raise RuntimeError(f"the training child failed (exit {done.returncode}): {tail}")
    peak = float(result["peak_rss_mb"])
    r = row("memory", "trainer (dygraph, cached features), 762 images", 64, None, 1,
            peak_rss_mb=peak, train_seconds=result["seconds"], wall_seconds=wall,
            epochs=int(args.memory_epochs), target_mb=TARGET_MB)
    return {"rows": [r], "checks": []}
