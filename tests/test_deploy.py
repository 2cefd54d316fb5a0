"""Deployment: export (score / heatmap / feature_map), Paddle Inference, the infer CLI, ONNX.

One tiny model (32 px synthetic texture, random expert, 3 epochs) is trained and exported once per
session; everything is compared with the dynamic graph on the same preprocessed test images.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import paddle
import pytest
import yaml

from kdad.data.io import preprocess, read_image
from kdad.deploy.config import load_deploy_config, read_program_info
from kdad.deploy.runtime import (
    InferenceError,
    PredictorOptions,
    build_parser,
    create_paddle_predictor,
    list_images,
    load_paddle_model,
    resolve_model_files,
    run,
)
from kdad.export import held_out_map_statistics
from kdad.methods.kdad.localization import input_gradients, raw_maps_from_gradients
from kdad.utils.autolog import AutoLogger, Times
from kdad.utils.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
REL = 1e-4


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    from kdad.config import load_config
    from kdad.data.synthetic import generate_synthetic_class
    from kdad.engine.trainer import train

    base = tmp_path_factory.mktemp("deploy")
    root = base / "data"
    generate_synthetic_class(str(root), "tex", kind="texture", n_train=20, n_test_good=3, n_test_defect=2,
                             size=48, seed=0)
    cfg = load_config(None, {"dataset_root": str(root), "normal_class": "tex", "pretrain": False,
                             "num_epochs": 3, "batch_size": 8, "mvtec_img_size": SIZE,
                             "save_dir": str(base / "out"), "log_dir": str(base / "logs"),
                             "progress_bar": False})
    return {"path": train(cfg), "base": base, "test_dir": str(root / "tex" / "test")}


@pytest.fixture(scope="session")
def exported(trained: Dict[str, Any]) -> Dict[str, Any]:
    from kdad.export import export_model

    save_dir = str(trained["base"] / "export")
    folders = export_model(trained["path"], save_dir)
    return {"root": save_dir, **folders}


@pytest.fixture(scope="session")
def exported_autograd(trained: Dict[str, Any]) -> str:
    """The heatmap exported with ``paddle.grad`` inside the graph (backward ops: oneDNN off, no ONNX)."""
    from kdad.export import export_model

    save_dir = str(trained["base"] / "export_autograd")
    return export_model(trained["path"], save_dir, kinds=["heatmap"], heatmap_backward="autograd")["heatmap"]


@pytest.fixture(scope="session")
def reference(trained: Dict[str, Any]) -> Dict[str, Any]:
    """Dynamic-graph scores, raw gradient maps and tap outputs of the test images."""
    model, checkpoint, config = load_model(trained["path"])
    paths = list_images(trained["test_dir"])
    x = np.stack([preprocess(read_image(p), SIZE) for p in paths])
    scores, grads = input_gradients(model, paddle.to_tensor(x))
    with paddle.no_grad():
        cloner, expert = model.features(paddle.to_tensor(x))
    taps = {t: (cloner[t].numpy(), expert[t].numpy()) for t in model.score_taps}
    maps = raw_maps_from_gradients(grads, config["blur_sigma"])
    return {"paths": paths, "x": x, "scores": scores, "maps": maps, "taps": taps, "model": model,
            "config": config, "checkpoint": checkpoint}


def _runner(folder: str, mkldnn: bool):
    model_file, params_file = resolve_model_files(model_dir=folder)
    options = PredictorOptions(enable_mkldnn=mkldnn, cpu_threads=2)
    return create_paddle_predictor(model_file, params_file, options, load_deploy_config(folder))


def _batched(runner, x: np.ndarray, batch: int) -> List[np.ndarray]:
    parts = [runner.run(x[i:i + batch]) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def _close(got: np.ndarray, want: np.ndarray, rel: float = REL) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * float(np.abs(want).max()))


# ----------------------------------------------------------------------------- export


def test_deploy_yaml(exported, reference) -> None:
    calibration = reference["checkpoint"]["calibration"]
    for kind in ("score", "heatmap", "feature_map"):
        deploy = load_deploy_config(exported[kind])
        assert deploy["kind"] == kind
        assert deploy["input"]["shape"] == [-1, 3, SIZE, SIZE] and deploy["input"]["channel_order"] == "RGB"
        assert deploy["postprocess"]["threshold"] == pytest.approx(calibration["threshold"])
        assert deploy["model_info"]["score_taps"] == list(reference["model"].score_taps)
        assert read_program_info(os.path.join(exported[kind], "model.json"))["inputs"] == {
            "x": [-1, 3, SIZE, SIZE]}
    heat = load_deploy_config(exported["heatmap"])
    assert heat["model_info"]["heatmap_backward"].startswith("explicit")
    assert heat["engine"]["onnx"] is True and heat["engine"]["onednn"] is False
    assert heat["postprocess"]["heatmap_statistics"] == pytest.approx(calibration["map_statistics"])
    for kind in ("score", "feature_map"):
        engine = load_deploy_config(exported[kind])["engine"]
        assert engine["onednn"] is True and engine["onnx"] is True
    assert set(load_deploy_config(exported["feature_map"])["postprocess"]["heatmap_statistics"]) == {
        "p50", "p99", "p999", "max"}
    # with another blur_sigma the export recomputes the statistics; the recipe equals the calibration's
    recomputed, _ = held_out_map_statistics("heatmap", reference["model"], reference["config"])
    assert recomputed == pytest.approx(calibration["map_statistics"], rel=1e-5)


# ----------------------------------------------------------------------------- Paddle Inference parity


@pytest.mark.parametrize("mkldnn", [True, False])
def test_score_model_parity_and_batch_independence(exported, reference, mkldnn: bool) -> None:
    runner = _runner(exported["score"], mkldnn)
    assert runner.config.mkldnn_enabled() is mkldnn
    n = len(reference["x"])
    full = _batched(runner, reference["x"], n)[0]
    np.testing.assert_allclose(full, reference["scores"], rtol=REL)
    for batch in (1, 2):
        np.testing.assert_allclose(_batched(runner, reference["x"], batch)[0], full, rtol=1e-5)


@pytest.mark.parametrize("backward", ["explicit", "autograd"])
def test_heatmap_model_parity_and_batch_independence(exported, exported_autograd, reference,
                                                     backward: str) -> None:
    """Deployed gradient maps (blurred outside the graph) equal the dynamic ``paddle.grad`` maps."""
    from kdad.postprocess import blur

    folder = exported["heatmap"] if backward == "explicit" else exported_autograd
    runner = _runner(folder, mkldnn=True)
    assert runner.config.mkldnn_enabled() is False  # deploy.yaml forces oneDNN off
    sigma = reference["config"]["blur_sigma"]
    n = len(reference["x"])
    scores, raw = _batched(runner, reference["x"], n)
    np.testing.assert_allclose(scores, reference["scores"], rtol=REL)
    _close(blur(raw, sigma), reference["maps"])
    for batch in (1, 2):
        s_b, raw_b = _batched(runner, reference["x"], batch)
        np.testing.assert_allclose(s_b, scores, rtol=1e-5)
        _close(raw_b, raw, 1e-5)


def _numpy_feature_map(taps: Dict[int, Any], lamda: float, size: int) -> np.ndarray:
    """Independent numpy statement of kdad.methods.kdad.feature_maps (cos with Paddle's eps clamp)."""
    total = 0.0
    for cloner, expert in taps.values():
        c, e = cloner.astype(np.float64), expert.astype(np.float64)
        norm = np.sqrt(np.maximum((c * c).sum(1) * (e * e).sum(1), 1e-16))
        term = 1.0 - (c * e).sum(1) / norm + lamda * ((c - e) ** 2).mean(1)
        r = size // term.shape[-1]
        total = total + np.repeat(np.repeat(term, r, axis=1), r, axis=2)
    return total


def test_feature_map_model_matches_numpy(exported, reference) -> None:
    runner = _runner(exported["feature_map"], mkldnn=True)
    assert runner.config.mkldnn_enabled() is True
    scores, maps = _batched(runner, reference["x"], 2)
    np.testing.assert_allclose(scores, reference["scores"], rtol=REL)
    want = _numpy_feature_map(reference["taps"], reference["model"].lamda, SIZE)
    assert maps.shape == want.shape == (len(reference["x"]), SIZE, SIZE)
    _close(maps, want)


# ----------------------------------------------------------------------------- infer CLI


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name.replace('/', '_')}", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli_error(monkeypatch, capsys, script: str, argv: List[str]) -> str:
    """Run a tool through kdad.cli.run_main in-process; returns stderr, asserting exit code 2."""
    from kdad.cli import run_main

    monkeypatch.setattr(sys, "argv", [script] + argv)
    with pytest.raises(SystemExit) as stop:
        run_main(_tool(script).main)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


def test_infer_folder_with_corrupt_file(trained, exported_autograd, reference, tmp_path, capsys) -> None:
    folder = tmp_path / "images"
    for path in reference["paths"]:
        target = folder / Path(path).parent.name / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (folder / "good" / "broken.png").write_bytes(b"not an image at all")
    out_dir = tmp_path / "out"
    args = build_parser().parse_args([
        f"--model_dir={exported_autograd}", "--input_file", str(folder),
        "--batch_size=3", "--enable_mkldnn=True", "--cpu_threads", "2", f"--save_dir={out_dir}"])
    output = run(args)
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "skipped" in captured.err
    assert "oneDNN disabled" in captured.out
    assert output["runner"].config.mkldnn_enabled() is False
    summary = json.loads((out_dir / "results.json").read_text())["summary"]
    assert summary["skipped"] == 1 and summary["images_scored"] == len(reference["paths"])
    by_name = {os.path.relpath(r["image"], folder): r for r in output["results"]}
    for path, score in zip(reference["paths"], reference["scores"]):
        row = by_name[os.path.relpath(path, trained["test_dir"])]
        assert row["score"] == pytest.approx(float(score), rel=REL)
        assert row["decision"] == ("NG" if row["score"] > row["threshold"] else "OK")
        assert os.path.isfile(row["result_image"]) and row["map_max"] > 0 and row["anomalous_area"] >= 0
    # one schema with tools/predict.py (kdad.deploy.runtime.RESULT_COLUMNS)
    lines = (out_dir / "results.csv").read_text().splitlines()
    assert lines[0] == "image,score,decision,threshold,map_max,anomalous_area,result_image"
    assert len(lines) == len(reference["paths"]) + 1
    saved = json.loads((out_dir / "results.json").read_text())["results"]
    assert all(list(row) == lines[0].split(",") for row in saved)


@pytest.mark.parametrize("flag,word", [("--threshold=nan", "threshold"), ("--threshold=-inf", "threshold"),
                                       ("--batch_size=0", "batch_size"), ("--pixel_threshold=nan", "pixel")])
def test_infer_rejects_bad_values_before_loading(exported, reference, tmp_path, monkeypatch, capsys, flag,
                                                 word) -> None:
    """A non-finite threshold never calls every image OK, batch size 0 fails before the model loads."""
    err = _cli_error(monkeypatch, capsys, "tools/infer.py",
                     [f"--model_dir={tmp_path / 'no_model_here'}", f"--input_file={reference['paths'][0]}",
                      f"--save_dir={tmp_path / 'out'}", flag])
    assert word in err and "no_model_here" not in err and not (tmp_path / "out").exists()
    from kdad.deploy.runtime import predict_folder

    deploy = load_deploy_config(exported["score"])
    with pytest.raises(InferenceError, match="finite"):
        predict_folder(lambda batch: [np.zeros(len(batch))], deploy, reference["paths"][0],
                       threshold=float("nan"))
    nan_score = predict_folder(lambda batch: [np.full(len(batch), np.nan)], deploy, reference["paths"][0])
    assert nan_score["results"][0]["decision"] == "NG"  # a score that is not a number is never OK
    bad = dict(deploy, postprocess=dict(deploy["postprocess"], threshold=float("nan")))
    with pytest.raises(InferenceError, match="finite"):  # a broken deploy.yaml threshold, too
        predict_folder(lambda batch: [np.zeros(len(batch))], bad, reference["paths"][0])


def test_mkldnn_flag_really_off(exported, reference, tmp_path) -> None:
    image = reference["paths"][0]
    for flag, expected in (("False", False), ("True", True)):
        args = build_parser().parse_args([f"--model_dir={exported['score']}", f"--input_file={image}",
                                          f"--enable_mkldnn={flag}", f"--save_dir={tmp_path}"])
        assert run(args)["runner"].config.mkldnn_enabled() is expected


@pytest.mark.skipif(paddle.device.is_compiled_with_cuda(), reason="checks the CPU-only fallback")
def test_use_gpu_on_cpu_wheel_warns_and_runs(exported, reference, tmp_path, capsys) -> None:
    args = build_parser().parse_args(["--use_gpu=True", "--use_tensorrt", "True",
                                      f"--model_dir={exported['score']}",
                                      f"--input_file={reference['paths'][0]}", f"--save_dir={tmp_path}"])
    output = run(args)
    err = capsys.readouterr().err
    assert "CPU-only" in err and "TensorRT" in err
    assert output["runner"].config.use_gpu() is False
    assert output["results"][0]["score"] == pytest.approx(float(reference["scores"][0]), rel=REL)


def test_infer_errors(exported, reference, tmp_path, monkeypatch, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _cli_error(monkeypatch, capsys, "tools/infer.py",
                     [f"--model_dir={exported['score']}", f"--input_file={empty}"])
    assert "no images" in err
    err = _cli_error(monkeypatch, capsys, "tools/infer.py",
                     [f"--model_dir={tmp_path}", f"--input_file={reference['paths'][0]}"])
    assert "no model file" in err
    err = _cli_error(monkeypatch, capsys, "tools/infer.py",
                     [f"--model_file={tmp_path / 'model.json'}", f"--input_file={reference['paths'][0]}"])
    assert "does not exist" in err
    broken = tmp_path / "no_params"
    shutil.copytree(exported["score"], broken)
    os.remove(broken / "model.pdiparams")
    err = _cli_error(monkeypatch, capsys, "tools/infer.py",
                     [f"--model_dir={broken}", f"--input_file={reference['paths'][0]}"])
    assert "model.pdiparams" in err
    legacy_name = os.path.join(exported["score"], "model.pdmodel")  # old TIPC configs point here
    assert resolve_model_files(model_file=legacy_name)[0] == os.path.join(exported["score"], "model.json")


@pytest.mark.parametrize("shape,word", [([-1, 3, 64, 64], "size"), ([-1, 1, SIZE, SIZE], "channels")])
def test_model_vs_deploy_mismatch(exported, tmp_path, shape, word) -> None:
    folder = tmp_path / "model"
    shutil.copytree(exported["score"], folder)
    path = folder / "deploy.yaml"
    data = yaml.safe_load(path.read_text())
    data["Deploy"]["input"]["shape"] = shape
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InferenceError, match=word):
        load_paddle_model(str(folder), None, None, PredictorOptions())


def test_benchmark_report_and_exit_code(exported, reference, tmp_path) -> None:
    folder = os.path.dirname(reference["paths"][0])
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "infer.py"), "--use_gpu=False", "--enable_mkldnn=True",
         "--cpu_threads=2", "--batch_size=2", f"--model_dir={exported['root']}", f"--input_file={folder}",
         "--enable_benchmark", "True", "--precision=fp32", "--use_tensorrt=False", f"--save_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    n = len(list_images(folder))
    for line in ("---------------------- Env info ----------------------",
                 "----------------------- Perf info -----------------------", " enable_mkldnn: True",
                 f" data_num: {n}", " batch_size: 2", "preprocess_time(ms): "):
        assert line in out
    assert out.index("Perf info") < out.index(f"scored {n} of {n} images")  # continued after report
    assert (tmp_path / "results.json").is_file()


def test_autolog_times_and_report_format() -> None:
    import logging

    clock = iter(np.arange(0.0, 100.0, 0.5)).__next__
    times = Times(clock=clock)
    for _ in range(3):
        times.start()
        times.stamp()
        times.stamp()
        times.end(stamp=True)
    assert times._num_counts() == 3 and times.value(mode="mean")["inference_time"] == pytest.approx(0.5)
    records: List[str] = []
    logger = logging.Logger("root")
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    log = AutoLogger("KDAD", batch_size=2, inference_config=None, logger=logger)
    log.times = times
    log.report()
    assert records[0] == "\n" and records[1] == "---------------------- Env info ----------------------"
    assert " data_num: 3" in records
    assert records[-1].startswith(" preprocess_time(ms): 500.0, inference_time(ms): 500.0")
    assert len(records) == 28


# ----------------------------------------------------------------------------- ONNX


def test_onnx_parity_via_scripts(trained, exported, exported_autograd, reference, tmp_path, monkeypatch,
                                capsys) -> None:
    err = _cli_error(monkeypatch, capsys, "deploy/onnx/convert.py", [f"--model_dir={exported_autograd}"])
    assert "not convertible" in err
    onnx_dir = tmp_path / "onnx" / "nested"
    done = subprocess.run([sys.executable, str(ROOT / "deploy/onnx/convert.py"),
                           f"--model_dir={exported['score']}", f"--save_dir={onnx_dir}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (onnx_dir / "model.onnx").is_file()
    assert load_deploy_config(str(onnx_dir))["onnx"]["model"] == "model.onnx"
    out_dir = tmp_path / "onnx_out"
    done = subprocess.run([sys.executable, str(ROOT / "deploy/onnx/infer_onnx.py"), f"--model_dir={onnx_dir}",
                           f"--input_file={trained['test_dir']}", "--batch_size=2", f"--save_dir={out_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = {r["image"]: r["score"] for r in json.loads((out_dir / "results.json").read_text())["results"]}
    got = np.array([results[p] for p in reference["paths"]])
    np.testing.assert_allclose(got, reference["scores"], rtol=REL)


def test_onnx_heatmap_parity(exported, reference, tmp_path) -> None:
    """The explicit-backward heatmap converts to ONNX; onnxruntime gives the dynamic maps."""
    from kdad.deploy.config import load_deploy_config
    from kdad.deploy.onnx_runtime import OnnxRunner, convert_to_onnx, onnx_optimization
    from kdad.postprocess import blur

    onnx_file = convert_to_onnx(exported["heatmap"], str(tmp_path / "heatmap_onnx"))
    deploy = load_deploy_config(exported["heatmap"])
    assert onnx_optimization(deploy) == "extended"  # see kdad/export.py: ORT's layout passes flip ReLU masks
    scores, raw = OnnxRunner(onnx_file, 2, onnx_optimization(deploy)).run(reference["x"])
    np.testing.assert_allclose(scores, reference["scores"], rtol=REL)
    _close(blur(raw, reference["config"]["blur_sigma"]), reference["maps"])


def test_feature_map_localization_method(reference) -> None:
    """``localization_method: feature_map`` evaluates the map the feature_map/ model deploys."""
    from kdad.methods.kdad.localization import localization_maps
    from kdad.postprocess import blur

    sigma = reference["config"]["blur_sigma"]
    x = paddle.to_tensor(reference["x"])
    scores, paper, raw = localization_maps(reference["model"], x, "feature_map", sigma)
    np.testing.assert_allclose(scores, reference["scores"], rtol=REL)
    want = _numpy_feature_map(reference["taps"], reference["model"].lamda, SIZE)
    _close(raw, blur(want.astype(np.float32), sigma))
    flat = want.reshape(len(want), -1)  # the original code's per-image (min, p99) scaling, clipped
    low, high = flat.min(axis=1)[:, None, None], np.percentile(flat, 99, axis=1)[:, None, None]
    _close(paper, blur(np.clip((want - low) / (high - low), 0, 1).astype(np.float32), sigma), 1e-3)
