"""The machine's matrix-multiply rate, measured in the same run: the yardstick of the FLOP floor.

GEMM shapes are those of the im2col form of VGG16's dominant convolutions at 128x128, batch 8
(``M = batch * H_out * W_out``, ``K = C_in * 9``, ``N = C_out``), plus a square 2048 GEMM. float32,
numpy (OpenBLAS) and Paddle's dygraph ``matmul`` (Intel MKL in the CPU wheel), timed side by side.
The reference rate of the run is the *highest* rate any library reached on any shape, so the floor
(FLOPs / rate) is the most demanding one this machine justifies.
"""

from __future__ import annotations

from typing import Any, Dict, List

from benchmarks.common import interleaved_timing

SHAPES = [
    ("vgg16 conv3 (32x32, 256->256), batch 8", 8192, 2304, 256),
    ("vgg16 conv4 (16x16, 512->512), batch 8", 2048, 4608, 512),
    ("square 2048", 2048, 2048, 2048),
]


def measure(repeats: int = 10, libraries=("numpy", "paddle")) -> List[Dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(0)
    functions = {}
    flops = {}
    for label, m, k, n in SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        if "numpy" in libraries:
            functions[("numpy", label)] = (lambda a=a, b=b: a @ b)
        if "paddle" in libraries:
            import paddle

            pa, pb = paddle.to_tensor(a), paddle.to_tensor(b)
            functions[("paddle", label)] = (lambda pa=pa, pb=pb: paddle.matmul(pa, pb))
        flops[label] = 2 * m * k * n
    timings = interleaved_timing({f"{lib}|{label}": fn for (lib, label), fn in functions.items()},
                                 repeats=repeats, warmup=2)
    results = []
    for key, timing in timings.items():
        library, label = key.split("|", 1)
        results.append({"library": library, "shape": label, "flops": flops[label],
                        "gflops_per_s": flops[label] / timing["median_s"] / 1e9,
                        "median_s": timing["median_s"], "repeats": len(timing["times_s"])})
    return results
