"""Tests of prediction (kdad.engine.predictor, tools/predict.py): scores, decisions, the result tables
shared with tools/infer.py, inputs, options. The panels themselves: tests/test_visualize.py."""

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
from kdad.visualize import colour_range, draw_outline, overlay, scale_map

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


def _contains(panel: np.ndarray, tile: np.ndarray) -> bool:
    """Whether ``tile`` appears exactly somewhere in ``panel``."""
    if tile.shape[0] > panel.shape[0] or tile.shape[1] > panel.shape[1]:
        return False
    score = cv2.matchTemplate(panel.astype(np.float32), tile.astype(np.float32), cv2.TM_SQDIFF)
    y, x = np.unravel_index(int(np.argmin(score)), score.shape)
    return bool(np.array_equal(panel[y:y + tile.shape[0], x:x + tile.shape[1]], tile))


def test_panel_shows_the_input_and_marks_ng(trained: Dict[str, Any], tmp_path: Path) -> None:
    results = predict(trained["model_path"], trained["defect"][0], str(tmp_path / "out"), threshold=0.0)
    assert len(results) == 1 and results[0]["decision"] == "NG"
    assert results[0]["result_image"] == str(tmp_path / "out" / "000_result.png")
    panel = read_image(results[0]["result_image"])
    # the input (64 px, square) enlarged pixel for pixel to the default tile max(input size, 256)
    expected = cv2.resize(read_image(trained["defect"][0]), (256, 256), interpolation=cv2.INTER_NEAREST)
    assert _contains(panel, expected)
    assert panel.shape[1] >= 3 * 256
    # NG: the map maximum is marked (magenta ring) even if no pixel is over the pixel threshold
    red, green, blue = (panel[:, :, i].astype(int) for i in range(3))
    assert ((red > 180) & (blue > 180) & (green < 90)).sum() > 0


def test_scores_match_model_and_calibrated_threshold(trained: Dict[str, Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    files = trained["good"] + trained["defect"]
    folder = _folder(tmp_path, files)
    results = predict(trained["model_path"], str(folder), str(tmp_path / "out"), batch_size=3)
    assert [Path(r["image"]).name for r in results] == sorted(os.listdir(folder))
    expected = [trained["scores"][p] for p in files]
    np.testing.assert_allclose([r["score"] for r in results], expected, rtol=1e-5, atol=1e-7)
    threshold = trained["calibration"]["threshold"]
    assert threshold is not None
    for r in results:
        assert r["threshold"] == threshold
        assert r["decision"] == ("NG" if r["score"] > threshold else "OK")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    summary = saved["summary"]
    assert summary["threshold_source"] == "calibration" and summary["threshold"] == threshold
    # KDAD pixel threshold: the largest value of the held-out normal maps (kdad.visualize)
    assert summary["pixel_threshold"] == trained["calibration"]["map_statistics"]["max"]
    assert [row["image"] for row in saved["results"]] == [r["image"] for r in results]
    # one schema with tools/infer.py: kdad.deploy.runtime.RESULT_COLUMNS
    csv_lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "image,score,decision,threshold,map_max,anomalous_area,result_image"
    assert len(csv_lines) == len(files) + 1
    n_ng = sum(r["decision"] == "NG" for r in results)
    out = capsys.readouterr().out
    assert f"(0 unreadable, skipped); {len(files) - n_ng} OK, {n_ng} NG" in out
    assert sum(line.startswith(str(folder)) for line in out.splitlines()) == len(files)


def test_threshold_override(trained: Dict[str, Any], tmp_path: Path) -> None:
    folder = _folder(tmp_path, trained["good"] + trained["defect"])
    scores = sorted(trained["scores"].values())
    override = (scores[2] + scores[3]) / 2
    results = predict(trained["model_path"], str(folder), str(tmp_path / "b"), threshold=override)
    assert all(r["threshold"] == override for r in results)
    assert [r["decision"] for r in results] == ["NG" if r["score"] > override else "OK" for r in results]
    assert sum(r["decision"] == "OK" for r in results) == 3
    summary = json.loads((tmp_path / "b" / "results.json").read_text())["summary"]
    assert summary["threshold_source"] == "argument"


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
    assert "1 unreadable, skipped" in captured.out
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [Path(s["image"]).name for s in saved["summary"]["skipped_files"]] == ["broken.png"]
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
    assert (out / "run_001" / "results.json").is_file() and first[0]["image"] == trained["good"][0]
    assert "run_001" in capsys.readouterr().out


def _predict_tool():
    spec = importlib.util.spec_from_file_location("predict_tool", ROOT / "tools" / "predict.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_cli(trained: Dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = _predict_tool().main(["--image_path", trained["good"][0], "--model_path", trained["model_path"],
                                 "--save_dir", str(tmp_path / "out"), "--threshold", "1e9",
                                 "--batch_size", "2", "--display_size", "48", "--cpu_threads", "1"])
    assert code == 0 and "-> OK" in capsys.readouterr().out
    panel = read_image(str(tmp_path / "out" / "000_result.png"))
    expected = cv2.resize(read_image(trained["good"][0]), (48, 48), interpolation=cv2.INTER_AREA)
    assert _contains(panel, expected)


@pytest.mark.parametrize("option,value,word", [("--threshold", "nan", "threshold"),
                                               ("--threshold", "inf", "threshold"),
                                               ("--pixel_threshold", "nan", "pixel_threshold"),
                                               ("--batch_size", "0", "batch_size"),
                                               ("--cpu_threads", "-1", "cpu_threads")])
def test_cli_rejects_bad_values_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture, option: str, value: str,
                                               word: str) -> None:
    """Non-finite thresholds, batch size 0, negative threads: refused before the model is loaded (the
    model path does not even exist), exit code 2, a message naming the option."""
    import sys

    from kdad.cli import run_main

    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setattr(sys, "argv", ["predict.py", "--image_path", str(image), "--model_path",
                                      str(tmp_path / "missing.pdparams"), "--save_dir", str(tmp_path / "out"),
                                      f"{option}={value}"])
    with pytest.raises(SystemExit) as stop:
        run_main(_predict_tool().main)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert word in err and "missing.pdparams" not in err and not (tmp_path / "out").exists()
    number = float(value) if "threshold" in word else int(value)
    with pytest.raises(ValueError, match=word):
        predict(str(tmp_path / "missing.pdparams"), str(image), str(tmp_path / "out"), **{word: number})


def test_subfolders_are_searched_as_by_infer(trained: Dict[str, Any], tmp_path: Path) -> None:
    """A folder with sub-folders (an MVTec test/ folder): every image under it, as tools/infer.py
    reads it; panel names follow the path; the output folder inside the input is not read back."""
    root = tmp_path / "test"
    for path in trained["good"][:2] + trained["defect"][:1]:
        target = root / Path(path).parent.name / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    out = root / "predictions"
    results = predict(trained["model_path"], str(root), str(out))
    names = [os.path.relpath(r["image"], root) for r in results]
    assert names == sorted(names) and len(names) == 3 and names[0].startswith("blob" + os.sep)
    assert {Path(r["result_image"]).name for r in results} == {
        os.path.splitext(n)[0].replace(os.sep, "_") + "_result.png" for n in names}
    again = predict(trained["model_path"], str(root), str(out))  # into predictions/run_001
    assert [r["image"] for r in again] == [r["image"] for r in results]


def test_cpu_threads_zero_means_all_cores(trained: Dict[str, Any], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--cpu_threads 0: all cores, for predict (dynamic graph) and Paddle Inference alike."""
    import kdad.engine.predictor as predictor
    from kdad.deploy.runtime import PredictorOptions, create_paddle_predictor
    from kdad.export import export_model

    calls: List[int] = []
    real = predictor.set_cpu_threads
    monkeypatch.setattr(predictor, "set_cpu_threads", lambda n: calls.append(n) or real(n))
    predict(trained["model_path"], trained["good"][0], str(tmp_path / "out"), cpu_threads=0)
    assert calls == [0] and real(0) == (os.cpu_count() or 1)
    folder = export_model(trained["model_path"], str(tmp_path / "export"), kinds=["score"])["score"]
    runner = create_paddle_predictor(os.path.join(folder, "model.json"),
                                     os.path.join(folder, "model.pdiparams"), PredictorOptions(cpu_threads=0))
    assert runner.config.cpu_math_library_num_threads() == (os.cpu_count() or 1)


# ----------------------------------------------------------------------------- colour scaling


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
