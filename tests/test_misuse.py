"""Trustworthy under misuse (issue 13): evaluation never scores training images, tiny training
sets say what their threshold is worth, bad values and faults give a clear error and a non-zero exit.

Tiny runs on generated 32 px images with a random expert; PaDiM where a fitted method is checked.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
import paddle
import pytest
from tiny_runs import CLASS, tiny_config  # tests/tiny_runs.py

from kdad.config import ConfigError, load_config, parse_overrides
from kdad.data import ImageReadError, generate_synthetic_class
from kdad.engine.evaluator import run_test
from kdad.engine.predictor import predict
from kdad.engine.trainer import TrainingDiverged, train
from kdad.export import export_model
from kdad.methods.kdad import train as kdad_train
from kdad.utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONWARNINGS="ignore")


def _config(data: Path, out: Path, **overrides: Any):
    return tiny_config(data, out, **overrides)


def _log(config, name: str = CLASS) -> str:
    folder = Path(config["log_dir"])
    if config["method"] != "kdad":
        folder = folder / config["method"]
    return (folder / f"{name}_train.log").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("misuse_data")
    generate_synthetic_class(str(root), CLASS, "texture", n_train=12, n_test_good=3, n_test_defect=2, size=32,
                             seed=1)
    return root


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp("misuse_run")
    config = _config(data, out, holdout_fraction=0.25)  # 3 held out: a threshold
    final = train(config)
    return {"config": config, "final": final, "out": out,
            "latest": str(Path(final).parent / "checkpoint_latest.pdparams")}


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("item", ["learning_rate=nan", "learning_rate=inf", "learning_rate=.inf",
                                  "lamda=-inf", "blur_sigma=nan", "false_reject_rate=nan",
                                  "coreset_ratio=nan", "smoothgrad_sigma=inf"])
def test_non_finite_float_values_are_rejected(item: str) -> None:
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}' must be a finite number"):
        load_config(None, parse_overrides([item]))


# ----------------------------------------------------------------------------- non-finite training


def test_first_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(data: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    config = _config(data, tmp_path, num_epochs=4)
    real = kdad_train.training_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 5 else value  # epoch 1, second batch

    monkeypatch.setattr(kdad_train, "training_loss", loss)
    with pytest.raises(TrainingDiverged) as info:
        train(config)
    message = str(info.value)
    assert "epoch 1" in message and "the loss is nan" in message and "No final model was written" in message
    assert "checkpoint_latest.pdparams' (epoch 0) is kept" in message
    assert calls["n"] == 5  # stopped at the first non-finite loss
    folder = Path(config["save_dir"]) / CLASS
    assert not (folder / "model_final.pdparams").exists()
    assert sorted(p.name for p in folder.glob("checkpoint_*")) == ["checkpoint_epoch_0.pdparams",
                                                                   "checkpoint_latest.pdparams"]
    latest = load_checkpoint(str(folder / "checkpoint_latest.pdparams"))
    assert latest["epoch"] == 0
    assert all(np.isfinite(np.asarray(v.numpy() if hasattr(v, "numpy") else v)).all()
               for v in latest["cloner"].values())
    assert "ERROR: training stopped at epoch 1" in _log(config)


def test_huge_learning_rate_exits_non_zero_without_a_final_model(data: Path, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "tools/train.py", "--dataset_root", str(data), "--normal_class", CLASS,
         "--save_dir", str(tmp_path / "out"), "-o", "pretrain=False", "-o", "mvtec_img_size=32",
         "-o", "batch_size=4", "-o", "num_epochs=3", "-o", "learning_rate=1e30", "-o", "progress_bar=False",
         "-o", f"log_dir={tmp_path / 'logs'}", "-o", "cpu_threads=1"],
        cwd=str(REPO), env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training stopped at epoch 0"), run.stderr
    assert "learning_rate 1e+30" in lines[0]
    assert not list((tmp_path / "out").rglob("model_final.pdparams"))


def test_non_finite_scores_of_a_fitted_model_are_an_error(data: Path, tmp_path: Path, monkeypatch) -> None:
    from kdad.engine import trainer as module

    def nan_maps(model, images, batch_size):
        return np.full(len(images), np.nan, np.float32), np.zeros((len(images), 8, 8), np.float32)

    monkeypatch.setattr(module, "predict_maps", nan_maps)
    config = _config(data, tmp_path, method="padim", backbone_pretrained=False, mvtec_img_size=64,
                     holdout_fraction=0.25)
    with pytest.raises(TrainingDiverged, match="not finite"):
        train(config)
    assert not list(Path(config["save_dir"]).rglob("model_final.pdparams"))


# ----------------------------------------------------------------------------- unreadable images


def test_every_unreadable_training_image_is_reported_at_once(data: Path, tmp_path: Path) -> None:
    local = tmp_path / "data"
    shutil.copytree(data / CLASS, local / CLASS)
    good = sorted((local / CLASS / "train" / "good").iterdir())
    broken = [good[0], good[5], good[11]]
    for path in broken:
        path.write_bytes(b"not an image")
    config = _config(local, tmp_path)
    with pytest.raises(ImageReadError) as info:
        train(config)
    message = str(info.value)
    assert message.startswith("3 of 12 files cannot be read")
    for path in broken:
        assert path.name in message
    assert not Path(config["save_dir"]).exists()


# ----------------------------------------------------------------------------- tiny training sets


@pytest.mark.parametrize(("n_train", "held_out"), [(1, 0), (2, 1), (5, 1)])
def test_tiny_training_sets_warn_and_store_no_threshold(tmp_path: Path, n_train: int, held_out: int) -> None:
    data = tmp_path / "data"
    generate_synthetic_class(str(data), CLASS, "texture", n_train=n_train, n_test_good=1, n_test_defect=1,
                             size=32, seed=4)
    config = _config(data, tmp_path, num_epochs=1)
    final = train(config)
    calibration = load_checkpoint(final)["calibration"]
    assert calibration["threshold"] is None and calibration["holdout_images"] == held_out
    log = _log(config)
    warning = [line for line in log.splitlines() if "WARNING" in line and "held out" in line]
    assert warning, log
    assert f"only {held_out} of the {n_train} normal training images" in warning[0]
    assert "at least 2 (min_calibration_images)" in warning[0] and "--threshold" in warning[0]
    # the warning comes at training time, before the first epoch
    assert log.index(warning[0]) < log.index("epoch 0 loss")
    image = str(next((data / CLASS / "test" / "good").iterdir()))
    with pytest.raises(ValueError) as info:
        predict(final, image, str(tmp_path / "pred"))
    assert "--threshold" in str(info.value) and f"only {held_out} of the {n_train}" in str(info.value)
    assert "holdout_fraction 0)" not in str(info.value)


def test_a_small_calibration_set_is_used_with_a_loud_warning(data: Path, tmp_path: Path) -> None:
    config = _config(data, tmp_path, num_epochs=1, holdout_fraction=0.25)  # 3 of 12 held out
    final = train(config)
    calibration = load_checkpoint(final)["calibration"]
    assert calibration["holdout_images"] == 3 and calibration["threshold"] is not None
    assert ("WARNING: the threshold is the highest score of the 3 held-out normal images: about 1 in 4 "
            "normal images (25%)") in _log(config)
    # the floor is a documented key
    stricter = _config(data, tmp_path / "strict", num_epochs=1, holdout_fraction=0.25,
                       min_calibration_images=5)
    assert load_checkpoint(train(stricter))["calibration"]["threshold"] is None


def test_a_fitted_method_warns_about_its_calibration_too(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_synthetic_class(str(data), CLASS, "texture", n_train=3, n_test_good=1, n_test_defect=1, size=64,
                             seed=4)
    config = _config(data, tmp_path, method="padim", backbone_pretrained=False, mvtec_img_size=64)
    final = train(config)
    assert load_checkpoint(final)["calibration"]["threshold"] is None
    assert "WARNING: only 1 of the 3 normal training images is held out" in _log(config)


# ----------------------------------------------------------------------------- the folder dataset


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> Path:
    """A folder dataset: 60 good and 6 defective images."""
    root = tmp_path_factory.mktemp("folder_data")
    generate_synthetic_class(str(root / "mvtec"), "src", "texture", n_train=54, n_test_good=6,
                             n_test_defect=3, size=32, seed=6)
    src = root / "mvtec" / "src"
    (root / "parts" / "good").mkdir(parents=True)
    (root / "parts" / "defect").mkdir()
    goods = sorted((src / "train" / "good").iterdir()) + sorted((src / "test" / "good").iterdir())
    for i, path in enumerate(goods):
        shutil.copy(path, root / "parts" / "good" / f"{i:03d}.png")
    defects = [p for kind in sorted((src / "test").iterdir()) if kind.name != "good"
               for p in sorted(kind.iterdir())]
    for i, path in enumerate(defects):
        shutil.copy(path, root / "parts" / "defect" / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("method", ["kdad", "padim"])
def test_folder_dataset_never_scores_training_images(folder_data: Path, tmp_path: Path, method: str) -> None:
    extra: Dict[str, Any] = {}
    if method == "padim":
        extra = {"method": method, "mvtec_img_size": 64, "backbone_pretrained": False}
    config = _config(folder_data, tmp_path, normal_class="parts", dataset_name="folder", num_epochs=1, seed=3,
                     localization_test=False, **extra)
    final = train(config)
    split = load_checkpoint(final)["split"]
    assert split["seed"] == 3 and split["test_fraction"] == 0.2 and split["dataset_name"] == "folder"
    train_set, holdout, test_good = set(split["train"]), set(split["holdout"]), set(split["test_good"])
    assert len(test_good) == 12 and len(holdout) == 5 and len(train_set) == 43
    assert not (train_set & holdout or train_set & test_good or holdout & test_good)
    assert train_set | holdout | test_good == {f"good/{i:03d}.png" for i in range(60)}
    # evaluated with the default seed: the test set is still the images the checkpoint never saw
    test_config = _config(folder_data, tmp_path, normal_class="parts", dataset_name="folder",
                          localization_test=False, **({"method": method} if method == "padim" else {}))
    assert test_config["seed"] != 3
    result = run_test(test_config, final)
    scored = {os.path.relpath(f, folder_data / "parts") for f in result["files"]}
    assert {s for s in scored if s.startswith("good/")} == test_good
    assert len([s for s in scored if s.startswith("defect/")]) == 6
    assert result["num_test_images"] == 18 and result["num_defective"] == 6


def test_folder_split_is_seeded_and_documented(folder_data: Path, tmp_path: Path) -> None:
    from kdad.config import SCHEMA
    from kdad.engine.common import split_train, test_samples

    config = _config(folder_data, tmp_path, normal_class="parts", dataset_name="folder")
    train_a, hold_a = split_train(config)
    train_b, hold_b = split_train(config)
    assert [s.path for s in train_a] == [s.path for s in train_b] and [s.path for s in hold_a] == [
        s.path for s in hold_b]
    test = [s.path for s in test_samples(config) if s.label == 0]
    assert not set(test) & {s.path for s in train_a + hold_a}
    other = _config(folder_data, tmp_path, normal_class="parts", dataset_name="folder", seed=8)
    assert {s.path for s in test_samples(other) if s.label == 0} != set(test)
    assert "test_fraction" in SCHEMA and "never trained on" in SCHEMA["test_fraction"][2]


# ----------------------------------------------------------------------------- predict and export


def test_predict_on_an_intermediate_checkpoint_names_it(trained: Dict[str, Any], data: Path,
                                                        tmp_path: Path) -> None:
    image = str(next((data / CLASS / "test" / "good").iterdir()))
    with pytest.raises(ValueError) as info:
        predict(trained["latest"], image, str(tmp_path / "pred"))
    message = str(info.value)
    assert "intermediate training checkpoint" in message and "model_final.pdparams" in message
    assert "--threshold" in message and "holdout_fraction" not in message


def _tool(monkeypatch, capsys, script: str, *args: str):
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    return info.value.code, capsys.readouterr()


def test_export_into_an_existing_file_is_a_clear_error(trained: Dict[str, Any], tmp_path: Path, monkeypatch,
                                                       capsys) -> None:
    target = tmp_path / "a_file"
    target.write_text("x")
    code, out = _tool(monkeypatch, capsys, "tools/export_model.py", "--model_path", trained["final"],
                      "--save_dir", str(target))
    assert code == 2
    assert out.err.strip().splitlines() == [
        f"error: --save_dir '{target}' exists and is not a folder; name a folder for the exported models"]


def test_export_never_mixes_with_another_export(trained: Dict[str, Any], tmp_path: Path, monkeypatch,
                                                capsys) -> None:
    save_dir = tmp_path / "export"
    export_model(trained["final"], str(save_dir), kinds=["score"], probe=False)
    with pytest.raises(ValueError, match=r"already holds exported models \(score/\).*--overwrite"):
        export_model(trained["final"], str(save_dir), kinds=["feature_map"], probe=False)
    assert sorted(os.listdir(save_dir)) == ["score"]
    code, out = _tool(monkeypatch, capsys, "tools/export_model.py", "--model_path", trained["final"],
                      "--save_dir", str(save_dir), "--kinds", "feature_map")
    assert code == 2 and "already holds exported models" in out.err
    written = export_model(trained["final"], str(save_dir), kinds=["feature_map"], probe=False,
                           overwrite=True)
    assert list(written) == ["feature_map"]
    assert sorted(os.listdir(save_dir)) == ["feature_map"]  # no deploy.yaml of the earlier export left
    # a folder holding other things (e.g. a training run, as in TIPC) is fine
    other = tmp_path / "run_dir"
    (other / "tex").mkdir(parents=True)
    export_model(trained["final"], str(other), kinds=["score"], probe=False)
    assert sorted(os.listdir(other)) == ["score", "tex"]


def test_a_finished_run_leaves_no_lock_or_temporary_file(trained: Dict[str, Any]) -> None:
    """The fixture's run finished normally: no lock, no temporary file in its folder."""
    folder = Path(trained["final"]).parent
    assert not [n for n in os.listdir(folder) if n.startswith(".")]
    assert paddle.load(trained["final"])["calibration"]["threshold"] is not None
