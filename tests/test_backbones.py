"""Shared backbones (``kdad.backbones``): registry, taps, weights and the converter.

(a) torchvision -> Paddle key mapping and ``tools/convert_weights.py`` on fake checkpoints written here
without torch; (b) the missing-weights error; (c) tap shapes and geometry of every backbone;
(d) EfficientNet-Lite0/1/2 architectures against their packages' checkpoints, Lite1 and Lite2
classify real photos; (e) golden: ResNet18 / Wide-ResNet50-2 features against the PaDiM, STFPM and
PatchCore fixtures of ``<repo>/../shared/golden`` (skipped when absent).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
import zipfile
from typing import Any, Dict, List, Sequence, Tuple

import cv2
import numpy as np
import paddle
import pytest
from golden_rule import rule_weights as golden_rule_weights  # tests/golden_rule.py
from skimage import data as skdata

import kdad.backbones.efficientnet_lite as effnet
from kdad.backbones import available_backbones, build_backbone
from kdad.backbones.resnet import ResNetBackbone
from kdad.backbones.weights import (
    convert_torchvision_state,
    rename_torchvision_state,
    torchvision_key_to_paddle,
    torchvision_reference_shapes,
)
from kdad.utils.torch_pickle import load_torch_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(os.path.dirname(REPO), "shared", "golden")

# --- a minimal torch.save zip writer (pickle protocol 2, opcode by opcode) ----------------------------

_STORAGE = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}


def _pickle_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _pickle_int_tuple(values: Sequence[int]) -> bytes:
    return b"(" + b"".join(b"J" + struct.pack("<i", int(v)) for v in values) + b"t"


def _pickle_ordered_dict() -> bytes:
    return b"ccollections\nOrderedDict\n)R"


def write_torch_zip(path: str, entries: Dict[str, Tuple[str, int, Tuple[int, ...]]],
                    storages: Dict[str, np.ndarray]) -> None:
    """``{key: (storage key, offset, shape)}`` (C-contiguous views) as ``torch.save`` writes a state dict."""
    out = bytearray(b"\x80\x02" + _pickle_ordered_dict() + b"(")
    for key, (storage, offset, shape) in entries.items():
        array = storages[storage]
        strides = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
        out += _pickle_str(key)
        out += b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += b"(" + _pickle_str("storage") + f"ctorch\n{_STORAGE[array.dtype]}\n".encode()
        out += _pickle_str(storage) + _pickle_str("cpu") + b"J" + struct.pack("<i", array.size) + b"tQ"
        out += b"J" + struct.pack("<i", offset) + _pickle_int_tuple(shape) + _pickle_int_tuple(strides)
        out += b"\x89" + _pickle_ordered_dict() + b"tR"
    out += b"u."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", bytes(out))
        archive.writestr("archive/byteorder", "little")
        for key, array in storages.items():
            archive.writestr(f"archive/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes())
        archive.writestr("archive/version", "3\n")


def paddle_to_torchvision_key(key: str) -> str:
    module, _, param = key.rpartition(".")
    param = {"_mean": "running_mean", "_variance": "running_var"}.get(param, param)
    return f"{module}.{param}"


def fake_torchvision_checkpoint(path: str, name: str, head: bool = True) -> Dict[str, np.ndarray]:
    """torchvision-style checkpoint of ``name`` (distinct values: tensor i starts at storage offset i,
    Linear weights ``[out, in]``, ``num_batches_tracked`` after each BatchNorm); returns its arrays."""
    reference = torchvision_reference_shapes(name, head=head)
    torch_shapes: Dict[str, Tuple[int, ...]] = {}
    for key, shape in reference.items():
        torch_shapes[paddle_to_torchvision_key(key)] = shape[::-1] if len(shape) == 2 else shape
        if key.endswith("._variance"):
            torch_shapes[key.rpartition(".")[0] + ".num_batches_tracked"] = ()
    floats = [key for key, shape in torch_shapes.items() if not key.endswith("num_batches_tracked")]
    size = max(int(np.prod(torch_shapes[key])) for key in floats) + len(torch_shapes)
    storages = {"0": (np.arange(size, dtype=np.float32) % 1009) * np.float32(0.001) - np.float32(0.5),
                "1": np.array([7], dtype=np.int64)}
    entries: Dict[str, Tuple[str, int, Tuple[int, ...]]] = {}
    arrays: Dict[str, np.ndarray] = {}
    for index, (key, shape) in enumerate(torch_shapes.items()):
        if key.endswith("num_batches_tracked"):
            entries[key] = ("1", 0, ())
            arrays[key] = storages["1"][0]
        else:
            entries[key] = ("0", index, shape)
            arrays[key] = storages["0"][index:index + int(np.prod(shape))].reshape(shape)
    write_torch_zip(path, entries, storages)
    return arrays


def load_tool(name: str) -> Any:
    """Import ``tools/<name>.py`` by path (``tools`` is not a package)."""
    path = os.path.join(REPO, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"kdad_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- (a) key mapping and the converter ---------------------------------------------------------------


def test_registry_lists_every_backbone() -> None:
    assert {"resnet18", "wide_resnet50_2", "efficientnet_lite0", "efficientnet_lite1",
            "efficientnet_lite2"} <= set(available_backbones())
    with pytest.raises(ValueError, match="unknown backbone 'resnet34'"):
        build_backbone("resnet34", ["layer1"])
    with pytest.raises(ValueError, match=r"no tap\(s\) \['layer5'\]"):
        build_backbone("efficientnet_lite1", ["layer5"], pretrained=False)


def test_torchvision_key_mapping() -> None:
    assert torchvision_key_to_paddle("layer1.0.bn1.running_mean") == "layer1.0.bn1._mean"
    assert torchvision_key_to_paddle("bn1.running_var") == "bn1._variance"
    assert torchvision_key_to_paddle("bn1.num_batches_tracked") is None
    assert torchvision_key_to_paddle("layer2.0.downsample.0.weight") == "layer2.0.downsample.0.weight"
    fc = np.arange(6, dtype=np.float32).reshape(3, 2)  # torch Linear [out, in]
    state = rename_torchvision_state({"module.fc.weight": fc, "module.fc.bias": np.zeros(3, np.float32),
                                      "module.bn1.num_batches_tracked": np.array(3, np.int64)})
    assert list(state) == ["fc.weight", "fc.bias"]
    np.testing.assert_array_equal(state["fc.weight"], fc.T)
    assert "fc.weight" in torchvision_reference_shapes("wide_resnet50_2")
    assert not any(key.startswith("fc.") for key in torchvision_reference_shapes("resnet18", head=False))


def test_converter_round_trip_resnet18(tmp_path, capsys) -> None:
    src, dst = str(tmp_path / "resnet18-fake.pth"), str(tmp_path / "weights" / "resnet18.pdparams")
    arrays = fake_torchvision_checkpoint(src, "resnet18")
    main = load_tool("convert_weights").main
    assert main(["resnet18", src, dst, "--quiet"]) == 0
    assert "wrote 102 tensors (11,699,112 values)" in capsys.readouterr().out
    state = paddle.load(dst, return_numpy=True)
    reference = torchvision_reference_shapes("resnet18")
    assert list(state) == list(reference)
    for key, value in state.items():
        want = arrays[paddle_to_torchvision_key(key)]
        np.testing.assert_array_equal(value, want.T if key == "fc.weight" else want, err_msg=key)
    assert state["fc.weight"].shape == (512, 1000)
    assert not [name for name in os.listdir(tmp_path / "weights") if name.startswith(".tmp")]

    backbone = build_backbone("resnet18", ["layer1", "layer2"], weights_path=dst)
    np.testing.assert_array_equal(backbone.layer2[0].bn1._variance.numpy(),
                                  arrays["layer2.0.bn1.running_var"])
    assert not hasattr(backbone, "layer3")

    headless = str(tmp_path / "headless.pdparams")
    assert main(["resnet18", src, headless, "--no-head", "--quiet"]) == 0
    assert "fc.weight" not in paddle.load(headless, return_numpy=True)


def test_converter_errors_name_the_file(tmp_path, capsys) -> None:
    main = load_tool("convert_weights").main
    out = str(tmp_path / "out.pdparams")
    # the wrong network: a ResNet18 file given as Wide-ResNet50-2
    src = str(tmp_path / "resnet18-fake.pth")
    fake_torchvision_checkpoint(src, "resnet18", head=False)
    assert main(["wide_resnet50_2", src, out]) == 1
    err = capsys.readouterr().err
    assert "resnet18-fake.pth" in err and "does not match" in err and len(err.strip().splitlines()) == 1
    # a classifier-less file needs --no-head
    assert main(["resnet18", src, out]) == 1
    assert "fc.weight" in capsys.readouterr().err
    # missing and unreadable files
    assert main(["resnet18", str(tmp_path / "nowhere.pth"), out]) == 1
    assert "nowhere.pth" in capsys.readouterr().err
    garbage = str(tmp_path / "garbage.pth")
    with open(garbage, "wb") as handle:
        handle.write(b"not a checkpoint")
    assert main(["vgg16", garbage, out]) == 1
    assert "garbage.pth" in capsys.readouterr().err
    assert not os.path.exists(out)
    with pytest.raises(ValueError, match=r"'extra\.pth' does not match"):
        convert_torchvision_state("resnet18", {"conv1.weight": np.zeros((1, 1), np.float32)}, "extra.pth")


def test_vgg16_features_convert_with_both_tools(tmp_path) -> None:
    src = str(tmp_path / "vgg16-fake.pth")
    arrays = fake_torchvision_checkpoint(src, "vgg16", head=False)
    new, old = str(tmp_path / "new.pdparams"), str(tmp_path / "old.pdparams")
    assert load_tool("convert_weights").main(["vgg16", src, new, "--no-head", "--quiet"]) == 0
    assert load_tool("convert_vgg16").main([src, old]) == 0
    first, second = paddle.load(new, return_numpy=True), paddle.load(old, return_numpy=True)
    assert list(first) == list(second) == [key for key in arrays if key.startswith("features.")]
    for key in first:
        np.testing.assert_array_equal(first[key], arrays[key])
        np.testing.assert_array_equal(second[key], arrays[key])
    from kdad.methods.kdad.experts import build_expert

    build_expert("vgg16", pretrain=True, weights_path=old)  # loads into the KDAD expert


# --- (b) missing weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, pth", [("resnet18", "resnet18-f37072fd.pth"),
                                       ("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth")])
def test_missing_weights_error_says_what_to_do(tmp_path, monkeypatch, name: str, pth: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        build_backbone(name, ["layer2"])
    message = str(info.value)
    assert f"weights/{name}.pdparams" in message  # where to put it
    assert f"https://download.pytorch.org/models/{pth}" in message  # where to get it
    assert f"python tools/convert_weights.py {name} {pth} weights/{name}.pdparams" in message
    assert f"paddle.vision.models.{name}(pretrained=True)" in message

    with pytest.raises(FileNotFoundError, match=r"'my/own\.pdparams' does not exist") as info:
        build_backbone(name, ["layer2"], weights_path="my/own.pdparams")
    assert f"weights/{name}.pdparams" in str(info.value)

    wrong = str(tmp_path / "wrong.pdparams")  # a file that is not this network
    paddle.save({"conv1.weight": np.zeros((1, 3, 7, 7), np.float32)}, wrong)
    with pytest.raises(ValueError, match="wrong.pdparams"):
        build_backbone(name, ["layer2"], weights_path=wrong)


# --- (c) tap shapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, channels", [("resnet18", (64, 128, 256, 512)),
                                            ("wide_resnet50_2", (256, 512, 1024, 2048))])
def test_resnet_tap_shapes(name: str, channels: Tuple[int, ...]) -> None:
    taps = ["layer1", "layer2", "layer3", "layer4"]
    backbone = build_backbone(name, taps, pretrained=False)
    assert [backbone.geometry[tap] for tap in taps] == [(c, 4 * 2 ** i) for i, c in enumerate(channels)]
    assert not backbone.training and all(p.stop_gradient for p in backbone.parameters())
    x = paddle.rand([2, 3, 64, 64])
    with paddle.no_grad():
        feats = backbone(x)
    assert list(feats) == taps
    for tap in taps:
        c, stride = backbone.geometry[tap]
        assert list(feats[tap].shape) == [2, c, 64 // stride, 64 // stride], tap
    # the backbone's keys are the Paddle model's (= torchvision's, BatchNorm buffers renamed), fc aside
    own = {key: tuple(value.shape) for key, value in backbone.state_dict().items()}
    assert own == torchvision_reference_shapes(name, head=False)
    shallow = ResNetBackbone(name, ["layer2"])
    assert not any(key.startswith(("layer3", "layer4", "fc")) for key in shallow.state_dict())


LITE_STAGE_CHANNELS = {"efficientnet_lite0": (24, 40, 112, 320), "efficientnet_lite1": (24, 40, 112, 320),
                       "efficientnet_lite2": (24, 48, 120, 352)}


@pytest.mark.parametrize("name", sorted(LITE_STAGE_CHANNELS))
def test_lite_tap_shapes(name: str) -> None:
    taps = ["layer1", "layer2", "layer3", "layer4", "stem", "blocks.5.expand", "blocks.5.depthwise", "head"]
    backbone = build_backbone(name, taps, pretrained=False)
    assert backbone.name == name
    assert [backbone.geometry[f"layer{i}"] for i in range(1, 5)] == [
        (c, 4 * 2 ** i) for i, c in enumerate(LITE_STAGE_CHANNELS[name])]
    blocks = len(backbone.net.blocks)
    assert blocks == (16 if name == "efficientnet_lite0" else 21)
    assert backbone.geometry["layer4"] == backbone.geometry[f"blocks.{blocks - 1}"]
    x = paddle.rand([2, 3, 64, 64])
    with paddle.no_grad():
        feats = backbone(x)
        every = backbone.net.feature_maps(x)
    for tap in taps:
        c, stride = backbone.geometry[tap]
        assert list(feats[tap].shape) == [2, c, 64 // stride, 64 // stride], tap
    for key, value in every.items():  # the geometry table covers every feature, right
        c, stride = backbone.geometry[key]
        assert list(value.shape) == [2, c, 64 // stride, 64 // stride], key
    np.testing.assert_array_equal(feats["layer3"].numpy(), every[effnet.stage_taps(name)["layer3"]].numpy())


# --- (d) EfficientNet-Lite architectures and weights ---------------------------------------------------


def test_lite_scaling_rules() -> None:
    assert [effnet.round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [
        16, 24, 48, 88, 120, 208, 352]
    assert [s[0] for s in effnet.variant_stages("efficientnet_lite0")] == [1, 2, 2, 3, 3, 4, 1]
    assert [s[0] for s in effnet.variant_stages("lite1")] == [1, 3, 3, 4, 4, 5, 1]
    assert [s[0] for s in effnet.variant_stages("lite2")] == [1, 3, 3, 4, 4, 5, 1]
    assert effnet.variant_stages("lite0") == effnet.STAGES
    assert effnet.STAGE_TAPS == {"layer1": "blocks.2", "layer2": "blocks.4", "layer3": "blocks.10",
                                 "layer4": "blocks.15"}
    assert effnet.stage_taps("lite2") == {"layer1": "blocks.3", "layer2": "blocks.6", "layer3": "blocks.14",
                                          "layer4": "blocks.20"}
    with pytest.raises(ValueError, match="lite7"):
        effnet.get_variant("lite7")


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_checkpoint_matches_architecture(name: str) -> None:
    """Every key and shape of the package's .pth maps onto the Paddle model (and nothing is left over)."""
    source = effnet.package_weights_path(name)
    assert os.path.basename(source).startswith(name.replace("_", "-"))
    torch_state = load_torch_state_dict(source)
    state = effnet.convert_torch_state(torch_state, source, name)
    assert set(state) == set(effnet.reference_shapes(name))
    assert len(state) == len([k for k in torch_state if not k.endswith("num_batches_tracked")])
    with pytest.raises(ValueError, match="does not match"):  # Lite1's file is not Lite2's network
        other = "efficientnet_lite2" if name == "efficientnet_lite1" else "efficientnet_lite1"
        effnet.convert_torch_state(torch_state, source, other)


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """A module-wide KDAD_CACHE_DIR so nothing is written to ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDAD_CACHE_DIR", str(tmp_path_factory.mktemp("kdad_cache")))
        yield


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """TF EfficientNet eval preprocessing: central crop of size/(size+32) of the short side, bicubic."""
    height, width = image.shape[:2]
    side = int(round(min(height, width) * size / (size + 32)))
    top, left = (height - side) // 2, (width - side) // 2
    return cv2.resize(image[top:top + side, left:left + side], (size, size), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_classifies_real_photos(cache_env, name: str) -> None:
    model = effnet.load_pretrained(effnet.EfficientNetLite(name))
    size = effnet.get_variant(name).resolution
    images = np.stack([preprocess(skdata.chelsea(), size), preprocess(skdata.coffee(), size)])
    logits = effnet.imagenet_logits(model, images)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top1 = probs.argmax(axis=1)
    assert 281 <= top1[0] <= 285, f"{name}: chelsea classified as {top1[0]}"
    assert probs[0, 281:286].sum() > 0.75  # measured: Lite1 0.83, Lite2 0.83 (top-1 285 Egyptian cat)
    runner_up = np.sort(probs[1])[-2]
    # measured p(espresso): Lite1 0.54 (runner-up 0.05), Lite2 0.88 (0.01); Lite0 0.95
    assert top1[1] == 967 and probs[1, 967] > 0.45 and probs[1, 967] > 5 * runner_up, (
        f"{name}: coffee {top1[1]} p={probs[1].max():.3f}")
    assert os.path.isfile(effnet.cached_weights_path(variant=name))


def test_lite_backbone_from_converted_file(cache_env, tmp_path, capsys) -> None:
    """``tools/convert_weights.py`` also converts a Lite package .pth; the backbone loads that file."""
    source = effnet.package_weights_path("efficientnet_lite2")
    dst = str(tmp_path / "lite2.pdparams")
    assert load_tool("convert_weights").main(["efficientnet_lite2", source, dst, "--no-head", "--quiet"]) == 0
    assert "wrote 320 tensors" in capsys.readouterr().out
    from_file = build_backbone("efficientnet_lite2", ["layer2"], weights_path=dst)
    from_package = build_backbone("efficientnet_lite2", ["layer2"])
    x = paddle.rand([1, 3, 64, 64])
    with paddle.no_grad():
        np.testing.assert_array_equal(from_file(x)["layer2"].numpy(), from_package(x)["layer2"].numpy())
    with pytest.raises(FileNotFoundError, match="nowhere.pdparams"):
        build_backbone("efficientnet_lite2", ["layer2"], weights_path=str(tmp_path / "nowhere.pdparams"))


# --- (e) golden fixtures --------------------------------------------------------------------------------


def golden(name: str) -> Any:
    path = os.path.join(GOLDEN, f"{name}_reference_v1.npz")
    if not os.path.isfile(path):
        pytest.skip(f"golden fixture {path} not found (the shared folder <repo>/../shared is absent)")
    return np.load(path)


def rule_weights(keys: Sequence[str], shapes: np.ndarray, seed: int, gain: float) -> Dict[str, np.ndarray]:
    """The fixtures' weight rule (``tests/golden_rule.py``) for a fixture's keys and -1 padded shapes."""
    spec = [(str(key), tuple(int(d) for d in padded if d >= 0)) for key, padded in zip(keys, shapes)]
    return golden_rule_weights(spec, seed, gain)

def rule_backbone(fixture: Any, name: str, taps: List[str], tmp_path: Any, prefix: str = "") -> Any:
    """The backbone with the fixture's rule weights, going through a converted ``.pdparams`` file."""
    keys = fixture["weight_keys"]
    weights = rule_weights(keys, fixture["weight_shapes"], int(fixture[f"{prefix}weight_seed"]),
                           float(fixture["weight_gain"]))
    digest = hashlib.sha256(b"".join(weights[str(k)].astype("<f4").tobytes() for k in keys)).hexdigest()
    assert digest == str(fixture[f"{prefix}weight_sha256"])
    state = rename_torchvision_state(weights)
    path = str(tmp_path / f"{prefix}rule.pdparams")
    paddle.save(state, path)
    backbone = build_backbone(name, taps, weights_path=path)
    assert set(backbone.state_dict()) == set(state)  # the torchvision key list maps onto the backbone's
    return backbone


def check_features(fixture: Any, feats: Dict[str, paddle.Tensor], prefix: str) -> None:
    """README tolerances: channel norms L2-relative 1e-5, slices max-abs 1e-4 of the slice's max."""
    for tap, value in feats.items():
        array = value.numpy().astype(np.float64)
        norms = np.sqrt((array ** 2).sum(axis=(2, 3)))
        want = fixture[f"{prefix}{tap}_chan_norms"]
        assert np.linalg.norm(norms - want) / np.linalg.norm(want) < 1e-5, tap
        want_slice = fixture[f"{prefix}{tap}_slice"]
        assert np.abs(array[:2, :2] - want_slice).max() <= 1e-4 * np.abs(want_slice).max(), tap


def fixture_input(fixture: Any) -> paddle.Tensor:
    """[0, 1] RGB NCHW: the backbone applies ImageNet's mean/std itself."""
    np.testing.assert_allclose(fixture["mean_rgb"], (0.485, 0.456, 0.406), rtol=1e-6)
    np.testing.assert_allclose(fixture["std_rgb"], (0.229, 0.224, 0.225), rtol=1e-6)
    return paddle.to_tensor(fixture["images"].astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255))


@pytest.mark.parametrize("fixture_name, prefix", [("padim", "feat_"), ("stfpm", "teacher_")])
def test_golden_resnet18_features(tmp_path, fixture_name: str, prefix: str) -> None:
    fixture = golden(fixture_name)
    backbone = rule_backbone(fixture, "resnet18", ["layer1", "layer2", "layer3"], tmp_path)
    with paddle.no_grad():
        feats = backbone(fixture_input(fixture))
    check_features(fixture, feats, prefix)


def test_golden_stfpm_student_features(tmp_path) -> None:
    fixture = golden("stfpm")
    backbone = rule_backbone(fixture, "resnet18", ["layer1", "layer2", "layer3"], tmp_path, prefix="student_")
    with paddle.no_grad():
        feats = backbone(fixture_input(fixture))
    check_features(fixture, feats, "student_")


def test_golden_wide_resnet50_2_features(tmp_path) -> None:
    fixture = golden("patchcore")
    backbone = rule_backbone(fixture, "wide_resnet50_2", ["layer2", "layer3"], tmp_path)
    with paddle.no_grad():
        feats = backbone(fixture_input(fixture))
    assert list(feats) == ["layer2", "layer3"]
    check_features(fixture, feats, "feat_")
