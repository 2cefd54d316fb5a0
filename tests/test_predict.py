"""Tests of prediction (kdad.engine.predictor, tools/predict.py) and the heatmap panels (kdad.visualize)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List

import cv2
import numpy as np
import paddle
import pytest

from kdad.data.io import preprocess, read_image
from kdad.engine.predictor import predict
from kdad.methods.kdad.localization import localization_maps
from kdad.utils.checkpoint import RANDOM_EXPERT_NAME, load_model
from kdad.visualize import colorize, colour_range, compose_panel, draw_outline, overlay, scale_map

SIZE = 32  # model input size; the synthetic images are 64 px, so preprocessing resizes
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """A small model trained on a synthetic texture class (random expert, 3 epochs)."""
    from kdad.config import load_config
    from kdad.data.synthetic import generate_synthetic_class
    from kdad.engine.trainer import train

    base = tmp_path_factory.mktemp("predict")
    class_dir = generate_synthetic_class(str(base / "data"), "tex", n_train=40, n_test_good=4,
                                         n_test_defect=2, size=64, seed=0)
    cfg = load_config(None, {"dataset_root": str(base / "data"), "normal_class": "tex", "pretrain": False,
                             "num_epochs": 3, "batch_size": 8, "mvtec_img_size": SIZE,
                             "save_dir": str(base / "ckpt"), "log_dir": str(base / "logs"),
                             "progress_bar": False})
    model_path = train(cfg)
    model, checkpoint, config = load_model(model_path)
    test = Path(class_dir) / "test"
    good = sorted(map(str, (test / "good").glob("*.png")))
    defect = [str(p) for kind in ("blob", "scratch") for p in sorted((test / kind).glob("*.png"))]
    # independent path to the scores: the one preprocessing, then the model directly
    inputs = np.stack([preprocess(read_image(p), SIZE) for p in good + defect])
    with paddle.no_grad():
        scores = model.score(paddle.to_tensor(inputs)).numpy()
    return {"model_path": model_path, "model": model, "calibration": checkpoint["calibration"],
            "config": config, "good": good, "defect": defect,
            "scores": dict(zip(good + defect, scores.tolist()))}


def _folder(tmp_path: Path, files: List[str], name: str = "images") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for i, path in enumerate(files):
        shutil.copy(path, folder / f"{i:02d}_{Path(path).parent.name}.png")
    return folder


# ----------------------------------------------------------------------------- predict


def test_panel_is_three_tiles_wide(trained: Dict[str, Any], tmp_path: Path) -> None:
    results = predict(trained["model_path"], trained["defect"][0], str(tmp_path / "out"))
    assert len(results) == 1
    assert results[0]["result_image"] == str(tmp_path / "out" / "000_result.png")
    panel = read_image(results[0]["result_image"])
    assert panel.shape[1] == 3 * 256 and panel.shape[0] > 256  # default tile: max(input size, 256)
    # the left tile is the input image squared to the tile size
    expected = cv2.resize(read_image(trained["defect"][0]), (256, 256), interpolation=cv2.INTER_LINEAR)
    assert np.abs(panel[:256, :256].astype(int) - expected.astype(int)).max() <= 1


def test_scores_match_model_and_calibrated_threshold(trained: Dict[str, Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    files = trained["good"] + trained["defect"]
    folder = _folder(tmp_path, files)
    results = predict(trained["model_path"], str(folder), str(tmp_path / "out"), batch_size=3)
    assert [Path(r["file"]).name for r in results] == sorted(os.listdir(folder))
    expected = [trained["scores"][p] for p in files]
    np.testing.assert_allclose([r["score"] for r in results], expected, rtol=1e-5, atol=1e-7)
    threshold = trained["calibration"]["threshold"]
    assert threshold is not None
    for r in results:
        assert r["threshold"] == threshold
        assert r["decision"] == ("NG" if r["score"] > threshold else "OK")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["threshold_source"] == "calibration"
    assert saved["pixel_threshold"] == trained["calibration"]["map_statistics"]["p999"]
    csv_lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("file,score,decision,threshold") and len(csv_lines) == len(files) + 1
    n_ng = sum(r["decision"] == "NG" for r in results)
    out = capsys.readouterr().out
    assert f"{len(files) - n_ng} OK, {n_ng} NG, 0 skipped" in out
    assert sum(line.startswith(str(folder)) for line in out.splitlines()) == len(files)


def test_threshold_override(trained: Dict[str, Any], tmp_path: Path) -> None:
    folder = _folder(tmp_path, trained["good"] + trained["defect"])
    scores = sorted(trained["scores"].values())
    override = (scores[2] + scores[3]) / 2
    results = predict(trained["model_path"], str(folder), str(tmp_path / "b"), threshold=override)
    assert all(r["threshold"] == override for r in results)
    assert [r["decision"] for r in results] == ["NG" if r["score"] > override else "OK" for r in results]
    assert sum(r["decision"] == "OK" for r in results) == 3
    assert json.loads((tmp_path / "b" / "results.json").read_text())["threshold_source"] == "argument"


def test_missing_calibration_asks_for_threshold(trained: Dict[str, Any], tmp_path: Path) -> None:
    state = paddle.load(trained["model_path"])
    state["calibration"] = {"threshold": None, "holdout_images": 0}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    paddle.save(state, str(model_dir / "model_final.pdparams"))
    shutil.copy(Path(trained["model_path"]).parent / RANDOM_EXPERT_NAME, model_dir / RANDOM_EXPERT_NAME)
    path = str(model_dir / "model_final.pdparams")
    with pytest.raises(ValueError, match="--threshold"):
        predict(path, trained["good"][0], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="--pixel_threshold"):  # no normal statistics either
        predict(path, trained["good"][0], str(tmp_path / "out"), threshold=0.5)
    results = predict(path, trained["good"][0], str(tmp_path / "out"), threshold=0.5, pixel_threshold=1e-3)
    assert results[0]["decision"] == ("NG" if results[0]["score"] > 0.5 else "OK")


def test_unreadable_and_non_image_files(trained: Dict[str, Any], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    folder = _folder(tmp_path, trained["good"][:2])
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    results = predict(trained["model_path"], str(folder), str(tmp_path / "out"))
    assert len(results) == 2
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "notes.txt" not in captured.err + captured.out
    assert "1 skipped" in captured.out
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [Path(s["file"]).name for s in saved["skipped"]] == ["broken.png"]
    assert sorted(os.listdir(tmp_path / "out")) == ["00_good_result.png", "01_good_result.png",
                                                     "results.csv", "results.json"]


def test_empty_folder_is_a_clear_error(trained: Dict[str, Any], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image file"):
        predict(trained["model_path"], str(empty), str(tmp_path / "out"))
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image file"):
        predict(trained["model_path"], str(empty), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError):
        predict(trained["model_path"], str(tmp_path / "missing"), str(tmp_path / "out"))


def test_earlier_outputs_are_kept(trained: Dict[str, Any], tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    first = predict(trained["model_path"], trained["good"][0], str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    second = predict(trained["model_path"], trained["defect"][0], str(out), threshold=0.0)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert Path(second[0]["result_image"]).parent == out / "run_001"
    assert (out / "run_001" / "results.json").is_file() and first[0]["file"] == trained["good"][0]
    assert "run_001" in capsys.readouterr().out


def test_cli(trained: Dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("predict_tool", ROOT / "tools" / "predict.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(["--image_path", trained["good"][0], "--model_path", trained["model_path"],
                      "--save_dir", str(tmp_path / "out"), "--threshold", "1e9", "--batch_size", "2",
                      "--display_size", "48"])
    assert code == 0 and "-> OK" in capsys.readouterr().out
    panel = read_image(str(tmp_path / "out" / "000_result.png"))
    assert panel.shape[1] == 3 * 48 and panel.shape[0] > 48
    expected = cv2.resize(read_image(trained["good"][0]), (48, 48), interpolation=cv2.INTER_AREA)
    assert np.abs(panel[:48, :48].astype(int) - expected.astype(int)).max() <= 1


# ----------------------------------------------------------------------------- colour scaling


def test_colour_scale_is_global() -> None:
    low, high = 1.0, 3.0
    a = np.array([[2.0, 0.0], [1.0, 3.0]], dtype=np.float32)
    b = np.array([[2.0, 100.0], [2.5, 2.6]], dtype=np.float32)  # other range, same value at [0, 0]
    ca, cb = colorize(a, low, high), colorize(b, low, high)
    assert ca.dtype == np.uint8 and ca.shape == (2, 2, 3)
    np.testing.assert_array_equal(ca[0, 0], cb[0, 0])
    np.testing.assert_array_equal(ca[1, 1], cb[0, 1])  # at or above high: the same (saturated) colour
    np.testing.assert_array_equal(ca[0, 1], ca[1, 0])  # at or below low: the same (coolest) colour
    jet_low = cv2.applyColorMap(np.zeros((1, 1), np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1]
    np.testing.assert_array_equal(ca[1, 0], jet_low)  # RGB order
    stats = {"p50": 1.0, "p99": 1.5, "p999": 2.0, "max": 2.2}
    assert colour_range(stats) == (1.0, 3.0)
    assert colour_range(stats, pixel_threshold=10.0) == (1.0, 3.0)  # outline threshold: not the colours
    assert colour_range(None, pixel_threshold=0.5) == (0.0, 1.0)


def test_normal_heatmap_is_not_saturated(trained: Dict[str, Any]) -> None:
    low, high = colour_range(trained["calibration"]["map_statistics"])
    means = {}
    for kind in ("good", "defect"):
        inputs = np.stack([preprocess(read_image(p), SIZE) for p in trained[kind]])
        _, _, raw = localization_maps(trained["model"], paddle.to_tensor(inputs), "gradients",
                                      float(trained["config"]["blur_sigma"]))
        scaled = scale_map(raw, low, high)
        means[kind] = float(scaled.mean())
        if kind == "good":
            assert (scaled >= 1.0).mean() < 0.01  # hardly any saturated pixel on normal images
    assert means["good"] < 0.3 and means["good"] < 0.7 * means["defect"], means


def test_panel_helpers() -> None:
    image = np.full((20, 20, 3), 100, np.uint8)
    heat = np.full((20, 20, 3), 200, np.uint8)
    assert overlay(image, heat, 0.5)[0, 0, 0] == 150
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    outlined = draw_outline(image, mask, (255, 0, 0), 1)
    assert (outlined[5, 5:15] == (255, 0, 0)).all(axis=1).any() and (outlined[0, 0] == 100).all()
    assert (draw_outline(image, np.zeros((20, 20), bool)) == image).all()
    panel = compose_panel(image, heat, outlined, "line 1\nline 2")
    assert panel.shape[1] == 60 and panel.shape[0] > 20
    np.testing.assert_array_equal(panel[:20, 20:40], heat)
