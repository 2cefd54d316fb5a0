"""Evaluation metrics for anomaly detection and localization (pure numpy / sklearn / scipy / cv2).

Image level: AUROC and best F1. Pixel level: the standard pixel AUROC and AUPRO (Bergmann et al.,
MVTec AD) over all test images, plus the KDAD paper's own localization AUC protocol
(``compute_localization_auc`` of the original code) over the defective images only.
Threshold helpers calibrate an OK/NG decision and heatmap colour scale on normal images.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import cv2
import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score

# 8-connectivity inside each image of an [N, H, W] stack, no connection across images.
_STACK_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_STACK_8_CONNECTIVITY[1] = True


def _binary_labels(labels: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Validate 1-D labels/scores of equal length with both classes present."""
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.shape} vs {scores.shape}")
    classes = np.unique(labels)
    if not np.isin(classes, [0, 1]).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous); got {classes}")
    if classes.size < 2:
        raise ValueError(f"both normal (0) and anomalous (1) samples are required; got only {classes}")
    return labels.astype(bool), scores


def _pixel_inputs(masks: np.ndarray, maps: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Validate [N, H, W] masks and maps of identical shape."""
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks and maps must both be [N, H, W]; got {masks.shape} and {maps.shape}")
    return masks, maps


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level ROC AUC (labels 1 = anomalous, higher score = more anomalous)."""
    labels, scores = _binary_labels(labels, scores)
    return float(roc_auc_score(labels, scores))


def image_f1_max(labels: np.ndarray, scores: np.ndarray) -> Tuple[float, float]:
    """Best F1 over all thresholds and the threshold achieving it (anomalous iff ``score >= t``)."""
    labels, scores = _binary_labels(labels, scores)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel ROC AUC over all given images; masks are binarized at ``>= 0.5``."""
    masks, maps = _pixel_inputs(masks, maps)
    truth = (masks >= 0.5).ravel()
    if truth.all() or not truth.any():
        raise ValueError("pixel AUROC needs both anomalous and normal pixels in the masks")
    return float(roc_auc_score(truth, maps.ravel()))


def _area_up_to(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under a curve with non-decreasing ``fpr`` on [0, limit], interpolated at limit."""
    end = int(np.searchsorted(fpr, limit, side="right"))  # fpr[:end] <= limit < fpr[end]
    area = float(auc(fpr[:end], pro[:end])) if end >= 2 else 0.0
    if end < fpr.size and fpr[end - 1] < limit:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        y_limit = y0 + (limit - x0) * (y1 - y0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2.0
    return area


def aupro(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, num_thresholds: Optional[int] = None
) -> float:
    """Normalized area under the per-region-overlap curve up to ``fpr_limit`` (perfect map = 1.0).

    Regions are the 8-connected components of each binarized (``>= 0.5``) mask; PRO at a threshold
    is the mean over all regions of the fraction of region pixels with ``map >= t``; FPR is over
    all normal pixels of all images. Pixels are sorted once; with ``num_thresholds=None`` the sweep
    is exact (every distinct map value), otherwise it uses ``num_thresholds`` quantiles of the map
    values. The curve runs from (0, 0) to (1, 1); the trapezoid area on [0, fpr_limit] (linearly
    interpolated at ``fpr_limit``) is divided by ``fpr_limit``.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks, maps = _pixel_inputs(masks, maps)
    regions, num_regions = ndimage.label(masks >= 0.5, structure=_STACK_8_CONNECTIVITY)
    regions = regions.ravel()
    region_sizes = np.bincount(regions)
    num_negatives = int(region_sizes[0])
    if num_regions == 0 or num_negatives == 0:
        raise ValueError("AUPRO needs at least one anomalous region and at least one normal pixel")

    # Per-pixel contributions: each normal pixel adds 1/N_neg to FPR, each region pixel 1/(|r| R) to PRO.
    neg_weight = (regions == 0) / num_negatives
    pro_weight = np.where(regions > 0, 1.0 / (region_sizes[regions] * num_regions), 0.0)
    order = np.argsort(maps.ravel(), kind="stable")
    values = maps.ravel()[order].astype(np.float64)
    # suffix[i] = sum of weights of pixels values[i:], i.e. those above the threshold values[i].
    fpr_suffix = np.append(np.cumsum(neg_weight[order][::-1])[::-1], 0.0)
    pro_suffix = np.append(np.cumsum(pro_weight[order][::-1])[::-1], 0.0)

    if num_thresholds is None:
        thresholds = np.unique(values)
    else:
        thresholds = np.unique(np.quantile(values, np.linspace(0.0, 1.0, num_thresholds)))
    start = np.searchsorted(values, thresholds[::-1], side="left")  # descending thresholds
    fpr = np.concatenate([[0.0], np.clip(fpr_suffix[start], 0.0, 1.0), [1.0]])
    pro = np.concatenate([[0.0], np.clip(pro_suffix[start], 0.0, 1.0), [1.0]])
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _open_maps(maps: np.ndarray) -> np.ndarray:
    """Grey-level opening of each map with the 3x3 elliptical kernel of the original code.

    A flat opening commutes with thresholding, so ``_open_maps(m) >= t`` equals the binary opening
    of ``m >= t`` for every ``t``: one cv2 call per image replaces one per image and threshold.
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    return np.stack([cv2.morphologyEx(m, cv2.MORPH_OPEN, kernel) for m in maps])


def paper_localization_auc(masks: np.ndarray, maps: np.ndarray, num_thresholds: int = 1000) -> float:
    """The KDAD paper's localization AUC (``compute_localization_auc`` of the original code).

    Pass only the defective images (the caller filters) with their per-image normalized maps in
    [0, 1]. Masks may be soft in [0, 1] and are used as pixel weights, as in the original. For
    ``t = i / num_thresholds`` (``0.001 * i`` by default) the prediction ``maps >= t`` is opened with
    a 3x3 elliptical kernel, then TPR = sum(pred * mask) / sum(mask) and FPR =
    sum(pred * (1 - mask)) / (sum(pred * (1 - mask)) + sum((1 - pred) * (1 - mask))); the result is
    ``sklearn.metrics.auc(fpr, tpr)``. Computed exactly via a grey-level opening and sorted sums.
    """
    masks, maps = _pixel_inputs(masks, maps)
    weights = masks.astype(np.float64).ravel()
    if weights.min() < 0.0 or weights.max() > 1.0:
        raise ValueError("masks must lie in [0, 1]")
    if weights.sum() <= 0 or (1.0 - weights).sum() <= 0:
        raise ValueError("the paper localization AUC needs both defective and normal pixel weight")
    # Keep float32 maps as float32 so ``maps >= t`` compares in the maps' precision, as the original did.
    dtype = maps.dtype if maps.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    opened = _open_maps(maps.astype(dtype)).ravel()
    order = np.argsort(opened, kind="stable")
    values = opened[order]
    pos, neg = weights[order], 1.0 - weights[order]
    # Pixels values[k:] are predicted anomalous; suffix sums give TP/FP, prefix sums give TN.
    tp_suffix = np.append(np.cumsum(pos[::-1])[::-1], 0.0)
    fp_suffix = np.append(np.cumsum(neg[::-1])[::-1], 0.0)
    tn_prefix = np.concatenate([[0.0], np.cumsum(neg)])

    step = 1.0 / num_thresholds  # 1.0 / 1000 == 0.001 exactly, so step * i matches the original
    thresholds = (step * np.arange(num_thresholds)).astype(dtype)
    start = np.searchsorted(values, thresholds, side="left")
    tpr = tp_suffix[start] / weights.sum()
    fpr = fp_suffix[start] / (fp_suffix[start] + tn_prefix[start])
    return float(auc(fpr, tpr))


def compute_all(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: Optional[np.ndarray] = None,
    maps: Optional[np.ndarray] = None,
    paper_maps: Optional[np.ndarray] = None,
    has_mask: Optional[np.ndarray] = None,
) -> Dict[str, float]:
    """All metrics of a test set.

    Image metrics always; ``pixel_auroc`` and ``aupro`` from ``maps`` over the images with a known
    mask; ``paper_localization_auc`` from ``paper_maps`` over the anomalous images with a known mask.
    ``has_mask`` (bool per image, default all True) marks images whose ground-truth mask is known.
    """
    labels = np.asarray(labels).ravel()
    masks = None if masks is None else np.asarray(masks)
    maps = None if maps is None else np.asarray(maps)
    paper_maps = None if paper_maps is None else np.asarray(paper_maps)
    f1, f1_threshold = image_f1_max(labels, scores)
    result = {
        "image_auroc": image_auroc(labels, scores),
        "image_f1_max": f1,
        "image_f1_threshold": f1_threshold,
    }
    if masks is None:
        return result
    known = np.ones(len(labels), dtype=bool) if has_mask is None else np.asarray(has_mask, dtype=bool)
    if known.shape != labels.shape or len(masks) != len(labels):
        raise ValueError("masks and has_mask must have one entry per image")
    if maps is not None:
        result["pixel_auroc"] = pixel_auroc(masks[known], maps[known])
        result["aupro"] = aupro(masks[known], maps[known])
    if paper_maps is not None:
        defective = known & (labels == 1)
        result["paper_localization_auc"] = paper_localization_auc(masks[defective], paper_maps[defective])
    return result
