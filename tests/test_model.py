"""Tests of the networks (VGG16 expert, cloner), the KDAD distance and the expert weight loading.

Expected tap indices, layer sequences and shapes are written out by hand from the paper's /
original code's description; the distance is checked against a numpy implementation written here.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from kdad.backbones.vgg import CLONER_CFG_A, CLONER_CFG_B
from kdad.config import load_config
from kdad.methods.kdad.cloner import Cloner
from kdad.methods.kdad.experts import VGG16Expert, build_expert
from kdad.methods.kdad.loss import per_image_distance, training_loss
from kdad.methods.kdad.model import KDADModel, build_model, check_taps_match

SIZE = 64
EXPERT_TAPS = [1, 4, 6, 9, 11, 13, 16, 18, 20, 23, 25, 27, 30]
CLONER_TAPS = [2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38]
# (channels, spatial size at 64 px) of each of the 13 taps
EXPERT_SHAPES = [(64, 64), (64, 32), (128, 32), (128, 16), (256, 16), (256, 16), (256, 8),
                 (512, 8), (512, 8), (512, 4), (512, 4), (512, 4), (512, 2)]
CLONER_B_SHAPES = [(16, 64), (16, 32), (16, 32), (128, 16), (16, 16), (16, 16), (256, 8),
                   (16, 8), (16, 8), (512, 4), (16, 4), (16, 4), (512, 2)]
# C conv, B BatchNorm, R ReLU, P max-pool
EXPERT_LAYERS = "CRCRP" "CRCRP" "CRCRCRP" "CRCRCRP" "CRCRCRP"
CLONER_LAYERS = "CBRCRP" "CBRCRP" "CBRCBRCRP" "CBRCBRCRP" "CBRCBRCRP"
CLONER_B_WIDTHS = [16, 16, 16, 128, 16, 16, 256, 16, 16, 512, 16, 16, 512]
VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def _kind(layer: nn.Layer) -> str:
    for cls, letter in ((nn.Conv2D, "C"), (nn.BatchNorm2D, "B"), (nn.ReLU, "R"), (nn.MaxPool2D, "P")):
        if isinstance(layer, cls):
            return letter
    return "?"


def _config(**overrides):
    values = {"pretrain": False, "mvtec_img_size": SIZE}
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture(scope="module")
def model() -> KDADModel:
    paddle.seed(7)
    return build_model(_config())


@pytest.fixture(scope="module")
def images() -> paddle.Tensor:
    rng = np.random.default_rng(0)
    return paddle.to_tensor(rng.uniform(0, 1, (3, 3, SIZE, SIZE)).astype(np.float32))


# ----------------------------------------------------------------------------- architecture


def test_expert_layers_taps_and_shapes(model: KDADModel, images: paddle.Tensor) -> None:
    expert = model.expert
    assert "".join(_kind(layer) for layer in expert.features) == EXPERT_LAYERS
    assert list(expert.taps) == EXPERT_TAPS
    convs = [layer for layer in expert.features if isinstance(layer, nn.Conv2D)]
    assert [c.weight.shape[0] for c in convs] == VGG16_WIDTHS
    assert all(c.bias is not None for c in convs)  # VGG16 convs have biases
    with paddle.no_grad():
        feats = expert(images)
    assert [list(f.shape) for f in feats] == [[3, c, s, s] for c, s in EXPERT_SHAPES]
    # the taps are post-ReLU or post-pool activations: never negative
    assert all(float(f.min()) >= 0 for f in feats)
    assert tuple(expert.spec.loss_taps) == (3, 6, 9, 12)
    assert tuple(expert.spec.score_taps) == (6, 9, 12)
    assert model.loss_taps == (3, 6, 9, 12) and model.score_taps == (6, 9, 12)


def test_cloner_b_layers_taps_and_shapes(model: KDADModel, images: paddle.Tensor) -> None:
    cloner = model.cloner
    assert cloner.cfg == [16, 16, "M", 16, 128, "M", 16, 16, 256, "M", 16, 16, 512, "M", 16, 16, 512, "M"]
    assert "".join(_kind(layer) for layer in cloner.features) == CLONER_LAYERS
    assert list(cloner.taps) == CLONER_TAPS
    with paddle.no_grad():
        feats = cloner(images)
    assert [list(f.shape) for f in feats] == [[3, c, s, s] for c, s in CLONER_B_SHAPES]
    # the loss and score taps mirror the expert's shapes
    for tap in (3, 6, 9, 12):
        assert CLONER_B_SHAPES[tap] == EXPERT_SHAPES[tap]


@pytest.mark.parametrize(("equal_size", "widths"), [(False, CLONER_B_WIDTHS), (True, VGG16_WIDTHS)])
def test_cloner_batchnorm_placement_and_no_bias(equal_size: bool, widths: List[int]) -> None:
    paddle.seed(1)
    cloner = build_model(_config(equal_network_size=equal_size)).cloner
    assert cloner.cfg == (CLONER_CFG_A if equal_size else CLONER_CFG_B)
    layers = list(cloner.features)
    assert "".join(_kind(layer) for layer in layers) == CLONER_LAYERS
    conv_index = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2D)]
    assert conv_index == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36]
    bn_index = [i for i, layer in enumerate(layers) if isinstance(layer, nn.BatchNorm2D)]
    assert bn_index == [1, 7, 13, 16, 22, 25, 31, 34]  # every conv not followed by a pool
    in_channels = 3
    for i, width in zip(conv_index, widths):
        conv = layers[i]
        assert conv.bias is None, f"conv {i} has a bias"
        assert list(conv.weight.shape) == [width, in_channels, 3, 3]
        if i + 1 in bn_index:
            assert list(layers[i + 1]._mean.shape) == [width]
        in_channels = width
    assert list(cloner.taps) == CLONER_TAPS
    # the state dict: conv weights (no bias) and BatchNorm affine parameters and running statistics
    expected = {f"features.{i}.weight" for i in conv_index}
    bn_names = ("weight", "bias", "_mean", "_variance")
    expected |= {f"features.{i}.{name}" for i in bn_index for name in bn_names}
    assert set(cloner.state_dict()) == expected


def test_use_bias_adds_zero_biases() -> None:
    cloner = Cloner(CLONER_CFG_B, use_bias=True)
    convs = [layer for layer in cloner.features if isinstance(layer, nn.Conv2D)]
    assert all(c.bias is not None and float(paddle.abs(c.bias).max()) == 0.0 for c in convs)


def _check_xavier(weight: np.ndarray) -> None:
    out_c, in_c, kh, kw = weight.shape
    bound = np.sqrt(6.0 / (in_c * kh * kw + out_c * kh * kw))
    w = np.abs(weight)
    assert w.max() <= bound * (1 + 1e-6)
    assert w.max() >= 0.9 * bound  # uses the full range (n >= 432: P(max < 0.9 bound) < 1e-19)
    # uniform on [-b, b]: standard deviation b / sqrt(3)
    assert abs(weight.std() / (bound / np.sqrt(3)) - 1) < 0.1
    assert abs(weight.mean()) < 0.1 * bound


@pytest.mark.parametrize("cfg", [CLONER_CFG_B, CLONER_CFG_A], ids=["B", "A"])
def test_cloner_xavier_uniform(cfg) -> None:
    paddle.seed(3)
    for layer in Cloner(cfg).features:
        if isinstance(layer, nn.Conv2D):
            _check_xavier(layer.weight.numpy())


def test_random_expert_is_xavier_uniform(model: KDADModel) -> None:
    for layer in model.expert.features:
        if isinstance(layer, nn.Conv2D):
            _check_xavier(layer.weight.numpy())
            assert float(paddle.abs(layer.bias).max()) == 0.0


def test_expert_frozen_and_stays_in_eval_mode(images: paddle.Tensor) -> None:
    paddle.seed(5)
    model = build_model(_config())
    assert all(p.stop_gradient for p in model.expert.parameters())
    trainable = [p for n, p in model.cloner.named_parameters() if not n.endswith(("_mean", "_variance"))]
    assert len(trainable) == 13 + 2 * 8  # conv weights, BatchNorm weights and biases
    assert all(not p.stop_gradient for p in trainable)
    model.train()
    assert model.training and model.cloner.training
    assert not model.expert.training
    assert not any(layer.training for layer in model.expert.sublayers())
    assert all(layer.training for layer in model.cloner.sublayers())
    loss = model.loss(images)
    loss.backward()
    assert all(p.grad is None for p in model.expert.parameters())
    assert all(p.grad is not None and float(paddle.abs(p.grad).sum()) > 0 for p in trainable)
    model.eval()
    assert not model.cloner.training and not model.expert.training


def test_check_taps_match_rejects_mismatched_cloner() -> None:
    expert = build_expert("vgg16", pretrain=False)
    check_taps_match(expert, Cloner(CLONER_CFG_B), SIZE)  # the paper's pair is fine
    wrong = list(CLONER_CFG_B)
    wrong[4] = 64  # tap 3 would have 64 channels instead of the expert's 128
    with pytest.raises(ValueError, match="tap 3"):
        check_taps_match(expert, Cloner(wrong), SIZE)


# ----------------------------------------------------------------------------- the distance


def np_distance(cloner: Sequence[np.ndarray], expert: Sequence[np.ndarray], taps, lamda: float,
                direction_only: bool = False) -> np.ndarray:
    """Per image: sum over taps of (1 - cos(flattened)) + lamda * mean squared error, float64."""
    n = cloner[0].shape[0]
    total = np.zeros(n)
    for tap in taps:
        c = cloner[tap].reshape(n, -1).astype(np.float64)
        e = expert[tap].reshape(n, -1).astype(np.float64)
        cos = (c * e).sum(axis=1) / (np.linalg.norm(c, axis=1) * np.linalg.norm(e, axis=1))
        total += 1.0 - cos
        if not direction_only:
            total += lamda * ((c - e) ** 2).mean(axis=1)
    return total


def np_original_training_loss(cloner, expert, taps, lamda, direction_only=False) -> float:
    """The original code's form: per tap, batch mean of (1 - cos) plus lamda * MSE over the whole batch."""
    n = cloner[0].shape[0]
    loss = 0.0
    for tap in taps:
        c = cloner[tap].reshape(n, -1).astype(np.float64)
        e = expert[tap].reshape(n, -1).astype(np.float64)
        cos = (c * e).sum(axis=1) / (np.linalg.norm(c, axis=1) * np.linalg.norm(e, axis=1))
        loss += np.mean(1.0 - cos)
        if not direction_only:
            loss += lamda * np.mean((c - e) ** 2)
    return float(loss)


def _random_taps(rng: np.random.Generator, n: int = 4) -> List[np.ndarray]:
    shapes = [(n, 3, 8, 8), (n, 5, 4, 4), (n, 2, 6, 6), (n, 7, 3, 3), (n, 4, 2, 2)]
    return [rng.normal(0.3, 1.0, s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize(
    ("taps", "lamda", "direction_only"),
    [((1, 3, 4), 0.5, False), ((0, 2), 0.01, False), ((1, 2, 3, 4), 2.0, False), ((1, 3, 4), 0.5, True)],
)
def test_distance_matches_numpy(taps, lamda: float, direction_only: bool) -> None:
    rng = np.random.default_rng(11)
    cloner, expert = _random_taps(rng), _random_taps(rng)
    expected = np_distance(cloner, expert, taps, lamda, direction_only)
    got = per_image_distance([paddle.to_tensor(a) for a in cloner], [paddle.to_tensor(a) for a in expert],
                             taps, lamda, direction_only).numpy()
    assert got.shape == (4,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    loss = float(training_loss([paddle.to_tensor(a) for a in cloner], [paddle.to_tensor(a) for a in expert],
                               taps, lamda, direction_only))
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(loss, np_original_training_loss(cloner, expert, taps, lamda, direction_only),
                               rtol=1e-5)


def test_distance_hand_worked_case() -> None:
    # one image, one tap: c = (1, 0), e = (1, 1): cos = 1/sqrt(2); MSE = (0 + 1) / 2 = 0.5
    c = paddle.to_tensor(np.array([[[[1.0]], [[0.0]]]], dtype=np.float32))
    e = paddle.to_tensor(np.array([[[[1.0]], [[1.0]]]], dtype=np.float32))
    got = per_image_distance([c], [e], (0,), lamda=0.5).numpy()
    np.testing.assert_allclose(got, [1 - 1 / np.sqrt(2) + 0.25], rtol=1e-6)
    got = per_image_distance([c], [e], (0,), lamda=0.5, direction_only=True).numpy()
    np.testing.assert_allclose(got, [1 - 1 / np.sqrt(2)], rtol=1e-6)
    # identical features: distance 0, whatever lamda
    np.testing.assert_allclose(per_image_distance([e], [e], (0,), lamda=3.0).numpy(), [0.0], atol=1e-6)


@pytest.mark.parametrize(("lamda", "direction_only"), [(0.5, False), (0.01, False), (0.5, True)])
def test_model_score_and_loss_match_numpy(model: KDADModel, images: paddle.Tensor, lamda: float,
                                          direction_only: bool) -> None:
    model = KDADModel(model.expert, model.cloner, lamda=lamda, direction_only=direction_only)
    model.eval()
    with paddle.no_grad():
        cloner = [f.numpy() for f in model.cloner(images)]
        expert = [f.numpy() for f in model.expert(images)]
        score = model(images).numpy()
        loss = float(model.loss(images))
    np.testing.assert_allclose(score, np_distance(cloner, expert, (6, 9, 12), lamda, direction_only),
                               rtol=1e-5)
    per_image_loss = np_distance(cloner, expert, (3, 6, 9, 12), lamda, direction_only)
    np.testing.assert_allclose(loss, per_image_loss.mean(), rtol=1e-5)
    # the loss uses tap 3 too: it is not the mean score
    assert abs(loss - score.mean()) > 1e-3


# ----------------------------------------------------------------------------- expert weights


def test_pretrain_with_missing_weights_explains_how_to_get_them(tmp_path: Path) -> None:
    missing = tmp_path / "weights" / "vgg16.pdparams"
    with pytest.raises(FileNotFoundError) as info:
        build_model(_config(pretrain=True, expert_weights=str(missing)))
    message = str(info.value)
    assert str(missing) in message
    assert "vgg16.pdparams" in message
    assert "paddle.vision.models.vgg16(pretrained=True)" in message  # how to get it
    assert "tools/convert_vgg16.py" in message
    assert "pretrain=False" in message


def _save_state(path: Path, state) -> str:
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(path))
    return str(path)


def test_load_imagenet_weights_wrong_keys(tmp_path: Path) -> None:
    path = _save_state(tmp_path / "resnet.pdparams", {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)})
    with pytest.raises(ValueError) as info:
        VGG16Expert().load_imagenet_weights(path)
    message = str(info.value)
    assert path in message and "not a VGG16 state dict" in message and "features.0.weight" in message


def test_load_imagenet_weights_wrong_shape(tmp_path: Path) -> None:
    state = {k: v.numpy() for k, v in VGG16Expert().state_dict().items()}
    state["features.28.weight"] = np.zeros((512, 512, 1, 1), np.float32)
    path = _save_state(tmp_path / "bad_shape.pdparams", state)
    with pytest.raises(ValueError) as info:
        VGG16Expert().load_imagenet_weights(path)
    message = str(info.value)
    assert "features.28.weight" in message and "[512, 512, 1, 1]" in message and "[512, 512, 3, 3]" in message


def test_load_imagenet_weights_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "vgg16.pdparams"
    path.write_bytes(b"this is not a paddle file")
    with pytest.raises(ValueError, match="cannot read VGG16 weights"):
        VGG16Expert().load_imagenet_weights(str(path))


def test_load_imagenet_weights_good_file(tmp_path: Path, images: paddle.Tensor) -> None:
    rng = np.random.default_rng(2)
    own = VGG16Expert().state_dict()
    state = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in own.items()}
    state["classifier.0.weight"] = np.zeros((10, 4), np.float32)  # classifier keys are ignored
    path = _save_state(tmp_path / "vgg16.pdparams", state)
    expert = build_expert("vgg16", pretrain=True, weights_path=path)
    for key, value in expert.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[key])
    assert all(p.stop_gradient for p in expert.parameters()) and not expert.training
