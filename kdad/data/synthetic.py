"""A small synthetic MVTec-style class (normal texture or object, ``blob`` and ``scratch`` defects).

Normal pixels stay in [40, 215] on every channel and every defect colour has a channel outside that
range, so a defect changes exactly the pixels of its mask (drawn with the same OpenCV primitive).

Command line::

    python -m kdad.data.synthetic --root data --category synthetic --kind texture --size 64
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

KINDS = ("texture", "object")
DEFECT_TYPES = ("blob", "scratch")
MARKER = ".kdad_synthetic"  # marks a folder written here, so a re-run may replace it

_LO, _HI = 40, 215  # range of normal pixels
_BLOB_COLOURS = ((30, 200, 250), (250, 40, 200), (40, 245, 60), (250, 230, 25))  # each leaves the range


def _normal_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Slightly rotated stripes crossed by a weaker wave, random phase, colour jitter and noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = np.deg2rad(rng.uniform(-8.0, 8.0))
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    period = size / 8.0 * rng.uniform(0.9, 1.1)
    pattern = 0.75 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi)) + 0.25 * np.sin(
        2 * np.pi * v / (2 * period) + rng.uniform(0, 2 * np.pi)
    )
    base = np.array([150.0, 125.0, 95.0]) + rng.uniform(-10.0, 10.0, 3)
    amplitude = 45.0 * rng.uniform(0.9, 1.1)
    image = base + amplitude * pattern[..., None] + rng.normal(0.0, 4.0, (size, size, 3))
    return np.clip(np.rint(image), _LO, _HI).astype(np.uint8)


def _normal_object(size: int, rng: np.random.Generator) -> Tuple[np.ndarray, Tuple[float, float], float]:
    """A ringed disc on a plain background; returns the image, the disc centre (x, y) and radius."""
    background = np.array([60.0, 60.0, 65.0]) + rng.uniform(-5.0, 5.0, 3)
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = background
    shift = 4  # sub-pixel drawing: coordinates in 1/16 px
    cx, cy = size / 2.0 + rng.uniform(-0.04, 0.04, 2) * size
    radius = 0.32 * size * rng.uniform(0.94, 1.06)
    centre = (int(round(cx * 16)), int(round(cy * 16)))
    colour = np.array([190.0, 160.0, 70.0]) + rng.uniform(-8.0, 8.0, 3)
    cv2.circle(image, centre, int(round(radius * 16)), colour.tolist(), -1, cv2.LINE_AA, shift)
    ring = (colour * 0.7).tolist()
    cv2.circle(image, centre, int(round(0.6 * radius * 16)), ring, max(1, size // 32), cv2.LINE_AA, shift)
    image += rng.normal(0.0, 3.0, image.shape)
    return np.clip(np.rint(image), _LO, _HI).astype(np.uint8), (cx, cy), radius


def _draw_defect(
    image: np.ndarray,
    defect_type: str,
    centre: Tuple[float, float],
    half_length: Tuple[float, float],
    semi_axes: Tuple[float, float],
    rng: np.random.Generator,
) -> Tuple[np.ndarray, np.ndarray]:
    """Draw a defect around ``centre``; returns (defective image, 0/255 mask).

    A scratch's half-length and a blob's semi-axes are drawn from the given (low, high) ranges in px.
    """
    size = image.shape[0]
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    cx, cy = centre
    if defect_type == "scratch":
        angle = rng.uniform(0.0, np.pi)
        half = rng.uniform(*half_length)
        dx, dy = half * np.cos(angle), half * np.sin(angle)
        p1 = (int(round(cx - dx)), int(round(cy - dy)))
        p2 = (int(round(cx + dx)), int(round(cy + dy)))
        cv2.line(mask, p1, p2, 255, max(2, round(size / 24)), cv2.LINE_8)
        grey = int(rng.integers(0, 16)) if rng.random() < 0.5 else int(rng.integers(240, 256))
        colour = np.array([grey, grey, grey])
    elif defect_type == "blob":
        axes = tuple(int(round(a)) for a in rng.uniform(*semi_axes, 2))
        centre_px = (int(round(cx)), int(round(cy)))
        cv2.ellipse(mask, centre_px, axes, rng.uniform(0.0, 180.0), 0, 360, 255, -1, cv2.LINE_8)
        colour = np.array(_BLOB_COLOURS[rng.integers(len(_BLOB_COLOURS))]) + rng.integers(-5, 6, 3)
    else:
        raise ValueError(f"unknown defect type {defect_type!r}; expected one of {DEFECT_TYPES}")
    defective = image.copy()
    defective[mask > 0] = np.clip(colour, 0, 255).astype(np.uint8)
    return defective, mask


def render_sample(
    kind: str, size: int, rng: np.random.Generator, defect_type: Optional[str] = None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one ``size x size`` RGB image; returns ``(clean, image, mask)``.

    ``clean`` is the normal image, ``image`` the same with the defect drawn (equal to ``clean`` when
    ``defect_type`` is None) and ``mask`` the ``uint8`` 0/255 mask of exactly the changed pixels.
    """
    if kind == "texture":
        clean = _normal_texture(size, rng)
        centre = tuple(rng.uniform(0.25 * size, 0.75 * size, 2))
        half_length, semi_axes = (0.22 * size, 0.32 * size), (0.11 * size, 0.18 * size)
    elif kind == "object":
        clean, (cx, cy), radius = _normal_object(size, rng)
        offset = rng.uniform(-0.2, 0.2, 2) * radius
        centre = (cx + offset[0], cy + offset[1])
        # offset <= 0.29 r and half-length <= 0.65 r: the defect stays on the disc
        half_length, semi_axes = (0.45 * radius, 0.65 * radius), (0.3 * radius, 0.45 * radius)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if defect_type is None:
        return clean, clean.copy(), np.zeros((size, size), dtype=np.uint8)
    image, mask = _draw_defect(clean, defect_type, centre, half_length, semi_axes, rng)
    return clean, image, mask


def _write_png(path: str, array: np.ndarray) -> None:
    """Write an RGB or single-channel ``uint8`` array as PNG (non-ASCII paths allowed)."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path!r} as PNG")
    buffer.tofile(path)


def _prepare_folder(class_dir: str) -> None:
    """Create ``class_dir``; replace a previous synthetic class, refuse to touch any other content."""
    if os.path.isdir(class_dir) and os.listdir(class_dir):
        if not os.path.isfile(os.path.join(class_dir, MARKER)):
            raise FileExistsError(
                f"folder {class_dir!r} exists and was not written by kdad.data.synthetic; "
                "choose another --root or --category"
            )
        for sub in ("train", "test", "ground_truth"):
            shutil.rmtree(os.path.join(class_dir, sub), ignore_errors=True)
    os.makedirs(class_dir, exist_ok=True)
    with open(os.path.join(class_dir, MARKER), "w", encoding="utf-8") as f:
        f.write("written by kdad.data.synthetic\n")


def generate_synthetic_class(
    root: str,
    category: str = "synthetic",
    kind: str = "texture",
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    size: int = 64,
    seed: int = 0,
) -> str:
    """Write an MVTec-style class under ``<root>/<category>`` and return that folder.

    ``train/good`` holds ``n_train`` images, ``test/good`` ``n_test_good`` and ``test/<type>``
    ``n_test_defect`` images for *each* defect type in :data:`DEFECT_TYPES`, with masks in
    ``ground_truth/<type>/<stem>_mask.png``. The same arguments give the same files.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError("n_train must be >= 1 and n_test_good, n_test_defect >= 0")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    class_dir = os.path.join(root, category)
    _prepare_folder(class_dir)

    jobs: List[Tuple[str, str, Optional[str], int]] = [("train", "good", None, n_train)]
    jobs.append(("test", "good", None, n_test_good))
    jobs += [("test", t, t, n_test_defect) for t in DEFECT_TYPES]
    for split_id, (split, folder, defect_type, count) in enumerate(jobs):
        out_dir = os.path.join(class_dir, split, folder)
        os.makedirs(out_dir, exist_ok=True)
        gt_dir = os.path.join(class_dir, "ground_truth", folder)
        if defect_type is not None:
            os.makedirs(gt_dir, exist_ok=True)
        width = max(3, len(str(count - 1)))
        for i in range(count):
            rng = np.random.default_rng([seed, split_id, i])
            _, image, mask = render_sample(kind, size, rng, defect_type)
            stem = f"{i:0{width}d}"
            _write_png(os.path.join(out_dir, stem + ".png"), image)
            if defect_type is not None:
                _write_png(os.path.join(gt_dir, stem + "_mask.png"), mask)
    return class_dir


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line entry point: write a synthetic class and print its folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="dataset root; the class goes to <root>/<category>")
    parser.add_argument("--category", default="synthetic")
    parser.add_argument("--kind", choices=KINDS, default="texture")
    parser.add_argument("--n_train", type=int, default=40)
    parser.add_argument("--n_test_good", type=int, default=10)
    parser.add_argument("--n_test_defect", type=int, default=10, help="test images per defect type")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        generate_synthetic_class(
            args.root, args.category, args.kind, args.n_train, args.n_test_good, args.n_test_defect,
            args.size, args.seed,
        )
    )


if __name__ == "__main__":
    main()
