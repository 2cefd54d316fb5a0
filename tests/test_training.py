"""Tests of the configuration, the training loop, checkpoints and evaluation on tiny generated data.

The trained models are shared through module-scoped fixtures (32 px images, a few epochs, random
expert). Metrics are checked independently: AUROC with sklearn from per-image scores, losses and
weights against other runs, averaged metrics against per-checkpoint evaluations.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import paddle
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from kdad.config import ConfigError, load_config, parse_overrides
from kdad.data import generate_synthetic_class
from kdad.engine import common
from kdad.engine.common import dataset, score_images, split_train
from kdad.engine.evaluator import evaluate_checkpoint, evaluate_model
from kdad.engine.trainer import cache_expert_features, train
from kdad.methods.kdad.loss import training_loss
from kdad.methods.kdad.model import build_model
from kdad.utils import checkpoint as ckpt
from kdad.utils.checkpoint import atomic_save, load_checkpoint, load_model

REPO = Path(__file__).resolve().parents[1]
CLASS = "tex"
ENV = dict(os.environ, PYTHONWARNINGS="ignore")


# ----------------------------------------------------------------------------- configuration


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'num_epoch'"):
        load_config(None, {"num_epoch": 3})
    with pytest.raises(ConfigError, match=r"unknown key 'Num_Epochs' \(did you mean 'num_epochs'\?\)"):
        load_config(None, {"Num_Epochs": 3})
    path = tmp_path / "c.yaml"
    path.write_text("num_epochs: 3\nlearning_rat: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "learning_rat" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(("key", "value"), [("batch_size", "eight"), ("pretrain", "yes"), ("lamda", "half"),
                                            ("num_epochs", 2.5), ("batch_size", True)])
def test_wrong_type_is_named(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {key: value})
    assert f"'{key}'" in str(info.value)


def test_wrong_type_in_file_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("num_epochs: ten\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "'num_epochs'" in str(info.value) and str(path) in str(info.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(str(missing))


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="num_epochs10"):
        parse_overrides(["num_epochs10"])
    assert parse_overrides(["num_epochs=10", "expert_weights=a=b.pdparams"]) == {
        "num_epochs": 10, "expert_weights": "a=b.pdparams"}


def test_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-3\nlamda: 5e-1\n", encoding="utf-8")
    assert yaml.safe_load(path.read_text()) == {"learning_rate": "1e-3", "lamda": "5e-1"}  # YAML 1.1
    config = load_config(str(path))
    assert config["learning_rate"] == 0.001 and isinstance(config["learning_rate"], float)
    assert config["lamda"] == 0.5
    assert load_config(None, parse_overrides(["learning_rate=1e-4"]))["learning_rate"] == 0.0001


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--dataset_root", "{tmp}/missing", "--normal_class", "tex", "-o", "pretrain=False"],
         "{tmp}/missing/tex"),
        (["--dataset_root", "{tmp}", "--normal_class", "tex", "-o", "num_epochs10"], "num_epochs10"),
        (["--dataset_root", "{tmp}", "--normal_class", "tex", "-o", "batch_sise=3"], "batch_sise"),
    ],
)
def test_train_cli_errors_exit_2_with_one_line(tmp_path: Path, args: List[str], expected: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    run = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), *args], capture_output=True,
                         text=True, env=ENV, cwd=str(tmp_path), timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: ") and expected.replace("{tmp}", str(tmp_path)) in lines[0]
    assert not (tmp_path / "output").exists()


# ----------------------------------------------------------------------------- shared training runs


def _base_config(root: Path, name: str, **overrides) -> Dict[str, Any]:
    values = {
        "dataset_root": str(root / "data"), "normal_class": CLASS, "pretrain": False,
        "mvtec_img_size": 32, "batch_size": 4, "num_epochs": 2, "save_every": 1, "progress_bar": False,
        "eval_batch_size": 32, "save_dir": str(root / name / "out"), "log_dir": str(root / name / "logs"),
        "seed": 42,
    }
    values.update(overrides)
    return load_config(None, values)


def _train(config: Dict[str, Any]):
    """``train(config, return_model=True)`` in this process (after other layers were built: the
    trainer must not depend on global parameter-name counters to resume)."""
    return train(config, return_model=True)


def _epoch_losses(config: Dict[str, Any]) -> Dict[int, str]:
    """``{epoch: loss as logged}`` from ``<log_dir>/<class>_train.log``."""
    text = (Path(config["log_dir"]) / f"{CLASS}_train.log").read_text(encoding="utf-8")
    return {int(e): loss for e, loss in re.findall(r"epoch (\d+) loss (\S+)", text)}


def _cloner_state(path: str) -> Dict[str, np.ndarray]:
    state = paddle.load(path)["cloner"]
    return {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in state.items()}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """12 training images (11 trained on, 1 held out: 3 batches of 4), 3 good and 4 defective tests."""
    base = tmp_path_factory.mktemp("kdad_small")
    generate_synthetic_class(str(base / "data"), CLASS, "texture", n_train=12, n_test_good=3,
                             n_test_defect=2, size=32, seed=1)
    return base


@pytest.fixture(scope="module")
def short_runs(small_root: Path) -> Dict[str, Dict[str, Any]]:
    """Two-epoch runs "a" and "b" (same seed), "uncached" (expert run on every batch), "seed7" (one
    epoch, another seed), "straight4" (4 epochs); then "a" continued to 4 epochs ("resumed")."""
    runs: Dict[str, Dict[str, Any]] = {}
    specs = {"a": {}, "b": {}, "uncached": {"cache_expert_features": False},
             "seed7": {"seed": 7, "num_epochs": 1}, "straight4": {"num_epochs": 4}}
    for name, overrides in specs.items():
        config = _base_config(small_root, name, **overrides)
        final, model = _train(config)
        runs[name] = {"config": config, "final": final, "losses": _epoch_losses(config),
                      "cloner": _cloner_state(final)}
        if name in ("a", "b"):
            runs[name]["eval"] = evaluate_model(model, dict(config, localization_test=False))
    resumed = _base_config(small_root, "a", num_epochs=4, continue_train=True)
    final, _ = _train(resumed)
    runs["resumed"] = {"config": resumed, "final": final, "losses": _epoch_losses(resumed),
                       "cloner": _cloner_state(final)}
    return runs


def test_same_seed_same_losses_and_auroc(short_runs) -> None:
    a, b = short_runs["a"], short_runs["b"]
    assert sorted(a["losses"]) == [0, 1]
    assert a["losses"] == b["losses"]
    for key, value in a["cloner"].items():
        np.testing.assert_array_equal(value, b["cloner"][key], err_msg=key)
    assert len(a["eval"]["scores"]) == 7
    assert a["eval"]["scores"] == b["eval"]["scores"]
    assert a["eval"]["metrics"]["image_auroc"] == b["eval"]["metrics"]["image_auroc"]
    # the AUROC is that of the per-image scores
    assert a["eval"]["metrics"]["image_auroc"] == pytest.approx(
        roc_auc_score(a["eval"]["labels"], a["eval"]["scores"]), abs=1e-12)
    # and the seed matters
    assert short_runs["seed7"]["losses"][0] != a["losses"][0]


def test_cached_and_uncached_expert_features_give_the_same_losses(short_runs) -> None:
    cached, uncached = short_runs["a"]["losses"], short_runs["uncached"]["losses"]
    assert sorted(uncached) == [0, 1]
    for epoch in (0, 1):
        assert float(uncached[epoch]) == pytest.approx(float(cached[epoch]), rel=1e-5, abs=2e-6)


def test_cache_expert_features_matches_per_image_expert(small_root: Path) -> None:
    config = _base_config(small_root, "cache_check")
    paddle.seed(0)
    model = build_model(config)
    model.eval()
    images = dataset(split_train(config)[0], config).images()
    n = len(images)
    assert n == 11
    cached = cache_expert_features(model, images, batch_size=4)  # 3 batches, the last one short
    assert sorted(cached) == [3, 6, 9, 12]
    # 32 px: taps 3, 6, 9, 12 have strides 4, 8, 16, 32
    assert [cached[t].shape for t in (3, 6, 9, 12)] == [(n, 128, 8, 8), (n, 256, 4, 4), (n, 512, 2, 2),
                                                        (n, 512, 1, 1)]
    for i in (0, 5, n - 1):
        with paddle.no_grad():
            own = model.expert(paddle.to_tensor(images[i:i + 1]))
        for tap in (3, 6, 9, 12):
            np.testing.assert_allclose(cached[tap][i:i + 1], own[tap].numpy(), rtol=1e-5, atol=1e-6)
    # the loss of a shuffled batch from the cache equals the loss with the expert run on the batch
    index = np.array([9, 2, 10, 4])
    x = paddle.to_tensor(images[index])
    with paddle.no_grad():
        cloner_feats = model.cloner(x)
        from_cache = training_loss(cloner_feats, {t: paddle.to_tensor(v[index]) for t, v in cached.items()},
                                   model.loss_taps, model.lamda)
        direct = model.loss(x)
    assert float(from_cache) == pytest.approx(float(direct), rel=1e-5)


def test_resume_gives_the_same_weights(short_runs) -> None:
    straight, resumed = short_runs["straight4"], short_runs["resumed"]
    assert sorted(straight["losses"]) == [0, 1, 2, 3]
    # the resumed run logged epochs 0, 1 (first part) and 2, 3 (second part), as the straight run
    assert resumed["losses"] == straight["losses"]
    assert load_checkpoint(resumed["final"])["epoch"] == 3
    for key, value in straight["cloner"].items():
        np.testing.assert_allclose(resumed["cloner"][key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    # training did go on after the resume
    before = short_runs["a"]["cloner"]
    assert any(not np.array_equal(v, before[k]) for k, v in resumed["cloner"].items())


def test_checkpoints_written_without_leftovers(short_runs) -> None:
    folder = Path(short_runs["straight4"]["config"]["save_dir"]) / CLASS
    names = sorted(os.listdir(folder))
    assert names == sorted(["checkpoint_epoch_0.pdparams", "checkpoint_epoch_1.pdparams",
                            "checkpoint_epoch_2.pdparams", "checkpoint_epoch_3.pdparams",
                            "checkpoint_latest.pdparams", "expert_random_init.pdparams",
                            "model_final.pdparams"])
    for run in short_runs.values():
        leftovers = [p for p in Path(run["config"]["save_dir"]).rglob("*") if p.name.startswith(".tmp-")]
        assert not leftovers
    assert [e for e, _ in ckpt.list_epoch_checkpoints(str(folder))] == [0, 1, 2, 3]
    assert load_checkpoint(str(folder / "checkpoint_epoch_2.pdparams"))["epoch"] == 2


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "model_final.pdparams"
    atomic_save({"cloner": {"w": paddle.to_tensor([1.0, 2.0])}, "config": {}}, str(target))
    before = target.read_bytes()
    written: List[str] = []

    def broken_save(obj, path, *args, **kwargs):
        written.append(path)
        with open(path, "wb") as handle:  # a partial file, then the failure
            handle.write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.paddle, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"cloner": {"w": paddle.to_tensor([3.0])}, "config": {}}, str(target))
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert len(written) == 1 and written[0] != str(target)
    assert os.path.dirname(os.path.abspath(written[0])) == str(tmp_path)  # same folder: rename is atomic
    assert sorted(os.listdir(tmp_path)) == ["model_final.pdparams"]
    # a complete write replaces the file
    atomic_save({"cloner": {"w": paddle.to_tensor([3.0])}, "config": {}}, str(target))
    np.testing.assert_array_equal(np.asarray(paddle.load(str(target))["cloner"]["w"]), [3.0])
    assert sorted(os.listdir(tmp_path)) == ["model_final.pdparams"]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("kdad_e2e")
    generate_synthetic_class(str(base / "data"), CLASS, "texture", n_train=40, n_test_good=10,
                             n_test_defect=10, size=32, seed=0)
    return base


@pytest.fixture(scope="module")
def trained(root: Path):
    """10 epochs on the generated texture class, checkpoints every 4 epochs (0, 4, 8)."""
    config = _base_config(root, "e2e", num_epochs=10, batch_size=8, save_every=4)
    final, model = _train(config)
    return {"config": config, "final": final, "model": model}


def _run_test_cli(config: Dict[str, Any], log_dir: str, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "tools" / "test.py"), "--dataset_root", config["dataset_root"],
            "--normal_class", CLASS, "--save_dir", config["save_dir"], "-o", f"log_dir={log_dir}",
            "-o", "progress_bar=False", *extra]
    run = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=str(REPO), timeout=300)
    assert run.returncode == 0, run.stderr
    return run


def _read_val_log(path: Path) -> Dict[str, str]:
    values: Dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"([a-z0-9_]+): (\S.*)", line)
        assert match, f"not a 'key: value' line: {line!r}"
        assert match.group(1) not in values, f"duplicate key {match.group(1)}"
        values[match.group(1)] = match.group(2)
    return values


@pytest.fixture(scope="module")
def tested(trained, root: Path):
    log_dir = str(root / "e2e" / "val_logs")
    _run_test_cli(trained["config"], log_dir, "--model_path", trained["final"])
    return {"log": _read_val_log(Path(log_dir) / f"{CLASS}_val.log"),
            "json": json.loads((Path(log_dir) / f"{CLASS}_val.json").read_text(encoding="utf-8"))}


def test_end_to_end_reaches_high_auroc(tested) -> None:
    per_image = tested["json"]["per_image"]
    labels = [p["label"] for p in per_image]
    scores = [p["score"] for p in per_image]
    assert len(per_image) == 30 and sum(labels) == 20
    assert all(("/test/good/" in p["file"]) == (p["label"] == 0) for p in per_image)
    auroc = roc_auc_score(labels, scores)
    assert auroc >= 0.9
    assert tested["json"]["metrics"]["image_auroc"] == pytest.approx(auroc, abs=1e-12)
    assert float(tested["log"]["image_auroc"]) == pytest.approx(auroc, abs=5e-5)


def test_val_log_format_and_json_twin(tested) -> None:
    log, summary = tested["log"], tested["json"]
    assert log["class"] == CLASS
    assert log["test_images"] == "30" and log["defective_images"] == "20"
    metric_keys = ("image_auroc", "image_f1_max", "paper_localization_auc", "pixel_auroc", "aupro")
    for key in metric_keys:
        value = float(log[key])
        assert 0.0 <= value <= 1.0
        assert re.fullmatch(r"\d\.\d{4}", log[key])
        assert summary["metrics"][key] == pytest.approx(value, abs=5e-5)
    assert summary["class"] == CLASS and summary["num_test_images"] == 30 and summary["num_defective"] == 20


def test_random_expert_is_saved_and_reloaded(trained) -> None:
    folder = Path(trained["final"]).parent
    saved = paddle.load(str(folder / "expert_random_init.pdparams"))
    trained_model = trained["model"]
    for key, value in trained_model.expert.state_dict().items():
        np.testing.assert_array_equal(np.asarray(saved[key].numpy()), value.numpy(), err_msg=key)
    reloaded, _, _ = load_model(trained["final"])
    for key, value in trained_model.expert.state_dict().items():
        np.testing.assert_array_equal(reloaded.expert.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    images = dataset(common.test_samples(trained["config"]), trained["config"]).images()
    np.testing.assert_array_equal(score_images(reloaded, images, 32), score_images(trained_model, images, 32))


def test_average_checkpoints(trained, root: Path) -> None:
    config = trained["config"]
    log_dir = root / "e2e" / "avg_logs"
    # average_from_epoch is an evaluation key: given at test time
    run = _run_test_cli(config, str(log_dir), "--average_checkpoints", "-o", "average_from_epoch=4")
    log = _read_val_log(log_dir / f"{CLASS}_val.log")
    summary = json.loads((log_dir / f"{CLASS}_val.json").read_text(encoding="utf-8"))
    assert summary["averaged_epochs"] == [4, 8]  # average_from_epoch 4 drops epoch 0
    assert "average of 2 checkpoints" in log["model"]
    folder = Path(trained["final"]).parent
    paths = [str(folder / f"checkpoint_epoch_{e}.pdparams") for e in (4, 8)]
    singles = [evaluate_checkpoint(p, config) for p in paths]
    # image AUROC of each checkpoint computed independently (sklearn on its scores), then averaged
    aurocs = [roc_auc_score(s["labels"], s["scores"]) for s in singles]
    assert summary["metrics"]["image_auroc"] == pytest.approx(np.mean(aurocs), abs=1e-6)
    assert float(log["image_auroc"]) == pytest.approx(np.mean(aurocs), abs=5e-5)
    # the other metrics: the mean over the per-checkpoint evaluations
    for key in ("image_f1_max", "paper_localization_auc", "pixel_auroc", "aupro"):
        values = [s["metrics"][key] for s in singles]
        assert summary["metrics"][key] == pytest.approx(np.mean(values), abs=1e-6), key
    assert "image_auroc:" in run.stdout
