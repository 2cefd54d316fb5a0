"""onnxruntime inference with the training preprocessing:
python deploy/onnx/infer_onnx.py --model_dir DIR_WITH_MODEL_ONNX --input_file IMG_OR_DIR [--batch_size 2]

Prints per-image scores and OK/NG and writes results.csv / results.json (and heatmaps for a
feature_map model), exactly as tools/infer.py does with Paddle Inference.
"""

import os
import sys
from typing import List

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from kdad.cli import run_main  # noqa: E402


def main(argv: List[str]) -> int:
    from kdad.deploy.onnx_runtime import infer_main

    return infer_main(argv)


if __name__ == "__main__":
    run_main(main)
