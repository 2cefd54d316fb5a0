"""PatchCore: faithfulness to anomalib's reference (golden fixture), independent checks of the nearest-
neighbour search and the coreset, and the exported model in Paddle Inference.

The golden part regenerates the fixture's Wide-ResNet50-2 weights from the README's numpy rule and
runs it at 256 px on the fixture's 16 training and 8 test images (the heavy part of this file); it is
skipped when ``<repo>/../shared/golden/patchcore_reference_v1.npz`` is absent.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import paddle
import pytest
from golden_rule import rule_weights  # tests/golden_rule.py (pytest puts tests/ on sys.path)

import kdad  # noqa: F401  (sets the CPU environment before paddle's kernels run)
from kdad.backbones import build_backbone
from kdad.config import default_config
from kdad.methods.patchcore import METHOD, PatchcoreModel, build_model
from kdad.methods.patchcore.coreset import (
    covering_radius,
    greedy_cells,
    greedy_exact,
    jl_min_dim,
    project,
    select_coreset,
    sparse_random_projection,
)
from kdad.methods.patchcore.fit import _InferenceEmbedder, patch_embeddings
from kdad.methods.patchcore.model import nearest_in_bank

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "..", "shared", "golden", "patchcore_reference_v1.npz")


# --- golden: anomalib 2.7.0's PatchcoreModel on rule weights -------------------------------------------

def l2_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(GOLDEN):
        pytest.skip(f"golden fixture {os.path.normpath(GOLDEN)} not present (it lives outside the repo)")
    ref = dict(np.load(GOLDEN))
    spec = [(str(k), tuple(int(d) for d in s if d >= 0))
            for k, s in zip(ref["weight_keys"], ref["weight_shapes"])]
    weights = rule_weights(spec, int(ref["weight_seed"]), float(ref["weight_gain"]))
    digest = hashlib.sha256()
    for key, _ in spec:
        digest.update(weights[key].astype("<f4").tobytes())
    backbone = build_backbone("wide_resnet50_2", ["layer2", "layer3"], pretrained=False)
    state = {k.replace("running_mean", "_mean").replace("running_var", "_variance"): v
             for k, v in weights.items()}
    assert set(state) == set(backbone.state_dict())
    backbone.set_state_dict(state)
    model = PatchcoreModel(backbone, ["layer2", "layer3"], image_size=256, blur_sigma=4.0,
                           num_neighbors=int(ref["num_neighbors"]))
    model.eval()
    x = ref["images"].astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)  # normalised inside
    train = ref["train_images"].astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)
    with paddle.no_grad():
        feats = {k: v.numpy() for k, v in backbone(paddle.to_tensor(x)).items()}
        embedding = model.embed(paddle.to_tensor(x))
    bank = patch_embeddings(model, train, batch_size=8, engine="dygraph")
    model.set_memory_bank(bank[ref["coreset_idx"]])
    with paddle.no_grad():
        out = {k: v.numpy() for k, v in model.score_embedding(embedding).items()}
        patch = paddle.to_tensor(out["patch_scores"]).unsqueeze(1)
        raw = paddle.nn.functional.interpolate(patch, size=[256, 256], mode="nearest").squeeze(1)
        out["anomaly_map_raw"] = raw.numpy()
        out["anomaly_map"] = model.anomaly_maps(paddle.to_tensor(out["patch_scores"])).numpy()
    return {"ref": ref, "sha": digest.hexdigest(), "feats": feats, "embedding": embedding.numpy(),
            "bank": bank, "out": out}


def test_golden_weights(golden):
    assert golden["sha"] == str(golden["ref"]["weight_sha256"])


def test_golden_features(golden):
    ref, emb = golden["ref"], golden["embedding"]
    for layer in ("layer2", "layer3"):
        feat = golden["feats"][layer]
        norms = np.sqrt((feat.astype(np.float64) ** 2).sum(axis=(2, 3)))
        assert l2_rel(norms, ref[f"feat_{layer}_chan_norms"]) < 1e-5
        part = ref[f"feat_{layer}_slice"]
        assert np.abs(feat[:2, :2] - part).max() < 1e-4 * np.abs(part).max()
    assert emb.shape == (8, 1536, 32, 32)
    norms = np.sqrt((emb.astype(np.float64) ** 2).sum(axis=(2, 3)))
    assert l2_rel(norms, ref["embedding_chan_norms"]) < 1e-5
    center = ref["embedding_at_center"]
    assert np.abs(emb[:, :, 16, 16] - center).max() < 1e-4 * np.abs(center).max()
    rows = np.sqrt((golden["bank"].astype(np.float64) ** 2).sum(axis=1))
    assert np.max(np.abs(rows - ref["bank_row_norms"]) / ref["bank_row_norms"]) < 1e-5


def test_golden_coreset(golden):
    ref = golden["ref"]
    assert jl_min_dim(golden["bank"].shape[0]) == ref["coreset_projection"].shape[0]
    assert int(golden["bank"].shape[0] * float(ref["coreset_ratio"])) == ref["coreset_idx"].shape[0]
    features = project(golden["bank"], ref["coreset_projection"])
    idx = greedy_exact(features, ref["coreset_idx"].shape[0], int(ref["coreset_start"]), overwrite=True)
    assert idx[0] == ref["coreset_start"] and len(set(idx.tolist())) == idx.shape[0]
    common = len(set(idx.tolist()) & set(ref["coreset_idx"].tolist())) / ref["coreset_idx"].shape[0]
    assert common >= 0.99, f"only {common:.1%} of the reference coreset selected"
    assert np.array_equal(idx[:100], ref["coreset_idx"][:100])  # near-ties only later


def test_golden_kcenter_standalone(golden):
    ref = golden["ref"]
    embedding = ref["kcg_embedding"].astype(np.float32)
    assert jl_min_dim(embedding.shape[0]) == ref["kcg_projection"].shape[0]
    n_select = int(embedding.shape[0] * float(ref["kcg_ratio"]))
    features = project(embedding, ref["kcg_projection"])
    np.testing.assert_array_equal(greedy_exact(features, n_select, int(ref["kcg_start"])), ref["kcg_idx"])
    lazy, cells = greedy_cells(features, n_select, int(ref["kcg_start"]), cell_size=128, probes=None)
    assert cells >= 8
    np.testing.assert_array_equal(lazy, ref["kcg_idx"])


def test_golden_scores_and_maps(golden):
    ref, out = golden["ref"], golden["out"]
    patch = out["patch_scores"]
    assert np.abs(patch - ref["patch_scores"]).max() < 0.02
    assert l2_rel(patch, ref["patch_scores"]) < 1e-3
    assert (out["nn_locations"] == ref["nn_locations"]).mean() >= 0.995
    for key in ("max_patch", "nn_index", "support_samples"):
        np.testing.assert_array_equal(out[key], ref[key], err_msg=key)
    support = ref["support_distances"]
    assert np.max(np.abs(out["support_distances"] - support) / support) < 1e-3
    one_minus = 1.0 - ref["reweight"].astype(np.float64)
    assert np.max(np.abs((1.0 - out["reweight"]) - one_minus) / one_minus) < 1e-2
    assert np.max(np.abs(out["scores"] - ref["scores"]) / ref["scores"]) < 5e-4
    assert np.abs(out["anomaly_map_raw"] - ref["anomaly_map_raw"]).max() < 0.02
    assert l2_rel(out["anomaly_map_raw"], ref["anomaly_map_raw"]) < 1e-3
    amap = ref["anomaly_map"]
    assert np.abs(out["anomaly_map"] - amap).max() < 2e-3 * amap.max()


# --- independent checks ----------------------------------------------------------------------------------

def test_nearest_in_bank_matches_sklearn():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    bank = rng.standard_normal((1000, 24)).astype(np.float32)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    x[:5] = bank[[3, 999, 500, 0, 77]]  # exact members: distance 0, in every chunk position
    dist_ref, idx_ref = NearestNeighbors(n_neighbors=1).fit(bank).kneighbors(x)
    for chunk in (1000, 256, 333, 7):
        dist, idx = nearest_in_bank(paddle.to_tensor(x), paddle.to_tensor(bank), chunk)
        assert (idx.numpy() == idx_ref[:, 0]).mean() == 1.0, chunk
        np.testing.assert_allclose(dist.numpy(), dist_ref[:, 0], atol=2e-3)


def test_greedy_exact_on_a_line():
    # from 0: the farthest is 20; then 10 (min distance 10; 11.75 has 8.25), 4 (4), 11.75 (1.75),
    # 2.5 (1.5), 1 (1). From 4: 20 (16), then 11.75 (7.75 > 6 for 10 and 4 for 0), then 0 (4)
    points = np.array([0, 1, 2.5, 4, 10, 11.75, 20], dtype=np.float32)[:, None]
    np.testing.assert_array_equal(greedy_exact(points, 7, 0), [0, 6, 4, 3, 5, 2, 1])
    np.testing.assert_array_equal(greedy_exact(points, 4, 3), [3, 6, 5, 0])


def clusters(rng: np.random.Generator, n_clusters: int, per: int, dim: int, spread: float) -> np.ndarray:
    centres = rng.standard_normal((n_clusters, dim)) * 10.0
    noise = spread * rng.standard_normal((n_clusters * per, dim))
    return (np.repeat(centres, per, axis=0) + noise).astype(np.float32)


def test_greedy_visits_every_cluster_first():
    rng = np.random.default_rng(1)
    points = clusters(rng, 5, 200, 8, 0.1)
    for idx in (greedy_exact(points, 5, 17), greedy_cells(points, 5, 17, cell_size=64, probes=6, seed=0)[0]):
        assert sorted(set((idx // 200).tolist())) == [0, 1, 2, 3, 4]


def test_lazy_cell_greedy_without_probe_limit_is_exact():
    rng = np.random.default_rng(5)
    points = np.concatenate([clusters(rng, 10, 150, 12, 2.0),
                             rng.standard_normal((1500, 12)).astype(np.float32)])
    reference = greedy_exact(points, 300, 7)
    lazy, cells = greedy_cells(points, 300, 7, cell_size=256, probes=None, seed=1)
    assert cells >= 12
    np.testing.assert_array_equal(lazy, reference)


def test_fast_coreset_radius_close_to_exact():
    rng = np.random.default_rng(2)
    points = np.concatenate([clusters(rng, 20, 300, 16, 1.0),
                             rng.standard_normal((2000, 16)).astype(np.float32)])
    n_select = points.shape[0] // 10
    exact = greedy_exact(points, n_select, 0)
    fast, cells = greedy_cells(points, n_select, 0, cell_size=256, probes=4, seed=0)
    assert cells >= 32 and len(set(fast.tolist())) == n_select and fast[0] == 0
    r_exact, r_fast = covering_radius(points, exact), covering_radius(points, fast)
    r_random = covering_radius(points, rng.choice(points.shape[0], n_select, replace=False))
    assert r_fast <= 1.15 * r_exact, (r_fast, r_exact)
    assert r_fast < r_random


def test_select_coreset_contract():
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((3000, 64)).astype(np.float32)
    picks = {}
    for method in ("bruteforce", "exact", "fast"):
        idx, info = select_coreset(emb, 0.1, seed=5, method=method, cell_size=512)
        again, _ = select_coreset(emb, 0.1, seed=5, method=method, cell_size=512)
        np.testing.assert_array_equal(idx, again)
        assert idx.shape == (300,) and len(set(idx.tolist())) == 300 and idx[0] == info["start"]
        assert info["bank_size"] == 300 and info["patches"] == 3000
        picks[method] = idx
    assert info["projection_dim"] == 64 and not info["projected"]  # fast: D < JL dimension (128)
    np.testing.assert_array_equal(picks["exact"], picks["bruteforce"])
    with pytest.raises(ValueError):
        select_coreset(emb, 0.1, seed=5, method="random")


def test_sparse_random_projection_distribution():
    proj = sparse_random_projection(1536, 239, np.random.default_rng(0))
    density = 1 / math.sqrt(1536)
    nonzero = proj != 0
    assert abs(nonzero.mean() - density) < 0.1 * density
    np.testing.assert_allclose(np.abs(proj[nonzero]), math.sqrt(1 / density) / math.sqrt(239), rtol=1e-6)
    assert abs((proj[nonzero] > 0).mean() - 0.5) < 0.05


# --- the product: fit, checkpoint round trip, export ----------------------------------------------------

@pytest.fixture(scope="module")
def small_fitted():
    config = default_config()
    config.update(method="patchcore", backbone="efficientnet_lite0", backbone_pretrained=True,
                  mvtec_img_size=64, coreset_ratio=0.25, seed=3)
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    base = 0.5 + 0.2 * np.sin(12 * xx)[None] * np.cos(9 * yy)[None]
    train = np.clip(base + 0.05 * rng.standard_normal((6, 3, 64, 64)), 0, 1).astype(np.float32)
    test = np.clip(base + 0.05 * rng.standard_normal((3, 3, 64, 64)), 0, 1).astype(np.float32)
    test[2, :, 20:36, 20:36] = 1.0  # a bright square: the defect
    model = METHOD.build_model(config)
    facts = METHOD.fit(model, train, config)
    return config, model, facts, train, test


def test_fit_facts_and_embedding_engines(small_fitted):
    config, model, facts, train, _ = small_fitted
    assert model.is_fitted and facts["patches"] == 6 * 8 * 8 and facts["bank_size"] == 96
    assert list(model.memory_bank.shape) == [96, 152]
    assert facts["feature_engine"] == "paddle_inference"  # no fall-back to the dynamic graph
    dyn = patch_embeddings(model, train[:2], batch_size=2, engine="dygraph")
    embedder = _InferenceEmbedder(model, 64, threads=1)
    try:
        pinf = embedder(train[:2])
    finally:
        embedder.close()
    assert l2_rel(pinf.transpose(0, 2, 3, 1).reshape(dyn.shape), dyn) < 1e-4


def test_scores_rank_the_defect_and_checkpoint_roundtrip(small_fitted):
    config, model, _, _, test = small_fitted
    model.eval()
    with paddle.no_grad():
        scores, maps = (t.numpy() for t in model(paddle.to_tensor(test)))
    assert scores.shape == (3,) and maps.shape == (3, 64, 64)
    assert scores[2] > scores[:2].max()
    other = build_model(config)  # placeholder bank of one row: the checkpoint's 96 rows must load
    other.load_fitted_state(model.checkpoint_state(include_backbone=False))
    other.eval()
    with paddle.no_grad():
        scores2, _ = other(paddle.to_tensor(test))
    np.testing.assert_allclose(scores2.numpy(), scores, rtol=1e-6)
    with pytest.raises(ValueError):
        other.load_fitted_state({"memory_bank": np.zeros((5, 10), np.float32)})


def test_export_to_paddle_inference_and_onnx_equals_dynamic(small_fitted):
    from kdad.deploy.runtime import PredictorOptions, create_paddle_predictor

    config, model, _, _, test = small_fitted
    model.bank_chunk = 40  # the exported graph scans the 96-row bank in 3 chunks (40, 40, 16)
    model.eval()
    with paddle.no_grad():
        scores, maps = (t.numpy() for t in model(paddle.to_tensor(test)))
    with tempfile.TemporaryDirectory() as folder:
        spec = [paddle.static.InputSpec([None, 3, 64, 64], "float32", "x")]
        static = paddle.jit.to_static(model, input_spec=spec, full_graph=True)
        paddle.jit.save(static, os.path.join(folder, "model"))
        model_file = os.path.join(folder, "model.json")
        if not os.path.isfile(model_file):
            model_file = os.path.join(folder, "model.pdmodel")
        runner = create_paddle_predictor(model_file, os.path.join(folder, "model.pdiparams"),
                                         PredictorOptions(enable_mkldnn=False, cpu_threads=1))
        for batch in (test, test[1:2]):
            exported_scores, exported_maps = runner.run(batch)
            ref_scores = scores if batch.shape[0] == 3 else scores[1:2]
            ref_maps = maps if batch.shape[0] == 3 else maps[1:2]
            np.testing.assert_allclose(exported_scores, ref_scores, rtol=1e-5)
            assert np.abs(exported_maps - ref_maps).max() <= 1e-5 * np.abs(ref_maps).max()
        # the same program through paddle2onnx and onnxruntime (the ONNX deployment path)
        onnx_file = os.path.join(folder, "model.onnx")
        command = [sys.executable, "-m", "paddle2onnx.command", "--model_dir", folder,
                   "--model_filename", os.path.basename(model_file), "--params_filename", "model.pdiparams",
                   "--save_file", onnx_file, "--opset_version", "13", "--optimize_tool", "None"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0 and os.path.isfile(onnx_file), (done.stdout + done.stderr)[-2000:]
        import onnxruntime

        session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
        onnx_scores, onnx_maps = session.run(None, {session.get_inputs()[0].name: test})
        np.testing.assert_allclose(onnx_scores, scores, rtol=1e-5)
        assert np.abs(onnx_maps - maps).max() <= 1e-5 * np.abs(maps).max()
