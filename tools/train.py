"""Train or fit one class:
python tools/train.py --config CFG --dataset_root DIR --normal_class NAME [-o method=padim]
"""

import os
import shlex
import sys
from typing import List

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from kdad.cli import base_parser, config_from_args, run_main  # noqa: E402


def main(argv: List[str]) -> int:
    parser = base_parser("Train (KDAD, STFPM, RD4AD, CFlow-AD, DRAEM) or fit (PaDiM, PatchCore) a model on "
                         "normal images of one class.")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    from kdad.engine.trainer import TrainingInterrupted, train

    try:
        path = train(config)
    except TrainingInterrupted as interrupted:
        if not interrupted.resumable:
            raise
        resume = [] if config["continue_train"] else ["-o", "continue_train=True"]
        if config["overwrite"]:
            resume += ["-o", "overwrite=False"]
        command = shlex.join(["python", os.path.relpath(__file__), *argv, *resume])
        raise TrainingInterrupted(f"{interrupted}; resume with: {command}", True) from None
    if path:
        print(f"final model: {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
