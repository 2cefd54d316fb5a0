"""Tests of kdad.metrics against hand-worked cases and independent brute-force references."""

from __future__ import annotations

from typing import List, Tuple

import cv2
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score

from kdad.metrics import (
    _open_maps,
    aupro,
    compute_all,
    image_auroc,
    image_f1_max,
    paper_localization_auc,
    pixel_auroc,
)
from kdad.postprocess import normal_map_statistics, threshold_from_normal_scores

# --------------------------------------------------------------------------- references


def _mann_whitney_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), by counting all pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _f1_brute_force(labels: np.ndarray, scores: np.ndarray) -> float:
    """Max F1 of ``score >= t`` over every distinct score."""
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        fp = np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def _aupro_brute_force(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float, thresholds: np.ndarray
) -> float:
    """Per-threshold loop with per-image 8-connected labelling; area by clipping each segment."""
    binary = masks >= 0.5
    regions: List[Tuple[int, np.ndarray]] = []
    for i, mask in enumerate(binary):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.extend((i, labelled == k) for k in range(1, count + 1))
    points: List[Tuple[float, float]] = [(0.0, 0.0), (1.0, 1.0)]
    for t in thresholds:
        pred = maps >= t
        fpr = np.sum(pred & ~binary) / np.sum(~binary)
        pro = np.mean([pred[i][region].sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    points.sort()
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (fpr_limit - x0) * (y1 - y0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def _paper_auc_loop(masks: np.ndarray, maps: np.ndarray, num_thresholds: int = 1000) -> float:
    """Straight transcription of the original compute_localization_auc (per image, per threshold)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    tpr, fpr = [], []
    for threshold in [0.001 * i for i in range(num_thresholds)]:
        pred = (maps >= threshold).astype(np.uint8)
        pred = np.stack([cv2.morphologyEx(p, cv2.MORPH_OPEN, kernel) for p in pred]).astype(np.float64)
        tpr.append(np.sum(pred * masks) / np.sum(masks))
        fp = np.sum(pred * (1 - masks))
        tn = np.sum((1 - pred) * (1 - masks))
        fpr.append(fp / (fp + tn))
    return float(auc(fpr, tpr))


def _blobs(rng: np.random.Generator, n: int, size: int, count: int) -> np.ndarray:
    """Random rectangular defect masks, ``count`` per image."""
    masks = np.zeros((n, size, size), dtype=np.float32)
    for i in range(n):
        for _ in range(count):
            r, c = rng.integers(0, size - 6, 2)
            h, w = rng.integers(2, 7, 2)
            masks[i, r : r + h, c : c + w] = 1.0
    return masks


# --------------------------------------------------------------------------- image metrics


def test_image_auroc_hand_case() -> None:
    # Positive/negative pairs: 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4.
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)


def test_image_auroc_matches_pairwise_count() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # rounding creates ties
    assert image_auroc(labels, scores) == pytest.approx(_mann_whitney_auc(labels, scores), abs=1e-12)


def test_image_auroc_single_class_raises() -> None:
    with pytest.raises(ValueError, match="both normal"):
        image_auroc(np.zeros(5), np.arange(5.0))


def test_image_f1_max_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        labels = rng.integers(0, 2, 150)
        scores = np.round(rng.normal(size=150) + 0.8 * labels, 1)
        f1, threshold = image_f1_max(labels, scores)
        assert f1 == pytest.approx(_f1_brute_force(labels, scores), abs=1e-12)
        pred = scores >= threshold
        tp = np.sum(pred & (labels == 1))
        assert 2 * tp / (pred.sum() + labels.sum()) == pytest.approx(f1, abs=1e-12)


def test_image_f1_max_hand_case() -> None:
    # t = 0.4 flags {0.4, 0.8, 0.9}: TP 2, FP 1, FN 0 -> F1 = 4/5; t = 0.8: TP 2, FP 0 -> F1 = 1.
    f1, threshold = image_f1_max(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.8, 0.9]))
    assert f1 == pytest.approx(1.0)
    assert threshold == pytest.approx(0.8)


# --------------------------------------------------------------------------- pixel AUROC


def test_pixel_auroc_hand_case() -> None:
    # One positive (0.9) against negatives 0.2, 0.95, 0.1: wins 2 of 3 pairs.
    masks = np.array([[[1, 0], [0, 0]]], dtype=np.float32)
    maps = np.array([[[0.9, 0.2], [0.95, 0.1]]])
    assert pixel_auroc(masks, maps) == pytest.approx(2 / 3)


def test_pixel_auroc_matches_sklearn_flattened() -> None:
    rng = np.random.default_rng(2)
    masks = _blobs(rng, 6, 32, 2) * rng.uniform(0.4, 1.0, (6, 32, 32))  # soft masks, binarized at 0.5
    masks[:2] = 0.0  # normal images contribute negatives only
    maps = ndimage.gaussian_filter(rng.random((6, 32, 32)), (0, 2, 2)) + 0.3 * (masks >= 0.5)
    expected = roc_auc_score((masks >= 0.5).ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- AUPRO


def _two_region_case() -> Tuple[np.ndarray, np.ndarray]:
    """One 1x13 image: region A = pixels 0-1, 10 normal pixels 2-11, region B = pixel 12."""
    mask = np.zeros((1, 1, 13))
    mask[0, 0, [0, 1, 12]] = 1.0
    score = np.full((1, 1, 13), 0.1)
    score[0, 0, [0, 1, 12]] = [0.9, 0.6, 0.7]  # A = (0.9, 0.6), B = 0.7
    score[0, 0, [2, 3]] = [0.8, 0.6]  # two normal pixels score high
    return mask, score


def test_aupro_two_regions_hand_case() -> None:
    # Thresholds descending -> (FPR, PRO), PRO = mean(fraction of A, fraction of B):
    #   start           (0.0, 0.00)
    #   t=0.9: A0       (0.0, 0.25)   mean(1/2, 0)
    #   t=0.8: normal   (0.1, 0.25)
    #   t=0.7: B        (0.1, 0.75)   mean(1/2, 1)
    #   t=0.6: A1 + normal, tie     (0.2, 1.00)
    #   t=0.1: all      (1.0, 1.00)
    # Up to 0.3: 0.1 * 0.25 + 0.1 * (0.75 + 1) / 2 + 0.1 * 1 = 0.2125 -> / 0.3 = 0.708333.
    # Up to 0.15 (interpolate the tie segment at 0.15: PRO = 0.875):
    #   0.025 + 0.05 * (0.75 + 0.875) / 2 = 0.065625 -> / 0.15 = 0.4375.
    mask, score = _two_region_case()
    assert aupro(mask, score, fpr_limit=0.3) == pytest.approx(0.2125 / 0.3, abs=1e-12)
    assert aupro(mask, score, fpr_limit=0.15) == pytest.approx(0.4375, abs=1e-12)
    assert aupro(mask, score, fpr_limit=0.1) == pytest.approx(0.025 / 0.1, abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    # Diagonal pair (one region of 2 px) plus a lone pixel; map hits the lone pixel and one of the pair.
    # 8-connected: PRO = mean(1/2, 1) = 0.75 (4-connected would give mean(1, 0, 1) = 2/3).
    mask = np.zeros((1, 5, 5))
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 4, 4] = 1.0
    score = np.zeros((1, 5, 5))
    score[0, 0, 0] = score[0, 4, 4] = 1.0
    # Curve: (0,0) -> (0, 0.75) -> (1, 1); area on [0, 0.3] = 0.3 * (0.75 + 0.825) / 2.
    expected = 0.3 * (0.75 + (0.75 + 0.3 * 0.25)) / 2 / 0.3
    assert aupro(mask, score) == pytest.approx(expected, abs=1e-12)


def test_aupro_perfect_map_is_one() -> None:
    rng = np.random.default_rng(3)
    masks = _blobs(rng, 5, 32, 3)
    masks[0] = 0.0
    assert aupro(masks, masks.astype(np.float64)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, masks + 0.01 * rng.random(masks.shape), fpr_limit=0.05) == pytest.approx(1.0)


def test_aupro_invariant_to_monotone_transform() -> None:
    rng = np.random.default_rng(4)
    masks = _blobs(rng, 8, 32, 2)
    maps = ndimage.gaussian_filter(rng.random(masks.shape), (0, 1.5, 1.5)) + 0.1 * masks
    reference = aupro(masks, maps)
    assert aupro(masks, np.exp(5 * maps) - 3) == pytest.approx(reference, abs=1e-12)
    assert aupro(masks, np.sqrt(maps)) == pytest.approx(reference, abs=1e-12)


def test_aupro_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    masks = _blobs(rng, 6, 24, 3)
    masks[0] = 0.0
    maps = ndimage.gaussian_filter(rng.random(masks.shape), (0, 1.0, 1.0)) + 0.15 * masks
    maps = np.round(maps * 150) / 150  # few distinct values: the reference loop covers all of them
    thresholds = np.unique(maps)
    for limit in (0.3, 0.1, 1.0):
        expected = _aupro_brute_force(masks, maps, limit, thresholds)
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)
    # A quantile grid approximates the exact sweep.
    assert aupro(masks, maps, num_thresholds=400) == pytest.approx(aupro(masks, maps), abs=1e-3)


def test_aupro_requires_regions() -> None:
    with pytest.raises(ValueError, match="anomalous region"):
        aupro(np.zeros((2, 4, 4)), np.ones((2, 4, 4)))


# --------------------------------------------------------------------------- paper localization AUC


def test_paper_auc_hand_case_opening_removes_isolated_pixel() -> None:
    # Mask and map: a plus-shaped defect (the 3x3 elliptical kernel itself, so opening keeps it) in a
    # 7x7 image; the map also fires on one isolated normal pixel that opening removes.
    # t = 0: everything predicted -> (FPR, TPR) = (1, 1); t > 0: the plus only -> (0, 1). AUC = 1.
    # Without the opening the isolated pixel gives FPR = 1/44 and AUC = 43/44.
    mask = np.zeros((1, 7, 7))
    mask[0, 2, 1:4] = mask[0, 1:4, 2] = 1.0
    score = mask.copy()
    score[0, 6, 6] = 1.0
    assert paper_localization_auc(mask, score) == pytest.approx(1.0, abs=1e-12)
    # Soft mask weight 0.5 on one plus pixel: positives 4.5, negatives 49 - 4.5 = 44.5,
    # FP at t > 0 = 0.5 -> FPR = 1/89, TPR = 1 -> AUC = 88/89.
    soft = mask.copy()
    soft[0, 2, 2] = 0.5
    assert paper_localization_auc(soft, score) == pytest.approx(88 / 89, abs=1e-12)


def test_paper_auc_perfect_and_random() -> None:
    rng = np.random.default_rng(6)
    rows, cols = np.mgrid[:32, :32]
    masks = np.zeros((4, 32, 32))
    for i in range(4):
        r, c = rng.integers(6, 26, 2)
        # Diamonds (L1 discs) are unions of the plus-shaped kernel, so the opening keeps them exactly.
        masks[i] = np.abs(rows - r) + np.abs(cols - c) <= 5
    assert paper_localization_auc(masks, masks) == pytest.approx(1.0, abs=1e-12)
    noise = rng.random((4, 32, 32))
    assert paper_localization_auc(masks, noise) == pytest.approx(0.5, abs=0.03)


def test_paper_auc_fast_path_equals_loop() -> None:
    rng = np.random.default_rng(7)
    soft = ndimage.gaussian_filter(_blobs(rng, 5, 32, 2).astype(np.float64), (0, 1, 1))
    masks = np.clip(soft * 1.5, 0, 1)
    maps = np.clip(ndimage.gaussian_filter(rng.random(masks.shape), (0, 1, 1)) * 2 - 0.5 + 0.3 * masks, 0, 1)
    maps[0, 3, 3] = 0.5  # exact threshold values exercise the ">=" boundary
    maps[1, 5, 5] = 0.001 * 37
    assert paper_localization_auc(masks, maps) == pytest.approx(_paper_auc_loop(masks, maps), rel=1e-12)
    maps32 = maps.astype(np.float32)  # compared in float32, like ``float32_array >= python_float``
    assert paper_localization_auc(masks, maps32) == pytest.approx(_paper_auc_loop(masks, maps32), rel=1e-12)
    # The grey-level opening thresholded equals the binary opening of the threshold, exactly.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    opened = _open_maps(maps)
    for t in [0.001 * i for i in range(0, 1000, 7)] + [0.5, 0.037]:
        binary = np.stack([cv2.morphologyEx((m >= t).astype(np.uint8), cv2.MORPH_OPEN, kernel) for m in maps])
        np.testing.assert_array_equal(opened >= t, binary.astype(bool))


# --------------------------------------------------------------------------- compute_all and thresholds


def test_compute_all_filters_images() -> None:
    rng = np.random.default_rng(8)
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = rng.random(6) + labels
    masks = _blobs(rng, 6, 24, 2)
    masks[:3] = 0.0
    masks[5] = 1.0  # bogus: this image's mask is unknown
    has_mask = np.array([True, True, True, True, True, False])
    maps = ndimage.gaussian_filter(rng.random(masks.shape), (0, 1, 1)) + 0.2 * masks
    paper_maps = np.clip(maps, 0, 1)
    result = compute_all(labels, scores, masks, maps, paper_maps, has_mask)
    f1, f1_threshold = image_f1_max(labels, scores)
    assert result == pytest.approx(
        {
            "image_auroc": image_auroc(labels, scores),
            "image_f1_max": f1,
            "image_f1_threshold": f1_threshold,
            "pixel_auroc": pixel_auroc(masks[:5], maps[:5]),
            "aupro": aupro(masks[:5], maps[:5]),
            "paper_localization_auc": paper_localization_auc(masks[3:5], paper_maps[3:5]),
        }
    )
    assert set(compute_all(labels, scores)) == {"image_auroc", "image_f1_max", "image_f1_threshold"}


def test_threshold_from_normal_scores() -> None:
    # 1..10 at 20 %: quantile position 0.8 * 9 = 7.2 -> "higher" takes sorted[8] = 9; rejects {10}.
    assert threshold_from_normal_scores(np.arange(1.0, 11.0), 0.2) == 9.0
    assert threshold_from_normal_scores(np.arange(1.0, 11.0), 0.0) == 10.0
    rng = np.random.default_rng(9)
    for n in (7, 50, 333):
        scores = rng.normal(size=n)
        for rate in (0.01, 0.05, 0.3):
            assert np.sum(scores > threshold_from_normal_scores(scores, rate)) <= rate * n
    with pytest.raises(ValueError, match="no normal scores"):
        threshold_from_normal_scores(np.array([]))


def test_normal_map_statistics() -> None:
    maps = (np.arange(1001) / 1000.0).reshape(1, 7, 143)
    stats = normal_map_statistics(maps)
    assert stats == pytest.approx({"p50": 0.5, "p99": 0.99, "p999": 0.999, "max": 1.0})
