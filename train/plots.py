"""Evaluation figures: ROC and PRO curves, score histograms, and anomaly-map overlays, saved as PNG.

Matplotlib runs on the Agg backend (set here, before pyplot is imported) so no display is needed on a
training server. :func:`overlay` uses cv2 and numpy only, so the edge runtime can reuse it.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

_DPI = 100


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    # pyplot keeps every figure alive until closed; a per-image panel loop would otherwise leak.
    plt.close(fig)
    return path


def _auc_text(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4f}"


def plot_roc_curves(
    curves: dict[str, tuple[np.ndarray, np.ndarray, float | None]], path: str | Path, title: str = "ROC"
) -> Path:
    """ROC curves ``{name: (fpr [k], tpr [k], auc)}`` on one figure, AUC in the legend -> PNG path."""
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    ax.plot([0.0, 1.0], [0.0, 1.0], color="0.7", linestyle="--", linewidth=1.0, label="chance")
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(np.asarray(fpr), np.asarray(tpr), linewidth=1.5, label=f"{name} (AUC = {_auc_text(auc)})")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_pro_curve(
    fpr: np.ndarray, pro: np.ndarray, aupro: float | None, fpr_limit: float, path: str | Path
) -> Path:
    """PRO curve ``(fpr [k], pro [k])`` with the integrated part (FPR <= ``fpr_limit``) shaded -> PNG path."""
    fpr = np.asarray(fpr, dtype=np.float64)
    pro = np.asarray(pro, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    ax.plot(fpr, pro, linewidth=1.5, color="tab:blue", label=f"PRO (AUPRO@{fpr_limit:g} = {_auc_text(aupro)})")
    inside = fpr <= fpr_limit
    if inside.any() and fpr.size:
        # Close the shaded area at exactly the limit, as the integral does.
        shade_x = np.append(fpr[inside], fpr_limit)
        shade_y = np.append(pro[inside], np.interp(fpr_limit, fpr, pro))
        ax.fill_between(shade_x, shade_y, color="tab:blue", alpha=0.2)
    ax.axvline(fpr_limit, color="tab:red", linestyle="--", linewidth=1.0, label=f"FPR limit {fpr_limit:g}")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("false positive rate (defect-free pixels)")
    ax.set_ylabel("per-region overlap")
    ax.set_title("PRO curve")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _as_rgb_uint8(image_rgb: np.ndarray) -> np.ndarray:
    image = np.asarray(image_rgb)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], found shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, found {image.dtype}")
    return np.ascontiguousarray(image)


def _fit_map(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Map ``[h, w]`` -> float32 ``[H, W]`` in [0, 1], resized (bilinear) when the sizes differ."""
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim == 3 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.ndim != 2:
        raise ValueError(f"expected an anomaly map [H, W], found shape {amap.shape}")
    if amap.shape != shape:
        amap = cv2.resize(amap, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.nan_to_num(amap, nan=0.0), 0.0, 1.0)


def overlay(image_rgb: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 image ``[H, W, 3]`` and anomaly map ``[H, W]`` in [0, 1] -> uint8 ``[H, W, 3]``.

    The map, coloured with cv2's JET colormap (blue low, red high), is blended over the image with
    weight ``alpha``. A map of another size is resized to the image first. cv2/numpy only.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], found {alpha}")
    image = _as_rgb_uint8(image_rgb)
    amap = _fit_map(amap, image.shape[:2])
    heat_bgr = cv2.applyColorMap(np.round(amap * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1.0 - alpha, heat, alpha, 0.0)


def _contour_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask_u8 = np.asarray(mask).astype(bool).astype(np.uint8)
    if mask_u8.shape != image.shape[:2]:
        mask_u8 = cv2.resize(mask_u8, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask_u8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    drawn = image.copy()
    thickness = max(1, round(min(image.shape[:2]) / 128))
    cv2.drawContours(drawn, contours, -1, (255, 0, 0), thickness)
    return drawn


def save_overlay_panel(
    image_rgb: np.ndarray, amap: np.ndarray, gt_mask: np.ndarray | None, path: str | Path, title: str
) -> Path:
    """One PNG of three panels: the RGB uint8 image ``[H, W, 3]``, the map ``[h, w]`` in [0, 1] blended
    over it, and the ground truth ``[H, W]`` drawn as a red contour (``None`` or empty: "no defect")."""
    image = _as_rgb_uint8(image_rgb)
    blended = overlay(image, amap)
    has_defect = gt_mask is not None and bool(np.asarray(gt_mask).any())

    fig, axes = plt.subplots(1, 3, figsize=(12.0, 4.4))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(blended)
    axes[1].set_title("anomaly map")
    # The blend is plain RGB, so the colour bar comes from a separate mappable (matplotlib's jet = cv2's).
    fig.colorbar(
        ScalarMappable(norm=Normalize(0.0, 1.0), cmap="jet"),
        ax=axes[1],
        fraction=0.046,
        pad=0.04,
    )
    if has_defect:
        axes[2].imshow(_contour_image(image, gt_mask))
        axes[2].set_title("ground truth")
    else:
        axes[2].imshow(image)
        axes[2].set_title("ground truth: no defect")
        axes[2].text(
            0.5, 0.5, "no defect", transform=axes[2].transAxes, ha="center", va="center",
            color="white", fontsize=14, bbox={"facecolor": "black", "alpha": 0.5, "edgecolor": "none"},
        )
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_score_histogram(
    scores_good: np.ndarray, scores_bad: np.ndarray, threshold: float | None, path: str | Path
) -> Path:
    """Histograms of good ``[M]`` and anomalous ``[K]`` image scores on shared bins, the decision
    threshold as a vertical line when given -> PNG path."""
    good = np.asarray(scores_good, dtype=np.float64).reshape(-1)
    bad = np.asarray(scores_bad, dtype=np.float64).reshape(-1)
    values = np.concatenate((good, bad))
    values = values[np.isfinite(values)]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    if values.size:
        low, high = float(values.min()), float(values.max())
        if threshold is not None and np.isfinite(threshold):
            low, high = min(low, float(threshold)), max(high, float(threshold))
        if high <= low:
            high = low + 1e-6
        bins = np.linspace(low, high, 41)
        if good.size:
            ax.hist(good, bins=bins, alpha=0.6, color="tab:green", label=f"good ({good.size})")
        if bad.size:
            ax.hist(bad, bins=bins, alpha=0.6, color="tab:red", label=f"anomalous ({bad.size})")
    if threshold is not None:
        ax.axvline(float(threshold), color="black", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.4g}")
    ax.set_xlabel("image score")
    ax.set_ylabel("images")
    ax.set_title("image scores")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
