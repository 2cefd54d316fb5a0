"""Convert torchvision's VGG16 ImageNet checkpoint into the Paddle weights of the VGG16 expert.

Usage::

    python tools/convert_vgg16.py vgg16-397923af.pth vgg16.pdparams

torch is not needed: the ``.pth`` is read by :mod:`kdad.utils.torch_pickle`. Only the
``features.*`` keys are kept (the expert has no classifier); their shapes are checked against
``kdad.methods.kdad.experts.VGG16Expert``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdad.methods.kdad.experts import convert_vgg16_checkpoint  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="torchvision VGG16 checkpoint, e.g. vgg16-397923af.pth")
    parser.add_argument("dst", help="output Paddle state dict, e.g. weights/vgg16.pdparams")
    args = parser.parse_args(argv)
    try:
        written = convert_vgg16_checkpoint(args.src, args.dst)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for key, shape in written.items():
        print(f"{key:22s} {list(shape)}")
    total = sum(math.prod(shape) for shape in written.values())
    print(f"wrote {len(written)} tensors ({total:,} values) to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
