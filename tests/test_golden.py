"""Golden test: the original PyTorch KDAD implementation's numbers on fixed weights and 8 images.

``../shared/golden/kdad_reference_v1.npz`` (see the README beside it) holds float16 weights of a
VGG16 expert and a config-B cloner, preprocessed inputs and what the original code computed from
them. We load the same weights, feed the same inputs (eval mode) and compare with the README's
tolerances. Skipped when the file is absent.
"""

from __future__ import annotations

import os
from typing import Dict

import numpy as np
import paddle
import pytest
from sklearn.metrics import roc_auc_score

from kdad.backbones.vgg import CLONER_CFG_B
from kdad.methods.kdad.cloner import Cloner
from kdad.methods.kdad.experts import VGG16Expert
from kdad.methods.kdad.localization import input_gradients, localization_maps
from kdad.methods.kdad.loss import per_image_distance, training_loss
from kdad.methods.kdad.model import KDADModel
from kdad.metrics import image_auroc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "..", "shared", "golden", "kdad_reference_v1.npz")
BN_NAMES = {"weight": "weight", "bias": "bias", "running_mean": "_mean", "running_var": "_variance"}


def _rel(got, expected) -> np.ndarray:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return np.abs(got - expected) / np.abs(expected)


def _state(reference, prefix: str) -> Dict[str, np.ndarray]:
    """Torch keys ``<prefix>.features.N.<name>`` -> Paddle keys, float16 -> float32."""
    state = {}
    for key in reference.files:
        if key.startswith(prefix + "."):
            _, features, index, name = key.split(".")
            state[f"{features}.{index}.{BN_NAMES[name]}"] = reference[key].astype(np.float32)
    return state


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(GOLDEN):
        pytest.skip(f"golden reference '{GOLDEN}' is absent")
    reference = np.load(GOLDEN)
    expert, cloner = VGG16Expert(), Cloner(CLONER_CFG_B)
    for network, prefix in ((expert, "expert"), (cloner, "cloner")):
        state = _state(reference, prefix)
        own = network.state_dict()
        assert set(state) == set(own), f"{prefix}: keys differ: {sorted(set(state) ^ set(own))}"
        for key, value in own.items():
            assert list(value.shape) == list(state[key].shape), key
        network.set_state_dict(state)
        for key, value in network.state_dict().items():  # really loaded, exactly
            np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)
    expert.freeze()
    model = KDADModel(expert, cloner, lamda=float(reference["lamda"]))
    model.eval()
    x = paddle.to_tensor(reference["inputs"])
    assert model.score_taps == (6, 9, 12) and model.loss_taps == (3, 6, 9, 12)
    with paddle.no_grad():  # one forward pass of each network, reused by the checks below
        expert_feats, cloner_feats = expert(x), cloner(x)
        scores = per_image_distance(cloner_feats, expert_feats, model.score_taps, model.lamda).numpy()
        loss = float(training_loss(cloner_feats, expert_feats, model.loss_taps, model.lamda))
    assert not model.training and not cloner.training  # eval mode: BatchNorm uses running statistics
    return {"ref": reference, "model": model, "x": x, "expert_feats": [f.numpy() for f in expert_feats],
            "cloner_feats": [f.numpy() for f in cloner_feats], "scores": scores, "loss": loss}


def test_scores(golden) -> None:
    ref = golden["ref"]
    assert golden["scores"].shape == (8,)
    assert _rel(golden["scores"], ref["scores"]).max() <= 1e-4


def test_training_loss_on_the_batch(golden) -> None:
    assert _rel(golden["loss"], golden["ref"]["loss_train_batch"]) <= 1e-4


@pytest.mark.parametrize("network", ["expert", "cloner"])
def test_tap_norms(golden, network: str) -> None:
    feats = golden[f"{network}_feats"]
    assert len(feats) == 13
    norms = np.array([np.linalg.norm(f.astype(np.float64).ravel()) for f in feats])
    assert _rel(norms, golden["ref"][f"{network}_tap_norms"]).max() <= 1e-5


def test_image_auroc(golden) -> None:
    ref = golden["ref"]
    ours = image_auroc(ref["labels"], golden["scores"])
    # the original stores round(roc_auc, 4): compare at that precision (half a unit of the 4th decimal)
    assert abs(ours - float(ref["auroc"])) <= 0.5e-4 + 1e-12
    assert round(ours, 4) == pytest.approx(float(ref["auroc"]), abs=1e-12)
    assert ours == pytest.approx(roc_auc_score(ref["labels"], golden["scores"]), abs=1e-12)


def test_input_gradients(golden) -> None:
    """d score_i / d input_i through ``KDADModel.score`` (the scores come from the model itself)."""
    ref = golden["ref"]
    scores, grads = input_gradients(golden["model"], golden["x"])
    assert grads.shape == ref["input_grad"].shape
    assert _rel(scores, ref["scores"]).max() <= 1e-4
    expected = ref["input_grad"].astype(np.float64)
    l2_relative = np.linalg.norm(grads.astype(np.float64) - expected) / np.linalg.norm(expected)
    assert l2_relative <= 0.02


def test_gradient_maps(golden) -> None:
    ref = golden["ref"]
    scores, paper_maps, _ = localization_maps(golden["model"], golden["x"], "gradients")
    assert paper_maps.shape == ref["gradient_maps"].shape
    assert _rel(scores, ref["scores"]).max() <= 1e-4
    diff = np.abs(paper_maps.astype(np.float64) - ref["gradient_maps"])
    assert diff.mean() <= 1e-3
    assert diff.max() <= 0.02
