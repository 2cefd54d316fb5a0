"""Predict OK/NG and heatmaps for new images (see README)::

    python tools/predict.py --image_path IMG_OR_DIR --model_path CKPT --save_dir DIR \\
        [--threshold T] [--pixel_threshold P] [--batch_size N] [--cpu_threads N] [--verbose]

Input, results.csv / results.json and --cpu_threads mean the same as for tools/infer.py
(kdad/deploy/runtime.py); the panels and the pixel threshold rule are described in kdad/visualize.py.
"""

import argparse
import os
import sys
from typing import List

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from kdad.cli import run_main  # noqa: E402


def main(argv: List[str]) -> int:
    from kdad.deploy.runtime import RESULT_COLUMNS, finite_float, non_negative_int, positive_int
    from kdad.utils import quiet
    from kdad.visualize import PIXEL_THRESHOLD_HELP

    parser = argparse.ArgumentParser(
        description="Anomaly score, OK/NG decision and heatmap panel for an image or a folder of images.",
        epilog="results.csv / results.json columns: " + ", ".join(RESULT_COLUMNS) + " (the same as "
               "tools/infer.py). decision: NG iff score > threshold.")
    parser.add_argument("--image_path", required=True,
                        help="an image, or a folder: every image in it and in its sub-folders")
    parser.add_argument("--model_path", required=True, help="checkpoint (model_final.pdparams)")
    parser.add_argument("--save_dir", required=True,
                        help="output folder (a new run_NNN sub-folder if it holds earlier results)")
    parser.add_argument("--threshold", type=finite_float, default=None,
                        help="OK/NG threshold, NG iff score > T (default: the checkpoint's calibrated one)")
    parser.add_argument("--pixel_threshold", type=finite_float, default=None,
                        help=PIXEL_THRESHOLD_HELP)
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--cpu_threads", type=non_negative_int, default=0,
                        help="CPU math threads, 0 (default): all cores")
    parser.add_argument("--display_size", type=positive_int, default=None,
                        help="size of each panel tile, about display_size^2 pixels at the image's aspect "
                             "ratio (default: max(input size, 256))")
    quiet.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    from kdad.engine.predictor import predict

    predict(args.model_path, args.image_path, args.save_dir, threshold=args.threshold,
            pixel_threshold=args.pixel_threshold, batch_size=args.batch_size,
            display_size=args.display_size, cpu_threads=args.cpu_threads)
    return 0


if __name__ == "__main__":
    run_main(main)
