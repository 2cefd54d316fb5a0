"""Tests of kdad.data: readers, listing, the dataset, the hold-out split and the synthetic class."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest
from PIL import Image

from kdad.data import (
    AnomalyDataset,
    ImageReadError,
    Sample,
    generate_synthetic_class,
    list_folder,
    list_mvtec,
    preprocess,
    read_image,
    read_mask,
    resize_mask,
    split_holdout,
)
from kdad.data.synthetic import DEFECT_TYPES, main, render_sample

RNG = np.random.default_rng(123)
RGB = RNG.integers(0, 256, (13, 17, 3), dtype=np.uint8)


def _save_pil(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


# ----------------------------------------------------------------------------- readers


def test_grayscale_png_gives_three_equal_channels(tmp_path: Path) -> None:
    gray = RGB[:, :, 0]
    image = read_image(_save_pil(tmp_path / "g.png", gray))
    assert image.shape == (13, 17, 3) and image.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(image[:, :, c], gray)


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    alpha = RNG.integers(0, 256, (13, 17, 1), dtype=np.uint8)
    path = _save_pil(tmp_path / "a.png", np.concatenate([RGB, alpha], axis=2))
    np.testing.assert_array_equal(read_image(path), RGB)


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_png_matches_pil(tmp_path: Path, transparency: bool) -> None:
    pal = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=12)
    path = tmp_path / "p.png"
    pal.save(path, **({"transparency": 3} if transparency else {}))
    assert Image.open(path).mode == "P"
    expected = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(read_image(str(path)), expected)


def test_16bit_png_scales_to_8bit(tmp_path: Path) -> None:
    values = np.array([[0, 1, 128, 129, 257], [385, 386, 32896, 65534, 65535]], dtype=np.uint16)
    expected = np.floor(values.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)
    assert expected[0, 0] == 0 and expected[1, -1] == 255 and expected[0, 2] == 0 and expected[0, 3] == 1
    gray_path = str(tmp_path / "g16.png")
    assert cv2.imwrite(gray_path, values)
    gray = read_image(gray_path)
    for c in range(3):
        np.testing.assert_array_equal(gray[:, :, c], expected)

    rgb16 = np.stack([values, values[::-1], 65535 - values], axis=2)
    rgb_path = str(tmp_path / "c16.png")
    assert cv2.imwrite(rgb_path, np.ascontiguousarray(rgb16[:, :, ::-1]))  # OpenCV writes BGR
    expected_rgb = np.floor(rgb16.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(read_image(rgb_path), expected_rgb)


def test_jpeg_and_bmp_load(tmp_path: Path) -> None:
    bmp = read_image(_save_pil(tmp_path / "x.bmp", RGB))
    np.testing.assert_array_equal(bmp, RGB)
    smooth = cv2.GaussianBlur(RGB, (5, 5), 2.0)
    path = tmp_path / "x.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    jpeg = read_image(str(path))
    assert jpeg.shape == RGB.shape and jpeg.dtype == np.uint8
    reference = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert np.abs(jpeg.astype(int) - reference).mean() < 2.0  # same file, possibly another IDCT


def _corrupt_files(tmp_path: Path) -> dict:
    good = tmp_path / "good.png"
    Image.fromarray(RGB).save(good)
    data = good.read_bytes()
    files = {
        "truncated": (tmp_path / "truncated_file.png", data[: len(data) // 2]),
        "garbage": (tmp_path / "garbage_file.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
        "text": (tmp_path / "notes_renamed.png", b"this is a text file, not an image\n"),
        "empty": (tmp_path / "empty_file.png", b""),
    }
    for path, content in files.values():
        path.write_bytes(content)
    return {k: str(p) for k, (p, _) in files.items()}


@pytest.mark.parametrize("kind", ["truncated", "garbage", "text", "empty", "missing"])
@pytest.mark.parametrize("reader", [read_image, read_mask])
def test_unreadable_files_raise_with_name(tmp_path: Path, kind: str, reader) -> None:
    files = _corrupt_files(tmp_path)
    path = files.get(kind, str(tmp_path / "missing_file.png"))
    with pytest.raises(ImageReadError, match=os.path.basename(path)) as info:
        reader(path)
    assert isinstance(info.value, ValueError)


def test_read_mask_binarises_gray_and_rgb(tmp_path: Path) -> None:
    gray = np.zeros((6, 7), np.uint8)
    gray[1:3, 2:5] = 255
    gray[5, 6] = 1
    mask = read_mask(_save_pil(tmp_path / "m.png", gray))
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, (gray > 0).astype(np.float32))
    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[0, 0, 2] = 7  # nonzero in one channel only
    rgb[4, 3] = (255, 255, 255)
    expected = np.zeros((6, 7), np.float32)
    expected[0, 0] = expected[4, 3] = 1
    np.testing.assert_array_equal(read_mask(_save_pil(tmp_path / "m_rgb.png", rgb)), expected)


def test_preprocess_matches_hand_computation() -> None:
    image = RNG.integers(0, 256, (50, 37, 3), dtype=np.uint8)
    out = preprocess(image, 24)
    resized = cv2.resize(image, (24, 24), interpolation=cv2.INTER_AREA)
    expected = np.stack([resized[:, :, c] / 255.0 for c in range(3)]).astype(np.float32)
    assert out.shape == (3, 24, 24) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    assert out.min() >= 0.0 and out.max() <= 1.0
    with pytest.raises(ValueError):
        preprocess(image[:, :, 0], 24)


def test_resize_mask() -> None:
    mask = np.zeros((40, 40), np.float32)
    mask[:20] = 1
    out = resize_mask(mask, 10)
    assert out.shape == (10, 10) and out.dtype == np.float32
    np.testing.assert_allclose(out, cv2.resize(mask, (10, 10), interpolation=cv2.INTER_AREA))
    assert out.min() >= 0.0 and out.max() <= 1.0 and out[:5].min() == 1.0 and out[5:].max() == 0.0


# ----------------------------------------------------------------------------- listing


def _mvtec_tree(root: Path) -> Path:
    """A hand-made MVTec class: 2 train, 2 good test, crack x2 and hole x1 (with masks)."""
    cls = root / "toy"
    for sub in ["train/good", "test/good", "test/crack", "test/hole"]:
        (cls / sub).mkdir(parents=True)
    for sub in ["crack", "hole"]:
        (cls / "ground_truth" / sub).mkdir(parents=True)
    for name in ["001.png", "000.png"]:
        _save_pil(cls / "train/good" / name, RGB)
        _save_pil(cls / "test/good" / name, RGB)
    for t, names in {"crack": ["001.png", "000.png"], "hole": ["000.png"]}.items():
        for name in names:
            _save_pil(cls / "test" / t / name, RGB)
            mask = np.zeros(RGB.shape[:2], np.uint8)
            mask[2:6, 3:9] = 255
            _save_pil(cls / "ground_truth" / t / name.replace(".png", "_mask.png"), mask)
    (cls / "train/good/readme.txt").write_text("not an image")
    (cls / "train/good/Thumbs.db").write_bytes(b"\x00")
    (cls / "train/good/.hidden.png").write_bytes(b"")
    return cls


def test_list_mvtec_order_and_fields(tmp_path: Path) -> None:
    cls = _mvtec_tree(tmp_path)
    train = list_mvtec(str(tmp_path), "toy", "train")
    assert [os.path.basename(s.path) for s in train] == ["000.png", "001.png"]
    assert all(s.label == 0 and s.mask_path is None and s.defect_type == "good" for s in train)
    test = list_mvtec(str(tmp_path), "toy", "test")
    assert [(s.defect_type, os.path.basename(s.path)) for s in test] == [
        ("good", "000.png"), ("good", "001.png"), ("crack", "000.png"), ("crack", "001.png"),
        ("hole", "000.png"),
    ]
    assert [s.label for s in test] == [0, 0, 1, 1, 1]
    assert test[2].mask_path == str(cls / "ground_truth/crack/000_mask.png")
    assert test[0].mask_path is None


def test_list_mvtec_missing_mask(tmp_path: Path) -> None:
    cls = _mvtec_tree(tmp_path)
    os.remove(cls / "ground_truth/hole/000_mask.png")
    with pytest.raises(FileNotFoundError, match="000_mask.png") as info:
        list_mvtec(str(tmp_path), "toy", "test")
    assert str(cls / "test/hole/000.png") in str(info.value)
    samples = list_mvtec(str(tmp_path), "toy", "test", require_masks=False)
    assert samples[-1].label == 1 and samples[-1].mask_path is None
    ds = AnomalyDataset(samples, 8)
    assert ds[len(ds) - 1][3] == 0 and ds[2][3] == 1 and ds[0][3] == 1


@pytest.mark.parametrize("missing", ["root", "category", "split", "good"])
def test_list_mvtec_missing_folders(tmp_path: Path, missing: str) -> None:
    cls = _mvtec_tree(tmp_path / "data")
    root, category = str(tmp_path / "data"), "toy"
    if missing == "root":
        root = str(tmp_path / "nowhere")
        folder = root
    elif missing == "category":
        category = "bottle"
        folder = os.path.join(root, "bottle")
    elif missing == "split":
        os.rename(cls / "train", cls / "training")
        folder = str(cls / "train")
    else:
        os.rename(cls / "train/good", cls / "train/ok")
        folder = str(cls / "train/good")
    with pytest.raises(FileNotFoundError, match="layout") as info:
        list_mvtec(root, category, "train")
    assert folder in str(info.value)


def test_list_mvtec_empty_folder(tmp_path: Path) -> None:
    cls = _mvtec_tree(tmp_path)
    for name in os.listdir(cls / "train/good"):
        os.remove(cls / "train/good" / name)
    with pytest.raises(FileNotFoundError, match="no images"):
        list_mvtec(str(tmp_path), "toy", "train")
    with pytest.raises(ValueError, match="split"):
        list_mvtec(str(tmp_path), "toy", "val")


def test_list_folder(tmp_path: Path) -> None:
    for sub, n in [("good", 3), ("defect", 2)]:
        (tmp_path / sub).mkdir()
        for i in range(n):
            _save_pil(tmp_path / sub / f"{i}.jpg", RGB)
    (tmp_path / "good" / "notes.txt").write_text("x")
    samples = list_folder(str(tmp_path))
    assert [s.label for s in samples] == [0, 0, 0, 1, 1]
    assert all(s.mask_path is None for s in samples)
    assert [s.defect_type for s in samples] == ["good"] * 3 + ["defect"] * 2
    assert len(list_folder(str(tmp_path), defect_dir="absent")) == 3  # train-only folder
    with pytest.raises(FileNotFoundError, match="ok"):
        list_folder(str(tmp_path), good_dir="ok")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_folder(str(tmp_path), good_dir="empty")
    with pytest.raises(FileNotFoundError, match="missing_root"):
        list_folder(str(tmp_path / "missing_root"))


# ----------------------------------------------------------------------------- dataset


def test_dataset_items_and_caches(tmp_path: Path) -> None:
    _mvtec_tree(tmp_path)
    samples = list_mvtec(str(tmp_path), "toy", "test")
    ds = AnomalyDataset(samples, 8)
    lazy = AnomalyDataset(samples, 8, preload=False)
    assert len(ds) == 5
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 1])
    image, label, mask, has_mask, index = ds[2]
    assert image.shape == (3, 8, 8) and image.dtype == np.float32
    assert label.dtype == np.int64 and int(label) == 1 and int(has_mask) == 1 and int(index) == 2
    expected_mask = resize_mask(read_mask(samples[2].mask_path), 8)
    np.testing.assert_array_equal(mask, expected_mask)
    good_mask = ds[0][2]
    assert good_mask.shape == (8, 8) and good_mask.dtype == np.float32 and not good_mask.any()
    expected_images = np.stack([preprocess(read_image(s.path), 8) for s in samples])
    np.testing.assert_array_equal(ds.images(), expected_images)
    np.testing.assert_array_equal(lazy.images(), expected_images)
    np.testing.assert_array_equal(ds.masks(), lazy.masks())
    assert ds.masks().shape == (5, 8, 8) and ds.masks()[:2].sum() == 0
    for a, b in zip(ds[4], lazy[4]):
        np.testing.assert_array_equal(a, b)

    loader = paddle.io.DataLoader(ds, batch_size=4, shuffle=False)
    images, labels, masks, has_masks, indices = next(iter(loader))
    assert images.shape == [4, 3, 8, 8] and labels.shape == [4] and masks.shape == [4, 8, 8]
    np.testing.assert_array_equal(indices.numpy(), [0, 1, 2, 3])


def test_dataset_errors_name_the_file(tmp_path: Path) -> None:
    files = _corrupt_files(tmp_path)
    good = Sample(str(tmp_path / "good.png"), 0, "good", None)
    bad = Sample(files["truncated"], 0, "good", None)
    with pytest.raises(ImageReadError, match="truncated_file.png"):
        AnomalyDataset([good, bad], 8)
    lazy = AnomalyDataset([good, bad], 8, preload=False)
    with pytest.raises(ImageReadError, match="truncated_file.png"):
        lazy[1]
    small_mask = _save_pil(tmp_path / "small_mask.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="small_mask.png"):
        AnomalyDataset([Sample(good.path, 1, "x", small_mask)], 8)


def test_dataset_reports_every_unreadable_file_at_once(tmp_path: Path) -> None:
    files = _corrupt_files(tmp_path)
    good = Sample(str(tmp_path / "good.png"), 0, "good", None)
    small_mask = _save_pil(tmp_path / "small_mask.png", np.zeros((4, 4), np.uint8))
    samples = [good] + [Sample(p, 0, "good", None) for p in files.values()] + [
        Sample(good.path, 1, "x", small_mask), Sample(str(tmp_path / "missing_file.png"), 0, "good", None)]
    with pytest.raises(ImageReadError) as info:
        AnomalyDataset(samples, 8)
    message = str(info.value)
    assert message.startswith(f"6 of {len(samples)} files cannot be read")
    for name in ("truncated_file.png", "garbage_file.png", "notes_renamed.png", "empty_file.png",
                 "small_mask.png", "missing_file.png"):
        assert name in message
    assert len(message.splitlines()) == 1 + 6  # the summary, then one line per file


def test_empty_dataset() -> None:
    ds = AnomalyDataset([], 8)
    assert len(ds) == 0 and ds.images().shape == (0, 3, 8, 8) and ds.masks().shape == (0, 8, 8)


# ----------------------------------------------------------------------------- hold-out split


def test_split_holdout() -> None:
    train, hold = split_holdout(20, 0.25, seed=3)
    assert len(hold) == 5 and len(train) == 15
    assert np.array_equal(np.sort(np.concatenate([train, hold])), np.arange(20))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(hold) > 0)
    again = split_holdout(20, 0.25, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(hold, again[1])
    assert not np.array_equal(hold, split_holdout(20, 0.25, seed=4)[1])
    assert len(split_holdout(10, 0.0, 0)[1]) == 0 and len(split_holdout(10, 0.0, 0)[0]) == 10
    assert len(split_holdout(10, 0.01, 0)[1]) == 1  # at least one
    assert len(split_holdout(2, 0.9, 0)[0]) == 1  # training keeps one image
    assert len(split_holdout(1, 0.5, 0)[1]) == 0
    with pytest.raises(ValueError):
        split_holdout(10, 1.5, 0)


def test_split_folder_good() -> None:
    from kdad.data.datasets import split_folder_good

    train, hold, test = split_folder_good(60, 0.2, 0.1, seed=3)
    assert (len(train), len(hold), len(test)) == (43, 5, 12)
    assert np.array_equal(np.sort(np.concatenate([train, hold, test])), np.arange(60))  # disjoint, complete
    for part in (train, hold, test):
        assert np.all(np.diff(part) > 0)
    again = split_folder_good(60, 0.2, 0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, hold, test), again))
    assert not np.array_equal(test, split_folder_good(60, 0.2, 0.1, seed=4)[2])
    assert len(split_folder_good(60, 0.0, 0.1, seed=3)[2]) == 0
    assert [len(p) for p in split_folder_good(1, 0.2, 0.1, seed=0)] == [1, 0, 0]  # training keeps its image
    assert [len(p) for p in split_folder_good(2, 0.5, 0.5, seed=0)] == [1, 0, 1]
    with pytest.raises(ValueError):
        split_folder_good(10, 1.0, 0.1, 0)


# ----------------------------------------------------------------------------- synthetic class


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_generator_layout_masks_and_determinism(tmp_path: Path, kind: str) -> None:
    args = dict(kind=kind, n_train=5, n_test_good=3, n_test_defect=2, size=32, seed=7)
    cls = generate_synthetic_class(str(tmp_path / "a"), "syn", **args)
    assert cls == str(tmp_path / "a" / "syn")
    train = list_mvtec(str(tmp_path / "a"), "syn", "train")
    test = list_mvtec(str(tmp_path / "a"), "syn", "test")
    assert len(train) == 5 and os.path.basename(train[0].path) == "000.png"
    assert [s.defect_type for s in test] == ["good"] * 3 + [t for t in DEFECT_TYPES for _ in range(2)]
    for s in test[3:]:
        image, mask = read_image(s.path), cv2.imread(s.mask_path, cv2.IMREAD_UNCHANGED)
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
        assert set(np.unique(mask)) == {0, 255}
        assert 0.005 < (mask > 0).mean() < 0.2  # visible, but a small part of the image
    normals = np.stack([read_image(s.path) for s in train])
    assert np.abs(normals.astype(int) - normals[0]).max() > 20  # real normal variation

    generate_synthetic_class(str(tmp_path / "b"), "syn", **args)
    for s in train + test:
        rel = os.path.relpath(s.path, tmp_path / "a")
        np.testing.assert_array_equal(read_image(s.path), read_image(str(tmp_path / "b" / rel)))
    other = generate_synthetic_class(str(tmp_path / "c"), "syn", **{**args, "seed": 8})
    first_other = read_image(os.path.join(other, "train", "good", "000.png"))
    assert not np.array_equal(read_image(train[0].path), first_other)


@pytest.mark.parametrize("kind", ["texture", "object"])
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_render_sample_mask_is_exactly_the_changed_pixels(kind: str, defect: str) -> None:
    for seed in range(5):
        clean, image, mask = render_sample(kind, 48, np.random.default_rng(seed), defect)
        changed = np.any(image != clean, axis=2)
        np.testing.assert_array_equal(changed, mask > 0)
        assert mask.any() and set(np.unique(mask)) <= {0, 255}
        contrast = np.abs(image.astype(int) - clean.astype(int)).max(axis=2)[mask > 0]
        assert contrast.mean() > 60  # a strong defect
    clean, image, mask = render_sample(kind, 48, np.random.default_rng(0))
    assert np.array_equal(clean, image) and not mask.any()


def test_generator_rerun_cli_and_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["--root", str(tmp_path), "--category", "c", "--n_train", "3", "--n_test_good", "1",
          "--n_test_defect", "1", "--size", "16"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "c")
    generate_synthetic_class(str(tmp_path), "c", n_train=2, n_test_good=1, n_test_defect=1, size=16)
    assert len(list_mvtec(str(tmp_path), "c", "train")) == 2  # old files replaced, not mixed
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="real"):
        generate_synthetic_class(str(tmp_path), "real", size=16)
    assert (tmp_path / "real" / "keep.txt").exists()
