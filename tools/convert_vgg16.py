"""Convert torchvision's VGG16 ImageNet checkpoint into the Paddle weights of the VGG16 expert.

Usage::

    python tools/convert_vgg16.py vgg16-397923af.pth vgg16.pdparams

An alias of ``python tools/convert_weights.py vgg16 SRC DST --no-head``: torch is not needed (the
``.pth`` is read by :mod:`kdad.utils.torch_pickle`); only the ``features.*`` keys are kept (the
expert has no classifier) and their shapes are checked against the Paddle VGG16.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import List, Optional


def _convert_weights_main(argv: List[str]) -> int:
    """``tools/convert_weights.py``'s ``main`` (``tools`` is not a package: loaded by path)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert_weights.py")
    spec = importlib.util.spec_from_file_location("kdad_tool_convert_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="torchvision VGG16 checkpoint, e.g. vgg16-397923af.pth")
    parser.add_argument("dst", help="output Paddle state dict, e.g. weights/vgg16.pdparams")
    args = parser.parse_args(argv)
    return _convert_weights_main(["vgg16", args.src, args.dst, "--no-head"])


if __name__ == "__main__":
    sys.exit(main())
