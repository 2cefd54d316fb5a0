"""End-to-end demo on generated data: the exact commands a user runs, one after the other.

Generates a small MVTec-style class, trains KDAD with the pretrained EfficientNet-Lite0 expert
(installs offline from PyPI), evaluates on the test split, exports the static models, runs
Paddle Inference on the test images and writes heatmap panels (OK and NG) of the whole test folder
with the dynamic predictor. ``--verbose`` is passed on to every step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import List, Optional

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _run(step: str, command: List[str]) -> None:
    print(f"\n=== {step}\n$ {' '.join(command)}", flush=True)
    start = time.time()
    subprocess.run(command, check=True, cwd=REPO)
    print(f"--- {step}: {time.time() - start:.1f}s", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="demo_output", help="everything is written here")
    parser.add_argument("--kind", default="object", choices=["texture", "object"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--expert", default="efficientnet_lite0")
    parser.add_argument("--verbose", action="store_true", help="every step shows Paddle's own messages too")
    args = parser.parse_args(argv)
    verbose = ["--verbose"] if args.verbose else []

    work = os.path.abspath(args.work_dir)
    data, category = os.path.join(work, "data"), f"synthetic_{args.kind}"
    common = ["--config", "configs/demo.yaml", "--dataset_root", data, "--normal_class", category,
              "-o", f"expert={args.expert}", "-o", f"log_dir={os.path.join(work, 'logs')}"]
    model = os.path.join(work, "output", category, "model_final.pdparams")
    export_dir = os.path.join(work, "inference_model")
    test_images = os.path.join(data, category, "test")
    py = sys.executable
    _run("generate data", [py, "-m", "kdad.data.synthetic", "--root", data, "--category", category,
                           "--kind", args.kind, "--size", "64", "--n_train", "60"])
    _run("train", [py, "tools/train.py", *common, "--save_dir", os.path.join(work, "output"),
                   "-o", f"num_epochs={args.epochs}", "-o", "overwrite=True", *verbose])  # the demo's own run
    _run("evaluate", [py, "tools/test.py", *common, "--model_path", model, *verbose])
    _run("export", [py, "tools/export_model.py", "--config", "configs/demo.yaml", "--model_path", model,
                    "--save_dir", export_dir, "--overwrite", *verbose])
    _run("Paddle Inference (score model, oneDNN)",
         [py, "tools/infer.py", "--model_dir", os.path.join(export_dir, "score"), "--input_file",
          os.path.join(test_images, "blob"), "--enable_mkldnn=True", "--cpu_threads=2", "--batch_size=4",
          "--save_dir", os.path.join(work, "infer_score"), *verbose])
    _run("predict with heatmaps (dynamic graph), the whole test folder",
         [py, "tools/predict.py", "--image_path", test_images, "--model_path", model,
          "--save_dir", os.path.join(work, "predict"), *verbose])
    print(f"\nDone. Metrics: {os.path.join(work, 'logs', category + '_val.log')}; "
          f"heatmap panels: {os.path.join(work, 'predict')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
