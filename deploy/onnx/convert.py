"""Convert an exported KDAD model to ONNX:
python deploy/onnx/convert.py --model_dir EXPORT/score [--save_dir DIR] [--opset_version 13]

Runs paddle2onnx in a subprocess (--optimize_tool None) and writes model.onnx plus deploy.yaml.
The gradient heatmap model is refused with a clear message (paddle2onnx cannot convert grad ops).
"""

import os
import sys
from typing import List

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from kdad.cli import run_main  # noqa: E402


def main(argv: List[str]) -> int:
    from kdad.deploy.onnx_runtime import convert_main

    return convert_main(argv)


if __name__ == "__main__":
    run_main(main)
