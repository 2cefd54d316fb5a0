"""Paddle Inference on images: python tools/infer.py --model_dir DIR --input_file IMG_OR_DIR [TIPC flags].

Flags (booleans as True/False, ``--flag=value`` or ``--flag value``): --use_gpu --enable_mkldnn
--cpu_threads --batch_size --model_file --params_file --model_dir --model_kind --input_file
--enable_benchmark --precision --use_tensorrt --threshold --pixel_threshold --save_dir
--save_heatmaps --display_size --verbose. See deploy/README.md. Input, results.csv / results.json and
--cpu_threads (0 = all cores) mean the same as for tools/predict.py (kdad/deploy/runtime.py).
"""

import os
import sys
from typing import List

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from kdad.cli import run_main  # noqa: E402


def main(argv: List[str]) -> int:
    from kdad.deploy.runtime import main as infer_main

    return infer_main(argv)


if __name__ == "__main__":
    run_main(main)
