"""Metrics, AUPRO and plots against independent brute-force references (explicit loops, pair counts)."""
from __future__ import annotations

import json
from collections import deque

import cv2
import numpy as np
import pytest

from memseg_edge.train import aupro as aupro_module
from memseg_edge.train import metrics, plots


# ---------------------------------------------------------------- references (deliberately naive)
def _mann_whitney(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(positive > negative) + 1/2 P(tie), over every pair."""
    pos = scores[labels]
    neg = scores[~labels]
    wins = 0.0
    for p in pos:
        for q in neg:
            wins += 1.0 if p > q else 0.5 if p == q else 0.0
    return wins / (len(pos) * len(neg))


def _brute_roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr = [0.0], [0.0]
    for t in sorted(set(scores.tolist()), reverse=True):
        called = scores >= t
        tpr.append((called & labels).sum() / labels.sum())
        fpr.append((called & ~labels).sum() / (~labels).sum())
    return np.array(fpr), np.array(tpr)


def _brute_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    best = 0.0
    for t in set(scores.tolist()):
        called = scores >= t
        tp = int((called & labels).sum())
        fp = int((called & ~labels).sum())
        fn = int((~called & labels).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn)
        if precision + recall:
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _flood_regions(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected regions of one 2-D mask by breadth-first flood fill, each as a bool mask."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    h, w = mask.shape
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            region = np.zeros_like(mask, dtype=bool)
            queue = deque([(y0, x0)])
            seen[y0, x0] = True
            while queue:
                y, x = queue.popleft()
                region[y, x] = True
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            regions.append(region)
    return regions


def _brute_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    regions = []
    for i, mask in enumerate(masks):
        for region in _flood_regions(mask):
            full = np.zeros_like(masks)
            full[i] = region
            regions.append(full)
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        called = maps >= t
        fprs.append((called & normal).sum() / normal.sum())
        pros.append(np.mean([(called & r).sum() / r.sum() for r in regions]))
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < fpr_limit:
                y_lim = y0 + (fpr_limit - x0) * (y1 - y0) / (x1 - x0)
                area += (fpr_limit - x0) * (y0 + y_lim) / 2
            break
    return area / fpr_limit


def _blob_case(seed: int, n: int = 3, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """A few rectangular/diagonal blobs per image (the last image defect-free); maps with many ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n - 1):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 4, 2)
            hh, ww = rng.integers(1, 5, 2)
            masks[i, y : y + hh, x : x + ww] = True
        d = rng.integers(0, size - 3)
        masks[i, d, d] = masks[i, d + 1, d + 1] = True  # a diagonal pair
    noise = rng.random(masks.shape)
    maps = np.clip(0.5 * noise + 0.4 * masks, 0.0, 1.0)
    maps = np.round(maps * 10) / 10  # quantised: ties within and across classes
    return maps.astype(np.float32), masks


def _is_png(path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 50 and image.shape[1] > 50
    return image


# ---------------------------------------------------------------- ROC / AUROC / F1
@pytest.mark.parametrize("seed", range(6))
def test_auroc_equals_mann_whitney_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    labels = rng.random(n) < 0.4
    labels[0], labels[1] = True, False
    scores = rng.integers(0, 6, n).astype(np.float32)  # few values: many ties
    scores = scores + 1.5 * labels * rng.random(n).round(1)
    assert metrics.auroc(scores, labels) == pytest.approx(_mann_whitney(scores, labels), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_roc_curve_matches_explicit_thresholds(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    labels = rng.random(40) < 0.5
    labels[:2] = [True, False]
    scores = rng.integers(0, 8, 40).astype(np.float64)
    fpr, tpr, thresholds = metrics.roc_curve(scores, labels)
    ref_fpr, ref_tpr = _brute_roc(scores, labels)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert thresholds[0] == np.inf and np.all(np.diff(thresholds) < 0)
    assert len(thresholds) == len(np.unique(scores)) + 1


def test_auroc_of_large_float32_pixels_matches_rank_formula() -> None:
    rng = np.random.default_rng(7)
    labels = rng.random(300_000) < 0.05
    scores = (rng.random(300_000) + 0.3 * labels).astype(np.float32)
    scores = np.round(scores, 3)  # ties
    # Mann-Whitney U from average ranks, an independent O(n log n) route.
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = average_rank[inverse][labels].sum()
    n_pos, n_neg = labels.sum(), (~labels).sum()
    expected = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    assert metrics.pixel_auroc(scores.reshape(3, 100, 1000), labels.reshape(3, 100, 1000)) == pytest.approx(
        expected, abs=1e-9
    )


def test_auroc_perfect_inverted_and_constant_scores() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    assert metrics.image_auroc(labels.astype(float), labels) == 1.0
    assert metrics.image_auroc(-labels.astype(float), labels) == 0.0
    assert metrics.image_auroc(np.zeros(6), labels) == 0.5


def test_auroc_raises_when_one_class_only() -> None:
    with pytest.raises(ValueError, match="only one class"):
        metrics.auroc(np.arange(5.0), np.zeros(5, dtype=bool))
    with pytest.raises(ValueError, match="only one class"):
        metrics.roc_curve(np.arange(5.0), np.ones(5, dtype=bool))


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    labels = rng.random(50) < 0.3
    labels[0] = True
    scores = rng.integers(0, 10, 50) + 3.0 * labels * rng.random(50).round(1)
    f1, threshold = metrics.f1_max(scores, labels)
    assert f1 == pytest.approx(_brute_f1_max(scores, labels), abs=1e-12)
    called = scores >= threshold
    tp = (called & labels).sum()
    assert 2 * tp / (called.sum() + labels.sum()) == pytest.approx(f1, abs=1e-12)


# ---------------------------------------------------------------- AUPRO
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force_on_small_masks(seed: int, fpr_limit: float) -> None:
    maps, masks = _blob_case(seed)
    expected = _brute_aupro(maps, masks, fpr_limit)
    assert aupro_module.aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-10)


def test_pro_curve_ends_at_one_and_is_monotonic() -> None:
    maps, masks = _blob_case(11)
    fpr, pro = aupro_module.pro_curve(maps, masks)
    assert (fpr[0], pro[0]) == (0.0, 0.0)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    assert len(fpr) == len(np.unique(maps)) + 1


def test_aupro_perfect_map_is_one_and_inverted_map_is_zero() -> None:
    _, masks = _blob_case(3)
    assert aupro_module.aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro_module.aupro(1.0 - masks.astype(np.float32), masks) == pytest.approx(0.0, abs=1e-12)


def test_aupro_interpolates_where_fpr_jumps_past_the_limit() -> None:
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 4, :] = True  # one region of 10 pixels, 90 defect-free pixels
    maps = np.full((1, 10, 10), 0.5, dtype=np.float32)
    maps[0, 4, :5] = 0.9  # half the region found before any false positive
    # Curve: (0, 0) -> (0, 0.5) -> (1, 1); at FPR 0.3 the PRO is 0.65: area 0.3 * (0.5 + 0.65) / 2.
    assert aupro_module.aupro(maps, masks, fpr_limit=0.3) == pytest.approx(0.575, abs=1e-12)
    assert aupro_module.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.75, abs=1e-12)


def test_aupro_counts_diagonal_neighbours_as_one_region() -> None:
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # touching only at a corner
    masks[0, 5, 5] = True
    maps = np.full((1, 8, 8), 0.5, dtype=np.float32)
    maps[0, 1, 1] = maps[0, 5, 5] = 0.9
    maps[0, 2, 2] = 0.1
    # 8-connected: regions {2 px, half found} and {1 px, found}: PRO = 0.75 over FPR [0, 1).
    # With 4-connectivity it would be (1 + 0 + 1) / 3.
    assert aupro_module.aupro(maps, masks) == pytest.approx(0.75, abs=1e-12)


def test_aupro_coarse_thresholds_approximate_exact() -> None:
    rng = np.random.default_rng(5)
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[0, 4:12, 4:12] = masks[1, 20:30, 3:6] = masks[2, 10:13, 10:25] = True
    maps = np.clip(rng.normal(0.3, 0.15, masks.shape) + 0.3 * masks, 0, 1).astype(np.float32)
    exact = aupro_module.aupro(maps, masks)
    coarse = aupro_module.aupro(maps, masks, num_thresholds=2000)
    assert 0.1 < exact < 0.99
    assert coarse == pytest.approx(exact, abs=5e-3)
    fpr, pro = aupro_module.pro_curve(maps, masks, num_thresholds=50)
    assert len(fpr) == 51 and fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0)


def test_aupro_raises_without_anomalous_pixels() -> None:
    with pytest.raises(ValueError, match="anomalous"):
        aupro_module.aupro(np.random.rand(2, 8, 8), np.zeros((2, 8, 8), dtype=bool))


# ---------------------------------------------------------------- evaluate_maps
def _dataset(seed: int = 0):
    rng = np.random.default_rng(seed)
    types = ["good", "good", "good", "scratch", "scratch", "dent", "dent", "dent"]
    labels = np.array([t != "good" for t in types])
    masks = np.zeros((len(types), 16, 16), dtype=bool)
    for i, t in enumerate(types):
        if t == "scratch":
            masks[i, 3 + i, 2:14] = True
        elif t == "dent":
            masks[i, 5:9, 5:9] = True
    maps = np.clip(rng.random(masks.shape) * 0.6 + 0.35 * masks, 0, 1).astype(np.float32)
    scores = maps.reshape(len(types), -1).max(axis=1)
    return maps, masks, scores, labels, types


def test_evaluate_maps_summary_matches_the_parts_and_is_json() -> None:
    maps, masks, scores, labels, types = _dataset()
    result = metrics.evaluate_maps(maps, masks, scores, labels, types)
    json.dumps(result, allow_nan=False)
    assert result["n_images"] == 8 and result["n_anomalous"] == 5 and result["n_good"] == 3
    assert result["image_auroc"] == pytest.approx(_mann_whitney(scores, labels), abs=1e-12)
    assert result["f1_max"] == pytest.approx(_brute_f1_max(scores, labels), abs=1e-12)
    assert result["pixel_f1_max"] == pytest.approx(_brute_f1_max(maps.ravel(), masks.ravel()), abs=1e-12)
    assert result["aupro"] == pytest.approx(_brute_aupro(maps, masks, 0.3), abs=1e-10)
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max"):
        assert isinstance(result[key], float) and 0.0 <= result[key] <= 1.0
    assert set(result["per_defect"]) == {"scratch", "dent"}
    for name, n_defect in (("scratch", 2), ("dent", 3)):
        entry = result["per_defect"][name]
        keep = np.array([t in ("good", name) for t in types])
        assert entry["n_images"] == 3 + n_defect
        assert entry["image_auroc"] == pytest.approx(_mann_whitney(scores[keep], labels[keep]), abs=1e-12)
        assert entry["pixel_auroc"] == pytest.approx(
            _mann_whitney(maps[keep].ravel(), masks[keep].ravel()), abs=1e-12
        )
        assert entry["aupro"] == pytest.approx(_brute_aupro(maps[keep], masks[keep], 0.3), abs=1e-10)


def test_evaluate_maps_gives_none_for_undefined_metrics() -> None:
    maps, _, scores, _, _ = _dataset(1)
    n = len(maps)
    result = metrics.evaluate_maps(maps, np.zeros_like(maps, dtype=bool), scores, np.zeros(n, bool), ["good"] * n)
    json.dumps(result, allow_nan=False)
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max"):
        assert result[key] is None
    assert result["per_defect"] == {} and result["n_good"] == n


# ---------------------------------------------------------------- plots
def test_overlay_keeps_shape_and_dtype_and_reddens_where_map_is_high() -> None:
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    amap = np.zeros((40, 60), dtype=np.float32)
    amap[10:20, 10:30] = 1.0
    out = plots.overlay(image, amap, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    hot = out[15, 20].astype(int)
    cold = out[35, 50].astype(int)
    assert hot[0] > hot[2] + 50  # red over blue where the map is high (RGB order)
    assert cold[2] > cold[0] + 50  # blue where it is low
    assert np.abs(out.astype(int) - image).max() > 50
    assert np.array_equal(plots.overlay(image, amap, alpha=0.0), image)


def test_plots_write_valid_png_files(tmp_path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.5
    scores = rng.random(200) + 0.5 * labels
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    path = plots.plot_roc_curves(
        {"image": (fpr, tpr, metrics.auroc(scores, labels)), "pixel": (fpr, tpr ** 0.5, None)},
        tmp_path / "roc.png",
        "ROC test",
    )
    assert path == tmp_path / "roc.png"
    _is_png(path)

    maps, masks = _blob_case(2)
    pro_fpr, pro = aupro_module.pro_curve(maps, masks)
    _is_png(plots.plot_pro_curve(pro_fpr, pro, aupro_module.aupro(maps, masks), 0.3, tmp_path / "sub" / "pro.png"))

    image = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    amap = rng.random((32, 40)).astype(np.float32)  # a smaller map is resized to the image
    mask = np.zeros((64, 80), dtype=bool)
    mask[20:40, 30:50] = True
    panel = _is_png(plots.save_overlay_panel(image, amap, mask, tmp_path / "panel.png", "defect 007"))
    assert panel.shape[1] > panel.shape[0] * 2  # three panels side by side
    _is_png(plots.save_overlay_panel(image, amap, None, tmp_path / "panel_good.png", "good 001"))

    _is_png(plots.plot_score_histogram(scores[~labels], scores[labels], 0.9, tmp_path / "hist.png"))
    _is_png(plots.plot_score_histogram(scores[~labels], np.array([]), None, tmp_path / "hist_good.png"))


def test_metrics_of_images_of_different_sizes_equal_the_stacked_ones_when_sizes_agree():
    """Lists of maps and masks (images of varied size, each compared at its mask's resolution) give the
    same figures as the stacked arrays when every image has one size, and accept images that do not."""
    from memseg_edge.train.metrics import evaluate_maps

    rng = np.random.default_rng(3)
    maps = rng.random((6, 20, 24)).astype(np.float32)
    masks = np.zeros((6, 20, 24), bool)
    masks[3, 4:9, 5:12] = True
    masks[4, 10:14, 2:6] = True
    masks[5, 0:3, 0:20] = True
    maps[masks] += 0.5
    scores = maps.reshape(6, -1).max(1)
    labels = masks.reshape(6, -1).any(1)
    kinds = ["good"] * 3 + ["a", "b", "b"]
    stacked = evaluate_maps(maps, masks, scores, labels, kinds)
    listed = evaluate_maps(list(maps), list(masks), scores, labels, kinds)
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max"):
        assert listed[key] == pytest.approx(stacked[key], abs=1e-12), key
    assert listed["per_defect"]["b"]["aupro"] == pytest.approx(stacked["per_defect"]["b"]["aupro"], abs=1e-12)
    ragged_maps = [rng.random((h, w)).astype(np.float32) for h, w in ((10, 30), (40, 12), (25, 25))]
    ragged_masks = [np.zeros(m.shape, bool) for m in ragged_maps]
    ragged_masks[2][5:10, 5:10] = True
    ragged_maps[2][5:10, 5:10] += 1.0
    r = evaluate_maps(ragged_maps, ragged_masks, np.array([0.1, 0.2, 0.9]), np.array([False, False, True]),
                      ["good", "good", "x"])
    assert r["pixel_auroc"] == pytest.approx(1.0) and r["aupro"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="each of its mask's shape"):
        evaluate_maps([np.zeros((4, 4))], [np.zeros((4, 5), bool)], np.zeros(1), np.zeros(1, bool), ["good"])
