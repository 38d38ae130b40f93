"""The image score, defined once: the mean of the top-k pixel probabilities of the anomaly map (the
paper, section 4.2, k = 100). Evaluation, the threshold rule and the runtime call this; the exported
graph computes the same thing and a test holds them equal."""
from __future__ import annotations

import numpy as np

DEFAULT_TOP_K = 100


def image_scores(maps: np.ndarray, k: int = DEFAULT_TOP_K) -> np.ndarray:
    """Anomaly maps ``[N, H, W]`` or ``[N, 1, H, W]`` -> float32 scores ``[N]``."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim == 4:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise ValueError(f"expected maps [N, H, W] or [N, 1, H, W], found shape {maps.shape}")
    flat = maps.reshape(len(maps), -1)
    k = min(k, flat.shape[1])
    top = np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:]
    return top.mean(axis=1, dtype=np.float64).astype(np.float32)


def verdict(score: float, threshold: float) -> str:
    """``FAIL`` when the score reaches the threshold, else ``PASS``."""
    return "FAIL" if score >= threshold else "PASS"
