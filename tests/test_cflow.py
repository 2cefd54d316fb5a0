"""CFlow-AD: golden test against the official code's numbers, independent checks, export.

(a) ``../shared/golden/cflow_reference_v1.npz`` (see the README beside it): the official CFlow-AD code
(gudovskiy/cflow-ad with FrEIA) on rule-made weights (gain 1.0; the rule with FrEIA's branches:
:func:`rule_weights_freia`) and Magnetic Tile images. We regenerate the 457 weights, load them (the
encoder with reflect padding, the flows with transposed ``Linear`` weights), feed the same inputs and
compare at the README's tolerances: positional encodings, encoder taps, the flows' log-likelihoods,
log-determinants and ``|z|^2``, the training losses and gradient norms, the official set-level map and
scores, and the map lines alone on stored log-likelihoods (skipped when the file is absent).
(b) Independent checks: one flow equals a numpy float64 re-implementation of FrEIA's formula; the inverse
undoes the forward and the log-determinant equals ``log|det J|`` of a finite-difference Jacobian; the
positional encoding, ``get_logp`` and the loss equal numpy formulas; reflect padding equals Paddle's own
``padding_mode='reflect'``; an EfficientNet-Lite0 CFlow builds offline, its fixed-normaliser map equals
the official set-level map up to a constant when the reference maxima are the batch's; the trainer's
fiber sub-steps give exactly the official per-fiber-batch Adam updates; the learning-rate schedule.
(c) ``to_static(full_graph=True)`` + ``jit.save`` + Paddle Inference (oneDNN on and off) and
paddle2onnx + onnxruntime give the dynamic model's outputs.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
import yaml
from export_parity import assert_export_equals_dynamic  # tests/export_parity.py
from golden_rule import BN_RENAME, l2_rel  # tests/golden_rule.py
from golden_rule import max_rel as rel

from kdad.config import SCHEMA, default_config
from kdad.methods.cflow import (
    GCONST,
    METHOD,
    TRAINING,
    CFlowModel,
    CFlowSchedule,
    ConditionalFlow,
    build_encoder,
    build_model,
    fiber_batches,
    fibers,
    flows_state_from_official,
    get_logp,
    log_likelihood,
    nll,
    positionalencoding2d,
    reflect_convs,
    set_reference_maxima,
    use_reflect_padding,
)
from kdad.metrics import image_auroc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "..", "shared", "golden", "cflow_reference_v1.npz")
LAYERS = ["layer2", "layer3", "layer4"]


# --- helpers ------------------------------------------------------------------------------------------

def max_abs(got: Any, expected: Any) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64))))


def rule_weights_freia(spec: List[Tuple[str, Tuple[int, ...]]], seed: int, gain: float,
                       pool: Optional[ThreadPoolExecutor] = None) -> Dict[str, Any]:
    """The golden README's weight rule with FrEIA's branches (``global_scale``, ``global_offset``,
    ``w_perm`` from QR, ``w_perm_inv`` its transpose without a draw); without those keys it draws what
    ``tests/golden_rule.py``'s ``rule_weights`` draws. With a ``pool`` the QRs (the slow part; LAPACK on
    one thread: the same Q, 5x faster on a busy machine) run there and ``w_perm`` entries are futures
    until :func:`finish_rule_weights`; without, the result is complete."""
    from threadpoolctl import threadpool_limits

    def rotation(gaussian: np.ndarray) -> np.ndarray:
        with threadpool_limits(1, "blas"):
            q, r = np.linalg.qr(gaussian)
        return (q * np.where(np.diag(r) < 0, -1.0, 1.0)).astype(np.float16).astype(np.float32)

    if pool is None:
        with ThreadPoolExecutor(max_workers=1) as own:
            return finish_rule_weights(rule_weights_freia(spec, seed, gain, own), spec)
    rng = np.random.default_rng(seed)
    out: Dict[str, Any] = {}
    for key, shape in spec:
        name = key.rsplit(".", 1)[-1]
        if name == "w_perm_inv":  # no draw: filled in by finish_rule_weights
            continue
        if name == "w_perm":
            out[key] = pool.submit(rotation, rng.standard_normal(shape[:2]))
            continue
        if name == "running_var" or (name == "weight" and len(shape) == 1):
            values = rng.uniform(0.5, 1.5, shape)
        elif name in ("bias", "running_mean", "global_offset"):
            values = rng.normal(0.0, 0.1, shape)
        elif name == "global_scale":
            values = rng.uniform(8.0, 12.0, shape)
        else:
            values = rng.normal(0.0, np.sqrt(gain / int(np.prod(shape[1:]))), shape)
        out[key] = values.astype(np.float16).astype(np.float32)
    return out


def finish_rule_weights(out: Dict[str, Any],
                        spec: List[Tuple[str, Tuple[int, ...]]]) -> Dict[str, np.ndarray]:
    """Wait for the ``w_perm`` QRs and set each ``w_perm_inv`` to its transpose."""
    for key, shape in spec:
        if key.endswith(".w_perm"):
            out[key] = out[key].result().reshape(shape)
        elif key.endswith(".w_perm_inv"):
            out[key] = np.ascontiguousarray(out[key[:-4]].reshape(shape[:2]).T).reshape(shape)
    return out


def tiny_config(**overrides: Any) -> Dict[str, Any]:
    config = default_config()
    config.update({"method": "cflow", "backbone": "efficientnet_lite0", "backbone_pretrained": True,
                   "mvtec_img_size": 64, "seed": 5, "learning_rate": 2e-4, "batch_size": 2,
                   "num_epochs": 200, "fiber_batch": 256, "layers": []})
    config.update(overrides)
    return config


# --- (a) golden -----------------------------------------------------------------------------------------

def compute_golden(ref: Any) -> Dict[str, Any]:
    """Everything the golden tests compare, computed once (the network is freed afterwards)."""
    spec = [(str(key), tuple(int(d) for d in shape if d >= 0))
            for key, shape in zip(ref["weight_keys"], ref["weight_shapes"])]
    out: Dict[str, Any] = {}
    images = ref["images"].astype(np.float32) / np.float32(255)
    x = paddle.to_tensor(images.transpose(0, 3, 1, 2))
    readme_input = ((images - ref["mean_rgb"]) / ref["std_rgb"]).transpose(0, 3, 1, 2)
    with ThreadPoolExecutor(max_workers=1) as pool:  # the encoder runs while the w_perm QRs do
        weights = rule_weights_freia(spec, int(ref["weight_seed"]), float(ref["weight_gain"]), pool)
        backbone = build_encoder("wide_resnet50_2", LAYERS, pretrained=False)
        encoder_state = {}
        for key, value in weights.items():
            if key.startswith("encoder."):
                head, name = key[len("encoder."):].rsplit(".", 1)
                encoder_state[f"{head}.{BN_RENAME.get(name, name)}"] = value
        out["encoder_keys"] = set(encoder_state) == set(backbone.state_dict())
        backbone.set_state_dict(encoder_state)
        with paddle.no_grad():
            out["input_error"] = float(np.max(np.abs(backbone.normalize(x).numpy() - readme_input)))
            taps = backbone(x)  # = model.encoder_features(x) of the model built below
            features = [taps[tap] for tap in LAYERS]
        weights = finish_rule_weights(weights, spec)
    digest = hashlib.sha256()
    for key, _ in spec:
        digest.update(weights[key].astype("<f4").tobytes())
    checksums = np.zeros((len(spec), 2))
    for row, (key, _) in enumerate(spec):
        value = weights[key].astype(np.float64).ravel()
        checksums[row] = value.sum(), np.dot(value, value)
    out.update({"sha": digest.hexdigest(), "checksums": checksums})

    out["reflect_convs"] = reflect_convs(backbone)
    out["reflect_modes"] = {dict(backbone.named_sublayers())[name]._padding_mode
                            for name in out["reflect_convs"]}
    with paddle.LazyGuard():  # every flow value is overwritten below: skip drawing 170M random ones
        model = CFlowModel(backbone, image_size=int(ref["image_size"]), layers=LAYERS, permutation_seed=None)
    flow_state = flows_state_from_official(weights)
    out["key_sets"] = (out.pop("encoder_keys"), set(flow_state) == set(model.decoders.state_dict()),
                       len(encoder_state) + len(flow_state) == len(spec))
    out["trainable"] = sorted({name.rsplit(".", 1)[-1] if "subnet" not in name else "subnet"
                               for name, p in model.decoders.named_parameters() if not p.stop_gradient})
    model.decoders.set_state_dict(flow_state)
    block = model.decoders[2].module_list[7]
    key = "decoders.2.module_list.7."
    out["loaded_exact"] = (np.array_equal(block.w_perm_inv.numpy(), weights[key + "w_perm_inv"]) and
                           np.array_equal(block.subnet[2].weight.numpy().T, weights[key + "subnet.2.weight"]))
    del weights, encoder_state, flow_state

    model.eval()
    log_probs: List[paddle.Tensor] = []
    fiber_losses = []
    with paddle.no_grad():
        for index, (feature, (h, w)) in enumerate(zip(features, model.grid)):
            values = feature.numpy()
            flat = values.astype(np.float64).reshape(len(values), -1)
            out[f"enc_l{index}_norms"] = np.linalg.norm(flat, axis=1)
            out[f"enc_l{index}_slice"] = values[:, :8, :4, :4]
            out[f"pos_enc_l{index}"] = model.position_encoding(index).numpy().T.reshape(-1, h, w)
            z, log_jac_det = model.flow_outputs(index, feature)
            log_prob = log_likelihood(z, log_jac_det)
            out[f"log_prob_l{index}"] = log_prob.numpy().reshape(-1, h, w)
            out[f"log_jac_det_l{index}"] = log_jac_det.numpy().reshape(-1, h, w)
            out[f"z_sq_l{index}"] = paddle.sum(z ** 2, axis=-1).numpy().reshape(-1, h, w)
            losses = nll(log_prob).numpy().astype(np.float64).ravel()
            out[f"train_loss_l{index}"] = float(losses.mean())
            fiber_losses.append(losses)
            log_probs.append(log_prob.reshape([-1, h, w]))
        out["train_loss"] = float(np.concatenate(fiber_losses).sum() / sum(len(v) for v in fiber_losses))
        # the official set-level map, in float64 as the original
        as_double = [lp.astype("float64") for lp in log_probs]
        maxima = [paddle.max(lp) for lp in as_double]
        out["test_log_prob_max"] = np.array([float(m) for m in maxima])
        for index, prob in enumerate(model.probabilities(as_double, maxima)):
            out[f"test_prob_l{index}"] = prob.numpy()
        score_label, super_mask = model.set_level_maps(as_double)
        out["score_label"], out["super_mask"] = score_label.numpy(), super_mask.numpy()
        # the exportable map with the reference maxima set to this set's: the official map + a constant
        model.log_prob_max.set_value(out["test_log_prob_max"].astype(np.float32))
        fixed_scores, fixed_maps = model.anomaly_maps(log_probs)
        score_map_max = float(paddle.max(model.probability_sum(as_double, maxima)))
        out["fixed_maps"], out["fixed_scores"] = fixed_maps.numpy(), fixed_scores.numpy()
        out["fixed_offset"] = len(LAYERS) - score_map_max
        # the map lines alone on the stored log-likelihoods
        stored = [paddle.to_tensor(ref[f"mapcheck_log_prob_l{i}"].astype(np.float64)) for i in range(3)]
        mapcheck_label, mapcheck_mask = model.set_level_maps(stored)
        out["mapcheck_score_label"] = mapcheck_label.numpy()
        out["mapcheck_super_mask"] = mapcheck_mask.numpy()
    # gradient of the mean loss over the first fiber batch (order (image, row, column)) per decoder
    for index, feature in enumerate(features):
        count = int(ref["fiber_batch"])
        e = fibers(feature)[:count]
        c = paddle.tile(model.position_encoding(index), [feature.shape[0], 1])[:count]
        z, log_jac_det = model.decoders(index, e, c)
        paddle.mean(nll(log_likelihood(z, log_jac_det))).backward()
        grads = [p.grad.numpy().astype(np.float64) for p in model.decoders[index].parameters()
                 if not p.stop_gradient and p.grad is not None]
        out[f"grad_norm_fib0_l{index}"] = float(np.sqrt(sum(np.square(g).sum() for g in grads)))
        out[f"grad_count_l{index}"] = len(grads)
        model.decoders.clear_gradients()
    return out


@pytest.fixture(scope="module")
def golden() -> Iterator[Dict[str, Any]]:
    if not os.path.isfile(GOLDEN):
        pytest.skip(f"CFlow-AD reference fixture not found at {os.path.normpath(GOLDEN)} "
                    "(../shared/golden is not part of the repository)")
    ref = np.load(GOLDEN)
    yield {"ref": ref, **compute_golden(ref)}


def test_golden_weights_and_keys(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    assert len(ref["weight_keys"]) == 457 and float(ref["weight_gain"]) == 1.0
    assert golden["sha"] == str(ref["weight_sha256"])
    np.testing.assert_allclose(golden["checksums"], ref["weight_checksums"], rtol=1e-9, atol=1e-9)
    assert golden["key_sets"] == (True, True, True)  # encoder.* -> backbone, decoders.* -> flows, 1:1
    assert golden["loaded_exact"]  # w_perm_inv as given, Linear weights transposed
    assert golden["trainable"] == ["global_offset", "global_scale", "subnet"]  # w_perm(_inv): buffers
    assert golden["input_error"] <= 1e-6
    # cflow's WRN50-2: conv1 and the 3x3 conv of each of the 16 bottlenecks pad by reflection
    assert len(golden["reflect_convs"]) == 17 and golden["reflect_modes"] == {"reflect"}
    assert golden["reflect_convs"][0] == "conv1"
    assert all(name.endswith(".conv2") for name in golden["reflect_convs"][1:])
    assert list(ref["pool_dims"]) == [512, 1024, 2048] and float(ref["clamp_alpha"]) == 1.9
    assert int(ref["condition_vec"]) == 128 and int(ref["coupling_blocks"]) == 8


def test_golden_encoder_and_positional_encoding(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    for i in range(3):
        assert max_abs(golden[f"pos_enc_l{i}"], ref[f"pos_enc_l{i}"]) <= 1e-6, i
        assert rel(golden[f"enc_l{i}_norms"], ref[f"enc_l{i}_norms"]) <= 1e-5, i
        assert l2_rel(golden[f"enc_l{i}_slice"], ref[f"enc_l{i}_slice"]) <= 1e-4, i


def test_golden_flows(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    for i in range(3):
        for name in ("log_prob", "log_jac_det", "z_sq"):
            assert rel(golden[f"{name}_l{i}"], ref[f"{name}_l{i}"]) <= 1e-4, (name, i)


def test_golden_losses_and_gradients(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    for i in range(3):
        assert rel(golden[f"train_loss_l{i}"], ref[f"train_loss_l{i}"]) <= 1e-5, i
        assert rel(golden[f"grad_norm_fib0_l{i}"], ref[f"grad_norm_fib0_l{i}"]) <= 1e-4, i
        assert golden[f"grad_count_l{i}"] == 8 * 6  # global_scale, global_offset, 2x(weight, bias) per block
    assert rel(golden["train_loss"], ref["train_loss"]) <= 1e-5


def test_golden_maps_and_scores(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    assert rel(golden["test_log_prob_max"], ref["test_log_prob_max"]) <= 1e-5
    for i in range(3):
        assert max_abs(golden[f"test_prob_l{i}"], ref[f"test_prob_l{i}"]) <= 1e-5, i
    assert max_abs(golden["super_mask"], ref["super_mask"]) <= 2e-5
    assert max_abs(golden["score_label"], ref["score_label"]) <= 1e-5
    assert abs(image_auroc(ref["labels"], golden["score_label"]) - float(ref["auroc"])) <= 1e-9
    # the exported model's map (fixed maxima = this set's) is the official map plus a constant
    assert max_abs(golden["fixed_maps"] - golden["fixed_offset"], ref["super_mask"]) <= 5e-5
    assert max_abs(golden["fixed_scores"] - golden["fixed_offset"], ref["score_label"]) <= 5e-5


def test_golden_map_lines_on_stored_log_likelihoods(golden: Dict[str, Any]) -> None:
    ref = golden["ref"]
    assert max_abs(golden["mapcheck_super_mask"], ref["mapcheck_super_mask"]) <= 1e-6
    assert max_abs(golden["mapcheck_score_label"], ref["mapcheck_score_label"]) <= 1e-6


# --- (b) independent checks ------------------------------------------------------------------------------

def randomise_flow(flow: ConditionalFlow, seed: int) -> None:
    """Non-trivial values for every parameter (global scales away from 1, offsets, subnets)."""
    rng = np.random.default_rng(seed)
    for name, p in flow.named_parameters():
        if name.endswith("global_scale"):  # g in [0.8, 1.2], as the golden rule
            value = rng.uniform(8.0, 12.0, p.shape)
        elif name.endswith("global_offset"):
            value = rng.normal(0.0, 0.2, p.shape)
        else:  # subnets 3x their initial scale: couplings far from the identity
            value = rng.normal(0.0, 3.0 / math.sqrt(3 * p.shape[0]), p.shape)
        p.set_value(value.astype(p.numpy().dtype))


def numpy_flow(flow: ConditionalFlow, x: np.ndarray, c: np.ndarray,
               clamp: float = 1.9) -> Tuple[np.ndarray, np.ndarray]:
    """FrEIA's AllInOneBlock sequence as the golden README spells it, in numpy float64."""
    x = x.astype(np.float64)
    log_det = np.zeros(len(x))
    for block in flow.module_list:
        get = lambda t: t.numpy().astype(np.float64)  # noqa: E731
        channels = x.shape[1]
        x1, x2 = x[:, :channels - channels // 2], x[:, channels - channels // 2:]
        pre = np.concatenate([x1, c], 1) @ get(block.subnet[0].weight) + get(block.subnet[0].bias)
        hidden = np.maximum(pre, 0)
        a = 0.1 * (hidden @ get(block.subnet[2].weight) + get(block.subnet[2].bias))
        s = clamp * np.tanh(a[:, :channels // 2])
        x2 = x2 * np.exp(s) + a[:, channels // 2:]
        g = 0.1 * 2.0 * np.log1p(np.exp(get(block.global_scale) / 2.0))
        x = (np.concatenate([x1, x2], 1) * g + get(block.global_offset)) @ get(block.w_perm).T
        log_det = log_det + s.sum(1) + np.log(g).sum()
    return x, log_det


@pytest.mark.parametrize("channels", [6, 7])
def test_flow_equals_numpy_formula(channels: int) -> None:
    paddle.seed(0)
    flow = ConditionalFlow(channels, condition_channels=4, blocks=3, rng=np.random.default_rng(1))
    randomise_flow(flow, 2)
    rng = np.random.default_rng(3)
    x, c = rng.normal(size=(50, channels)).astype(np.float32), rng.normal(size=(50, 4)).astype(np.float32)
    z, log_det = flow(paddle.to_tensor(x), paddle.to_tensor(c))
    want_z, want_log_det = numpy_flow(flow, x, c)
    assert max_abs(z.numpy(), want_z) <= 1e-5 * np.abs(want_z).max()
    assert max_abs(log_det.numpy(), want_log_det) <= 1e-5 * np.abs(want_log_det).max()
    # leading dimensions are free: [N, H*W, C] gives the same per-fiber values
    z3, log_det3 = flow(paddle.to_tensor(x.reshape(5, 10, channels)), paddle.to_tensor(c.reshape(5, 10, 4)))
    assert np.allclose(z3.numpy().reshape(50, channels), z.numpy(), atol=1e-6)
    assert np.allclose(log_det3.numpy().ravel(), log_det.numpy(), atol=1e-6)
    # FrEIA's initial global_scale gives g = 1; w_perm is a rotation, w_perm_inv its transpose
    fresh = ConditionalFlow(channels, condition_channels=4, blocks=2, rng=np.random.default_rng(4))
    block = fresh.module_list[0]
    assert np.allclose(block.scale().numpy(), 1.0, atol=1e-6)
    w = block.w_perm.numpy().astype(np.float64)
    assert np.allclose(w @ w.T, np.eye(channels), atol=1e-6)
    assert np.linalg.det(w) == pytest.approx(1.0, abs=1e-5)  # special_ortho_group: a rotation
    assert np.array_equal(block.w_perm_inv.numpy(), block.w_perm.numpy().T)
    assert not np.array_equal(fresh.module_list[1].w_perm.numpy(), w.astype(np.float32))
    assert all(p.stop_gradient is False for p in fresh.parameters())
    assert sorted(block.state_dict()) == ["global_offset", "global_scale", "subnet.0.bias", "subnet.0.weight",
                                          "subnet.2.bias", "subnet.2.weight", "w_perm", "w_perm_inv"]


@pytest.mark.parametrize("channels", [6, 7])
def test_flow_inverse_and_log_determinant(channels: int) -> None:
    rng = np.random.default_rng(10 + channels)
    x = rng.normal(size=(4, channels)).astype(np.float32)
    c = rng.normal(size=(4, 4)).astype(np.float32)
    paddle.seed(1)
    flow = ConditionalFlow(channels, condition_channels=4, blocks=8, rng=np.random.default_rng(2))
    randomise_flow(flow, 5)
    z, log_det = flow(paddle.to_tensor(x), paddle.to_tensor(c))
    back, inverse_log_det = flow.inverse(z, paddle.to_tensor(c))
    assert max_abs(back.numpy(), x) <= 1e-5
    assert max_abs(inverse_log_det.numpy(), -log_det.numpy()) <= 1e-4

    # the same flow in float64 (exact rotations; the float32 flow holds them rounded, so its inverse is
    # exact only to ~1e-7, as FrEIA's): log|det dz/dx| against a central finite-difference Jacobian
    default = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        flow64 = ConditionalFlow(channels, condition_channels=4, blocks=8, rng=np.random.default_rng(2))
    finally:
        paddle.set_default_dtype(default)
    randomise_flow(flow64, 5)
    assert flow64.module_list[0].w_perm.dtype == paddle.float64
    assert max_abs(flow64.module_list[3].w_perm.numpy(), flow.module_list[3].w_perm.numpy()) <= 1e-7
    x64, c64 = paddle.to_tensor(x.astype(np.float64)), paddle.to_tensor(c.astype(np.float64))
    log_det64 = flow64(x64, c64)[1].numpy()
    step = 1e-6
    for i in range(len(x)):
        columns = []
        for j in range(channels):
            offset = np.zeros((1, channels))
            offset[0, j] = step
            plus = flow64(paddle.to_tensor(x[i:i + 1].astype(np.float64) + offset), c64[i:i + 1])[0].numpy()
            minus = flow64(paddle.to_tensor(x[i:i + 1].astype(np.float64) - offset), c64[i:i + 1])[0].numpy()
            columns.append((plus - minus)[0] / (2 * step))
        sign, numeric = np.linalg.slogdet(np.stack(columns, axis=1))
        assert sign != 0 and abs(numeric - log_det64[i]) <= 1e-6, (i, numeric, log_det64[i])
    assert max_abs(log_det64, log_det.numpy()) <= 1e-4
    back64 = flow64.inverse(*flow64(x64, c64)[:1], c64)[0].numpy()
    assert max_abs(back64, x) <= 1e-12


def test_positional_encoding_and_formulas_equal_numpy() -> None:
    channels, height, width = 16, 5, 7
    want = np.zeros((channels, height, width))
    quarter = channels // 4
    for k in range(quarter):  # frequency k: 10000^(-2k / (D/2))
        freq = 10000.0 ** (-2.0 * k / (channels // 2))
        for y in range(height):
            for x in range(width):
                want[2 * k, y, x] = math.sin(x * freq)
                want[2 * k + 1, y, x] = math.cos(x * freq)
                want[channels // 2 + 2 * k, y, x] = math.sin(y * freq)
                want[channels // 2 + 2 * k + 1, y, x] = math.cos(y * freq)
    got = positionalencoding2d(channels, height, width)
    assert got.dtype == np.float32 and got.shape == (16, 5, 7)
    assert max_abs(got, want) <= 1e-6
    assert max_abs(positionalencoding2d(128, 32, 32)[:, 3, 9], positionalencoding2d(128, 8, 16)[:, 3, 9]) == 0
    with pytest.raises(ValueError, match="multiple of 4"):
        positionalencoding2d(6, 2, 2)

    rng = np.random.default_rng(0)
    z, log_det = rng.normal(size=(9, 5)), rng.normal(size=9)
    logp = get_logp(5, paddle.to_tensor(z), paddle.to_tensor(log_det)).numpy()
    want_logp = 5 * np.log(1 / np.sqrt(2 * np.pi)) - 0.5 * (z ** 2).sum(1) + log_det
    assert GCONST == pytest.approx(-0.5 * math.log(2 * math.pi), abs=1e-16)
    assert max_abs(logp, want_logp) <= 1e-12
    per_dimension = log_likelihood(paddle.to_tensor(z), paddle.to_tensor(log_det)).numpy()
    assert max_abs(per_dimension, want_logp / 5) <= 1e-12
    values = np.array([-60.0, -3.0, 0.0, 2.5, 40.0])
    assert max_abs(nll(paddle.to_tensor(values)).numpy(), np.logaddexp(0, -values)) <= 1e-12
    features = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # fibers ordered (image, row, column)
    assert np.array_equal(fibers(paddle.to_tensor(features)).numpy(),
                          features.transpose(0, 2, 3, 1).reshape(-1, 3))


def test_reflect_padding_equals_paddle_reflect_conv() -> None:
    paddle.seed(3)
    conv = paddle.nn.Conv2D(3, 4, 3, stride=2, padding=1, bias_attr=False)
    reference = paddle.nn.Conv2D(3, 4, 3, stride=2, padding=1, padding_mode="reflect", bias_attr=False)
    reference.weight.set_value(conv.weight.numpy())
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(2, 3, 9, 9)).astype(np.float32))
    zero_padded = conv(x).numpy()
    use_reflect_padding(conv)
    assert np.array_equal(conv(x).numpy(), reference(x).numpy())
    assert not np.allclose(zero_padded, reference(x).numpy())
    manual = F.conv2d(F.pad(x, [1, 1, 1, 1], mode="reflect"), conv.weight, stride=2)
    assert np.allclose(conv(x).numpy(), manual.numpy(), atol=1e-6)
    encoder = build_encoder("resnet18", ["layer2"], pretrained=False)  # conv1 + 2x2 BasicBlocks x 2 convs
    names = reflect_convs(encoder)
    assert names == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                     "layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2"]
    layers = dict(encoder.named_sublayers())
    assert all(layers[name]._padding_mode == "reflect" for name in names)
    assert layers["layer2.0.downsample.0"]._padding_mode == "zeros"
    lite = build_encoder("efficientnet_lite0", ["layer2"], pretrained=True)  # used as it is
    convs = [layer for layer in lite.sublayers() if isinstance(layer, paddle.nn.Conv2D)]
    assert convs and all(layer._padding_mode == "zeros" for layer in convs)


@pytest.fixture(scope="module")
def tiny() -> Dict[str, Any]:
    config = tiny_config()
    model = build_model(config)
    model.eval()
    images = np.random.default_rng(1).uniform(0, 1, (3, 3, 64, 64)).astype(np.float32)
    maxima = set_reference_maxima(model, images[:2], batch_size=1)
    return {"config": config, "model": model, "images": images, "maxima": maxima}


def test_lite0_model_structure_and_maps(tiny: Dict[str, Any]) -> None:
    model, images = tiny["model"], tiny["images"]
    assert METHOD.name == "cflow" and METHOD.training is TRAINING and METHOD.fit is None
    assert model.method == "cflow" and model.backbone_name == "efficientnet_lite0"
    assert model.layers == LAYERS and model.channels == [40, 112, 320]
    assert model.grid == [(8, 8), (4, 4), (2, 2)] and model.fiber_batch == 256
    state = model.decoders.state_dict()
    assert len(state) == 3 * 8 * 8
    assert list(state["2.module_list.7.subnet.0.weight"].shape) == [160 + 128, 2 * 288]  # Paddle [in, out]
    assert list(state["2.module_list.7.subnet.2.weight"].shape) == [2 * 288, 320]
    assert list(state["0.module_list.0.global_scale"].shape) == [1, 40]
    assert list(state["1.module_list.3.w_perm"].shape) == [112, 112]
    # checkpoints keep the flows, the positional encodings and the reference maxima, not the backbone
    kept = model.checkpoint_state(include_backbone=False)
    assert {key.split(".")[0] for key in kept} == {"decoders", "pos_enc_0", "pos_enc_1", "pos_enc_2",
                                                   "log_prob_max", "reference_images"}
    assert model.has_reference_maxima and float(model.reference_images.numpy()[0]) == 2
    x = paddle.to_tensor(images)
    with paddle.no_grad():
        scores, maps = model(x)
        log_probs = model.log_likelihoods(model.encoder_features(x))
        reference_max = np.array([float(paddle.max(lp[:2])) for lp in log_probs])
        set_scores, super_mask = model.set_level_maps(log_probs[:])
    assert np.allclose(model.log_prob_max.numpy(), reference_max, rtol=1e-6)
    assert np.allclose(tiny["maxima"], reference_max, rtol=1e-6)
    want = 3.0 - sum(resize(paddle.exp(lp - m)).numpy()
                     for resize, lp, m in zip(model.resizers, log_probs, reference_max.astype(np.float32)))
    assert list(maps.shape) == [3, 64, 64] and max_abs(maps.numpy(), want) <= 1e-6
    assert np.array_equal(scores.numpy(), maps.numpy().max(axis=(1, 2)))
    assert maps.numpy()[:2].min() >= -1e-6  # no probability of a reference image exceeds 1
    # with the reference maxima equal to the batch's, the map is the official set-level map + a constant
    model.log_prob_max.set_value(np.array([float(paddle.max(lp)) for lp in log_probs], np.float32))
    with paddle.no_grad():
        fixed_scores, fixed_maps = model(x)
        batch_max = [paddle.max(lp) for lp in log_probs]
        offset = 3.0 - float(paddle.max(model.probability_sum(log_probs, batch_max)))
    model.log_prob_max.set_value(reference_max.astype(np.float32))
    assert max_abs(fixed_maps.numpy() - offset, super_mask.numpy()) <= 1e-5
    assert max_abs(fixed_scores.numpy() - offset, set_scores.numpy()) <= 1e-5
    with pytest.raises(ValueError, match="built for 64 px"):
        model(paddle.zeros([1, 3, 96, 96]))


def test_build_model_is_reproducible(tiny: Dict[str, Any]) -> None:
    again = build_model(tiny["config"])
    first = tiny["model"].decoders.state_dict()
    assert all(np.array_equal(first[k].numpy(), v.numpy()) for k, v in again.decoders.state_dict().items())
    other = build_model(tiny_config(seed=6))
    assert not np.array_equal(other.decoders.state_dict()["0.module_list.0.w_perm"].numpy(),
                              first["0.module_list.0.w_perm"].numpy())
    w = again.decoders.state_dict()["2.module_list.0.subnet.0.weight"].numpy()  # torch's Linear init
    assert np.abs(w).max() <= 1 / math.sqrt(288)
    assert np.std(w) == pytest.approx(1 / math.sqrt(3 * 288), rel=0.05)
    again.train()
    assert again.decoders.training and not again.backbone.training
    assert not again.has_reference_maxima
    with pytest.raises(ValueError, match="taps that the backbone computes"):
        CFlowModel(again.backbone, image_size=64, layers=["layer1"])


def test_training_substeps_equal_the_official_fiber_loop(tiny: Dict[str, Any]) -> None:
    config = tiny_config(fiber_batch=16)
    model, reference = build_model(config), build_model(config)
    x = paddle.to_tensor(tiny["images"][:2])
    features = TRAINING.teacher_features(model, x)
    assert sorted(features) == LAYERS and all(f.stop_gradient for f in features.values())
    student = TRAINING.student(model)
    assert student is model.decoders
    opt = TRAINING.optimizer(config, student.parameters())
    assert isinstance(opt, paddle.optimizer.Adam) and opt.get_lr() == pytest.approx(2e-5)  # warm-up start
    model.train()
    # the shared trainer's call: TrainingSpec.step takes every fiber step of the image batch
    assert TRAINING.loss is None and TRAINING.finalize is not None
    value = TRAINING.step(model, student, x, features, np.random.default_rng(7), opt)

    # the official loop: per tap, randperm, one Adam step per full fiber batch of 16 (torch zero_grad: None)
    ref_opt = paddle.optimizer.Adam(learning_rate=2e-5, parameters=reference.decoders.parameters())
    rng = np.random.default_rng(7)
    losses, steps = [], []
    for index, tap in enumerate(LAYERS):
        e_r = fibers(features[tap])
        c_r = paddle.tile(reference.position_encoding(index), [2, 1])
        batches = fiber_batches(int(e_r.shape[0]), 16, rng)
        steps.append(len(batches))
        for idx in batches:
            idx = paddle.to_tensor(idx)
            z, log_det = reference.decoders(index, paddle.gather(e_r, idx), paddle.gather(c_r, idx))
            loss = nll(log_likelihood(z, log_det))
            ref_opt.clear_grad(set_to_zero=False)
            paddle.mean(loss).backward()
            ref_opt.step()
            losses.append(loss.numpy())
    assert steps == [8, 2, 1]  # 128, 32 and 8 fibers (8 < 16: one batch of all)
    assert float(value) == pytest.approx(float(np.concatenate(losses).mean()), rel=1e-6)
    got, want = model.decoders.state_dict(), reference.decoders.state_dict()
    for key in want:
        assert np.allclose(got[key].numpy(), want[key].numpy(), rtol=0, atol=1e-6), key
    initial = tiny["model"].decoders.state_dict()  # the same config's untrained flows
    moved = [key for key in want if not np.array_equal(want[key].numpy(), initial[key].numpy())]
    assert moved and all(".w_perm" not in key for key in moved)  # the permutations are never trained


def test_schedule_is_the_official_warmup_and_cosine() -> None:
    lr, meta_epochs = 2e-4, 25  # main.py: lr_warm_epochs 2, lr_decay_rate 0.1, lr_cosine; 8 sub-epochs
    schedule = CFlowSchedule(lr, num_epochs=8 * meta_epochs)
    eta_min = lr * 0.1 ** 3
    warmup_to = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * 2 / meta_epochs)) / 2
    values = []
    for _ in range(8 * meta_epochs):
        values.append(schedule.get_lr())
        schedule.step()
    assert values[0] == pytest.approx(lr / 10)
    assert values[8] == pytest.approx(lr / 10 + 0.5 * (warmup_to - lr / 10))  # halfway through the warm-up
    for epoch in (16, 23, 100, 199):
        meta = epoch // 8
        cosine = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * meta / 25)) / 2
        assert values[epoch] == pytest.approx(cosine)
    assert values[16] == pytest.approx(warmup_to)
    assert all(a >= b for a, b in zip(values[16:], values[17:]))


def test_configs_are_valid() -> None:
    for name, backbone in (("cflow.yaml", "efficientnet_lite0"),
                           ("cflow_wide_resnet50_2.yaml", "wide_resnet50_2")):
        with open(os.path.join(REPO, "configs", name), encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
        assert set(data) <= set(SCHEMA), name
        assert data["method"] == "cflow" and data["backbone"] == backbone
        assert data["layers"] == LAYERS and data["mvtec_img_size"] == 256 and data["fiber_batch"] == 256
        assert float(data["learning_rate"]) == 2e-4 and data["num_epochs"] == 200 and data["batch_size"] == 32


# --- (c) export -----------------------------------------------------------------------------------------

def test_export_paddle_inference_and_onnx_equal_dynamic(tiny: Dict[str, Any], tmp_path: Any) -> None:
    # the tiny model's encoder and taps with 2 coupling blocks per flow (the same ops as 8, a 4x smaller
    # graph to convert), its reference maxima set as after training
    x = tiny["images"]
    paddle.seed(8)
    model = CFlowModel(tiny["model"].backbone, image_size=64, coupling_blocks=2, permutation_seed=8)
    set_reference_maxima(model, x[:2])
    model.eval()
    assert_export_equals_dynamic(model, x, tmp_path / "cflow")
