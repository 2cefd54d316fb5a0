"""STFPM: golden test against the official code's numbers, independent checks, export.

(a) ``../shared/golden/stfpm_reference_v1.npz`` (see the README beside it): github gdwang08/STFPM's
``main.py`` on rule-made ResNet18 teacher and student weights and Magnetic Tile images. We regenerate
both weight sets with numpy, feed the same inputs and compare at the README's tolerances: features,
layer maps, score and anomaly maps, scores, AUROC, the eval- and train-mode losses, the gradients,
and the maps after one official SGD step (skipped when the file is absent).
(b) On tiny random data: the loss and the map equal a numpy re-computation (scipy/OpenCV resampling),
``Momentum`` equals torch's SGD formula over two steps, an EfficientNet-Lite0 STFPM builds with a
student mirroring its teacher, the training spec trains the student only.
(c) ``to_static(full_graph=True)`` + ``jit.save`` + Paddle Inference (oneDNN on and off) and
paddle2onnx + onnxruntime give the dynamic outputs.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Iterator, List, Tuple

import cv2
import numpy as np
import paddle
import paddle.nn as nn
import pytest
from export_parity import assert_export_equals_dynamic  # tests/export_parity.py
from golden_rule import (  # tests/golden_rule.py (pytest puts tests/ on sys.path)
    l2_rel,
    max_abs_of_max,
    max_rel,
    paddle_key,
    rule_weights,
)
from golden_rule import max_rel as rel
from scipy import ndimage

from kdad.backbones import build_backbone
from kdad.batchnorm import UnbiasedBatchNorm2D
from kdad.config import default_config, load_config
from kdad.methods.stfpm import METHOD, TRAINING, STFPMModel, build_model, layer_distance, stfpm_loss
from kdad.methods.stfpm.loss import NORMALIZE_EPS
from kdad.methods.stfpm.model import DEFAULT_LAYERS
from kdad.methods.stfpm.train import SGD_MOMENTUM, SGD_WEIGHT_DECAY
from kdad.metrics import image_auroc
from kdad.registry import get_method

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "..", "shared", "golden", "stfpm_reference_v1.npz")


# --- helpers ------------------------------------------------------------------------------------------

def small_config(**overrides: Any) -> Dict[str, Any]:
    config = default_config()
    config.update({"method": "stfpm", "backbone": "resnet18", "backbone_pretrained": False, "layers": [],
                   "mvtec_img_size": 64, "seed": 7, "learning_rate": 0.4})
    config.update(overrides)
    return config


def chan_norms(features: np.ndarray) -> np.ndarray:
    return np.linalg.norm(features.astype(np.float64), axis=(2, 3))


# --- (a) golden -----------------------------------------------------------------------------------------

def regenerate(ref: Any, seed_key: str) -> Tuple[Dict[str, np.ndarray], str, np.ndarray]:
    """The rule's weights for ``seed_key``, their sha256 and per-tensor (sum, sum of squares)."""
    spec = [(str(key), tuple(int(d) for d in shape if d >= 0))
            for key, shape in zip(ref["weight_keys"], ref["weight_shapes"])]
    weights = rule_weights(spec, int(ref[seed_key]), float(ref["weight_gain"]))
    sha = hashlib.sha256(b"".join(weights[key].astype("<f4").tobytes() for key, _ in spec)).hexdigest()
    sums = np.array([[weights[key].astype(np.float64).sum(), np.square(weights[key].astype(np.float64)).sum()]
                     for key, _ in spec])
    return weights, sha, sums


@pytest.fixture(scope="module")
def golden() -> Iterator[Dict[str, Any]]:
    """Everything compared with the fixture, computed once: eval-mode features and maps, the losses,
    the train-mode gradients, and the maps after one step of the method's optimiser."""
    if not os.path.isfile(GOLDEN):
        pytest.skip(f"STFPM reference fixture not found at {os.path.normpath(GOLDEN)} "
                    "(../shared/golden is not part of the repository)")
    ref = np.load(GOLDEN)
    layers = [str(tap) for tap in ref["layers"]]
    teacher_w, teacher_sha, teacher_sums = regenerate(ref, "weight_seed")
    student_w, student_sha, student_sums = regenerate(ref, "student_weight_seed")
    teacher = build_backbone(str(ref["backbone"]), layers, pretrained=False)
    student = build_backbone(str(ref["backbone"]), layers, pretrained=False)
    model = STFPMModel(teacher, student, image_size=int(ref["image_size"]), layers=layers)
    keys = {}
    for net, weights in ((model.backbone, teacher_w), (model.student, student_w)):
        state = {paddle_key(key): value for key, value in weights.items()}
        keys[id(net)] = set(state) == set(net.state_dict())
        net.set_state_dict(state)
    x = paddle.to_tensor((ref["images"].astype(np.float32) / np.float32(255)).transpose(0, 3, 1, 2))

    out: Dict[str, Any] = {"ref": ref, "model": model, "keys_match": all(keys.values()),
                           "teacher_sha": teacher_sha, "student_sha": student_sha,
                           "teacher_sums": teacher_sums, "student_sums": student_sums}
    model.eval()
    with paddle.no_grad():
        normalised = model.backbone.normalize(x).numpy()
        t_feats, s_feats = model.features(x)
        layer_maps = model.layer_maps(t_feats, s_feats)
        score_map = model.score_map(layer_maps)
        anomaly_map = model.anomaly_map(score_map)
        out["loss_eval"] = float(stfpm_loss([t_feats[t] for t in layers], [s_feats[t] for t in layers]))
        forward_scores, forward_maps = model(x[:1])  # forward itself on 1 image (time)
    readme_input = ((ref["images"].astype(np.float32) / np.float32(255) - ref["mean_rgb"]) / ref["std_rgb"])
    out["input_error"] = float(np.max(np.abs(normalised - readme_input.transpose(0, 3, 1, 2))))
    for i, tap in enumerate(layers, start=1):
        out[f"teacher_layer{i}"] = t_feats[tap].numpy()
        out[f"student_layer{i}"] = s_feats[tap].numpy()
        out[f"layer_map_{i}"] = layer_maps[i - 1].numpy()
    out.update(score_map=score_map.numpy(), anomaly_map=anomaly_map.numpy(),
               forward_scores=forward_scores.numpy(), forward_maps=forward_maps.numpy())

    # train_val(): teacher eval, student train (batch statistics), one loss, backward, one SGD step
    model.train()
    out["modes"] = (model.backbone.training, model.student.training)
    teacher_features = TRAINING.teacher_features(model, x)
    loss = TRAINING.loss(model, TRAINING.student(model), x, teacher_features)
    loss.backward()
    out["loss_train"] = float(loss)
    params = dict(model.student.named_parameters())
    out["grad_norms"] = np.array([np.linalg.norm(params[str(key)].grad.numpy().astype(np.float64))
                                  for key in ref["grad_keys"]])
    out["grad_param_count"] = sum(1 for p in model.student.parameters() if not p.stop_gradient)
    optimizer = TRAINING.optimizer({"learning_rate": float(ref["sgd_lr"])}, model.student.parameters())
    optimizer.step()
    optimizer.clear_grad()
    model.eval()
    with paddle.no_grad():  # the teacher is unchanged: its eval-mode features above are reused
        out["score_map_after_step"] = model.score_map(model.layer_maps(t_feats, model.student(x))).numpy()
    yield out


def test_golden_weights_and_input(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    assert golden["teacher_sha"] == str(ref["weight_sha256"])
    assert golden["student_sha"] == str(ref["student_weight_sha256"])
    np.testing.assert_allclose(golden["teacher_sums"], ref["weight_checksums"], rtol=1e-9, atol=0)
    np.testing.assert_allclose(golden["student_sums"], ref["student_weight_checksums"], rtol=1e-9, atol=0)
    assert golden["keys_match"], "rule keys (renamed) != the backbones' keys"
    assert golden["input_error"] <= 1e-6  # the README's input formula (measured: bit-identical)


def test_golden_features(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    for role in ("teacher", "student"):
        for i in (1, 2, 3):
            got = golden[f"{role}_layer{i}"]
            assert l2_rel(chan_norms(got), ref[f"{role}_layer{i}_chan_norms"]) <= 1e-5, (role, i)
            assert max_abs_of_max(got[:2, :2], ref[f"{role}_layer{i}_slice"]) <= 1e-4, (role, i)


def test_golden_maps_and_scores(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    for i in (1, 2, 3):
        assert max_rel(golden[f"layer_map_{i}"], ref[f"layer_map_{i}"]) <= 1e-4, i
    assert max_rel(golden["score_map"], ref["score_map"]) <= 1e-4
    assert max_abs_of_max(golden["anomaly_map"], ref["anomaly_map"]) <= 1e-4
    scores = golden["anomaly_map"].reshape(8, -1).max(axis=1)
    assert max_rel(scores, ref["scores"]) <= 1e-4
    assert max_abs_of_max(golden["forward_maps"], ref["anomaly_map"][:1]) <= 1e-4
    assert max_rel(golden["forward_scores"], ref["scores"][:1]) <= 1e-4
    assert abs(image_auroc(ref["labels"], scores) - float(ref["auroc"])) <= 1e-9


def test_golden_losses_and_gradients(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    assert golden["modes"] == (False, True)  # teacher eval, student train
    assert rel(golden["loss_eval"], ref["loss_eval"]) <= 1e-5
    assert rel(golden["loss_train"], ref["loss_train"]) <= 1e-5
    assert golden["grad_param_count"] == len(ref["grad_keys"]) == 45
    assert max_rel(golden["grad_norms"], ref["grad_norms"]) <= 2e-3
    assert l2_rel(golden["grad_norms"], ref["grad_norms"]) <= 5e-4
    assert rel(np.linalg.norm(golden["grad_norms"]), ref["grad_norm"]) <= 1e-4


def test_golden_after_one_sgd_step(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    assert (float(ref["sgd_momentum"]), float(ref["sgd_weight_decay"])) == (SGD_MOMENTUM, SGD_WEIGHT_DECAY)
    assert max_rel(golden["score_map_after_step"], ref["score_map_after_step"]) <= 2e-3
    valid_err = golden["score_map_after_step"].astype(np.float64).mean()
    assert rel(valid_err, ref["valid_err_after_step"]) <= 5e-4


# --- (b) independent checks ------------------------------------------------------------------------------

def np_normalize(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.sqrt(np.sum(f * f, axis=1, keepdims=True)), NORMALIZE_EPS)


def np_layer_distance(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.sum((np_normalize(t) - np_normalize(s)) ** 2, axis=1)


def scipy_bilinear(maps: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Bilinear, half-pixel centres, clamped edges (F.interpolate align_corners=False) by scipy."""
    zoom = (1.0, size[0] / maps.shape[1], size[1] / maps.shape[2])
    return ndimage.zoom(maps, zoom, order=1, mode="nearest", grid_mode=True)


def test_loss_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    shapes = [(3, 5, 6, 6), (3, 7, 3, 3), (3, 4, 2, 2)]
    teacher = [rng.normal(size=shape) for shape in shapes]
    student = [rng.normal(size=shape) for shape in shapes]
    teacher[0][1, :, 2, 3] = 0.0  # an all-zero feature vector: F.normalize's eps leaves it 0
    student[1][0, :, 1, 1] = 1e-14  # norm below eps: divided by eps, not by its norm
    expected = sum(np_layer_distance(t, s).mean() for t, s in zip(teacher, student))
    as_tensors = [[paddle.to_tensor(a.astype(np.float32)) for a in group] for group in (teacher, student)]
    got = stfpm_loss(*as_tensors)
    assert got.shape == [] and rel(got, expected) <= 1e-6
    np.testing.assert_allclose(layer_distance(as_tensors[0][0], as_tensors[1][0]).numpy(),
                               np_layer_distance(teacher[0], student[0]), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="same number"):
        stfpm_loss(as_tensors[0], as_tensors[1][:2])


@pytest.fixture(scope="module")
def tiny() -> Dict[str, Any]:
    """A random-teacher ResNet18 STFPM at 64 px and 3 random images."""
    model = build_model(small_config())
    images = np.random.default_rng(1).uniform(0, 1, (3, 3, 64, 64)).astype(np.float32)
    return {"model": model, "images": images}


def test_maps_equal_numpy(tiny: Dict[str, Any]) -> None:
    model, images = tiny["model"], tiny["images"]
    x = paddle.to_tensor(images)
    with paddle.no_grad():
        teacher, student = model.features(x)
        layer_maps, score_map, anomaly_map = model.maps(x)
        scores, maps = model(x)
    grid = (teacher["layer1"].shape[2], teacher["layer1"].shape[3])
    assert model.grid == grid == (16, 16) and model.layers == ["layer1", "layer2", "layer3"]
    product = np.ones((3, *grid))
    for i, tap in enumerate(model.layers):
        native = np_layer_distance(teacher[tap].numpy().astype(np.float64),
                                   student[tap].numpy().astype(np.float64))
        np.testing.assert_allclose(layer_maps[i].numpy(), native, rtol=1e-4, atol=1e-7)
        product *= scipy_bilinear(native, grid)
    np.testing.assert_allclose(score_map.numpy(), product, rtol=1e-4, atol=1e-7)
    # main(): cv2.resize INTER_LINEAR of the float64 score map
    resized = np.stack([cv2.resize(m, (64, 64), interpolation=cv2.INTER_LINEAR) for m in product])
    assert max_abs_of_max(anomaly_map.numpy(), resized) <= 1e-5
    np.testing.assert_array_equal(maps.numpy(), anomaly_map.numpy())
    np.testing.assert_allclose(scores.numpy(), resized.reshape(3, -1).max(axis=1), rtol=1e-5)
    with pytest.raises(ValueError, match="built for 64 px"):
        model(paddle.zeros([1, 3, 32, 32]))


def test_momentum_equals_torch_sgd_formula() -> None:
    """Two steps of the method's optimiser = torch.optim.SGD(lr, momentum=0.9, weight_decay=1e-4):
    ``v = mu * v + g + wd * p; p -= lr * v`` (conv and BatchNorm parameters alike)."""
    paddle.seed(5)
    net = nn.Sequential(nn.Conv2D(2, 3, 3, bias_attr=False), nn.BatchNorm2D(3))
    optimizer = TRAINING.optimizer(small_config(learning_rate=0.4), net.parameters())
    params = optimizer._parameter_list
    assert len(params) == 3  # conv weight, BatchNorm weight and bias (not its statistics)
    lr, mu, wd = 0.4, SGD_MOMENTUM, SGD_WEIGHT_DECAY
    values = [p.numpy().astype(np.float64) for p in params]
    velocity = [np.zeros_like(v) for v in values]
    rng = np.random.default_rng(2)
    for _ in range(2):
        x = paddle.to_tensor(rng.normal(size=(4, 2, 5, 5)).astype(np.float32))
        (net(x) ** 2).mean().backward()
        grads = [p.grad.numpy().astype(np.float64) for p in params]
        optimizer.step()
        optimizer.clear_grad()
        for i, grad in enumerate(grads):
            velocity[i] = mu * velocity[i] + grad + wd * values[i]
            values[i] = values[i] - lr * velocity[i]
    for param, expected in zip(params, values):
        np.testing.assert_allclose(param.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_training_spec_trains_the_student_only(tiny: Dict[str, Any]) -> None:
    model = build_model(small_config())  # a fresh copy: this test updates it
    assert METHOD.name == "stfpm" and METHOD.training is TRAINING and METHOD.fit is None
    assert TRAINING.student(model) is model.student
    assert all(type(layer) is not nn.BatchNorm2D for layer in model.student.sublayers())
    # bn1, layer1 2x2, layer2 and layer3 2x2 + downsample: 15 BatchNorms, torch's running variance
    assert sum(type(layer) is UnbiasedBatchNorm2D for layer in model.student.sublayers()) == 15
    # reproducible from the seed; the random teacher differs from the student
    again = build_model(small_config())
    for key, value in model.student.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), again.student.state_dict()[key].numpy())
    assert not np.array_equal(model.student.conv1.weight.numpy(), model.backbone.conv1.weight.numpy())
    model.train()
    assert model.student.training and not model.backbone.training
    x = paddle.to_tensor(tiny["images"])
    teacher = TRAINING.teacher_features(model, x)
    assert sorted(teacher) == model.layers and all(t.stop_gradient for t in teacher.values())
    # the last BatchNorm sees 3 x 4 x 4 = 48 values per channel: biased and unbiased differ by 2 %
    bn = model.student.layer3[1].bn2
    seen: List[np.ndarray] = []
    hook = bn.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].numpy().astype(np.float64)))
    variance_before = bn._variance.numpy().astype(np.float64)
    loss = TRAINING.loss(model, model.student, x, teacher)
    hook.remove()
    # that train-mode forward moved the running variance as torch does (momentum 0.1, unbiased variance)
    unbiased = seen[0].transpose(1, 0, 2, 3).reshape(seen[0].shape[1], -1).var(axis=1, ddof=1)
    np.testing.assert_allclose(bn._variance.numpy(), 0.9 * variance_before + 0.1 * unbiased, rtol=1e-5)
    with paddle.no_grad():
        expected = stfpm_loss([teacher[t] for t in model.layers], [model.student(x)[t] for t in model.layers])
    assert rel(loss, expected) <= 1e-6
    teacher_before = {k: v.numpy().copy() for k, v in model.backbone.state_dict().items()}
    student_before = model.student.conv1.weight.numpy().copy()
    optimizer = TRAINING.optimizer(small_config(), model.student.parameters())
    loss.backward()
    assert len(model.trainable_parameters) == 45  # conv weights, BatchNorm weights and biases
    assert all(p.grad is not None for p in model.trainable_parameters)
    assert all(p.grad is None for p in model.backbone.parameters())
    optimizer.step()
    optimizer.clear_grad()
    for key, value in model.backbone.state_dict().items():  # teacher weights and BN statistics unchanged
        np.testing.assert_array_equal(value.numpy(), teacher_before[key])
    assert not np.array_equal(model.student.conv1.weight.numpy(), student_before)


def test_configs_and_registry() -> None:
    paper = load_config(os.path.join(REPO, "configs", "stfpm_resnet18.yaml"))
    assert (paper["method"], paper["backbone"]) == ("stfpm", "resnet18")
    assert paper["layers"] == list(DEFAULT_LAYERS)
    assert (paper["mvtec_img_size"], paper["batch_size"], paper["num_epochs"], paper["learning_rate"]) == \
        (256, 32, 100, 0.4)
    default = load_config(os.path.join(REPO, "configs", "stfpm.yaml"))
    assert {key: default[key] for key in ("mvtec_img_size", "batch_size", "num_epochs", "learning_rate")} == \
        {key: paper[key] for key in ("mvtec_img_size", "batch_size", "num_epochs", "learning_rate")}
    assert default["backbone"] == "efficientnet_lite0" and default["backbone_pretrained"]
    assert get_method("stfpm") is METHOD


def test_efficientnet_lite0_student_mirrors_teacher() -> None:
    """configs/stfpm.yaml (pretrained Lite0 teacher, offline) at 64 px."""
    config = load_config(os.path.join(REPO, "configs", "stfpm.yaml"), {"mvtec_img_size": 64})
    model = get_method(config["method"]).build_model(config)
    assert model.backbone_name == "efficientnet_lite0" and model.student.name == "efficientnet_lite0"
    assert model.student.taps == model.backbone.taps == ["layer1", "layer2", "layer3"]
    x = paddle.to_tensor(np.random.default_rng(3).uniform(0, 1, (2, 3, 64, 64)).astype(np.float32))
    with paddle.no_grad():
        teacher, student = model.features(x)
        scores, maps = model(x)
    for tap, channels, side in zip(model.layers, (24, 40, 112), (16, 8, 4)):
        assert teacher[tap].shape == student[tap].shape == [2, channels, side, side], tap
    assert scores.shape == [2] and maps.shape == [2, 64, 64] and model.grid == (16, 16)
    assert np.all(np.isfinite(maps.numpy())) and np.all(maps.numpy() >= 0)
    # the pretrained teacher is not the student; parameters no tap depends on (blocks after layer3, the
    # head) are frozen, every other student parameter trains
    stem = (model.student.net.stem.conv.weight.numpy(), model.backbone.net.stem.conv.weight.numpy())
    assert not np.array_equal(*stem)
    frozen = {name.split(".")[2] if name.startswith("net.blocks.") else name.split(".")[1]
              for name, p in model.student.named_parameters()
              if p.stop_gradient and not name.endswith(("._mean", "._variance"))}
    assert frozen == {"11", "12", "13", "14", "15", "head"}  # Lite0's layer3 is blocks.10
    model.train()
    loss = TRAINING.loss(model, model.student, x, TRAINING.teacher_features(model, x))
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters)
    model.student.clear_gradients()


def test_student_must_mirror_teacher() -> None:
    teacher = build_backbone("resnet18", ["layer1", "layer2"], pretrained=False)
    student = build_backbone("efficientnet_lite0", ["layer1", "layer2"], pretrained=False)
    with pytest.raises(ValueError, match="mirror"):
        STFPMModel(teacher, student, image_size=64)
    with pytest.raises(ValueError, match="not taps"):
        STFPMModel(teacher, build_backbone("resnet18", ["layer1"], pretrained=False), image_size=64)


# --- (c) export -----------------------------------------------------------------------------------------

def test_export_paddle_inference_and_onnx_equal_dynamic(tiny: Dict[str, Any], tmp_path: Any) -> None:
    model = build_model(small_config())
    model.load_fitted_state(tiny["model"].checkpoint_state(include_backbone=True))  # random teacher too
    model.eval()
    x = tiny["images"]
    assert_export_equals_dynamic(model, x, tmp_path / "stfpm")
