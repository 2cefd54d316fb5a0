"""Evaluate a trained model (see README): python tools/test.py --config CFG --model_path CKPT ..."""

import os
import sys
from typing import List

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from kdad.cli import base_parser, config_from_args, run_main  # noqa: E402


def main(argv: List[str]) -> int:
    parser = base_parser("Evaluate a model on the test split; writes the val log (.log and .json).")
    parser.add_argument("--model_path", default=None, help="checkpoint (model_final.pdparams)")
    parser.add_argument("--average_checkpoints", action="store_true",
                        help="report the mean over periodic checkpoints from average_from_epoch (paper)")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    from kdad.engine.evaluator import run_test

    result = run_test(config, args.model_path, average=args.average_checkpoints)
    for key, value in result["metrics"].items():
        print(f"{key}: {value:.4f}")
    print(f"val log: {result['log_path']}")
    return 0


if __name__ == "__main__":
    run_main(main)
