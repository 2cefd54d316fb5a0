"""Listing of MVTec-style and good/defect folders, the paddle dataset and the hold-out split."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import paddle

from kdad.data.io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    read_image,
    read_mask,
    resize_mask,
    resize_rgb,
    to_chw_float,
)

MVTEC_LAYOUT = (
    "expected MVTec AD layout: <root>/<category>/train/good/*.png, <root>/<category>/test/<type>/*.png "
    "and <root>/<category>/ground_truth/<type>/<stem>_mask.png"
)
FOLDER_LAYOUT = "expected layout: <root>/<good_dir>/* (normal images) and optionally <root>/<defect_dir>/*"


@dataclass
class Sample:
    """One image: ``label`` 0 good / 1 defective; ``mask_path`` None means empty (good) or unknown."""

    path: str
    label: int
    defect_type: str
    mask_path: Optional[str]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _require_dir(folder: str, layout: str) -> None:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder!r} does not exist ({layout})")


def _list_images(folder: str) -> List[str]:
    """Sorted image file names in ``folder`` (other files and hidden files ignored)."""
    return sorted(n for n in os.listdir(folder) if _is_image(n) and os.path.isfile(os.path.join(folder, n)))


def _image_files(folder: str, layout: str) -> List[str]:
    """Sorted image file names in ``folder``; an error when it is missing or holds no image."""
    _require_dir(folder, layout)
    names = _list_images(folder)
    if not names:
        raise FileNotFoundError(
            f"folder {folder!r} contains no images (extensions {', '.join(IMAGE_EXTENSIONS)}; {layout})"
        )
    return names


def _find_mask(gt_dir: str, stem: str) -> Optional[str]:
    """``<stem>_mask.png`` in ``gt_dir``, else ``<stem>_mask<ext>`` or ``<stem><ext>`` (BTAD-style)."""
    for suffix in ("_mask", ""):
        for ext in IMAGE_EXTENSIONS:
            candidate = os.path.join(gt_dir, stem + suffix + ext)
            if os.path.isfile(candidate):
                return candidate
    return None


def list_mvtec(root: str, category: str, split: str, require_masks: bool = True) -> List[Sample]:
    """Samples of one MVTec AD class, sorted by defect type (``good`` first) then file name.

    ``train`` lists ``train/good``; ``test`` lists every ``test/<type>`` folder. A defective test image
    without a mask is an error unless ``require_masks`` is False (its ``mask_path`` is then None).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _require_dir(root, MVTEC_LAYOUT)
    class_dir = os.path.join(root, category)
    _require_dir(class_dir, MVTEC_LAYOUT)
    split_dir = os.path.join(class_dir, split)
    _require_dir(split_dir, MVTEC_LAYOUT)

    if split == "train":
        good_dir = os.path.join(split_dir, "good")
        names = _image_files(good_dir, MVTEC_LAYOUT)
        return [Sample(os.path.join(good_dir, n), 0, "good", None) for n in names]

    types = sorted(
        d for d in os.listdir(split_dir)
        if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d))
    )
    types.sort(key=lambda d: d != "good")  # stable: good first, the others alphabetical
    samples: List[Sample] = []
    for defect_type in types:
        type_dir = os.path.join(split_dir, defect_type)
        gt_dir = os.path.join(class_dir, "ground_truth", defect_type)
        for name in _list_images(type_dir):
            path = os.path.join(type_dir, name)
            if defect_type == "good":
                samples.append(Sample(path, 0, "good", None))
                continue
            stem = os.path.splitext(name)[0]
            mask_path = _find_mask(gt_dir, stem)
            if mask_path is None and require_masks:
                expected = os.path.join(gt_dir, stem + "_mask.png")
                raise FileNotFoundError(
                    f"defective test image {path!r} has no ground-truth mask (expected {expected!r}); "
                    "set require_masks=False to evaluate image-level metrics only"
                )
            samples.append(Sample(path, 1, defect_type, mask_path))
    if not samples:
        raise FileNotFoundError(
            f"folder {split_dir!r} contains no images in its <type> folders ({MVTEC_LAYOUT})"
        )
    return samples


def list_folder(root: str, good_dir: str = "good", defect_dir: str = "defect") -> List[Sample]:
    """Samples of ``<root>/<good_dir>`` (label 0) and, if present, ``<root>/<defect_dir>`` (label 1).

    No masks: ``mask_path`` is None. Good samples get ``defect_type`` ``"good"``, defective ones
    ``defect_dir``.
    """
    _require_dir(root, FOLDER_LAYOUT)
    good = os.path.join(root, good_dir)
    samples = [Sample(os.path.join(good, n), 0, "good", None) for n in _image_files(good, FOLDER_LAYOUT)]
    defect = os.path.join(root, defect_dir)
    if os.path.isdir(defect):
        samples += [
            Sample(os.path.join(defect, n), 1, defect_dir, None) for n in _image_files(defect, FOLDER_LAYOUT)
        ]
    return samples


class AnomalyDataset(paddle.io.Dataset):
    """Images resized to ``image_size``; items are ``(image, label, mask, has_mask, index)``.

    ``image`` is ``float32 [3, S, S]`` in [0, 1], ``mask`` ``float32 [S, S]`` (zeros when
    ``mask_path`` is None), ``has_mask`` 1 for good images and images with a mask file, 0 when the mask
    is unknown. With ``preload`` every file is decoded once, at construction.
    """

    def __init__(self, samples: List[Sample], image_size: int, preload: bool = True) -> None:
        super().__init__()
        if int(image_size) != image_size or image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.samples = list(samples)
        self.image_size = int(image_size)
        self.labels = np.array([s.label for s in self.samples], dtype=np.int64)
        self.has_masks = np.array(
            [int(s.mask_path is not None or s.label == 0) for s in self.samples], dtype=np.int64
        )
        self._images: Optional[np.ndarray] = None  # uint8 [N, S, S, 3], resized
        self._masks: Optional[List[Optional[np.ndarray]]] = None  # float32 [S, S], None = zeros
        if preload and self.samples:
            workers = min(8, os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=workers) as pool:  # cv2 releases the GIL
                loaded = list(pool.map(self._try_load, range(len(self.samples))))
            errors = [item for item in loaded if isinstance(item, Exception)]
            if len(errors) == 1:
                raise errors[0]
            if errors:  # every unreadable file at once, not only the first one
                listed = "\n  ".join(str(error) for error in errors)
                raise ImageReadError(f"{len(errors)} of {len(self.samples)} files cannot be read "
                                     f"(fix or remove them all, then run again):\n  {listed}")
            self._images = np.stack([image for image, _ in loaded])
            self._masks = [mask for _, mask in loaded]

    def _try_load(self, i: int):
        """:meth:`_load`, or the error (an unreadable image or a mask of the wrong size) it raised."""
        try:
            return self._load(i)
        except ValueError as error:  # ImageReadError is a ValueError
            return error

    def _load(self, i: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Decode sample ``i``: resized ``uint8`` RGB image and resized mask (None when absent)."""
        sample = self.samples[i]
        image = read_image(sample.path)
        if sample.mask_path is None:
            return resize_rgb(image, self.image_size), None
        mask = read_mask(sample.mask_path)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"mask {sample.mask_path!r} is {mask.shape[1]}x{mask.shape[0]} but image {sample.path!r} "
                f"is {image.shape[1]}x{image.shape[0]}"
            )
        return resize_rgb(image, self.image_size), resize_mask(mask, self.image_size)

    def _zeros(self) -> np.ndarray:
        return np.zeros((self.image_size, self.image_size), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        i = i % len(self)
        if self._images is not None and self._masks is not None:
            image, mask = self._images[i], self._masks[i]
        else:
            image, mask = self._load(i)
        return (
            to_chw_float(image),
            np.array(self.labels[i], dtype=np.int64),
            self._zeros() if mask is None else mask.copy(),
            np.array(self.has_masks[i], dtype=np.int64),
            np.array(i, dtype=np.int64),
        )

    def images(self) -> np.ndarray:
        """All images as ``float32 [N, 3, S, S]`` in [0, 1]."""
        size = self.image_size
        if not self.samples:
            return np.zeros((0, 3, size, size), dtype=np.float32)
        if self._images is not None:
            resized = self._images
        else:
            resized = np.stack([self._load(i)[0] for i in range(len(self))])
        return np.ascontiguousarray((resized.astype(np.float32) / 255.0).transpose(0, 3, 1, 2))

    def masks(self) -> np.ndarray:
        """All masks as ``float32 [N, S, S]`` (zeros for good images and unknown masks)."""
        if not self.samples:
            return np.zeros((0, self.image_size, self.image_size), dtype=np.float32)
        masks = self._masks if self._masks is not None else [self._load(i)[1] for i in range(len(self))]
        return np.stack([self._zeros() if m is None else m for m in masks])


def split_holdout(n: int, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic split of ``range(n)`` into sorted ``(train_indices, holdout_indices)``.

    The hold-out has ``round(n * fraction)`` items, at least 1 when ``fraction > 0`` and ``n >= 2``,
    and at most ``n - 1`` so that training keeps an image.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    k = min(max(int(round(n * fraction)), 1), n - 1) if fraction > 0 and n >= 2 else 0
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[k:]).astype(np.int64), np.sort(order[:k]).astype(np.int64)


def split_folder_good(n: int, test_fraction: float, holdout_fraction: float,
                      seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic split of the ``n`` good images of a folder dataset into sorted
    ``(train, holdout, test)`` indices that never overlap.

    ``test`` has ``round(n * test_fraction)`` images (at least 1 when ``test_fraction > 0`` and
    ``n >= 2``; training keeps at least one); the rest is split by :func:`split_holdout` with
    ``holdout_fraction`` (calibration). Seeded: the same ``seed`` gives the same split.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test fraction must be in [0, 1), got {test_fraction}")
    # another stream than the hold-out split's, so the two splits are independent
    rest, test = split_holdout(n, test_fraction, seed + 7919)
    train_in_rest, holdout_in_rest = split_holdout(len(rest), holdout_fraction, seed)
    return rest[train_in_rest], rest[holdout_in_rest], test
