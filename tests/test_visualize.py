"""Tests of the heatmap panels (kdad.visualize): pixel threshold rule, fixed colours, aspect ratio,
marking of the map maximum, readable overlay, colour bar. numpy / OpenCV only (fast)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from kdad import visualize
from kdad.visualize import NG_COLOUR, OK_COLOUR, caption, colorize, colour_range, result_panel, scale_map

STATS = {"p50": 1.0, "p99": 1.5, "p999": 2.0, "max": 2.5}


def _find(panel: np.ndarray, tile: np.ndarray) -> list:
    """Top-left corners where ``tile`` appears exactly in ``panel``."""
    if tile.shape[0] > panel.shape[0] or tile.shape[1] > panel.shape[1]:
        return []
    score = cv2.matchTemplate(panel.astype(np.float32), tile.astype(np.float32), cv2.TM_SQDIFF)
    tolerance = 1e-5 * float(np.square(tile.astype(np.float64)).sum()) + 1.0  # float32 rounding
    return [(int(y), int(x)) for y, x in zip(*np.nonzero(score < tolerance))
            if np.array_equal(panel[y:y + tile.shape[0], x:x + tile.shape[1]], tile)]


def _textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- thresholds and colours


def test_pixel_threshold_rule() -> None:
    # the image score is (PatchCore: a re-weighting of) the map maximum -> the image threshold
    # (tests/test_method_chain.py checks which methods' scores are their maps' maxima)
    for method in ("padim", "patchcore", "stfpm", "rd4ad", "cflow"):
        value, source = visualize.pixel_threshold_rule(method, 7.5, STATS)
        assert value == 7.5 and "image threshold" in source
    # KDAD maps are not in score units, DRAEM's score is a 21x21 mean: the largest held-out normal value
    for method in ("kdad", "draem"):
        value, source = visualize.pixel_threshold_rule(method, 7.5, STATS)
        assert value == 2.5 and "held-out normal" in source
    assert visualize.pixel_threshold_rule("kdad", 7.5, {"p50": 1.0, "p99": 1.5, "p999": 2.0})[0] == 2.0
    assert visualize.pixel_threshold_rule("kdad", 7.5, None)[0] is None
    with pytest.raises(ValueError, match="finite"):
        visualize.pixel_threshold_rule("padim", float("nan"), STATS)


def test_padim_pixel_threshold_is_consistent_with_the_decision() -> None:
    """Score = map maximum: NG exactly when some pixel is over the pixel threshold."""
    from kdad.deploy.runtime import result_row

    scale = visualize.display_scale("padim", STATS, threshold=3.0)
    assert scale["pixel_threshold"] == 3.0
    for peak in (2.9, 3.0, 3.1, 4.0):
        raw = np.full((16, 16), 1.0, np.float32)
        raw[5, 9] = peak
        row = result_row("x.png", float(raw.max()), 3.0, raw, scale["pixel_threshold"])
        assert (row["decision"] == "NG") == (row["anomalous_area"] > 0), peak
    # a user's threshold moves the pixel threshold with it; the colours stay those of the calibration
    moved = visualize.display_scale("padim", STATS, threshold=5.0, calibrated_threshold=3.0)
    assert moved["pixel_threshold"] == 5.0
    assert (moved["colour_low"], moved["colour_high"]) == (scale["colour_low"], scale["colour_high"])


def test_colour_scale_is_fixed_and_puts_the_threshold_mid_scale() -> None:
    low, high = colour_range(STATS)  # KDAD rule: threshold = max = 2.5
    assert (low, high) == (1.0, 4.0)
    assert scale_map(np.array([2.5]), low, high)[0] == pytest.approx(0.5)
    assert colour_range(STATS, pixel_threshold=3.0) == (1.0, 5.0)
    assert colour_range(None, pixel_threshold=0.5) == (0.0, 1.0)
    a = np.array([[2.0, 0.0], [1.0, 9.0]], np.float32)
    b = np.array([[2.0, 100.0], [2.5, 2.6]], np.float32)  # other range, same value at [0, 0]
    np.testing.assert_array_equal(colorize(a, low, high)[0, 0], colorize(b, low, high)[0, 0])
    assert scale_map(np.array([np.nan]), low, high)[0] == 1.0  # NaN never looks normal
    scale = visualize.display_scale("kdad", STATS, threshold=0.4)
    assert scale["pixel_threshold"] == 2.5 and (scale["colour_low"], scale["colour_high"]) == (1.0, 4.0)
    with pytest.raises(ValueError, match="finite"):
        visualize.display_scale("kdad", STATS, threshold=0.4, pixel_threshold=float("inf"))


def test_decisions_and_caption() -> None:
    from kdad.deploy.runtime import decide

    assert decide(0.6, 0.5) == "NG" and decide(0.5, 0.5) == "OK" and decide(0.4, None) == ""
    assert decide(float("nan"), 0.5) == "NG"  # a score that is not a number is never OK
    text, colour = caption(1.75, 0.5, "part.png")
    assert text.splitlines() == ["part.png", "NG  score 1.75 > threshold 0.5 (3.50x)"] and colour == NG_COLOUR
    assert caption(0.25, 0.5)[1] == OK_COLOUR and "<=" in caption(0.25, 0.5)[0]


# ----------------------------------------------------------------------------- the panel


def test_input_keeps_its_aspect_ratio() -> None:
    assert visualize.tile_shape(64, 64, 256) == (256, 256)
    th, tw = visualize.tile_shape(300, 5000, 256)
    assert tw / th == pytest.approx(5000 / 300, rel=0.03) and tw <= 4 * 256
    th, tw = visualize.tile_shape(900, 120, 256)
    assert th / tw == pytest.approx(900 / 120, rel=0.03)
    image = _textured(300, 5000)
    raw = np.full((32, 32), 1.0, np.float32)
    panel = result_panel(image, raw, 0.1, 0.5, *colour_range(STATS), 2.5, display_size=256, name="wide.png")
    th, tw = visualize.tile_shape(300, 5000, 256)
    shown = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)
    assert _find(panel, shown)  # the input, shrunk at its own aspect ratio, is in the panel


def test_ng_panel_marks_the_map_maximum_without_any_pixel_over_threshold() -> None:
    image = np.full((64, 64, 3), 120, np.uint8)
    raw = np.full((64, 64), 1.0, np.float32)
    raw = cv2.GaussianBlur(raw, (0, 0), 1)
    raw[40:44, 12:16] = 2.2  # below the pixel threshold 2.5: no outline
    value, row, column = visualize.map_maximum(raw)
    assert value == pytest.approx(2.2) and 40 <= row < 44 and 12 <= column < 16
    low, high = colour_range(STATS)
    ng = result_panel(image, raw, 0.9, 0.5, low, high, 2.5, display_size=128)
    ok = result_panel(image, raw, 0.4, 0.5, low, high, 2.5, display_size=128)
    start = 68  # below the title bar, the tiles: same height in both panels
    body_ng, body_ok = ng[start:start + 150], ok[start:start + 150]
    changed = np.argwhere((body_ng != body_ok).any(axis=2))
    assert len(changed) > 0, "the NG panel marks nothing"
    # every change is the mark near the maximum, in the map and the overlay tiles (128 px tiles)
    tile_x = (changed[:, 1] - 10) % (128 + 8)
    assert np.all(np.abs(tile_x - (column + 0.5) * 2) < 24)
    assert np.all(np.abs(changed[:, 0] - 22 - (row + 0.5) * 2) < 24)
    assert set(((changed[:, 1] - 10) // (128 + 8)).tolist()) == {1, 2}


def test_overlay_keeps_the_parts_colours() -> None:
    image = _textured(48, 48, seed=3)
    low, high = colour_range(STATS)
    raw = np.full((48, 48), low, np.float32)
    np.testing.assert_array_equal(visualize.heat_overlay(image, raw, low, high), image)  # normal: unchanged
    raw[10:20, 10:20] = high
    mixed = visualize.heat_overlay(image, raw, low, high, max_alpha=0.6)
    np.testing.assert_array_equal(mixed[30:, 30:], image[30:, 30:])
    assert not np.array_equal(mixed[10:20, 10:20], image[10:20, 10:20])
    # in the panel of a normal image the overlay tile shows the input unchanged (twice the same tile)
    panel = result_panel(image, np.full((48, 48), low, np.float32), 0.1, 0.5, low, high, 2.5,
                         display_size=96)
    shown = cv2.resize(image, (96, 96), interpolation=cv2.INTER_NEAREST)
    assert len(_find(panel, shown)) == 2


def test_colour_bar_and_outline() -> None:
    image = np.full((64, 64, 3), 90, np.uint8)
    low, high = colour_range(STATS)
    raw = np.full((64, 64), 1.0, np.float32)
    raw[20:40, 20:40] = 3.5  # over the pixel threshold 2.5
    panel = result_panel(image, raw, 0.9, 0.5, low, high, 2.5, display_size=128)
    width = panel.shape[1] - 20
    levels = np.linspace(0, 255, width).astype(np.uint8)[None, :]
    strip = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    assert len(_find(panel, strip[:, :40])) >= 1 and len(_find(panel, strip[:, -40:])) >= 1
    # the outline: black-and-white contour around the region, in the map tile
    heat_tile = panel[68 + 22:68 + 22 + 128, 10 + 136:10 + 136 + 128]
    white = (heat_tile == 255).all(axis=2)
    rows, cols = np.nonzero(white)
    assert rows.min() >= 35 and rows.max() <= 85 and cols.min() >= 35 and cols.max() <= 85
