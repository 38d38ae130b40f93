"""AUPRO, the per-region overlap metric of MVTec AD (Bergmann et al.), computed exactly.

Definition: the connected regions (8-connectivity) of every ground-truth mask are labelled. For a
threshold ``t``, PRO(t) is the mean over all regions of the share of the region's pixels with
``map >= t``, and FPR(t) is the share of all defect-free pixels (``mask == 0`` in every image, good
images included) with ``map >= t``. AUPRO is the area under PRO over FPR from 0 to ``fpr_limit``
(trapezoid rule, the curve interpolated linearly at exactly ``fpr_limit``) divided by ``fpr_limit``.

The curve is evaluated at every distinct score value without a Python loop over thresholds: pixels
are sorted once by score and each pixel of region ``r`` adds ``1 / (n_regions * |r|)`` to PRO when the
threshold passes it, so PRO and FPR at all thresholds are two cumulative sums. Numpy and cv2 only.
"""
from __future__ import annotations

import cv2
import numpy as np


def _check_inputs(maps, masks) -> tuple[np.ndarray | list, np.ndarray | list]:
    """``[N, H, W]`` arrays, or lists of ``[H_i, W_i]`` arrays (images of different sizes, each map at its
    mask's size)."""
    if isinstance(maps, (list, tuple)) or isinstance(masks, (list, tuple)):
        maps = [np.asarray(m) for m in maps]
        masks = [np.asarray(m) != 0 for m in masks]
        if len(maps) != len(masks) or any(a.ndim != 2 or a.shape != b.shape for a, b in zip(maps, masks)):
            raise ValueError("expected one 2-D map per mask, each of its mask's shape")
        if any(np.issubdtype(m.dtype, np.floating) and np.isnan(m).any() for m in maps):
            raise ValueError("anomaly maps contain NaN")
        return maps, masks
    maps = np.asarray(maps)
    masks = np.asarray(masks)
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"expected maps and masks [N, H, W] of one shape, found {maps.shape} and {masks.shape}")
    if np.issubdtype(maps.dtype, np.floating) and np.isnan(maps).any():
        raise ValueError("anomaly maps contain NaN")
    if masks.dtype != np.bool_:
        masks = masks != 0
    return maps, masks


def _flat(images) -> np.ndarray:
    """``[N, H, W]`` or a list of ``[H_i, W_i]`` -> one flat array."""
    if isinstance(images, list):
        return np.concatenate([a.reshape(-1) for a in images]) if images else np.zeros(0)
    return images.reshape(-1)


def _region_labels(masks) -> tuple[np.ndarray, int]:
    """Bool masks ``[N, H, W]`` (or a list of ``[H_i, W_i]``) -> (int32 labels of every pixel, flat: 0
    defect-free, 1..R one id per region over all images, R)."""
    labels = [np.zeros(m.shape, dtype=np.int32) for m in masks]
    n_regions = 0
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        count, image_labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        inside = image_labels > 0
        labels[i][inside] = image_labels[inside] + n_regions
        n_regions += count - 1  # cv2 counts the background as component 0
    return _flat(labels), n_regions


def pro_curve(
    maps: np.ndarray, masks: np.ndarray, num_thresholds: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps ``[N, H, W]`` and bool masks ``[N, H, W]`` -> ``(fpr, pro)``, float64 ``[k + 1]``.

    One point per distinct score, highest threshold first, after a leading ``(0, 0)``; both arrays are
    non-decreasing and end at ``(1, 1)``. With ``num_thresholds`` the curve is instead sampled at that
    many thresholds evenly spaced from the maximum to the minimum of ``maps`` (a coarse version).
    Raises ``ValueError`` when there is no anomalous or no defect-free pixel.
    """
    maps, masks = _check_inputs(maps, masks)
    labels, n_regions = _region_labels(masks)
    n_normal = int(labels.size - np.count_nonzero(labels))
    if n_regions == 0:
        raise ValueError("PRO is undefined without anomalous pixels: every ground-truth mask is empty")
    if n_normal == 0:
        raise ValueError("the FPR of PRO is undefined without defect-free pixels: every mask pixel is set")

    region_sizes = np.bincount(labels, minlength=n_regions + 1)
    weights = np.zeros(n_regions + 1, dtype=np.float64)
    weights[1:] = 1.0 / (n_regions * region_sizes[1:])

    scores = _flat(maps)
    order = np.argsort(scores)[::-1]
    ranked = scores[order]
    ranked_labels = labels[order]
    del order, labels
    pro_cum = np.cumsum(weights[ranked_labels])
    fp_cum = np.cumsum(ranked_labels == 0, dtype=np.int64)
    del ranked_labels

    if num_thresholds is None:
        # Last index of each group of equal scores: a tie is crossed all at once.
        ends = np.flatnonzero(ranked[1:] != ranked[:-1])
        ends = np.append(ends, ranked.size - 1)
    else:
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be at least 2, found {num_thresholds}")
        thresholds = np.linspace(float(ranked[0]), float(ranked[-1]), num_thresholds)
        ascending = ranked[::-1]
        at_or_above = ranked.size - np.searchsorted(ascending, thresholds.astype(ranked.dtype), side="left")
        # The top threshold always catches at least the maximum, so no count is 0.
        ends = at_or_above - 1
    fpr = np.concatenate(([0.0], fp_cum[ends] / n_normal))
    pro = np.concatenate(([0.0], np.minimum(pro_cum[ends], 1.0)))
    return fpr, pro


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` (``x`` non-decreasing) from ``x[0]`` to ``x_max``, the curve
    interpolated linearly at ``x_max``."""
    inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs = x[:inside]
    ys = y[:inside]
    if inside < x.size:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_at = y0 + (x_max - x0) * (y1 - y0) / (x1 - x0)  # x1 > x_max >= x0, so x1 > x0
        xs = np.append(xs, x_max)
        ys = np.append(ys, y_at)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)


def aupro(
    maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int | None = None
) -> float:
    """Anomaly maps ``[N, H, W]`` and bool masks ``[N, H, W]`` -> normalised area under the PRO curve
    up to ``fpr_limit``, in [0, 1].

    Exact over all distinct scores unless ``num_thresholds`` asks for the coarse, evenly sampled curve.
    Raises ``ValueError`` when there is no anomalous or no defect-free pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], found {fpr_limit}")
    fpr, pro = pro_curve(maps, masks, num_thresholds=num_thresholds)
    return float(min(max(_area_up_to(fpr, pro, fpr_limit) / fpr_limit, 0.0), 1.0))
