"""Threshold-free detection metrics for anomaly maps: ROC / AUROC, F1-max, and the evaluation summary.

Numpy only (plus :mod:`memseg_edge.train.aupro`), so an exported bundle can be evaluated on a machine
without torch. Every curve is computed exactly over all distinct score values: the scores are sorted
once and counted with cumulative sums, which stays cheap for the ~6 million pixels of an MVTec category.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .aupro import _flat
from .aupro import aupro as _aupro


def _flat_inputs(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels of any (equal) size -> flat views ``[n]`` (scores keep their dtype)."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.size != labels.size:
        raise ValueError(f"scores ({scores.shape}) and labels ({labels.shape}) differ in size")
    if scores.size == 0:
        raise ValueError("no scores given")
    scores = scores.reshape(-1)
    # Keep float32 as float32: a float64 copy of 6 M pixel scores would be an avoidable 48 MB.
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        scores = scores.astype(np.float64)
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    labels = labels.reshape(-1)
    if labels.dtype != np.bool_:
        labels = labels != 0
    return scores, labels


def _ranked_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positive counts at every distinct score, highest first.

    Returns ``(tps [k], fps [k], thresholds [k])``: at ``thresholds[i]`` exactly ``tps[i]`` positives and
    ``fps[i]`` negatives score ``>= thresholds[i]``. Equal scores form one group, so a tie is never split.
    """
    order = np.argsort(scores)[::-1]
    ranked = scores[order]
    ranked_labels = labels[order]
    del order
    # Last index of each group of equal scores in the descending order.
    ends = np.flatnonzero(ranked[1:] != ranked[:-1])
    ends = np.append(ends, ranked.size - 1)
    tps = np.cumsum(ranked_labels, dtype=np.int64)[ends]
    fps = ends + 1 - tps
    return tps, fps, ranked[ends].astype(np.float64)


def _require_both_classes(labels: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int(np.count_nonzero(labels))
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        present = "anomalous" if n_pos else "normal"
        raise ValueError(
            f"{what} is undefined when only one class is present: all {labels.size} labels are {present}"
        )
    return n_pos, n_neg


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores and boolean labels (any equal size, positive = anomalous) -> ``(fpr, tpr, thresholds)``.

    One point per distinct score (a sample is called positive when ``score >= threshold``), preceded by
    ``(0, 0)`` at threshold ``+inf``; the last point is ``(1, 1)``. All three arrays are float64 ``[k + 1]``.
    """
    scores, labels = _flat_inputs(scores, labels)
    n_pos, n_neg = _require_both_classes(labels, "the ROC curve")
    tps, fps, thresholds = _ranked_counts(scores, labels)
    fpr = np.concatenate(([0.0], fps / n_neg))
    tpr = np.concatenate(([0.0], tps / n_pos))
    return fpr, tpr, np.concatenate(([np.inf], thresholds))


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` vs boolean ``labels`` (any equal size).

    Equals the probability that a random positive scores above a random negative, ties counting 1/2.
    Raises ``ValueError`` when only one class is present.
    """
    fpr, tpr, _ = roc_curve(scores, labels)
    return _trapezoid(fpr, tpr)


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image scores ``[N]`` and image labels ``[N]`` (True = anomalous) -> image-level AUROC."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"expected scores [N] and labels [N], found {scores.shape} and {labels.shape}")
    return auroc(scores, labels)


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Anomaly maps ``[N, H, W]`` and ground-truth masks ``[N, H, W]`` -> AUROC over all pixels pooled.
    Images of different sizes: lists of ``[H_i, W_i]`` maps and masks."""
    if isinstance(maps, list) or isinstance(masks, list):
        if len(maps) != len(masks) or any(np.shape(a) != np.shape(b) for a, b in zip(maps, masks)):
            raise ValueError("expected one map per mask, each of its mask's shape")
        return auroc(_flat(list(maps)), _flat([np.asarray(m) for m in masks]))
    maps = np.asarray(maps)
    masks = np.asarray(masks)
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"expected maps and masks [N, H, W] of one shape, found {maps.shape} and {masks.shape}")
    return auroc(maps, masks)


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds ``score >= t`` -> ``(f1, t)``; scores and labels of any equal size.

    ``t`` is the score value at which the best F1 is reached (the highest such one on a tie in F1).
    Raises ``ValueError`` when there is no positive sample (F1 is then undefined).
    """
    scores, labels = _flat_inputs(scores, labels)
    n_pos = int(np.count_nonzero(labels))
    if n_pos == 0:
        raise ValueError(f"F1 is undefined without anomalous samples: all {labels.size} labels are normal")
    tps, fps, thresholds = _ranked_counts(scores, labels)
    # F1 = 2 TP / (2 TP + FP + FN) and FN = P - TP.
    f1 = 2.0 * tps / (tps + fps + n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _has_both(labels) -> bool:
    if isinstance(labels, list):
        n_pos = sum(int(np.count_nonzero(m)) for m in labels)
        return 0 < n_pos < sum(int(np.size(m)) for m in labels)
    n_pos = int(np.count_nonzero(labels))
    return 0 < n_pos < labels.size


def _fraction(value: float) -> float:
    # Rounding in the cumulative sums can leave 1 + 1e-16; fractions are promised in [0, 1].
    return float(min(max(value, 0.0), 1.0))


def _map_metrics(
    maps: np.ndarray, masks: np.ndarray, scores: np.ndarray, labels: np.ndarray, fpr_limit: float
) -> dict[str, Any]:
    return {
        "image_auroc": _fraction(image_auroc(scores, labels)) if _has_both(labels) else None,
        "pixel_auroc": _fraction(pixel_auroc(maps, masks)) if _has_both(masks) else None,
        "aupro": _fraction(_aupro(maps, masks, fpr_limit=fpr_limit)) if _has_both(masks) else None,
    }


def evaluate_maps(
    maps: np.ndarray,
    masks: np.ndarray,
    image_scores: np.ndarray,
    labels: np.ndarray,
    defect_types: Sequence[str],
    fpr_limit: float = 0.3,
) -> dict[str, Any]:
    """The evaluation summary of one test set, as a JSON-serialisable dict.

    ``maps`` float ``[N, H, W]`` in [0, 1], ``masks`` bool ``[N, H, W]``, ``image_scores`` ``[N]``,
    ``labels`` bool ``[N]`` (True = anomalous), ``defect_types`` ``N`` names with ``good`` for the
    defect-free images. Holds ``image_auroc``, ``pixel_auroc``, ``aupro`` (PRO integrated up to
    ``fpr_limit``, normalised), image-level ``f1_max`` with ``f1_threshold``, ``pixel_f1_max`` with
    ``pixel_f1_threshold``, the counts, and ``per_defect``: for every defect type, its images together
    with all good images -> ``{image_auroc, pixel_auroc, aupro, n_images}``. An undefined metric (one
    class only, no anomalous pixel) is ``None``, never NaN.

    Images of different sizes (pixel metrics at each mask's own resolution): ``maps`` and ``masks`` as
    lists of ``[H_i, W_i]`` arrays, each map at its mask's size.
    """
    ragged = isinstance(maps, list) or isinstance(masks, list)
    if ragged:
        maps = [np.asarray(m) for m in maps]
        masks = [np.asarray(m) != 0 for m in masks]
        if len(maps) != len(masks) or any(a.ndim != 2 or a.shape != b.shape for a, b in zip(maps, masks)):
            raise ValueError("expected one 2-D map per mask, each of its mask's shape")
    else:
        maps = np.asarray(maps)
        masks = np.asarray(masks)
        if masks.dtype != np.bool_:
            masks = masks != 0
    scores = np.asarray(image_scores)
    labels = np.asarray(labels)
    if labels.dtype != np.bool_:
        labels = labels != 0
    types = np.asarray(list(defect_types), dtype=object)
    n = len(maps)
    if not ragged and (maps.ndim != 3 or masks.shape != maps.shape):
        raise ValueError(f"expected maps and masks [N, H, W] of one shape, found {maps.shape} and {masks.shape}")
    if scores.shape != (n,) or labels.shape != (n,) or types.shape != (n,):
        raise ValueError(
            f"expected {n} image scores, labels and defect types, found "
            f"{scores.shape}, {labels.shape} and {types.shape}"
        )
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], found {fpr_limit}")

    result: dict[str, Any] = _map_metrics(maps, masks, scores, labels, fpr_limit)
    result["fpr_limit"] = float(fpr_limit)
    if labels.any():
        f1, t = f1_max(scores, labels)
        result["f1_max"], result["f1_threshold"] = _fraction(f1), t
    else:
        result["f1_max"], result["f1_threshold"] = None, None
    if _has_both(masks) or (not ragged and masks.any()):
        f1, t = f1_max(_flat(maps) if ragged else maps, _flat(masks) if ragged else masks)
        result["pixel_f1_max"], result["pixel_f1_threshold"] = _fraction(f1), t
    else:
        result["pixel_f1_max"], result["pixel_f1_threshold"] = None, None
    result["n_images"] = int(n)
    result["n_anomalous"] = int(np.count_nonzero(labels))
    result["n_good"] = int(n - result["n_anomalous"])

    good = types == "good"
    per_defect: dict[str, dict[str, Any]] = {}
    for name in sorted({str(t) for t in types} - {"good"}):
        keep = np.flatnonzero(good | (types == name))
        if ragged:
            entry = _map_metrics([maps[i] for i in keep], [masks[i] for i in keep], scores[keep], labels[keep],
                                 fpr_limit)
        else:
            entry = _map_metrics(maps[keep], masks[keep], scores[keep], labels[keep], fpr_limit)
        entry["n_images"] = int(keep.size)
        per_defect[name] = entry
    result["per_defect"] = per_defect
    return result
