"""The decision-threshold rule, defined once: from good images only, choose the score that rejects at
most a target share of them. Test images are never used."""
from __future__ import annotations

import math

import numpy as np


def threshold_for_false_reject_rate(good_scores: np.ndarray, target_frr: float) -> dict:
    """Scores of held-out good images ``[M]`` -> ``{"threshold", "rule", ...}``.

    The threshold is the smallest value such that at most ``floor(target_frr * M)`` good images score
    at or above it, placed midway to the next good score so that a tiny numeric drift (FP16, INT8)
    does not flip a held-out image. With few images the achievable rate is coarse, and the result says
    so (``achieved_frr``).
    """
    scores = np.sort(np.asarray(good_scores, dtype=np.float64))
    m = len(scores)
    if m == 0:
        raise ValueError("no held-out good images to choose a threshold from: raise data.holdout_fraction")
    if not 0.0 <= target_frr < 1.0:
        raise ValueError(f"target false-reject rate must be in [0, 1), found {target_frr}")
    allowed = math.floor(target_frr * m)  # good images allowed at or above the threshold
    top = scores[m - 1 - allowed]  # highest score that must pass
    nxt = scores[m - allowed] if allowed > 0 else None
    if nxt is None:
        # Nothing may be rejected: above the highest good score, by a margin of the spread's 5 %.
        spread = float(scores[-1] - scores[0]) if m > 1 else 0.0
        threshold = float(top + max(0.05 * spread, 1e-6))
    else:
        threshold = float((top + nxt) / 2.0) if nxt > top else float(np.nextafter(top, np.inf))
    return {
        "threshold": threshold,
        "rule": f"false-reject rate <= {target_frr:g} on {m} held-out good training images",
        "target_frr": float(target_frr),
        "achieved_frr": float(np.mean(scores >= threshold)),
        "n_good": int(m),
    }
