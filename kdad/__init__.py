"""kdad: Multiresolution Knowledge Distillation for Anomaly Detection on PaddlePaddle."""

import os

__version__ = "0.1.0"


def _is_amd_cpu() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="ignore") as handle:
            return "AuthenticAMD" in handle.read(4096)
    except OSError:
        return False


# Paddle's CPU wheel runs the GEMMs of its native kernels (dynamic graph, Paddle Inference without
# oneDNN) on Intel MKL, which takes a slow generic path on AMD CPUs unless told to use AVX2. Set
# before paddle is imported (kdad is imported first by every tool); an explicit value is kept.
# Measured on the 2-core AMD EPYC of docs/benchmarks.md: float32 matmul 32 -> 111 GFLOP/s, cached
# training 7.9 -> 15.4 images/s.
if _is_amd_cpu():
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

# Paddle's own noise (the ccache warning of its import, repeated dy2static and loading warnings)
# stays off the console unless --verbose / KDAD_VERBOSE=1; it goes to the log file instead
# (kdad/utils/quiet.py). Installed here, before any kdad module imports paddle.
from kdad.utils import quiet as _quiet  # noqa: E402

_quiet.install()
