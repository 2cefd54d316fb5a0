"""One table of methods on one class:
python tools/benchmark.py --dataset_root DIR --normal_class NAME --methods kdad,padim,patchcore
"""

import os
import sys
from typing import List

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from kdad.cli import run_main  # noqa: E402


def main(argv: List[str]) -> int:
    from kdad.benchmark import main as benchmark_main

    return benchmark_main(argv)


if __name__ == "__main__":
    run_main(main)
