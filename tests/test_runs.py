"""Runs never mix and nothing is lost or overwritten unasked (issue 13).

One run per class folder: a new run refuses a folder holding another one unless ``overwrite``
(which deletes that run first), a lock keeps concurrent runs out (a killed run's lock is taken
over), temporary files of killed writers are cleaned, a resume must match its checkpoint,
checkpoint averaging stays within one run and Ctrl-C ends in one line. Tiny runs: 32 px, random
expert, 1-3 epochs on 12 generated images; PaDiM for the methods fitted in one pass.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import paddle
import pytest
from tiny_runs import CLASS, tiny_config  # tests/tiny_runs.py

from kdad.config import ConfigError
from kdad.data import generate_synthetic_class
from kdad.engine.evaluator import evaluate_average, evaluate_checkpoint
from kdad.engine.trainer import TrainingInterrupted, train
from kdad.methods.kdad import train as kdad_train
from kdad.utils import checkpoint as ckpt
from kdad.utils.checkpoint import LOCK_NAME, RunFolderError, RunLock, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs_data")
    generate_synthetic_class(str(root), CLASS, "texture", n_train=12, n_test_good=3, n_test_defect=2,
                             size=32, seed=1)
    generate_synthetic_class(str(root), "other", "texture", n_train=4, n_test_good=2, n_test_defect=2,
                             size=32, seed=2)
    return root


def _config(data: Path, out: Path, **overrides: Any):
    return tiny_config(data, out, **overrides)


def _folder(config) -> Path:
    return Path(config["save_dir"]) / CLASS


def _snapshot(folder: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _log(config) -> str:
    return (Path(config["log_dir"]) / f"{CLASS}_train.log").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- one run per folder


def test_a_new_run_refuses_a_folder_holding_another_run(data: Path, tmp_path: Path) -> None:
    config = _config(data, tmp_path)
    train(config)
    before = _snapshot(_folder(config))
    with pytest.raises(RunFolderError) as info:
        train(_config(data, tmp_path, learning_rate=0.01))
    message = str(info.value)
    assert "already holds a run" in message and "model_final.pdparams" in message
    assert "continue_train=True" in message and "overwrite=True" in message
    assert _snapshot(_folder(config)) == before  # nothing replaced, nothing added


def test_a_fitted_method_refuses_too(data: Path, tmp_path: Path) -> None:
    config = _config(data, tmp_path, method="padim", backbone_pretrained=False, mvtec_img_size=64)
    first = train(config)
    before = Path(first).read_bytes()
    with pytest.raises(RunFolderError, match="already holds a run"):
        train(config)
    assert Path(first).read_bytes() == before
    again = train(_config(data, tmp_path, method="padim", backbone_pretrained=False, mvtec_img_size=64,
                          overwrite=True))
    assert again == first and load_checkpoint(again)["run"]["id"] != ""
    with pytest.raises(ValueError, match="nothing to resume"):
        train(_config(data, tmp_path, method="padim", backbone_pretrained=False, continue_train=True))


def test_overwrite_deletes_the_earlier_run_first(data: Path, tmp_path: Path) -> None:
    train(_config(data, tmp_path, num_epochs=3))
    folder = _folder(_config(data, tmp_path))
    old_id = load_checkpoint(str(folder / "model_final.pdparams"))["run"]["id"]
    epochs = {p.name for p in folder.glob("checkpoint_epoch_*")}
    assert epochs == {f"checkpoint_epoch_{e}.pdparams" for e in (0, 1, 2)}
    config = _config(data, tmp_path, num_epochs=1, overwrite=True)
    train(config)
    assert sorted(os.listdir(folder)) == ["checkpoint_epoch_0.pdparams", "checkpoint_latest.pdparams",
                                          "expert_random_init.pdparams", "model_final.pdparams"]
    new = load_checkpoint(str(folder / "model_final.pdparams"))
    assert new["run"]["id"] != old_id and new["epoch"] == 0
    assert load_checkpoint(str(folder / "checkpoint_epoch_0.pdparams"))["run"]["id"] == new["run"]["id"]
    assert "overwrite=True: deleted the earlier run" in _log(config)
    with pytest.raises(ConfigError, match="exclude each other"):
        _config(data, tmp_path, overwrite=True, continue_train=True)


def test_checkpoints_record_the_run_and_the_split(data: Path, tmp_path: Path) -> None:
    config = _config(data, tmp_path, seed=5)
    final = train(config)
    state = load_checkpoint(final)
    split = state["split"]
    assert split["seed"] == 5 and split["holdout_fraction"] == 0.1 and split["dataset_name"] == "mvtec"
    assert len(split["train"]) == 11 and len(split["holdout"]) == 1
    assert not set(split["train"]) & set(split["holdout"])
    assert sorted(split["train"] + split["holdout"]) == sorted(
        f"train/good/{n}" for n in os.listdir(data / CLASS / "train" / "good"))
    latest = load_checkpoint(str(_folder(config) / "checkpoint_latest.pdparams"))
    assert latest["split"] == split and latest["run"] == state["run"]


def test_averaging_refuses_checkpoints_of_two_runs(data: Path, tmp_path: Path) -> None:
    a = _config(data, tmp_path / "a", num_epochs=2)
    b = _config(data, tmp_path / "b", num_epochs=2, seed=3)
    train(a)
    train(b)
    folder = _folder(a)
    assert evaluate_average(str(folder), a, 0)["averaged_epochs"] == [0, 1]  # one run: fine
    shutil.copy(_folder(b) / "checkpoint_epoch_1.pdparams", folder / "checkpoint_epoch_7.pdparams")
    with pytest.raises(ValueError, match="belong to 2 different runs"):
        evaluate_average(str(folder), a, 0)


# ----------------------------------------------------------------------------- the lock


_HOLD_LOCK = """
import sys, time
from kdad.utils.checkpoint import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_running_run_locks_its_folder(data: Path, tmp_path: Path) -> None:
    config = _config(data, tmp_path)
    folder = _folder(config)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], stdout=subprocess.PIPE,
                              text=True, env=ENV, cwd=str(REPO))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError) as info:
            train(config)
        assert f"pid {holder.pid}" in str(info.value) and "another run is writing" in str(info.value)
        assert ckpt.run_files(str(folder)) == []  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # the killed holder left its lock file behind: the next run takes it over with a warning
    assert (folder / LOCK_NAME).is_file()
    train(config)
    assert re.search(rf"WARNING: took over the lock of an earlier run .*pid {holder.pid}", _log(config))
    assert not (folder / LOCK_NAME).exists()  # released at the end of the run


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    first, second = RunLock(str(tmp_path / "x")), RunLock(str(tmp_path / "x"))
    assert first.acquire() is None
    record = json.loads((tmp_path / "x" / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid()
    with pytest.raises(RunFolderError, match="another run is writing"):
        second.acquire()
    first.release()
    assert not (tmp_path / "x" / LOCK_NAME).exists()
    assert second.acquire() is None
    second.release()


# ----------------------------------------------------------------------------- temporary files


def test_stale_temporary_files_are_deleted_at_start(data: Path, tmp_path: Path, monkeypatch) -> None:
    config = _config(data, tmp_path, num_epochs=1)
    folder = _folder(config)
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen(["sleep", "60"])
    try:
        (folder / f".tmp-{dead_pid}-abc.pdparams").write_bytes(b"x" * 2 ** 20)
        (folder / ".tmp-oldstyle.pdparams").write_bytes(b"x" * 100)  # before pids were in the name
        (folder / f".tmp-{live.pid}-def.pdparams").write_bytes(b"y")  # a live writer's: kept
        train(config)
        names = sorted(os.listdir(folder))
        assert f".tmp-{live.pid}-def.pdparams" in names
        assert f".tmp-{dead_pid}-abc.pdparams" not in names and ".tmp-oldstyle.pdparams" not in names
        assert "deleted 2 temporary file(s) (1.0 MB) left by killed writers" in _log(config)
    finally:
        live.kill()
        live.wait()
    # atomic_save names its temporary file after the writing process
    seen = []
    real_save = ckpt.paddle.save

    def spy(obj, path, *args, **kwargs):
        seen.append(os.path.basename(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.paddle, "save", spy)
    ckpt.atomic_save({"a": 1}, str(tmp_path / "x.pdparams"))
    assert seen and seen[0].startswith(f".tmp-{os.getpid()}-")


# ----------------------------------------------------------------------------- resume


def test_resume_with_other_settings_is_a_clear_error(data: Path, tmp_path: Path) -> None:
    config = _config(data, tmp_path)
    train(config)
    folder = _folder(config)
    before = _snapshot(folder)
    with pytest.raises(ValueError) as info:
        train(_config(data, tmp_path, num_epochs=4, continue_train=True, expert="efficientnet_lite0",
                      learning_rate=0.01, batch_size=2))
    message = str(info.value)
    for key in ("expert", "learning_rate", "batch_size"):
        assert f"{key} (checkpoint" in message
    assert "num_epochs" not in message  # may change on resume
    assert _snapshot(folder) == before  # no stray file
    with pytest.raises(ValueError, match=r"learning_rate \(checkpoint 0.001, now 0.01\)"):
        train(_config(data, tmp_path, num_epochs=4, continue_train=True, learning_rate=0.01))
    assert _snapshot(folder) == before


def test_resume_adopts_the_checkpoint_values_left_at_their_defaults(data: Path, tmp_path: Path) -> None:
    config = _config(data, tmp_path, learning_rate=0.002)
    train(config)
    resumed = _config(data, tmp_path, num_epochs=3, continue_train=True)  # learning_rate: the default
    assert resumed["learning_rate"] == 0.001
    final = train(resumed)
    assert load_checkpoint(final)["config"]["learning_rate"] == 0.002
    assert "WARNING: continue_train: using the checkpoint's learning_rate=0.002" in _log(config)


def test_resume_on_other_training_images_is_an_error(data: Path, tmp_path: Path) -> None:
    local = tmp_path / "data"
    shutil.copytree(data / CLASS, local / CLASS)
    config = _config(local, tmp_path)
    train(config)
    shutil.copy(local / CLASS / "test" / "good" / "000.png", local / CLASS / "train" / "good" / "new.png")
    with pytest.raises(ValueError, match="the training images differ"):
        train(_config(local, tmp_path, num_epochs=3, continue_train=True))


def test_evaluating_another_class_warns(data: Path, tmp_path: Path, capsys) -> None:
    final = train(_config(data, tmp_path))
    capsys.readouterr()
    other = _config(data, tmp_path, normal_class="other", localization_test=False)
    result = evaluate_checkpoint(final, other)
    assert any("trained on class 'tex' but is evaluated on class 'other'" in w for w in result["warnings"])
    assert "WARNING: " in capsys.readouterr().err
    same = evaluate_checkpoint(final, _config(data, tmp_path, localization_test=False))
    assert "warnings" not in same


# ----------------------------------------------------------------------------- Ctrl-C


def _interrupt_at(monkeypatch, call: int) -> None:
    real = kdad_train.training_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(kdad_train, "training_loss", loss)


def test_ctrl_c_before_the_first_checkpoint_keeps_nothing(data: Path, tmp_path: Path, monkeypatch) -> None:
    config = _config(data, tmp_path)
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted) as info:
        train(config)
    assert not info.value.resumable and "nothing was kept" in str(info.value)
    assert not Path(config["save_dir"]).exists()  # not even the random expert or the lock
    monkeypatch.undo()
    train(config)  # the same command again works


def test_ctrl_c_after_a_checkpoint_can_be_resumed(data: Path, tmp_path: Path, monkeypatch) -> None:
    config = _config(data, tmp_path, num_epochs=3)
    _interrupt_at(monkeypatch, 5)  # 3 batches per epoch: in epoch 1
    with pytest.raises(TrainingInterrupted) as info:
        train(config)
    assert info.value.resumable and "checkpoint_latest.pdparams' (epoch 0) is kept" in str(info.value)
    monkeypatch.undo()
    folder = _folder(config)
    assert not (folder / LOCK_NAME).exists() and not (folder / "model_final.pdparams").exists()
    final = train(_config(data, tmp_path, num_epochs=3, continue_train=True))
    assert load_checkpoint(final)["epoch"] == 2


def test_ctrl_c_prints_one_line_with_the_resume_command(data: Path, tmp_path: Path) -> None:
    save_dir = tmp_path / "out"
    args = ["tools/train.py", "--dataset_root", str(data), "--normal_class", CLASS,
            "--save_dir", str(save_dir), "-o", "pretrain=False", "-o", "mvtec_img_size=32",
            "-o", "batch_size=4", "-o", "num_epochs=100000", "-o", "save_every=1", "-o", "progress_bar=False",
            "-o", f"log_dir={tmp_path / 'logs'}", "-o", "cpu_threads=1"]
    proc = subprocess.Popen([sys.executable, *args], cwd=str(REPO), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    latest = save_dir / CLASS / "checkpoint_latest.pdparams"
    deadline = time.time() + 240
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert latest.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.strip().splitlines()
             if "Warning" not in line and "warnings.warn" not in line]
    assert proc.returncode == 130, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "is kept; resume with: python tools/train.py" in lines[0]
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[-2:] == ["-o", "continue_train=True"] and command[2:-2] == args[1:]
    assert not (save_dir / CLASS / LOCK_NAME).exists()
    assert paddle.load(str(latest))["epoch"] >= 0


def test_infer_into_a_folder_with_earlier_results_writes_a_new_run_folder(tmp_path):
    """tools/infer.py's save_dir rule (shared with predict): earlier results and heatmaps are kept,
    the new run goes to the first free run_NNN (it used to rewrite results.csv beside old heatmaps)."""
    from kdad.deploy.runtime import InferenceError, fresh_output_dir

    target = tmp_path / "infer"
    assert fresh_output_dir(str(target)) == str(target)  # new folder: used as it is
    (target / "heatmaps").mkdir()
    (target / "heatmaps" / "old.png").write_bytes(b"png")
    (target / "results.csv").write_text("image,score\n")
    first = fresh_output_dir(str(target))
    assert first == str(target / "run_001")
    (tmp_path / "infer" / "run_001" / "results.csv").write_text("x")
    assert fresh_output_dir(str(target)) == str(target / "run_002")
    assert (target / "heatmaps" / "old.png").read_bytes() == b"png"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(InferenceError, match="is not a folder"):
        fresh_output_dir(str(a_file))
