"""Heatmap panels for prediction, shared by :mod:`kdad.engine.predictor` (``tools/predict.py``) and
the deploy runtime (``tools/infer.py``, ONNX). numpy / OpenCV only (no Paddle). Images are ``HxWx3``
``uint8`` RGB; maps are ``SxS`` float maps in the model's input frame (the whole image resized to
``SxS``, no crop), in the method's own units (KDAD: blurred ``sum_c |d score / d pixel|``; the other
methods: the anomaly map of the exported model), never scaled per image.

One panel per image (:func:`result_panel`), for an inspection engineer:

* a title bar: OK / NG badge, file name, ``score S > threshold T (k x)``;
* the input at its own aspect ratio (:func:`tile_shape`), the anomaly map coloured with a fixed
  scale, and an overlay that keeps the part's colours (the heat is blended in proportion to the
  map, so normal areas are shown unchanged);
* on the map and the overlay: the outline of the region over the pixel threshold (black and white,
  visible on any colour) and, on NG panels, a magenta cross at the map maximum (where the score comes
  from), even when no pixel passes the pixel threshold;
* a colour bar with its scale, the pixel threshold and this image's map maximum, and a legend
  saying what the outline means and where the maximum is.

Pixel threshold (:func:`pixel_threshold_rule`), from the same held-out normal images as the image
threshold (the calibration of ``tools/train.py``; the ``deploy.yaml`` of an export):

* PaDiM, PatchCore, STFPM, RD4AD and CFlow-AD (:data:`SCORE_IS_MAP_MAX`): the image threshold
  itself. Their score is the maximum of their map (PatchCore: the re-weighted largest patch
  distance, the quantity its map shows), so an image is NG exactly when some pixel is over the
  threshold. A ``--threshold`` given by the user moves the pixel threshold with it.
* KDAD (gradient and feature maps, not in score units) and DRAEM (its score is the largest 21x21
  mean of its probability map, not a pixel value; the image threshold would outline isolated
  normal pixels): the largest value of the held-out normal maps (``map_statistics["max"]``;
  ``p999`` for statistics without it). Like the image threshold, which is the largest held-out
  normal score whenever at most ``1 / false_reject_rate`` (100 by default) images are held out, no
  held-out normal image has a pixel over it.
* ``--pixel_threshold`` (predict) overrides it.

Colour scale (:func:`colour_range`), fixed per model, never per image: ``low`` = the normal median
``p50`` (dark blue), ``high = low + 2 (t - low)`` with ``t`` the *calibrated* pixel threshold, so
``t`` is mid-scale (green): cool colours are normal, warm colours are over the threshold, and the
same value has the same colour in every image. Without normal statistics an explicit pixel
threshold ``t`` gives ``(0, 2 t)``; without either the caller uses the image's own range and says so.

Signatures::

    pixel_threshold_rule(method, image_threshold, map_statistics) -> (value or None, source)
    default_pixel_threshold(map_statistics, method="kdad", image_threshold=None) -> float
    display_scale(method, map_statistics, threshold, calibrated_threshold=None, pixel_threshold=None)
        -> {"pixel_threshold", "pixel_threshold_source", "colour_low", "colour_high"}
    colour_range(map_statistics=None, pixel_threshold=None) -> (low, high)
    scale_map(raw_map, low, high) -> float32 in [0, 1] (NaN -> 1)
    colorize(raw_map, low, high) -> uint8 RGB (JET)
    overlay(image, heat, alpha=0.5) -> uint8 RGB (uniform blend)
    heat_overlay(image, raw_map, low, high, max_alpha=0.6) -> uint8 RGB (blend in proportion to the map)
    over_threshold(raw_map, pixel_threshold) -> bool mask
    map_maximum(raw_map) -> (value, row, column)
    draw_outline(image, region_mask, color=..., thickness=None) -> uint8 RGB
    tile_shape(height, width, display_size) -> (tile height, tile width), the image's aspect ratio
    caption(score, threshold, name="") -> (text, colour)
    result_panel(image, raw_map, score, threshold, low, high, pixel_threshold, display_size=256,
                 name="", pixel_note="", scale_note="") -> uint8 RGB panel
    save_rgb(path, image) -> None (PNG/JPG, non-ASCII paths allowed)
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

OK_COLOUR = (40, 170, 40)
NG_COLOUR = (220, 30, 30)
NONE_COLOUR = (120, 120, 120)
OUTLINE_COLOUR = (255, 255, 255)
MARK_COLOUR = (255, 0, 255)
BACKGROUND = (28, 28, 28)
TEXT_COLOUR = (235, 235, 235)
DIM_TEXT = (170, 170, 170)
FONT = cv2.FONT_HERSHEY_SIMPLEX

#: methods whose image score is the maximum of their map (or, PatchCore, its re-weighted maximum):
#: their pixel threshold is the image threshold
SCORE_IS_MAP_MAX = {
    "padim": "the PaDiM score is the maximum of its map",
    "patchcore": "the PatchCore score is the re-weighted largest patch distance, which its map shows",
    "stfpm": "the STFPM score is the maximum of its map",
    "rd4ad": "the RD4AD score is the maximum of its map",
    "cflow": "the CFlow-AD score is the maximum of its map",
}

#: ``--pixel_threshold``'s help, the same for ``tools/predict.py``, ``tools/infer.py`` and the ONNX runner
PIXEL_THRESHOLD_HELP = ("map value outlined as anomalous (default: the image threshold for "
                        + ", ".join(SCORE_IS_MAP_MAX) + ", whose score is their map's maximum; the largest "
                        "held-out normal map value for the others; kdad/visualize.py)")


def _finite(value: Any, what: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value}")
    return number


def pixel_threshold_rule(method: str, image_threshold: Optional[float],
                         map_statistics: Optional[Mapping[str, float]]) -> Tuple[Optional[float], str]:
    """The documented pixel threshold (see the module docstring) and a phrase saying where it is from."""
    if method in SCORE_IS_MAP_MAX and image_threshold is not None:
        return _finite(image_threshold, "threshold"), f"the image threshold ({SCORE_IS_MAP_MAX[method]})"
    if map_statistics:
        if "max" in map_statistics:
            return (_finite(map_statistics["max"], "map_statistics max"),
                    "the largest pixel of the held-out normal maps")
        return (_finite(map_statistics["p999"], "map_statistics p999"),
                "p99.9 of the held-out normal map pixels")
    return None, "none (no normal map statistics)"


def default_pixel_threshold(map_statistics: Mapping[str, float], method: str = "kdad",
                            image_threshold: Optional[float] = None) -> float:
    """:func:`pixel_threshold_rule`'s value (an error when there is none)."""
    value, source = pixel_threshold_rule(method, image_threshold, map_statistics)
    if value is None:
        raise ValueError(f"no pixel threshold: {source}")
    return value


def colour_range(
    map_statistics: Optional[Mapping[str, float]] = None, pixel_threshold: Optional[float] = None
) -> Tuple[float, float]:
    """Fixed ``(low, high)`` of the colour scale (see the module docstring). ``pixel_threshold`` is the
    *calibrated* one (default: :func:`pixel_threshold_rule` of KDAD maps), not a user's override."""
    if map_statistics:
        low = _finite(map_statistics["p50"], "map_statistics p50")
        t = (_finite(pixel_threshold, "pixel_threshold") if pixel_threshold is not None
             else default_pixel_threshold(map_statistics))
        if not t > low:  # degenerate statistics: fall back to the spread of the normal pixels
            t = max(float(map_statistics.get("p999", low)), float(map_statistics.get("max", low)))
        high = low + 2.0 * (t - low)
    elif pixel_threshold is not None:
        low, high = 0.0, 2.0 * _finite(pixel_threshold, "pixel_threshold")
    else:
        raise ValueError("no normal map statistics and no pixel threshold: cannot fix the colour scale")
    if not high > low:
        high = low + max(abs(low), 1e-12)
    return low, high


def display_scale(method: str, map_statistics: Optional[Mapping[str, float]], threshold: Optional[float],
                  calibrated_threshold: Optional[float] = None,
                  pixel_threshold: Optional[float] = None) -> Dict[str, Any]:
    """Pixel threshold and colour range of a run, one rule for the predictor and the deploy runtime.

    ``threshold`` is the image threshold in use, ``calibrated_threshold`` the calibrated one (it fixes
    the colours; default ``threshold``), ``pixel_threshold`` an explicit override. Colour range None:
    no statistics and no pixel threshold, the caller scales per image and says so."""
    if threshold is not None:
        threshold = _finite(threshold, "threshold")
    rule, source = pixel_threshold_rule(method, threshold, map_statistics)
    if pixel_threshold is not None:
        rule, source = _finite(pixel_threshold, "pixel_threshold"), "argument"
    calibrated, _ = pixel_threshold_rule(method, calibrated_threshold if calibrated_threshold is not None
                                         else threshold, map_statistics)
    low = high = None
    if map_statistics or calibrated is not None or rule is not None:
        low, high = colour_range(map_statistics, calibrated if calibrated is not None else rule)
    return {"pixel_threshold": rule, "pixel_threshold_source": source, "colour_low": low, "colour_high": high}


def scale_map(raw_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """``(raw - low) / (high - low)`` clipped to [0, 1], with the same ``low``/``high`` for every image;
    a NaN pixel becomes 1 (shown as the most anomalous colour, never as normal)."""
    if not high > low:
        raise ValueError(f"colour range needs high > low, got low={low}, high={high}")
    scaled = (np.asarray(raw_map, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(np.nan_to_num(scaled, nan=1.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


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


def heat_overlay(image: np.ndarray, raw_map: np.ndarray, low: float, high: float,
                 max_alpha: float = 0.6) -> np.ndarray:
    """The heat blended in proportion to the map: weight ``max_alpha * scale_map(raw)`` per pixel, so
    pixels at or below ``low`` (the normal median) keep the image's own colours exactly."""
    if image.shape[:2] != np.shape(raw_map):
        raise ValueError(f"image {image.shape} and map {np.shape(raw_map)} differ in size")
    if not 0.0 <= max_alpha <= 1.0:
        raise ValueError(f"max_alpha must be in [0, 1], got {max_alpha}")
    weight = (max_alpha * scale_map(raw_map, low, high))[:, :, None]
    heat = colorize(raw_map, low, high).astype(np.float32)
    blended = image.astype(np.float32) * (1.0 - weight) + heat * weight
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def over_threshold(raw_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """Pixels of the raw map above the pixel threshold (the outlined anomalous region)."""
    return np.asarray(raw_map) > pixel_threshold


def map_maximum(raw_map: np.ndarray) -> Tuple[float, int, int]:
    """``(value, row, column)`` of the largest finite map value (NaN pixels are ignored)."""
    values = np.asarray(raw_map, dtype=np.float64)
    finite = np.where(np.isfinite(values), values, -np.inf)
    row, column = np.unravel_index(int(np.argmax(finite)), values.shape)
    return float(values[row, column]), int(row), int(column)


def draw_outline(
    image: np.ndarray,
    region_mask: np.ndarray,
    color: Sequence[int] = OUTLINE_COLOUR,
    thickness: Optional[int] = None,
) -> np.ndarray:
    """A copy of ``image`` with the outer contours (``cv2.findContours``) of ``region_mask`` drawn:
    a black line under a ``color`` line, readable on bright and dark parts alike."""
    if region_mask.shape != image.shape[:2]:
        raise ValueError(f"mask {region_mask.shape} does not match image {image.shape[:2]}")
    out = np.ascontiguousarray(image).copy()
    contours, _ = cv2.findContours(region_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        width = thickness if thickness is not None else max(1, round(max(image.shape[:2]) / 200))
        cv2.drawContours(out, contours, -1, (0, 0, 0), width + 2, cv2.LINE_8)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), width, cv2.LINE_8)
    return out


def _draw_cross(image: np.ndarray, x: float, y: float, size: int) -> None:
    """A reticle at ``(x, y)``: four magenta ticks (black-edged) around a gap that leaves the spot itself
    visible; magenta is in neither the JET scale nor most parts."""
    cx, cy = int(round(x)), int(round(y))
    gap = max(3, size // 3)
    ticks = [((cx - size, cy), (cx - gap, cy)), ((cx + gap, cy), (cx + size, cy)),
             ((cx, cy - size), (cx, cy - gap)), ((cx, cy + gap), (cx, cy + size))]
    for start, end in ticks:
        cv2.line(image, start, end, (0, 0, 0), 5, cv2.LINE_8)
    for start, end in ticks:
        cv2.line(image, start, end, MARK_COLOUR, 2, cv2.LINE_8)


def tile_shape(height: int, width: int, display_size: int = 256) -> Tuple[int, int]:
    """``(tile height, tile width)`` with the image's aspect ratio and about ``display_size ** 2``
    pixels; the long side at most ``4 * display_size``."""
    if height < 1 or width < 1 or display_size < 1:
        raise ValueError(f"need positive sizes, got {height}x{width} and display size {display_size}")
    aspect = width / height
    long_side = display_size * min(math.sqrt(max(aspect, 1.0 / aspect)), 4.0)
    if aspect >= 1.0:
        return max(1, int(round(long_side / aspect))), int(round(long_side))
    return int(round(long_side)), max(1, int(round(long_side * aspect)))


def _resize(array: np.ndarray, shape: Tuple[int, int], enlarge: int,
            shrink: int = cv2.INTER_AREA) -> np.ndarray:
    height, width = shape
    if array.shape[0] == height and array.shape[1] == width:
        return array
    larger = height * width > array.shape[0] * array.shape[1]
    return cv2.resize(array, (width, height), interpolation=enlarge if larger else shrink)


def caption(score: float, threshold: Optional[float], name: str = "") -> Tuple[str, Tuple[int, int, int]]:
    """Decision line and colour: NG (red) iff ``score > threshold`` or the score is not finite, OK
    (green) otherwise; no threshold: no decision (grey)."""
    if threshold is None:
        text, colour = f"--  score {score:.6g} (no threshold: no decision)", NONE_COLOUR
    elif not math.isfinite(score):
        text, colour = f"NG  score {score} is not a number (threshold {threshold:.6g})", NG_COLOUR
    else:
        ng = score > threshold
        relation = ">" if ng else "<="
        ratio = f" ({score / threshold:.2f}x)" if threshold > 0 else ""
        text = f"{'NG' if ng else 'OK'}  score {score:.6g} {relation} threshold {threshold:.6g}{ratio}"
        colour = NG_COLOUR if ng else OK_COLOUR
    if name:
        text = f"{name}\n{text}"
    return text, colour


# --- the panel ----------------------------------------------------------------------------------

PAD, GAP, LABEL_HEIGHT, MIN_WIDTH = 10, 8, 22, 560
TEXT_SCALE = 0.45


def _ascii(text: str) -> str:
    """OpenCV's fonts are ASCII only: other characters are shown as '?'."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in str(text))


def _width(text: str, scale: float, thickness: int = 1) -> int:
    return cv2.getTextSize(text, FONT, scale, thickness)[0][0]


def _shorten(text: str, scale: float, max_width: int, thickness: int = 1) -> str:
    """``text``, or ``...`` and as much of its end as fits in ``max_width`` pixels."""
    text = _ascii(text)
    if _width(text, scale, thickness) <= max_width:
        return text
    keep = len(text)
    while keep > 1 and _width("..." + text[-keep:], scale, thickness) > max_width:
        keep -= 1
    return "..." + text[-keep:]


def _wrap(text: str, scale: float, max_width: int) -> List[str]:
    lines: List[str] = []
    for paragraph in _ascii(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and _width(candidate, scale) > max_width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(_shorten(line, scale, max_width))
    return lines


def _put(canvas: np.ndarray, text: str, x: int, baseline: int, scale: float = TEXT_SCALE,
         colour: Sequence[int] = TEXT_COLOUR, thickness: int = 1) -> None:
    cv2.putText(canvas, text, (int(x), int(baseline)), FONT, scale, tuple(int(c) for c in colour), thickness,
                cv2.LINE_AA)


def _title_bar(width: int, name: str, score: float, threshold: Optional[float]) -> np.ndarray:
    text, colour = caption(score, threshold)
    badge, detail = text.split("  ", 1)
    bar = np.full((68, width, 3), BACKGROUND, np.uint8)
    badge_width = _width(badge, 0.8, 2) + 16
    cv2.rectangle(bar, (PAD, 8), (PAD + badge_width, 38), tuple(int(c) for c in colour), -1)
    _put(bar, badge, PAD + 8, 32, 0.8, (255, 255, 255), 2)
    x = PAD + badge_width + 12
    _put(bar, _shorten(name or "(image)", 0.6, width - x - PAD), x, 31, 0.6, TEXT_COLOUR, 1)
    _put(bar, _shorten(detail, 0.55, width - 2 * PAD), PAD, 60, 0.55, TEXT_COLOUR, 1)
    return bar


def _colour_bar(width: int, low: float, high: float, pixel_threshold: Optional[float], peak: float,
                peak_label: str) -> np.ndarray:
    """JET from ``low`` to ``high`` with its values, the pixel threshold and this image's maximum."""
    section = np.full((64, width, 3), BACKGROUND, np.uint8)
    x0, x1, top, bottom = PAD, width - PAD, 22, 38
    levels = np.linspace(0, 255, x1 - x0).astype(np.uint8)[None, :]
    strip = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    section[top:bottom, x0:x1] = np.repeat(strip, bottom - top, axis=0)

    def position(value: float) -> int:
        fraction = 1.0 if not math.isfinite(value) else (value - low) / (high - low)
        return int(round(x0 + np.clip(fraction, 0.0, 1.0) * (x1 - x0 - 1)))

    baseline = bottom + 17
    left, right = f"{low:.4g}", f"{high:.4g}+"
    _put(section, left, x0, baseline, 0.42, DIM_TEXT)
    _put(section, right, x1 - _width(right, 0.42), baseline, 0.42, DIM_TEXT)
    if pixel_threshold is not None:
        x = position(pixel_threshold)
        cv2.line(section, (x, top - 3), (x, bottom + 2), (0, 0, 0), 3)
        cv2.line(section, (x, top - 3), (x, bottom + 2), (255, 255, 255), 1)
        label = f"pixel threshold {pixel_threshold:.4g}"
        w = _width(label, 0.42)
        lx = int(np.clip(x - w // 2, x0 + _width(left, 0.42) + 8, x1 - _width(right, 0.42) - 8 - w))
        _put(section, label, lx, baseline, 0.42, TEXT_COLOUR)
    x = position(peak)
    triangle = np.array([[x, top - 1], [x - 6, top - 10], [x + 6, top - 10]], np.int32)
    cv2.fillPoly(section, [triangle], (255, 255, 255), cv2.LINE_AA)
    w = _width(peak_label, 0.42)
    lx = x + 10 if x + 10 + w <= x1 else x - 10 - w
    _put(section, peak_label, max(x0, lx), top - 6, 0.42, TEXT_COLOUR)
    return section


def result_panel(
    image: np.ndarray,
    raw_map: np.ndarray,
    score: float,
    threshold: Optional[float],
    low: float,
    high: float,
    pixel_threshold: Optional[float],
    display_size: int = 256,
    name: str = "",
    pixel_note: str = "",
    scale_note: str = "fixed colour scale from held-out normal maps",
    max_alpha: float = 0.6,
) -> np.ndarray:
    """The panel of one image (see the module docstring): title, input / map / overlay tiles at the
    image's aspect ratio, colour bar and legend. ``raw_map`` is the ``SxS`` map of the model input
    (the whole image resized), ``threshold`` None gives no decision, ``pixel_threshold`` None no
    outline. ``pixel_note`` says where the pixel threshold comes from, ``scale_note`` the colours."""
    raw = np.asarray(raw_map, dtype=np.float32)
    if raw.ndim != 2:
        raise ValueError(f"expected an HxW map, got shape {raw.shape}")
    height, width = image.shape[:2]
    th, tw = tile_shape(height, width, display_size)
    shown = _resize(image, (th, tw), cv2.INTER_NEAREST)
    smooth = _resize(raw, (th, tw), cv2.INTER_LINEAR)
    heat = colorize(smooth, low, high)
    mixed = heat_overlay(shown, smooth, low, high, max_alpha)
    ng = threshold is not None and (not math.isfinite(score) or score > threshold)
    peak, row, column = map_maximum(raw)
    area = 0.0
    if pixel_threshold is not None:
        blocky = _resize(raw, (th, tw), cv2.INTER_NEAREST, cv2.INTER_NEAREST)
        mask = over_threshold(smooth, pixel_threshold) | over_threshold(blocky, pixel_threshold)
        heat, mixed = draw_outline(heat, mask), draw_outline(mixed, mask)
        area = float(over_threshold(raw, pixel_threshold).mean())
    x_in = int((column + 0.5) * width / raw.shape[1])
    y_in = int((row + 0.5) * height / raw.shape[0])
    if ng:
        x, y = (column + 0.5) * tw / raw.shape[1], (row + 0.5) * th / raw.shape[0]
        size = int(np.clip(min(th, tw) // 10, 9, 31))
        _draw_cross(heat, x, y, size)
        _draw_cross(mixed, x, y, size)

    tiles = [shown, heat, mixed]
    labels = [f"input {width}x{height} px", "anomaly map", "overlay"]
    vertical = tw >= 2 * th
    content_width = tw if vertical else 3 * tw + 2 * GAP
    panel_width = max(content_width + 2 * PAD, MIN_WIDTH)
    if vertical:
        body = np.full((3 * (LABEL_HEIGHT + th) + 2 * GAP, panel_width, 3), BACKGROUND, np.uint8)
        positions = [(PAD, i * (LABEL_HEIGHT + th + GAP)) for i in range(3)]
    else:
        body = np.full((LABEL_HEIGHT + th, panel_width, 3), BACKGROUND, np.uint8)
        positions = [(PAD + i * (tw + GAP), 0) for i in range(3)]
    room = tw if vertical else tw + GAP - 2
    label_scale = max(0.3, min(TEXT_SCALE, TEXT_SCALE * room / max(_width(t, TEXT_SCALE) for t in labels)))
    for tile, label, (x, y) in zip(tiles, labels, positions):
        _put(body, _shorten(label, label_scale, room), x, y + LABEL_HEIGHT - 7, label_scale, DIM_TEXT)
        body[y + LABEL_HEIGHT:y + LABEL_HEIGHT + th, x:x + tw] = tile

    bar = _colour_bar(panel_width, low, high, pixel_threshold, peak, f"this image: max {peak:.4g}")
    legend = []
    if pixel_threshold is not None:
        legend.append(f"outline: map > pixel threshold {pixel_threshold:.4g}"
                      f"{' = ' + pixel_note if pixel_note else ''}; {100.0 * area:.2f}% of the image over it")
    else:
        legend.append("no pixel threshold: no outline")
    if ng:
        legend.append(f"cross: map maximum {peak:.4g}, at x={x_in}, y={y_in} px of the input (where the "
                      "score comes from)")
    if scale_note:
        legend.append(f"colours: {scale_note}")
    lines = [line for item in legend for line in _wrap(item, TEXT_SCALE, panel_width - 2 * PAD)]
    notes = np.full((len(lines) * 18 + 8, panel_width, 3), BACKGROUND, np.uint8)
    for i, line in enumerate(lines):
        _put(notes, line, PAD, 16 + 18 * i, TEXT_SCALE, DIM_TEXT)
    return np.concatenate([_title_bar(panel_width, name, score, threshold), body, bar, notes], axis=0)


def save_rgb(path: str, image: np.ndarray) -> None:
    """Write an RGB ``uint8`` image; the format follows the extension (non-ASCII paths allowed)."""
    ext = "." + path.rsplit(".", 1)[-1] if "." in path else ".png"
    ok, buffer = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path!r}")
    buffer.tofile(path)
