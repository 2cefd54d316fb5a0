"""RD4AD: golden test against the official code's numbers, independent checks, export.

(a) ``../shared/golden/rd4ad_reference_v1.npz`` (see the README beside it): the official RD4AD code
(hq-deng/RD4AD) on rule-made Wide-ResNet-50-2 / OCBE / decoder weights and Magnetic Tile images. We
regenerate the 495 weights with numpy (gain 2), map the torch keys onto the backbone and the student, feed
the same inputs and compare at the README's tolerances: encoder, OCBE and decoder outputs, the level
maps, the anomaly maps and scores, the eval- and train-mode losses and the train-mode gradients
(skipped when the file is absent).
(b) On tiny random data: the loss and the level map equal numpy; resampling (align_corners=True) + blur
equal scipy.ndimage; an EfficientNet-Lite0 RD4AD builds (offline weights), mirrors the encoder's shapes,
is reproducible from its seed and trains through its :class:`TrainingSpec`.
(c) ``to_static(full_graph=True)`` + ``jit.save`` + Paddle Inference (oneDNN on and off) and
paddle2onnx + onnxruntime give the dynamic model's outputs.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Iterator

import numpy as np
import paddle
import pytest
from export_parity import assert_export_equals_dynamic  # tests/export_parity.py
from golden_rule import (  # tests/golden_rule.py (pytest puts tests/ on sys.path)
    BN_RENAME,
    l2_rel,
    rule_weights,
)
from golden_rule import max_rel as rel
from scipy.ndimage import gaussian_filter, map_coordinates

from kdad.backbones import build_backbone
from kdad.batchnorm import UnbiasedBatchNorm2D
from kdad.config import default_config
from kdad.methods.rd4ad import (
    BLUR_SIGMA,
    METHOD,
    TRAINING,
    RD4ADModel,
    build_model,
    level_map,
    loss_terms,
    rd4ad_loss,
    student_state_from_official,
)
from kdad.methods.rd4ad.networks import UNUSED_OFFICIAL_PREFIXES, bottleneck_width
from kdad.metrics import image_auroc
from kdad.registry import get_method

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "..", "shared", "golden", "rd4ad_reference_v1.npz")
LAYERS = ["layer1", "layer2", "layer3"]


# --- helpers ------------------------------------------------------------------------------------------

def max_abs(got: Any, expected: Any) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64))))


def image_norms(t: paddle.Tensor) -> np.ndarray:
    values = t.numpy().astype(np.float64)
    return np.linalg.norm(values.reshape(len(values), -1), axis=1)


def tiny_config(**overrides: Any) -> Dict[str, Any]:
    config = default_config()
    config.update({"method": "rd4ad", "backbone": "efficientnet_lite0", "backbone_pretrained": True,
                   "mvtec_img_size": 64, "seed": 5, "learning_rate": 0.005, "batch_size": 4})
    config.update(overrides)
    return config


# --- (a) golden -----------------------------------------------------------------------------------------

def compute_golden(ref: Any) -> Dict[str, Any]:
    """Everything the golden tests compare, computed once: the eval-mode pass, then the train-mode loss
    and its backward (the original training state)."""
    spec = [(str(key), tuple(int(d) for d in shape if d >= 0))
            for key, shape in zip(ref["weight_keys"], ref["weight_shapes"])]
    weights = rule_weights(spec, int(ref["weight_seed"]), float(ref["weight_gain"]))
    sha = hashlib.sha256(b"".join(weights[key].astype("<f4").tobytes() for key, _ in spec)).hexdigest()

    backbone = build_backbone("wide_resnet50_2", LAYERS, pretrained=False)
    with paddle.LazyGuard():  # every student value is overwritten below: skip drawing 80M random ones
        model = RD4ADModel(backbone, image_size=int(ref["image_size"]))
    encoder_state = {}
    for key, value in weights.items():
        if key.startswith("encoder."):
            head, name = key[len("encoder."):].rsplit(".", 1)
            encoder_state[f"{head}.{BN_RENAME.get(name, name)}"] = value
    student_state = student_state_from_official(weights)
    skipped = sorted(key for key in weights if key.startswith(UNUSED_OFFICIAL_PREFIXES))
    key_sets = (set(encoder_state) == set(backbone.state_dict()),
                set(student_state) == set(model.student.state_dict()))
    backbone.set_state_dict(encoder_state)
    model.student.set_state_dict(student_state)
    del weights, encoder_state, student_state

    images = ref["images"].astype(np.float32) / np.float32(255)
    x = paddle.to_tensor(images.transpose(0, 3, 1, 2))
    model.eval()
    out: Dict[str, Any] = {"sha": sha, "skipped": skipped, "key_sets": key_sets}
    with paddle.no_grad():
        readme_input = ((images - ref["mean_rgb"]) / ref["std_rgb"]).transpose(0, 3, 1, 2)
        out["input_error"] = float(np.max(np.abs(backbone.normalize(x).numpy() - readme_input)))
        teacher = model.encoder_features(x)
        bottleneck = model.student.bn(teacher)
        decoded = model.student.decoder(bottleneck)
        levels = model.level_maps(teacher, decoded)
        out["anomaly_maps"] = model.combine(levels)[1].numpy()
        out["loss_eval_batch"] = float(rd4ad_loss(teacher, decoded))
    for i in range(3):
        out[f"enc{i + 1}"], out[f"dec{i + 1}"] = teacher[i].numpy(), decoded[i].numpy()
        out[f"enc{i + 1}_norms"], out[f"dec{i + 1}_norms"] = image_norms(teacher[i]), image_norms(decoded[i])
        out[f"amap_native_l{i + 1}"] = levels[i].numpy()
    out["bn_out"], out["bn_out_norms"] = bottleneck.numpy(), image_norms(bottleneck)
    out["scores"] = out["anomaly_maps"].reshape(len(images), -1).max(axis=1)
    del decoded, bottleneck, levels

    model.train()  # encoder eval, bn + decoder train (BatchNorm batch statistics)
    out["backbone_training"] = model.backbone.training
    features = dict(zip(LAYERS, teacher))  # = TRAINING.teacher_features(model, x) (as the trainer's cache)
    student = TRAINING.student(model)
    terms = loss_terms(teacher, student(features))
    loss = terms[0] + terms[1] + terms[2]  # = TRAINING.loss (checked on the tiny model; one forward here)
    out["loss_train_terms"] = np.array([float(t) for t in terms])
    out["loss_train_batch"] = float(loss)
    loss.backward()
    out["grads"] = {name: 0.0 if p.grad is None else float(np.linalg.norm(p.grad.numpy().astype(np.float64)))
                    for name, p in student.named_parameters() if not p.stop_gradient}  # BN buffers are params
    return out


@pytest.fixture(scope="module")
def golden() -> Iterator[Dict[str, Any]]:
    if not os.path.isfile(GOLDEN):
        pytest.skip(f"RD4AD reference fixture not found at {os.path.normpath(GOLDEN)} "
                    "(../shared/golden is not part of the repository)")
    ref = np.load(GOLDEN)
    yield {"ref": ref, **compute_golden(ref)}


def test_golden_weights_and_keys(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    assert golden["sha"] == str(ref["weight_sha256"])
    assert len(ref["weight_keys"]) == 495
    assert golden["key_sets"] == (True, True)  # encoder.* -> backbone, bn.* + decoder.* -> student, 1:1
    # the only keys not loaded: the official OCBE's conv4/bn4, which its forward never uses
    assert golden["skipped"] == ["bn.bn4.bias", "bn.bn4.running_mean", "bn.bn4.running_var", "bn.bn4.weight",
                                 "bn.conv4.weight"]
    assert golden["input_error"] <= 1e-6  # README's input formula (bit-identical in practice)


def test_golden_features(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    for name in ("enc1", "enc2", "enc3", "dec1", "dec2", "dec3", "bn_out"):
        assert rel(golden[f"{name}_norms"], ref[f"{name}_norms"]) <= 1e-5, name
        assert l2_rel(golden[name][:, :8, :8, :8], ref[f"{name}_slice"]) <= 1e-4, name


def test_golden_maps_and_scores(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    for level in (1, 2, 3):
        assert max_abs(golden[f"amap_native_l{level}"], ref[f"amap_native_l{level}"]) <= 1e-5, level
    assert max_abs(golden["anomaly_maps"], ref["anomaly_maps"]) <= 1e-5
    assert max_abs(golden["scores"], ref["scores"]) <= 1e-5
    assert abs(image_auroc(ref["labels"], golden["scores"]) - float(ref["auroc"])) <= 1e-9


def test_golden_losses(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    assert rel(golden["loss_eval_batch"], ref["loss_eval_batch"]) <= 1e-4
    assert rel(golden["loss_train_batch"], ref["loss_train_batch"]) <= 1e-4
    assert rel(golden["loss_train_terms"], ref["loss_train_terms"]) <= 1e-4
    assert golden["backbone_training"] is False  # model.train() keeps the encoder in eval mode


def test_golden_gradients(golden: Dict[str, Any]) -> None:
    ref, grads = golden["ref"], golden["grads"]
    keys = [str(k) for k in ref["grad_param_keys"]]
    assert set(grads) == {k for k in keys if not k.startswith(UNUSED_OFFICIAL_PREFIXES)}
    got = np.array([grads.get(k, 0.0) for k in keys])
    want = ref["grad_norms_per_param"]
    assert all(want[i] == 0 for i, k in enumerate(keys) if k.startswith(UNUSED_OFFICIAL_PREFIXES))
    assert l2_rel(got, want) <= 3e-3
    in_bn = np.array([k.startswith("bn.") for k in keys])
    assert rel(np.linalg.norm(got), ref["grad_norm_total"]) <= 3e-3
    assert rel(np.linalg.norm(got[in_bn]), ref["grad_norm_bn"]) <= 3e-3
    assert rel(np.linalg.norm(got[~in_bn]), ref["grad_norm_decoder"]) <= 3e-3


# --- (b) independent checks ------------------------------------------------------------------------------

def test_loss_and_level_map_equal_numpy() -> None:
    rng = np.random.default_rng(0)
    shapes = [(3, 5, 8, 8), (3, 7, 4, 4), (3, 9, 2, 2)]
    teacher = [rng.normal(size=s).astype(np.float32) for s in shapes]
    student = [(t + rng.normal(size=t.shape) * 0.7).astype(np.float32) for t in teacher]
    student[2] *= np.float32(1e6)  # the scale of untrained decoders: cosines do not overflow
    t_pd, s_pd = [paddle.to_tensor(t) for t in teacher], [paddle.to_tensor(s) for s in student]

    def cos(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
        a, b = a.astype(np.float64), b.astype(np.float64)
        return (a * b).sum(axis) / (np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis))

    want_terms = [np.mean(1 - cos(t.reshape(3, -1), s.reshape(3, -1), 1)) for t, s in zip(teacher, student)]
    got_terms = [float(term) for term in loss_terms(t_pd, s_pd)]
    np.testing.assert_allclose(got_terms, want_terms, rtol=1e-5)
    assert float(rd4ad_loss(t_pd, s_pd)) == pytest.approx(sum(want_terms), rel=1e-5)
    for t, s, tp, sp in zip(teacher, student, t_pd, s_pd):
        np.testing.assert_allclose(level_map(tp, sp).numpy(), 1 - cos(t, s, 1), atol=1e-6)
    zero = paddle.zeros([1, 4, 2, 2])  # a zero vector has cosine 0 (norms clamped at eps), no NaN
    assert np.allclose(level_map(zero, zero).numpy(), 1.0)
    with pytest.raises(ValueError, match="same number"):
        loss_terms(t_pd, s_pd[:2])


@pytest.fixture(scope="module")
def tiny() -> Dict[str, Any]:
    config = tiny_config()
    model = build_model(config)
    model.eval()
    images = np.random.default_rng(1).uniform(0, 1, (3, 3, 64, 64)).astype(np.float32)
    return {"config": config, "model": model, "images": images}


def test_resize_and_blur_equal_scipy(tiny: Dict[str, Any]) -> None:
    model, size = tiny["model"], 64
    assert model.grid == [(16, 16), (8, 8), (4, 4)] and BLUR_SIGMA == 4.0
    rng = np.random.default_rng(2)
    levels = [rng.uniform(0, 2, (2, h, w)).astype(np.float32) for h, w in model.grid]
    raw, blurred = (t.numpy() for t in model.combine([paddle.to_tensor(level) for level in levels]))
    want_raw = np.zeros((2, size, size))
    for level in levels:  # F.interpolate(bilinear, align_corners=True): corner samples aligned
        h = level.shape[1]
        coords = np.arange(size) * (h - 1) / (size - 1)
        rows, cols = np.meshgrid(coords, coords, indexing="ij")
        want_raw += np.stack([map_coordinates(m.astype(np.float64), [rows, cols], order=1) for m in level])
    want = np.stack([gaussian_filter(m, sigma=4) for m in want_raw])  # mode 'reflect', truncate 4
    assert max_abs(raw, want_raw) <= 2e-6
    assert max_abs(blurred, want) <= 2e-6


def test_lite0_student_mirrors_the_encoder(tiny: Dict[str, Any]) -> None:
    model = tiny["model"]
    assert model.method == "rd4ad" and model.backbone_name == "efficientnet_lite0"
    channels = [model.backbone.channels(tap) for tap in LAYERS]
    assert channels == [24, 40, 112]
    x = paddle.to_tensor(tiny["images"])
    with paddle.no_grad():
        teacher = model.encoder_features(x)
        as_list = model.student(teacher)
        as_dict = model.student(dict(zip(LAYERS, teacher)))
    assert [list(t.shape) for t in as_list] == [list(t.shape) for t in teacher]
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(as_list, as_dict))
    state = model.student.state_dict()
    # the scaling rule: bn_layer 3*C3 -> 2*C3 (width C3), decoder stage widths out/2
    assert list(state["bn.bn_layer.0.conv1.weight"].shape) == [112, 336, 1, 1]
    assert list(state["bn.bn_layer.0.downsample.0.weight"].shape) == [224, 336, 1, 1]
    assert list(state["decoder.layer1.0.upsample.0.weight"].shape) == [224, 112, 2, 2]
    assert list(state["decoder.layer1.0.conv2.weight"].shape) == [56, 56, 2, 2]
    assert list(state["decoder.layer3.5.conv3.weight"].shape) == [24, 12, 1, 1]
    assert [bottleneck_width(c) for c in (1024, 512, 256)] == [512, 256, 128]  # = de_wide_resnet50_2
    assert not any(key.startswith(("bn.conv4", "bn.bn4")) for key in state)
    assert sum(key.startswith("decoder.layer3.") and key.endswith("conv1.weight") for key in state) == 6
    assert all(type(layer) is UnbiasedBatchNorm2D for layer in model.student.sublayers()
               if isinstance(layer, paddle.nn.BatchNorm2D))
    # checkpoints keep the student, not the backbone
    assert all(key.startswith("student.") for key in model.checkpoint_state(include_backbone=False))
    with paddle.no_grad():  # forward = the steps the golden test checks one by one
        scores, maps = model(x)
        want = model.combine(model.level_maps(teacher, as_list))[1].numpy()
    assert list(maps.shape) == [3, 64, 64] and np.array_equal(maps.numpy(), want)
    assert np.array_equal(scores.numpy(), want.max(axis=(1, 2)))
    with pytest.raises(ValueError, match="built for 64 px"):
        model(paddle.zeros([1, 3, 96, 96]))


def test_build_model_is_reproducible_and_checked(tiny: Dict[str, Any]) -> None:
    assert get_method("rd4ad") is METHOD
    assert METHOD.name == "rd4ad" and METHOD.training is TRAINING and METHOD.fit is None
    again = build_model(tiny["config"])
    first = tiny["model"].student.state_dict()
    assert all(np.array_equal(first[k].numpy(), v.numpy()) for k, v in again.student.state_dict().items())
    other = build_model(tiny_config(seed=6))
    assert not np.array_equal(other.student.state_dict()["bn.conv1.weight"].numpy(),
                              first["bn.conv1.weight"].numpy())
    # the official initialisation: Kaiming-normal fan_out for convs, torch's uniform for transposed convs
    w = again.student.state_dict()["bn.bn_layer.0.conv2.weight"].numpy()  # [112, 112, 3, 3]
    assert np.std(w) == pytest.approx(np.sqrt(2.0 / (112 * 9)), rel=0.05)
    u = again.student.state_dict()["decoder.layer1.0.upsample.0.weight"].numpy()  # [224, 112, 2, 2]
    assert np.abs(u).max() <= 1 / np.sqrt(112 * 4)
    assert np.std(u) == pytest.approx(1 / np.sqrt(3 * 448), rel=0.05)
    again.train()
    assert again.student.training and not again.backbone.training
    backbone = build_backbone("efficientnet_lite0", LAYERS, pretrained=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        RD4ADModel(backbone, image_size=80)
    with pytest.raises(ValueError, match="three encoder taps"):
        RD4ADModel(backbone, image_size=64, layers=["layer1", "layer2"])


def test_training_spec_steps_reduce_the_loss(tiny: Dict[str, Any]) -> None:
    model = build_model(tiny["config"])
    model.train()
    x = paddle.to_tensor(tiny["images"])
    features = TRAINING.teacher_features(model, x)
    assert sorted(features) == LAYERS and all(f.stop_gradient for f in features.values())
    student = TRAINING.student(model)
    assert student is model.student
    opt = TRAINING.optimizer(tiny["config"], student.parameters())
    assert isinstance(opt, paddle.optimizer.Adam)
    assert (opt._beta1, opt._beta2, opt.get_lr()) == (0.5, 0.999, 0.005)
    model.eval()  # the loss of the spec = rd4ad_loss of the taps and the student's outputs
    with paddle.no_grad():
        teacher = [features[tap] for tap in LAYERS]
        want = float(rd4ad_loss(teacher, student(teacher)))
        assert float(TRAINING.loss(model, student, x, features)) == want
    model.train()
    losses = []
    for _ in range(4):  # cached features: the encoder is not run again
        loss = TRAINING.loss(model, student, None, features)
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.backbone.parameters())


# --- (c) export -----------------------------------------------------------------------------------------

def test_export_paddle_inference_and_onnx_equal_dynamic(tiny: Dict[str, Any], tmp_path: Any) -> None:
    model, x = tiny["model"], tiny["images"]
    model.eval()
    assert_export_equals_dynamic(model, x, tmp_path / "rd4ad")
