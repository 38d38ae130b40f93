"""The decision-threshold rule, defined once: from good images only, choose the score that rejects at
most a target share of them. Test images are never used.

What a threshold chosen on ``m`` held-out good images promises is a statement about *new* good parts, and
``m`` bounds it. With ``k`` held-out images allowed at or above the threshold, a new good part's score is
exchangeable with the ``m`` held-out ones, so its chance to be rejected is on average ``(k + 1) / (m + 1)``
(the *expected* false-reject rate), and with 95 % confidence at most the Clopper-Pearson upper bound for
``k`` rejections in ``m`` trials. (Both are upper values: the threshold sits at or above the ``k``-th highest
held-out score, which is where they are exact.) The rate on the images that chose the threshold (``achieved_frr``) is
``k / m`` by construction and says nothing about new parts: with 21 images and a 1 % target, ``k = 0`` and
it reads 0 % while the expected rate is 4.5 %.
"""
from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def clopper_pearson_upper(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided upper confidence bound of a rate after ``k`` events in ``n`` trials: the ``p`` with
    ``P(Binomial(n, p) <= k) = 1 - confidence`` (for ``k = 0``: ``1 - (1 - confidence) ** (1 / n)``)."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    alpha = 1.0 - confidence
    lo, hi = k / n, 1.0
    for _ in range(100):  # bisection: the CDF falls as p grows
        mid = 0.5 * (lo + hi)
        if binomial_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def allowed_rejections(m: int, target_frr: float) -> int:
    """Held-out good images that may score at or above the threshold: the largest ``k`` whose expected
    false-reject rate ``(k + 1) / (m + 1)`` meets the target, i.e. ``floor(target * (m + 1)) - 1``, and 0
    where even ``k = 0`` does not (the target is then unresolved, and the result says so)."""
    return max(0, math.floor(target_frr * (m + 1) + 1e-9) - 1)


def images_to_resolve(target_frr: float) -> int | None:
    """The fewest held-out good images whose threshold's expected false-reject rate ``(k+1)/(m+1)`` meets
    ``target_frr`` (``k`` from :func:`allowed_rejections`); ``None`` for a target of 0, which no finite
    number meets."""
    if target_frr <= 0:
        return None
    m = 1
    while (allowed_rejections(m, target_frr) + 1) / (m + 1) > target_frr + 1e-12:
        m += 1
    return m


def threshold_for_false_reject_rate(good_scores: np.ndarray, target_frr: float, upper: float | None = None) -> dict:
    """Scores of held-out good images ``[M]`` -> ``{"threshold", "rule", "expected_frr", "frr_upper_95", ...}``.

    The threshold is the smallest value such that at most ``k`` good images score at or above it, ``k``
    the most whose expected false-reject rate on new good parts meets the target
    (:func:`allowed_rejections`), placed midway to the next good score so that a tiny numeric drift
    (FP16, INT8) does not flip a held-out image. ``expected_frr`` and ``frr_upper_95`` say what it promises for new
    good parts (module docstring); ``resolved`` is False when ``M`` images cannot resolve the target, and
    ``images_needed`` says how many would. ``upper``: scores can never exceed it (a map bounded to [0, 1]):
    the margin above the highest good score then stops halfway to it, so the threshold stays reachable.
    """
    scores = np.sort(np.asarray(good_scores, dtype=np.float64))
    m = len(scores)
    if m == 0:
        raise ValueError("no held-out good images to choose a threshold from: raise data.holdout_fraction")
    if not 0.0 <= target_frr < 1.0:
        raise ValueError(f"target false-reject rate must be in [0, 1), found {target_frr}")
    if not np.isfinite(scores).all():
        raise ValueError("held-out good images gave non-finite scores (NaN or infinity): the model is broken; "
                         "train again (lower --lr if the loss diverged)")
    allowed = allowed_rejections(m, target_frr)  # good images allowed at or above the threshold
    top = scores[m - 1 - allowed]  # highest score that must pass
    nxt = scores[m - allowed] if allowed > 0 else None
    if nxt is None:
        # Nothing may be rejected: above the highest good score, by a margin of the spread's 5 %.
        spread = float(scores[-1] - scores[0]) if m > 1 else 0.0
        threshold = float(top + max(0.05 * spread, 1e-6))
        if upper is not None and top < upper:
            threshold = min(threshold, float(top + (upper - top) / 2.0))
    else:
        threshold = float((top + nxt) / 2.0) if nxt > top else float(np.nextafter(top, np.inf))
    k = int(np.count_nonzero(scores >= threshold))
    expected = (k + 1) / (m + 1)
    needed = images_to_resolve(target_frr)
    return {
        "threshold": threshold,
        "rule": f"expected false-reject rate <= {target_frr:g}, from {m} held-out good training images",
        "target_frr": float(target_frr),
        "achieved_frr": float(k / m),
        "expected_frr": float(expected),
        "frr_upper_95": float(clopper_pearson_upper(k, m)),
        "resolved": bool(expected <= target_frr + 1e-12),
        "images_needed": needed,
        "n_good": int(m),
    }


def describe_threshold(thr: dict) -> str:
    """One line for a person: the threshold, its rule and what it promises for new good parts."""
    line = (f"decision threshold {thr['threshold']:.4f} ({thr['rule']}): expected false-reject rate on new good "
            f"parts {100 * thr['expected_frr']:.1f} %, at most {100 * thr['frr_upper_95']:.1f} % with 95 % "
            f"confidence")
    if "expected_frr" in thr and not thr.get("resolved", True):
        line += (f"\nWARNING: {thr['n_good']} held-out good images cannot resolve a {100 * thr['target_frr']:g} % "
                 f"false-reject target (the best they can promise is {100 * thr['expected_frr']:.1f} %)")
        if thr.get("images_needed"):
            line += (f"; {thr['images_needed']} held-out good images would: add good images or raise "
                     f"data.holdout_fraction")
    return line
