"""Data-parallel training on CPU: ``python -m paddle.distributed.launch --nproc_per_node 2``.

Two gloo workers train on a tiny generated class (32 px, 2 epochs, random expert) through
``tests/dist_train_probe.py``, which dumps every rank's cloner after ``train(config, return_model=True)``.

Checked: the launch succeeds with world size 2; the trainable cloner parameters and the frozen
expert are identical on both ranks; only rank 0 wrote checkpoints and the train log; the saved
checkpoints hold rank 0's weights, including rank 0's BatchNorm running statistics. Those statistics
are buffers, not parameters, so DataParallel does not all-reduce them and they may differ between
ranks (each rank sees its own shard); that difference is reported, not asserted.

CFlow-AD (64 px, Lite0) runs the same way: its fiber steps average their own gradients
(``kdad.utils.distributed``) instead of ``paddle.DataParallel``; its flows must be identical on both
ranks after training on different shards, the helpers give known answers on known per-rank values.

Skipped when a 2-process launch is impossible here (no paddle.distributed.launch, no loopback).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "dist_train_probe.py"
CLASS = "dist_tex"


def _launch_possible() -> str:
    """Empty when a 2-process CPU launch can work here, else the reason."""
    if importlib.util.find_spec("paddle.distributed.launch") is None:
        return "paddle.distributed.launch is not available"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
    except OSError as error:
        return f"cannot bind a loopback port: {error}"
    return ""


def _load(path: Path):
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        params = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
        buffers = {k[len("buffer/"):]: data[k] for k in data.files if k.startswith("buffer/")}
    return meta, params, buffers


def _tail(path: Path, n: int = 40) -> str:
    if not path.is_file():
        return f"({path} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _launch(tmp: Path, overrides: List[str]) -> Dict[str, Any]:
    """Two CPU workers of the probe on a tiny generated class; the run's folders and the workers' logs."""
    from kdad.data import generate_synthetic_class

    data = tmp / "data"
    generate_synthetic_class(str(data), CLASS, "texture", n_train=10, n_test_good=2, n_test_defect=1,
                             size=64, seed=3)
    launch_log, save, logs, dump = tmp / "launch", tmp / "save", tmp / "logs", tmp / "dump"
    cmd = [
        sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--host", "127.0.0.1",
        "--log_dir", str(launch_log), str(PROBE),
        "--dataset_root", str(data), "--normal_class", CLASS, "--save_dir", str(save),
        "--dump_dir", str(dump),
        "-o", "num_epochs=2", "-o", "batch_size=2", "-o", "holdout_fraction=0.2", "-o", "save_every=1",
        "-o", "eval_batch_size=4", "-o", "progress_bar=False", "-o", f"log_dir={logs}", "-o", "seed=7",
    ]
    for override in overrides:
        cmd += ["-o", override]
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # two workers on the machine's cores
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    workers = "\n".join(f"--- workerlog.{r}\n{_tail(launch_log / f'workerlog.{r}')}" for r in (0, 1))
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{workers}"
    return {"tmp": tmp, "save": save, "logs": logs, "dump": dump, "launch_log": launch_log,
            "stdout": proc.stdout, "workers": workers}


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """KDAD (random VGG16 expert, 32 px): the student wrapped in ``paddle.DataParallel``."""
    reason = _launch_possible()
    if reason:
        pytest.skip(reason)
    return _launch(tmp_path_factory.mktemp("dist"), ["mvtec_img_size=32", "pretrain=False", "expert=vgg16"])


@pytest.fixture(scope="module")
def cflow_run(tmp_path_factory):
    """CFlow-AD (Lite0 encoder, 64 px): its fiber steps average their own gradients."""
    reason = _launch_possible()
    if reason:
        pytest.skip(reason)
    return _launch(tmp_path_factory.mktemp("dist_cflow"), ["method=cflow", "backbone=efficientnet_lite0",
                                                           "mvtec_img_size=64", "fiber_batch=16"])


def test_both_ranks_ran_with_world_size_two(dist_run):
    for rank in (0, 1):
        path = dist_run["dump"] / f"rank{rank}.npz"
        assert path.is_file(), f"rank {rank} wrote no dump\n{dist_run['workers']}"
        meta, params, _ = _load(path)
        assert meta["rank"] == rank and meta["env_rank"] == rank
        assert meta["world_size"] == 2
        assert params, "no trainable parameters dumped"
    assert (dist_run["launch_log"] / "workerlog.1").is_file()


def test_trainable_weights_and_expert_identical_across_ranks(dist_run):
    meta0, params0, _ = _load(dist_run["dump"] / "rank0.npz")
    meta1, params1, _ = _load(dist_run["dump"] / "rank1.npz")
    assert sorted(params0) == sorted(params1)
    for name in params0:
        np.testing.assert_array_equal(params0[name], params1[name], err_msg=f"parameter {name} differs")
    # the frozen random expert comes from the same seed on every rank: both ranks distil the same teacher
    assert meta0["expert_sha256"] == meta1["expert_sha256"]


def test_only_rank0_writes_checkpoints_and_logs(dist_run):
    meta0, _, _ = _load(dist_run["dump"] / "rank0.npz")
    meta1, _, _ = _load(dist_run["dump"] / "rank1.npz")
    class0 = dist_run["save"] / "rank0" / CLASS
    for name in ("model_final.pdparams", "checkpoint_latest.pdparams", "expert_random_init.pdparams",
                 "checkpoint_epoch_0.pdparams", "checkpoint_epoch_1.pdparams"):
        assert (class0 / name).is_file(), f"rank 0 did not write {name}"
    assert meta0["returned_path"] and Path(meta0["returned_path"]).resolve() == (
        class0 / "model_final.pdparams").resolve()
    train_log = dist_run["logs"] / "rank0" / f"{CLASS}_train.log"
    assert train_log.is_file()
    assert "world size 2" in train_log.read_text()

    assert meta1["returned_path"] is None
    rank1_files = [p for d in (dist_run["save"] / "rank1", dist_run["logs"] / "rank1") if d.exists()
                   for p in d.rglob("*") if p.is_file()]
    assert rank1_files == [], f"rank 1 wrote {rank1_files}"


def test_checkpoints_hold_rank0_weights_and_batchnorm_statistics(dist_run):
    import paddle

    _, params0, buffers0 = _load(dist_run["dump"] / "rank0.npz")
    _, _, buffers1 = _load(dist_run["dump"] / "rank1.npz")
    class0 = dist_run["save"] / "rank0" / CLASS
    for ckpt in ("model_final.pdparams", "checkpoint_latest.pdparams"):
        state = paddle.load(str(class0 / ckpt))["cloner"]
        for name, value in params0.items():
            np.testing.assert_array_equal(np.asarray(state[name]), value, err_msg=f"{ckpt}: {name}")
        for name, value in buffers0.items():
            np.testing.assert_array_equal(np.asarray(state[name]), value, err_msg=f"{ckpt}: {name}")
    bn = [n for n in buffers0 if n.endswith("_mean") or n.endswith("_variance")]
    assert bn, "the cloner has no BatchNorm running statistics"
    diff = max(float(np.abs(buffers0[n] - buffers1[n]).max()) for n in bn)
    # Not synchronised by DataParallel (buffers are not all-reduced): may differ; rank 0's are saved.
    print(f"max |BN running stat rank0 - rank1| = {diff:.3g} over {len(bn)} buffers")


def test_cflow_ranks_step_together_and_only_rank0_writes(cflow_run):
    """Each rank trains on its own shard; equal flows after training mean every fiber step's gradients
    were averaged and every rank took the same steps (a missing step or collective would hang or
    diverge). The checkpoint holds those flows; rank 1 wrote nothing."""
    import paddle

    meta0, params0, _ = _load(cflow_run["dump"] / "rank0.npz")
    meta1, params1, _ = _load(cflow_run["dump"] / "rank1.npz")
    assert meta0["world_size"] == meta1["world_size"] == 2
    assert sorted(params0) == sorted(params1) and len(params0) > 100  # 3 taps x 8 coupling blocks
    for name in params0:
        np.testing.assert_array_equal(params0[name], params1[name], err_msg=f"flow parameter {name} differs")
    assert meta0["expert_sha256"] == meta1["expert_sha256"]
    state = paddle.load(str(Path(meta0["returned_path"])))["model"]
    matched = [name for name in state if name.startswith("decoders.")]
    assert matched, sorted(state)[:5]
    flows = {name[len("decoders."):]: np.asarray(state[name]) for name in matched}
    for name, value in params0.items():
        np.testing.assert_array_equal(flows[name], value, err_msg=f"checkpoint: {name}")
    assert meta1["returned_path"] is None
    rank1_files = [p for d in (cflow_run["save"] / "rank1", cflow_run["logs"] / "rank1") if d.exists()
                   for p in d.rglob("*") if p.is_file()]
    assert rank1_files == [], f"rank 1 wrote {rank1_files}"
    train_log = (cflow_run["logs"] / "rank0" / "cflow" / f"{CLASS}_train.log").read_text()
    assert "world size 2" in train_log and "epoch 1 loss" in train_log


def test_collective_helpers_on_known_values(cflow_run):
    """Gradients (rank + 1) averaged over the 2 ranks: 1.5 on both; element-wise minimum of
    [rank + 3, 10 - rank]: [3, 9] on both."""
    for rank in (0, 1):
        meta, _, _ = _load(cflow_run["dump"] / f"rank{rank}.npz")
        np.testing.assert_allclose(meta["averaged_gradient"], [1.5, 1.5], rtol=0, atol=1e-7)
        assert meta["agreed_minimum"] == [3, 9]
