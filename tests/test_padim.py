"""PaDiM: golden test against anomalib's numbers, independent checks, export.

(a) ``../shared/golden/padim_reference_v1.npz`` (see the README beside it): anomalib 2.7.0's PaDiM on
rule-made ResNet18 weights and Magnetic Tile images; we regenerate the weights with numpy, feed the
same inputs and compare at the README's tolerances (skipped when the file is absent).
(b) On a tiny random case: streaming statistics equal ``np.cov`` on all embeddings, distances equal
``scipy.spatial.distance.mahalanobis``, the embedding equals a numpy re-computation.
(c) ``to_static(full_graph=True)`` + ``jit.save`` + Paddle Inference (with and without oneDNN) give the
dynamic outputs; the interpolation-free resampling equals ``F.interpolate``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Iterator

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from golden_rule import (  # tests/golden_rule.py (pytest puts tests/ on sys.path)
    l2_rel,
    max_abs_of_max,
    max_rel,
    paddle_key,
    rule_weights,
)
from scipy.spatial.distance import mahalanobis

from kdad.backbones import build_backbone
from kdad.config import default_config
from kdad.deploy.config import engine_support, read_program_info
from kdad.deploy.runtime import PredictorOptions, create_paddle_predictor
from kdad.layers import bilinear_matrix, image_max, nearest_indices
from kdad.methods.padim import METHOD, PadimModel, build_model, fit_padim
from kdad.methods.padim.fit import (
    COVARIANCE_EPS,
    INVERSE_EPS,
    StreamingGaussian,
    accumulate_statistics,
    install_statistics,
    iter_embeddings,
)
from kdad.methods.padim.model import default_feature_dim
from kdad.metrics import image_auroc
from kdad.registry import get_method

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "..", "shared", "golden", "padim_reference_v1.npz")


# --- helpers ------------------------------------------------------------------------------------------

def small_config(**overrides: Any) -> Dict[str, Any]:
    config = default_config()
    config.update({"method": "padim", "backbone": "resnet18", "backbone_pretrained": False,
                   "mvtec_img_size": 64, "feature_dim": 12, "seed": 7, "eval_batch_size": 3})
    config.update(overrides)
    return config


# --- (a) golden -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden() -> Iterator[Dict[str, Any]]:
    if not os.path.isfile(GOLDEN):
        pytest.skip(f"PaDiM reference fixture not found at {os.path.normpath(GOLDEN)} "
                    "(../shared/golden is not part of the repository)")
    ref = np.load(GOLDEN)
    spec = [(str(key), tuple(int(d) for d in shape if d >= 0))
            for key, shape in zip(ref["weight_keys"], ref["weight_shapes"])]
    weights = rule_weights(spec, int(ref["weight_seed"]), float(ref["weight_gain"]))
    sha = hashlib.sha256(b"".join(weights[key].astype("<f4").tobytes() for key, _ in spec)).hexdigest()

    backbone = build_backbone("resnet18", [str(t) for t in ref["layers"]], pretrained=False)
    state = {paddle_key(key): value for key, value in weights.items()}
    assert set(state) == set(backbone.state_dict()), "rule keys != the backbone's keys"
    backbone.set_state_dict(state)
    size = int(ref["image_size"])
    model = PadimModel(backbone, ref["idx"], image_size=size, blur_sigma=4.0)

    def to_input(images: np.ndarray) -> np.ndarray:  # uint8 NHWC -> [0, 1] NCHW; normalised in the model
        return (images.astype(np.float32) / np.float32(255)).transpose(0, 3, 1, 2)

    stats = accumulate_statistics(model, to_input(ref["train_images"]), batch_size=8)
    install_statistics(model, stats)
    x = paddle.to_tensor(to_input(ref["images"]))
    with paddle.no_grad():
        normalised = backbone.normalize(x).numpy()
        embedding = model.embedding(x)
        distances, raw, blurred = model.maps_from_embedding(embedding)
        scores = image_max(blurred)
        forward_scores, forward_maps = model(x[:2])  # forward itself, on 2 images (time)
    readme_input = ((ref["images"].astype(np.float32) / np.float32(255) - ref["mean_rgb"]) / ref["std_rgb"])
    positions = ref["stat_positions"]
    yield {
        "ref": ref, "sha": sha, "model": model, "stats": stats,
        "input_error": float(np.max(np.abs(normalised - readme_input.transpose(0, 3, 1, 2)))),
        "embedding_chan_norms": np.linalg.norm(embedding.numpy().astype(np.float64), axis=(2, 3)),
        "cov_at": stats.covariance(positions),
        "cov_fro": np.concatenate([np.linalg.norm(stats.covariance(chunk), axis=(1, 2))
                                   for chunk in np.array_split(np.arange(stats.positions), 8)]),
        "inv_cov": model.inv_covariance.numpy(),
        "dist_map": distances.numpy(), "anomaly_map_raw": raw.numpy(), "anomaly_map": blurred.numpy(),
        "scores": scores.numpy(),
        "forward_scores": forward_scores.numpy(), "forward_maps": forward_maps.numpy(),
    }


def test_golden_weights_and_input(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    assert golden["sha"] == str(ref["weight_sha256"])
    assert golden["input_error"] <= 1e-6  # the README's formula (measured: bit-identical)
    assert np.array_equal(golden["model"].feature_index.numpy(), ref["idx"])
    assert l2_rel(golden["embedding_chan_norms"], ref["embedding_chan_norms"]) <= 1e-5


def test_golden_statistics(golden: Dict[str, Any]) -> None:
    ref, stats = golden["ref"], golden["stats"]
    positions = ref["stat_positions"]
    mean = golden["model"].mean.numpy()
    assert stats.count == len(ref["train_images"])
    assert l2_rel(mean[positions].T, ref["mean_at"]) <= 1e-5
    assert l2_rel(golden["cov_at"], ref["cov_at"]) <= 1e-5
    assert l2_rel(golden["inv_cov"][positions], ref["inv_cov_at"]) <= 1e-4
    assert max_rel(np.linalg.norm(mean.astype(np.float64), axis=1), ref["mean_pos_norms"]) <= 1e-4
    assert max_rel(golden["cov_fro"], ref["cov_fro"]) <= 1e-4
    inv_fro = np.linalg.norm(golden["inv_cov"].astype(np.float64), axis=(1, 2))
    assert max_rel(inv_fro, ref["inv_cov_fro"]) <= 1e-4


def test_golden_maps_and_scores(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    assert max_rel(golden["dist_map"], ref["dist_map"]) <= 1e-3
    assert max_abs_of_max(golden["anomaly_map_raw"], ref["anomaly_map_raw"]) <= 1e-4
    assert max_abs_of_max(golden["anomaly_map"], ref["anomaly_map"]) <= 1e-4
    assert max_rel(golden["scores"], ref["scores"]) <= 1e-4
    assert max_abs_of_max(golden["forward_maps"], ref["anomaly_map"][:2]) <= 1e-4
    assert max_rel(golden["forward_scores"], ref["scores"][:2]) <= 1e-4
    assert abs(image_auroc(ref["labels"], golden["scores"]) - float(ref["auroc"])) <= 1e-9


# --- (b) independent checks ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny() -> Dict[str, Any]:
    paddle.seed(3)
    config = small_config()
    model = build_model(config)
    rng = np.random.default_rng(0)
    train = rng.uniform(0, 1, (10, 3, 64, 64)).astype(np.float32)
    test = rng.uniform(0, 1, (2, 3, 64, 64)).astype(np.float32)
    facts = fit_padim(model, train, config)
    return {"config": config, "model": model, "train": train, "test": test, "facts": facts}


def test_streaming_fit_equals_np_cov(tiny: Dict[str, Any]) -> None:
    model = tiny["model"]
    embeddings = np.concatenate(list(iter_embeddings(model, tiny["train"], 4)), axis=0).astype(np.float64)
    stats = accumulate_statistics(model, tiny["train"], 3)  # batches 3+3+3+1
    assert embeddings.shape == (10, model.positions, model.feature_dim)
    for p in (0, 17, model.positions - 1):
        assert np.allclose(stats.covariance([p], regularise=False)[0], np.cov(embeddings[:, p], rowvar=False),
                           rtol=1e-10, atol=1e-12)
    assert np.allclose(stats.mean, embeddings.mean(axis=0), rtol=1e-12, atol=1e-12)
    assert np.allclose(model.mean.numpy(), embeddings.mean(axis=0), rtol=1e-6, atol=1e-6)
    # robust to a large common offset (no E[xx^T] - mm^T cancellation)
    rng = np.random.default_rng(1)
    data = 1e4 + rng.normal(size=(9, 2, 3))
    running = StreamingGaussian(2, 3)
    for chunk in (data[:4], data[4:5], data[5:]):
        running.update(chunk)
    assert np.allclose(running.covariance(regularise=False)[1], np.cov(data[:, 1], rowvar=False), rtol=1e-9)


def test_embedding_and_distances_independent(tiny: Dict[str, Any]) -> None:
    model, test, train = tiny["model"], tiny["test"], tiny["train"]
    x = paddle.to_tensor(test)
    with paddle.no_grad():
        feats = {tap: value.numpy() for tap, value in model.backbone(x).items()}
        embedding = model.embedding(x).numpy()
        distances = model.distance_map(model.embedding(x)).numpy()
        scores, maps = model(x)
    height, width = model.grid
    parts = [np.repeat(np.repeat(feats[tap], height // feats[tap].shape[2], axis=2),
                       width // feats[tap].shape[3], axis=3) for tap in model.layers]
    expected = np.concatenate(parts, axis=1)[:, model.feature_index.numpy()]
    assert np.allclose(embedding, expected, rtol=0, atol=0)
    train_emb = np.concatenate(list(iter_embeddings(model, train, 10)), axis=0).astype(np.float64)
    vectors = embedding.reshape(len(test), model.feature_dim, -1).astype(np.float64)
    eye = np.eye(model.feature_dim)
    for p in (0, 40, model.positions - 1):
        cov = np.cov(train_emb[:, p], rowvar=False) + (COVARIANCE_EPS + INVERSE_EPS) * eye
        inv = np.linalg.inv(cov)
        for n in range(len(test)):
            want = mahalanobis(vectors[n, :, p], train_emb[:, p].mean(axis=0), inv)
            assert distances[n].reshape(-1)[p] == pytest.approx(want, rel=1e-4)
    assert np.allclose(scores.numpy(), image_max(maps).numpy())
    assert maps.shape == [2, 64, 64]


def test_build_model_defaults_and_errors(tiny: Dict[str, Any]) -> None:
    assert get_method("padim") is METHOD and METHOD.fit is fit_padim
    model = tiny["model"]
    facts = tiny["facts"]
    assert facts["num_images"] == 10 and facts["feature_dim"] == 12 and facts["positions"] == 256
    assert model.is_fitted and model.grid == (16, 16)
    keys = set(model.state_dict())
    assert {"feature_index", "mean", "inv_covariance"} <= keys
    index = model.feature_index.numpy()
    assert len(np.unique(index)) == 12 and np.all(np.diff(index) > 0) and index.max() < 448
    again = build_model(tiny["config"])  # the seed fixes the channel draw
    assert np.array_equal(again.feature_index.numpy(), index)
    assert default_feature_dim("resnet18", 448) == 100
    assert default_feature_dim("wide_resnet50_2", 1792) == 550
    assert default_feature_dim("efficientnet_lite0", 176) == 176
    assert default_feature_dim("efficientnet_lite0", 472) == 200
    lite = build_model(small_config(backbone="efficientnet_lite0", feature_dim=0, mvtec_img_size=32))
    assert lite.feature_dim == 176 and np.array_equal(lite.feature_index.numpy(), np.arange(176))
    with pytest.raises(ValueError, match="exceeds the 448 channels"):
        build_model(small_config(feature_dim=449))
    with pytest.raises(ValueError, match="at least 2"):
        fit_padim(again, tiny["train"][:1], tiny["config"])


# --- (c) export -----------------------------------------------------------------------------------------

def test_export_paddle_inference_matches_dynamic(tiny: Dict[str, Any], tmp_path: Any) -> None:
    model = build_model(tiny["config"])
    assert not model.is_fitted
    model.load_fitted_state(tiny["model"].checkpoint_state(include_backbone=True))  # the random backbone too
    assert model.is_fitted
    x = tiny["test"]
    with paddle.no_grad():
        want_scores, want_maps = (t.numpy() for t in tiny["model"](paddle.to_tensor(x)))
    spec = [paddle.static.InputSpec([None, 3, 64, 64], "float32", "x")]
    static = paddle.jit.to_static(model, input_spec=spec, full_graph=True)
    prefix = str(tmp_path / "padim" / "model")
    paddle.jit.save(static, prefix)
    model_file = prefix + ".json" if os.path.isfile(prefix + ".json") else prefix + ".pdmodel"
    info = read_program_info(model_file)
    if info is not None:  # no interpolation ops: the graph may run under oneDNN
        assert engine_support(info["ops"])["onednn"], info["ops"]
    for mkldnn in (False, True):
        runner = create_paddle_predictor(model_file, prefix + ".pdiparams",
                                         PredictorOptions(enable_mkldnn=mkldnn, cpu_threads=1))
        outputs = runner.run(x)
        assert len(outputs) == 2
        scores, maps = (outputs[0], outputs[1]) if outputs[0].ndim == 1 else (outputs[1], outputs[0])
        assert maps.shape == (2, 64, 64)
        assert np.allclose(scores, want_scores, rtol=1e-5, atol=1e-6), mkldnn
        assert np.max(np.abs(maps - want_maps)) <= 1e-5 * np.max(np.abs(want_maps)), mkldnn


@pytest.mark.parametrize("size_in,size_out", [(16, 64), (8, 64), (64, 256), (7, 29), (10, 7)])
def test_resampling_equals_interpolate(size_in: int, size_out: int) -> None:
    values = np.random.default_rng(size_in).normal(size=(2, 1, size_in, size_in)).astype(np.float32)
    x = paddle.to_tensor(values)
    nearest = F.interpolate(x, size=[size_out, size_out], mode="nearest").numpy()[:, 0]
    index = nearest_indices(size_in, size_out)
    assert np.array_equal(values[:, 0][:, index][:, :, index], nearest)
    bilinear = F.interpolate(x, size=[size_out, size_out], mode="bilinear", align_corners=False).numpy()[:, 0]
    matrix = bilinear_matrix(size_in, size_out)
    assert np.max(np.abs(matrix @ values[:, 0] @ matrix.T - bilinear)) <= 2e-6 * np.max(np.abs(bilinear))
