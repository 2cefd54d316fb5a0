"""The whole chain for the methods other than KDAD (PaDiM, PatchCore fitted; STFPM, RD4AD, CFlow-AD,
DRAEM trained a few epochs) on a tiny generated class: fit or train -> calibrate -> evaluate ->
predict -> export -> Paddle Inference and onnxruntime, each checked against an independent
computation or the dynamic model. For the trained methods also: stopped and resumed =
uninterrupted, cached teacher features = uncached."""

from __future__ import annotations

import os

import numpy as np
import paddle
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from kdad.config import load_config
from kdad.data import AnomalyDataset, list_mvtec, split_holdout
from kdad.data.synthetic import generate_synthetic_class
from kdad.utils.checkpoint import load_checkpoint, load_model

METHODS = ("padim", "patchcore", "stfpm", "rd4ad", "cflow", "draem")
TRAINED = ("stfpm", "rd4ad", "cflow", "draem")
#: the Gaussian blur inside each method's exported graph (deploy.yaml postprocess.blur_in_graph)
BLUR_IN_GRAPH = {"padim": 4.0, "patchcore": 4.0, "stfpm": None, "rd4ad": 4.0, "cflow": None, "draem": None}
SIZE = 64
#: a short schedule for the trained methods (the papers' optimisers and learning rates)
SHORT = {"num_epochs": 3, "batch_size": 4, "save_every": 1, "fiber_batch": 64, "draem_width": 16}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain_data")
    generate_synthetic_class(str(root), "tex", kind="texture", n_train=16, n_test_good=4, n_test_defect=4,
                             size=SIZE, seed=3)
    return str(root)


def _backbone(method: str) -> str:
    """What runs of ``method`` name as their backbone here (DRAEM has none)."""
    return "none" if method == "draem" else "efficientnet_lite0"


def _config(method: str, root: str, out: str, **extra):
    values = {"method": method, "dataset_root": root, "normal_class": "tex", "mvtec_img_size": SIZE,
              "save_dir": os.path.join(out, "runs"), "log_dir": os.path.join(out, "logs"),
              "holdout_fraction": 0.25, "eval_batch_size": 8, "progress_bar": False, "cpu_threads": 2,
              "backbone": "efficientnet_lite0"}
    values.update(extra)
    return load_config(None, values)


@pytest.fixture(scope="module", params=METHODS)
def fitted(request, data_root, tmp_path_factory):
    from kdad.engine.trainer import train

    out = str(tmp_path_factory.mktemp(f"chain_{request.param}"))
    config = _config(request.param, data_root, out, **(SHORT if request.param in TRAINED else {}))
    path = train(config)
    return {"method": request.param, "config": config, "path": path, "out": out}


def test_checkpoint_names_method_and_backbone(fitted):
    method, path = fitted["method"], fitted["path"]
    assert path == os.path.join(fitted["out"], "runs", method, "tex", "model_final.pdparams")
    state = load_checkpoint(path)
    assert state["method"] == method and state["backbone"] == _backbone(method)
    # pretrained backbone weights are reloaded from their source, not stored
    assert not any(key.startswith("backbone.") for key in state["model"])
    assert os.path.isfile(os.path.join(fitted["out"], "logs", method, "tex_train.log"))


def test_calibration_uses_the_held_out_images(fitted, data_root):
    """The threshold is the 99th-percentile ('higher') of the held-out normal scores, recomputed here."""
    config = fitted["config"]
    model, state, _ = load_model(fitted["path"])
    samples = list_mvtec(data_root, "tex", "train")
    _, holdout_idx = split_holdout(len(samples), config["holdout_fraction"], config["seed"])
    images = AnomalyDataset([samples[i] for i in holdout_idx], SIZE).images()
    with paddle.no_grad():
        scores = model(paddle.to_tensor(images))[0].numpy()
    expected = float(np.quantile(scores.astype(np.float64), 0.99, method="higher"))
    calibration = state["calibration"]
    assert calibration["holdout_images"] == len(holdout_idx) == 4
    assert calibration["threshold"] == pytest.approx(expected, rel=1e-6)


def test_evaluation_metrics_and_val_log(fitted):
    from kdad.engine.evaluator import run_test

    result = run_test(fitted["config"], fitted["path"])
    metrics = result["metrics"]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(result["labels"], result["scores"]))
    assert {"pixel_auroc", "aupro", "image_f1_max"} <= set(metrics)
    assert result["log_path"].endswith(os.path.join("logs", fitted["method"], "tex_val.log"))
    text = open(result["log_path"], encoding="utf-8").read()
    assert f"method: {fitted['method']}" in text and f"backbone: {_backbone(fitted['method'])}" in text
    # the generated defects are obvious: a working method separates them (3 epochs of a trained
    # method's student on 12 images are not a working model yet: only the metric's computation counts)
    if fitted["method"] not in TRAINED:
        assert metrics["image_auroc"] >= 0.9


def test_wrong_method_or_backbone_is_a_clear_error(fitted):
    asked = load_config(None, {"method": "kdad"})
    with pytest.raises(ValueError, match=f"holds a {fitted['method']} model"):
        load_model(fitted["path"], asked)
    other = load_config(None, {"method": fitted["method"], "backbone": "resnet18"})
    if fitted["method"] == "draem":  # no backbone: the setting does not apply
        load_model(fitted["path"], other)
        return
    with pytest.raises(ValueError, match="with backbone efficientnet_lite0, but backbone=resnet18"):
        load_model(fitted["path"], other)


def test_export_paddle_inference_and_onnx_equal_the_dynamic_model(fitted, data_root):
    from kdad.deploy.onnx_runtime import OnnxRunner, convert_to_onnx
    from kdad.deploy.runtime import PredictorOptions, load_paddle_model
    from kdad.export import export_model

    export_dir = os.path.join(fitted["out"], "export")
    written = export_model(fitted["path"], export_dir)
    assert list(written) == ["anomaly_map"]
    folder = written["anomaly_map"]
    with open(os.path.join(folder, "deploy.yaml"), encoding="utf-8") as handle:
        deploy = yaml.safe_load(handle)["Deploy"]
    assert deploy["model_info"]["method"] == fitted["method"]
    assert deploy["model_info"]["backbone"] == _backbone(fitted["method"])
    assert deploy["postprocess"]["blur_sigma"] is None  # nothing to blur outside the graph
    assert deploy["postprocess"]["blur_in_graph"] == BLUR_IN_GRAPH[fitted["method"]]
    assert deploy["postprocess"]["threshold"] == pytest.approx(
        load_checkpoint(fitted["path"])["calibration"]["threshold"])

    images = AnomalyDataset(list_mvtec(data_root, "tex", "test"), SIZE).images()[:5]
    model, _, _ = load_model(fitted["path"])
    with paddle.no_grad():
        want_scores, want_maps = (t.numpy() for t in model(paddle.to_tensor(images)))
    # every method's graph resamples without interpolation ops, so Paddle Inference runs it with oneDNN too
    assert deploy["engine"]["onednn"] is True, deploy["engine"]
    for mkldnn in (False, True):
        options = PredictorOptions(enable_mkldnn=mkldnn, cpu_threads=2)
        runner, _ = load_paddle_model(folder, None, None, options)
        got_scores, got_maps = runner.run(images)
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-4, atol=1e-5 * np.abs(want_scores).max())
        assert np.abs(got_maps - want_maps).max() <= 1e-4 * np.abs(want_maps).max(), mkldnn

    onnx_file = convert_to_onnx(folder, os.path.join(fitted["out"], "onnx"))
    onnx_scores, onnx_maps = OnnxRunner(onnx_file).run(images)
    np.testing.assert_allclose(onnx_scores, want_scores, rtol=1e-4, atol=1e-5 * np.abs(want_scores).max())
    assert np.abs(onnx_maps - want_maps).max() <= 1e-4 * np.abs(want_maps).max()


def test_predict_and_infer_give_the_same_decisions(fitted, data_root):
    from kdad.deploy.runtime import PredictorOptions, load_paddle_model, predict_folder
    from kdad.engine.predictor import predict
    from kdad.export import export_model

    test_dir = os.path.join(data_root, "tex", "test", "good")
    dynamic = predict(fitted["path"], test_dir, os.path.join(fitted["out"], "predict"))
    folder = export_model(fitted["path"], os.path.join(fitted["out"], "export_infer"))["anomaly_map"]
    runner, deploy = load_paddle_model(folder, None, None, PredictorOptions(enable_mkldnn=False))
    static = predict_folder(runner.run, deploy, test_dir, batch_size=2,
                            save_dir=os.path.join(fitted["out"], "infer"))
    by_file = {os.path.basename(r["image"]): r for r in static["results"]}
    for row in dynamic:
        other = by_file[os.path.basename(row["image"])]
        assert other["score"] == pytest.approx(row["score"], rel=1e-4)
        assert other["decision"] == row["decision"]
        assert os.path.isfile(row["result_image"])


def test_outline_agrees_with_the_decision(fitted, data_root):
    """The methods whose score is their map's maximum (checked here on the model's own outputs) are
    those whose pixel threshold is the image threshold; for them a user's ``--threshold`` moves the
    outline with the decision: NG exactly when some pixel is outlined."""
    from kdad.engine.predictor import predict
    from kdad.visualize import SCORE_IS_MAP_MAX

    method, test_dir = fitted["method"], os.path.join(data_root, "tex", "test")
    first = predict(fitted["path"], test_dir, os.path.join(fitted["out"], "outline_1"))
    is_map_max = [abs(r["map_max"] - r["score"]) <= 1e-6 * max(1.0, abs(r["score"])) for r in first]
    # PatchCore's score is the re-weighted largest patch distance: listed, but not the map maximum
    assert all(is_map_max) == (method in SCORE_IS_MAP_MAX and method != "patchcore"), (method, first)
    if not all(is_map_max):
        return
    scores = sorted(r["score"] for r in first)
    threshold = 0.5 * (scores[len(scores) // 2 - 1] + scores[len(scores) // 2])  # some NG, some OK
    rows = predict(fitted["path"], test_dir, os.path.join(fitted["out"], "outline_2"), threshold=threshold)
    assert {r["decision"] for r in rows} == {"OK", "NG"}
    for row in rows:
        assert (row["decision"] == "NG") == (row["anomalous_area"] > 0), row


# ----------------------------------------------------------------------------- trained methods


def _final_state(path: str):
    state = load_checkpoint(path)
    return {key: np.asarray(value) for key, value in state["model"].items()}, state


@pytest.mark.parametrize("method", TRAINED)
def test_stopped_and_resumed_equals_uninterrupted(method, data_root, tmp_path):
    from kdad.engine.trainer import train

    whole = train(_config(method, data_root, str(tmp_path / "whole"), **SHORT))
    part = _config(method, data_root, str(tmp_path / "part"), **{**SHORT, "num_epochs": 2})
    train(part)
    resumed = train(_config(method, data_root, str(tmp_path / "part"), **SHORT, continue_train=True))
    want, want_state = _final_state(whole)
    got, got_state = _final_state(resumed)
    assert set(got) == set(want)
    for key in want:  # weights, BatchNorm statistics: the same arithmetic in the same order
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert got_state["loss"] == want_state["loss"]
    assert got_state["calibration"]["threshold"] == want_state["calibration"]["threshold"]


@pytest.mark.parametrize("method", TRAINED)
def test_cached_teacher_features_equal_uncached(method, data_root, tmp_path):
    from kdad.engine.trainer import train

    short = {**SHORT, "num_epochs": 2}
    cached = train(_config(method, data_root, str(tmp_path / "cached"), **short))
    uncached = train(_config(method, data_root, str(tmp_path / "uncached"), **short,
                             cache_expert_features=False))
    want, _ = _final_state(uncached)
    got, _ = _final_state(cached)
    for key in want:  # the teacher runs in batches of eval_batch_size instead of batch_size: rounding only
        scale = max(1.0, float(np.abs(want[key]).max()))
        assert np.abs(got[key] - want[key]).max() <= 1e-4 * scale, key
