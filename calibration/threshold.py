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

import json
import math
from pathlib import Path
from typing import Callable

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


def choose_variant_threshold(bundle_dir: str | Path, file_name: str, images: str | Path, *,
                             batch_size: int = 8, log: Callable = print) -> dict | None:
    """Give the precision variant ``file_name`` of a bundle its own threshold, by the training rule
    (:func:`threshold_for_false_reject_rate`, same target), from the held-out good images the bundle
    records (``model.json`` ``holdout_images``), found by name in the folder ``images`` and scored with
    the variant. FP16 and INT8 move every score a little; the same rule on the same images keeps the
    promise on new good parts (expected false-reject rate) for the variant that judges, where FP32's
    threshold could sit among its good scores or high above its defect scores.

    The images found are scored with ``model.onnx`` first and must give back the threshold training
    chose (else they are not the images the model held out: another product's folder, files changed),
    and then with the variant. Returns the record written to ``files[file_name]["threshold"]``, or None
    (the variant keeps the bundle's threshold, with a warning saying why)."""
    from memseg_edge.backends import OnnxRuntimeBackend
    from memseg_edge.bundle import load_bundle, map_gain
    from memseg_edge.preprocess import load_rgb, prepare

    from .int8 import hash_images

    bundle, _ = load_bundle(bundle_dir)
    base, names = bundle.meta.get("threshold"), bundle.meta.get("holdout_images")
    keep = f"{file_name} keeps the threshold chosen at training ({base['threshold']:.4f})" if base else ""
    if not base:
        log(f"{file_name}: the bundle records no threshold; pass --threshold T where it runs")
        return None
    if not names:
        log(f"warning: {bundle.root / 'model.json'} does not list the held-out good images (exported before they "
            f"were recorded): {keep}. Export the bundle again, then calibrate, to give {file_name} its own")
        return None
    folder = Path(images)
    paths = [folder / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        log(f"warning: {len(missing)} of the {len(names)} held-out good images (e.g. {missing[0]}) are not in "
            f"{folder}: {keep}. Give the product's train/good folder the model was trained from to give it its own")
        return None

    def scores(onnx_file: Path) -> np.ndarray:
        backend = OnnxRuntimeBackend(onnx_file)
        out = []
        for i in range(0, len(paths), batch_size):
            batch = np.stack([prepare(load_rgb(p), bundle.image_size, bundle.fit) for p in paths[i:i + batch_size]])
            out.append(np.asarray(backend.infer(batch)[1], dtype=np.float64))
        return np.concatenate(out)

    target = float(base["target_frr"]) if "target_frr" in base else None
    if target is None:
        log(f"warning: the training threshold records no target false-reject rate: {keep}")
        return None
    fp32 = threshold_for_false_reject_rate(scores(bundle.verify("fp32")), target, upper=1.0)
    # export checks onnxruntime against PyTorch to 1e-4 x the map's gain on any image; 10x that here
    tolerance = 1e-3 * map_gain(bundle.meta)
    drift = abs(fp32["threshold"] - float(base["threshold"]))
    if drift > tolerance:
        log(f"warning: the images named like the held-out ones in {folder} give a threshold of "
            f"{fp32['threshold']:.4f} with model.onnx, not the {base['threshold']:.4f} chosen at training (limit "
            f"{tolerance:.1e}): they are not the images the model held out. {keep}")
        return None
    own = threshold_for_false_reject_rate(scores(bundle.root / file_name), target, upper=1.0)
    own["rule"] += f", scored with {file_name}"
    own["holdout_sha256"] = hash_images(paths)
    own["fp32_check"] = {"threshold": fp32["threshold"], "difference": drift, "limit": tolerance}
    entry = bundle.meta["files"][file_name]
    entry["threshold"] = own
    (bundle.root / "model.json").write_text(json.dumps(bundle.meta, indent=2))
    log(f"{file_name}: its own threshold {own['threshold']:.4f} (training's, in FP32: {base['threshold']:.4f}), by the "
        f"training rule on the {own['n_good']} held-out good images scored with it")
    log(describe_threshold(own))
    return own

