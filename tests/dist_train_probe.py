"""Worker script for tests/test_distributed.py; run it under ``python -m paddle.distributed.launch``.

Trains like ``tools/train.py`` (same arguments) through ``train(config, return_model=True)``, then
every rank writes ``<dump_dir>/rank<k>.npz``: the trained network's (KDAD's cloner, CFlow-AD's flows:
the method's ``TrainingSpec.student``) trainable parameters (``param/<name>``), its non-trainable
tensors, i.e. the BatchNorm running statistics (``buffer/<name>``; Paddle keeps them as parameters
with ``stop_gradient=True``), a SHA-256 digest of the frozen teacher's parameters (KDAD's expert,
the backbone) and ``meta`` (rank, world size, the path ``train`` returned, and
:mod:`kdad.utils.distributed`'s averaging and minimum applied to known per-rank values).

Each rank gets its own ``save_dir`` and ``log_dir`` (``<dir>/rank<k>``), so the test can check that
only rank 0 writes checkpoints and logs (in real runs all ranks share one folder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import List

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from kdad.cli import base_parser, config_from_args  # noqa: E402


def main(argv: List[str]) -> int:
    parser: argparse.ArgumentParser = base_parser("Data-parallel training probe (tests only).")
    parser.add_argument("--dump_dir", required=True, help="rank<k>.npz files go here")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    config = config_from_args(args)
    config["save_dir"] = os.path.join(config["save_dir"], f"rank{rank}")
    config["log_dir"] = os.path.join(config["log_dir"], f"rank{rank}")

    import paddle.distributed as dist

    from kdad.engine.trainer import train
    from kdad.registry import get_method

    path, model = train(config, return_model=True)
    student = get_method(config["method"]).training.student(model)
    teacher = model.expert if config["method"] == "kdad" else model.backbone
    arrays = {}
    for name, param in student.named_parameters():
        # Paddle keeps BatchNorm's running mean/variance as non-trainable parameters
        kind = "buffer" if param.stop_gradient else "param"
        arrays[f"{kind}/{name}"] = param.numpy()
    for name, buffer in student.named_buffers():
        arrays[f"buffer/{name}"] = buffer.numpy()
    digest = hashlib.sha256()
    for name, param in sorted(teacher.named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(param.numpy()).tobytes())
    meta = {
        "rank": dist.get_rank(),
        "env_rank": rank,
        "world_size": dist.get_world_size(),
        "returned_path": path,
        "expert_sha256": digest.hexdigest(),
        "save_dir": config["save_dir"],
        "log_dir": config["log_dir"],
    }
    # the collective helpers on known values: gradient (rank + 1) averaged over 2 ranks is 1.5
    import paddle

    from kdad.utils.distributed import agreed_minimum, average_gradients

    probe = paddle.create_parameter([2], "float32")
    paddle.sum(probe * float(rank + 1)).backward()
    average_gradients([probe])
    meta["averaged_gradient"] = probe.grad.numpy().tolist()
    meta["agreed_minimum"] = agreed_minimum([rank + 3, 10 - rank])
    arrays["meta"] = np.array(json.dumps(meta))
    os.makedirs(args.dump_dir, exist_ok=True)
    np.savez(os.path.join(args.dump_dir, f"rank{rank}.npz"), **arrays)
    print(f"rank {rank}: dumped {len(arrays) - 1} arrays")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
