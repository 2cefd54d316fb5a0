"""Heatmap panels for prediction: ``original | heatmap | overlay with outline`` plus a caption.

Generic numpy-in / numpy-out helpers (no Paddle), shared by :mod:`kdad.engine.predictor` and the
Paddle-Inference deploy code. Images are ``HxWx3`` ``uint8`` RGB; maps are ``HxW`` float *raw* maps
(:func:`kdad.methods.kdad.localization.localization_maps`' third output: blurred ``sum_c |grad|`` without
per-image scaling).

Colour scaling is global, never per image: a map is scaled with fixed values ``low``/``high``
taken from the normal-image statistics stored at calibration
(``checkpoint["calibration"]["map_statistics"]``, raw maps of held-out normal *training* images), so
a normal image stays cool-coloured and the same raw value has the same colour in every image.

Decisions (documented defaults):

* pixel threshold (outline): ``map_statistics["p999"]``, the 99.9th percentile of all pixels of the
  normal maps (about 1 normal pixel in 1000 exceeds it); overridable.
* colour range: ``low = p50`` (the typical normal pixel: dark blue) and
  ``high = p50 + 2 * (p999 - p50)``, so the default pixel threshold sits at the middle of the JET
  scale (green) and red means twice as far above the normal median as the threshold. Without
  statistics (calibration disabled) an explicit pixel threshold ``t`` gives ``(0, 2 t)``.

Signatures::

    default_pixel_threshold(map_statistics) -> float
    colour_range(map_statistics=None, pixel_threshold=None) -> (low, high)
    scale_map(raw_map, low, high) -> float32 HxW in [0, 1]
    colorize(raw_map, low, high) -> uint8 HxWx3 RGB (JET)
    overlay(image, heat, alpha=0.5) -> uint8 HxWx3 RGB
    over_threshold(raw_map, pixel_threshold) -> bool HxW
    draw_outline(image, region_mask, color=(255, 255, 255), thickness=None) -> uint8 HxWx3 RGB
    compose_panel(original, heatmap, overlay_with_outline, text, text_color=...) -> uint8 RGB,
        3 W wide, H + caption bar high
    caption(score, threshold, name="") -> (text, colour)
    result_panel(image, raw_map, score, threshold, low, high, pixel_threshold, display_size=256,
                 name="") -> uint8 RGB panel (all of the above in one call)
    save_rgb(path, image) -> None (PNG/JPG, non-ASCII paths allowed)
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

OK_COLOUR = (40, 170, 40)
NG_COLOUR = (220, 30, 30)
OUTLINE_COLOUR = (255, 255, 255)


def default_pixel_threshold(map_statistics: Mapping[str, float]) -> float:
    """The documented pixel threshold: the 99.9th percentile of normal raw-map pixels."""
    return float(map_statistics["p999"])


def colour_range(
    map_statistics: Optional[Mapping[str, float]] = None, pixel_threshold: Optional[float] = None
) -> Tuple[float, float]:
    """Fixed ``(low, high)`` of the colour scale from normal statistics (see the module docstring)."""
    if map_statistics:
        low, p999 = float(map_statistics["p50"]), float(map_statistics["p999"])
        high = low + 2.0 * (p999 - low)
    elif pixel_threshold is not None:
        low, high = 0.0, 2.0 * float(pixel_threshold)
    else:
        raise ValueError("no normal map statistics and no pixel threshold: cannot fix the colour scale")
    if not high > low:
        high = low + max(abs(low), 1e-12)
    return low, high


def scale_map(raw_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """``(raw - low) / (high - low)`` clipped to [0, 1], with the same ``low``/``high`` for every image."""
    if not high > low:
        raise ValueError(f"colour range needs high > low, got low={low}, high={high}")
    scaled = (np.asarray(raw_map, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0)


def colorize(raw_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """JET heatmap (``cv2.applyColorMap``) of a raw map with the fixed range ``low``..``high``; RGB."""
    levels = np.rint(scale_map(raw_map, low, high) * 255.0).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * image + alpha * heat`` (both ``HxWx3`` ``uint8``)."""
    if image.shape != heat.shape:
        raise ValueError(f"image {image.shape} and heatmap {heat.shape} differ in shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return cv2.addWeighted(image, 1.0 - alpha, heat, alpha, 0.0)


def over_threshold(raw_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """Pixels of the raw map above the pixel threshold (the outlined anomalous region)."""
    return np.asarray(raw_map) > pixel_threshold


def draw_outline(
    image: np.ndarray,
    region_mask: np.ndarray,
    color: Sequence[int] = OUTLINE_COLOUR,
    thickness: Optional[int] = None,
) -> np.ndarray:
    """A copy of ``image`` with the outer contours (``cv2.findContours``) of ``region_mask`` drawn."""
    if region_mask.shape != image.shape[:2]:
        raise ValueError(f"mask {region_mask.shape} does not match image {image.shape[:2]}")
    out = np.ascontiguousarray(image).copy()
    contours, _ = cv2.findContours(region_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        width = thickness if thickness is not None else max(1, round(max(image.shape[:2]) / 160))
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), width, cv2.LINE_8)
    return out


def compose_panel(
    original: np.ndarray,
    heatmap: np.ndarray,
    overlay_with_outline: np.ndarray,
    text: str,
    text_color: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
    """``original | heatmap | overlay`` side by side above a black caption bar (lines split on ``\\n``)."""
    tiles = [original, heatmap, overlay_with_outline]
    if any(t.shape != original.shape or t.ndim != 3 or t.shape[2] != 3 for t in tiles):
        raise ValueError(f"the three panels must be equal HxWx3 images, got {[t.shape for t in tiles]}")
    row = np.concatenate([t.astype(np.uint8) for t in tiles], axis=1)
    width = row.shape[1]
    lines = text.split("\n") if text else []
    font, thick = cv2.FONT_HERSHEY_SIMPLEX, 1
    longest = max(lines, key=len) if lines else ""
    scale = 0.5
    if longest:
        text_width = cv2.getTextSize(longest, font, 1.0, thick)[0][0]
        scale = float(np.clip((width - 12) / max(text_width, 1), 0.3, 0.6))
    line_height = int(round(30 * scale)) + 6
    bar = np.zeros((line_height * len(lines) + 6 if lines else 0, width, 3), dtype=np.uint8)
    for i, line in enumerate(lines):
        baseline = (i + 1) * line_height
        cv2.putText(bar, line, (6, baseline), font, scale, tuple(int(c) for c in text_color), thick,
                    cv2.LINE_AA)
    return np.concatenate([row, bar], axis=0)


def caption(score: float, threshold: float, name: str = "") -> Tuple[str, Tuple[int, int, int]]:
    """Caption text and colour: NG (red) iff ``score > threshold``, else OK (green)."""
    ng = score > threshold
    decision = "NG" if ng else "OK"
    relation = ">" if ng else "<="
    text = f"{decision}  score {score:.6g} {relation} threshold {threshold:.6g}"
    if name:
        text = f"{name}\n{text}"
    return text, NG_COLOUR if ng else OK_COLOUR


def _fit(array: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size x size`` (INTER_AREA when shrinking, bilinear when enlarging)."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    shrink = array.shape[0] > size or array.shape[1] > size
    return cv2.resize(array, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def result_panel(
    image: np.ndarray,
    raw_map: np.ndarray,
    score: float,
    threshold: float,
    low: float,
    high: float,
    pixel_threshold: float,
    display_size: int = 256,
    name: str = "",
    alpha: float = 0.5,
) -> np.ndarray:
    """The full panel of one image: original (squared like the model input), heatmap, overlay with
    the outline of the region over ``pixel_threshold``, and the score / decision / threshold caption.

    ``raw_map`` is resized (bilinear) to ``display_size`` before colouring and thresholding.
    """
    shown = _fit(image, display_size)
    raw = _fit(np.asarray(raw_map, dtype=np.float32), display_size)
    heat = colorize(raw, low, high)
    outlined = draw_outline(overlay(shown, heat, alpha), over_threshold(raw, pixel_threshold))
    text, colour = caption(score, threshold, name)
    return compose_panel(shown, heat, outlined, text, colour)


def save_rgb(path: str, image: np.ndarray) -> None:
    """Write an RGB ``uint8`` image; the format follows the extension (non-ASCII paths allowed)."""
    ext = "." + path.rsplit(".", 1)[-1] if "." in path else ".png"
    ok, buffer = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path!r}")
    buffer.tofile(path)
