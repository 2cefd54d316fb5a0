"""Image and mask reading (OpenCV) and the resize recipe shared by training and inference.

Every reader returns RGB ``uint8`` whatever the file holds (grayscale, RGBA, palette, 16-bit) and
raises :class:`ImageReadError` naming the file when it cannot be decoded.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image or mask file is missing, empty, corrupt or of an unsupported pixel type."""


def _decode(path: str) -> np.ndarray:
    """Decode ``path`` with ``cv2.IMREAD_UNCHANGED`` (channels in OpenCV's BGR(A) order)."""
    if not os.path.isfile(path):
        raise ImageReadError(f"cannot read image {path!r}: no such file")
    try:
        buffer = np.fromfile(path, dtype=np.uint8)  # np.fromfile also handles non-ASCII paths
    except OSError as exc:
        raise ImageReadError(f"cannot read image {path!r}: {exc}") from exc
    if buffer.size == 0:
        raise ImageReadError(f"cannot read image {path!r}: the file is empty")
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageReadError(
            f"cannot read image {path!r}: not a decodable image (corrupt, truncated or not an image; "
            f"supported: {', '.join(IMAGE_EXTENSIONS)})"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ImageReadError(f"cannot read image {path!r}: unsupported array shape {image.shape}")
    return image


def read_image(path: str) -> np.ndarray:
    """Read an image file as an ``HxWx3`` ``uint8`` RGB array (alpha dropped, 16 bit scaled to 8)."""
    image = _decode(path)
    if image.dtype == np.uint16:
        image = np.rint(image / 257.0).astype(np.uint8)  # exact: 0 -> 0, 65535 -> 255
    elif image.dtype != np.uint8:
        raise ImageReadError(
            f"cannot read image {path!r}: unsupported pixel type {image.dtype} (expected 8 or 16 bit)"
        )
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str) -> np.ndarray:
    """Read a ground-truth mask as ``HxW`` ``float32``: 1 where any colour channel is nonzero, else 0."""
    mask = _decode(path)
    if mask.ndim == 3:
        mask = mask[:, :, :3].any(axis=2)  # ignore an alpha channel
    return (mask != 0).astype(np.float32)


def _check_size(size: int) -> None:
    if int(size) != size or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """``cv2.INTER_AREA`` resize of an ``HxWx3`` ``uint8`` RGB image to ``size x size x 3`` ``uint8``."""
    _check_size(size)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    return cv2.resize(image, (int(size), int(size)), interpolation=cv2.INTER_AREA)


def to_chw_float(resized: np.ndarray) -> np.ndarray:
    """``HxWx3`` ``uint8`` -> ``float32`` ``[3, H, W]`` in [0, 1] (divide by 255, no mean/std)."""
    return np.ascontiguousarray((resized.astype(np.float32) / 255.0).transpose(2, 0, 1))


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """RGB ``uint8`` image -> ``float32`` ``[3, size, size]`` in [0, 1] (INTER_AREA resize, then /255)."""
    return to_chw_float(resize_rgb(image, size))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """``cv2.INTER_AREA`` resize of an ``HxW`` 0/1 mask to ``float32`` ``[size, size]`` (soft edges)."""
    _check_size(size)
    if mask.ndim != 2:
        raise ValueError(f"expected an HxW mask, got shape {mask.shape}")
    resized = cv2.resize(mask.astype(np.float32), (int(size), int(size)), interpolation=cv2.INTER_AREA)
    return np.clip(resized, 0.0, 1.0)
