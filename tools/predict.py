"""Predict OK/NG and heatmaps for new images (see README)::

    python tools/predict.py --image_path IMG_OR_DIR --model_path CKPT --save_dir DIR \\
        [--threshold T] [--pixel_threshold P] [--batch_size N]
"""

import argparse
import os
import sys
from typing import List

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from kdad.cli import run_main  # noqa: E402


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        description="Anomaly score, OK/NG decision and heatmap panel for an image or a folder of images.")
    parser.add_argument("--image_path", required=True, help="an image file or a folder of images")
    parser.add_argument("--model_path", required=True, help="checkpoint (model_final.pdparams)")
    parser.add_argument("--save_dir", required=True,
                        help="output folder (a new run_NNN sub-folder if it holds earlier results)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="OK/NG threshold, NG iff score > T (default: the checkpoint's calibrated one)")
    parser.add_argument("--pixel_threshold", type=float, default=None,
                        help="raw-map value outlined as anomalous (default: p99.9 of normal maps)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--display_size", type=int, default=None,
                        help="side of each panel tile in pixels (default: max(input size, 256))")
    args = parser.parse_args(argv)
    from kdad.engine.predictor import predict

    predict(args.model_path, args.image_path, args.save_dir, threshold=args.threshold,
            pixel_threshold=args.pixel_threshold, batch_size=args.batch_size,
            display_size=args.display_size)
    return 0


if __name__ == "__main__":
    run_main(main)
