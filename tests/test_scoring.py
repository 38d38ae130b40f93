"""The image score (top-k mean) and the decision-threshold rule."""
from __future__ import annotations

import numpy as np
import pytest

from memseg_edge.calibration.threshold import threshold_for_false_reject_rate
from memseg_edge.scoring import image_scores, verdict


def test_image_score_is_the_mean_of_the_top_k_pixels():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 1, 20, 20)).astype(np.float32)
    expected = [np.sort(m.ravel())[-100:].mean() for m in maps]
    np.testing.assert_allclose(image_scores(maps, 100), expected, rtol=1e-6)
    np.testing.assert_allclose(image_scores(maps[:, 0], 1), maps.reshape(3, -1).max(1))


def test_threshold_rejects_at_most_the_target_share_of_good_images():
    scores = np.linspace(0.1, 0.5, 100)
    t = threshold_for_false_reject_rate(scores, 0.05)
    # k held-out images may score at or above it: the most for which (k + 1) / 101 <= 5 %.
    assert np.sum(scores >= t["threshold"]) == 4
    assert t["achieved_frr"] == pytest.approx(0.04) and t["expected_frr"] == pytest.approx(5 / 101)
    strict = threshold_for_false_reject_rate(scores, 0.0)
    assert strict["threshold"] > scores.max()
    assert "held-out good" in strict["rule"]


def test_threshold_refuses_empty_or_invalid_input():
    with pytest.raises(ValueError, match="held-out"):
        threshold_for_false_reject_rate(np.array([]), 0.01)
    with pytest.raises(ValueError):
        threshold_for_false_reject_rate(np.ones(5), 1.5)


def test_verdict_fails_at_or_above_the_threshold():
    assert verdict(0.5, 0.5) == "FAIL" and verdict(0.49, 0.5) == "PASS"


def test_threshold_reports_what_it_promises_for_new_good_parts():
    """21 held-out images and a 1 % target: nothing may be rejected, so the rule is "above the highest
    good score"; the rate on those images is 0 by construction, but a new good part is rejected with
    probability 1/22 on average and, with 95 % confidence, at most 1 - 0.05 ** (1/21)."""
    from memseg_edge.calibration.threshold import describe_threshold

    t = threshold_for_false_reject_rate(np.linspace(0.1, 0.3, 21), 0.01)
    assert t["achieved_frr"] == 0.0
    assert t["expected_frr"] == pytest.approx(1 / 22)
    assert t["frr_upper_95"] == pytest.approx(1 - 0.05 ** (1 / 21), rel=1e-6)
    assert t["resolved"] is False and t["images_needed"] == 99
    text = describe_threshold(t)
    assert "WARNING" in text and "99 held-out good images" in text and "4.5 %" in text
    enough = threshold_for_false_reject_rate(np.linspace(0.1, 0.3, 200), 0.01)
    assert enough["resolved"] and enough["expected_frr"] <= 0.01
    assert "WARNING" not in describe_threshold(enough)


def test_expected_rate_and_upper_bound_hold_for_new_good_parts_by_simulation():
    """Draw good scores, choose the threshold, measure the true false-reject rate of the score
    distribution (uniform: 1 - threshold). Averaged, it is at most the expected rate (the threshold sits
    at or above the k-th highest held-out score, whose rate averages exactly (k+1)/(m+1)); it exceeds the
    95 % bound in at most about 5 % of the draws."""
    rng = np.random.default_rng(0)
    true_rates, above = [], 0
    for _ in range(4000):
        t = threshold_for_false_reject_rate(rng.random(21), 0.01)
        rate = max(0.0, 1.0 - t["threshold"])
        true_rates.append(rate)
        above += rate > t["frr_upper_95"]
    assert np.mean(true_rates) <= 1 / 22 + 0.003
    assert above / 4000 <= 0.06
    # With 300 images and a 5 % target, k = 14: the rate averages (k+1)/(m+1) = 15/301 when the threshold
    # falls between two held-out scores (midway, as the rule places it), within the simulation's noise.
    rates = [max(0.0, 1.0 - threshold_for_false_reject_rate(rng.random(300), 0.05)["threshold"]) for _ in range(2000)]
    assert np.mean(rates) == pytest.approx(14.5 / 301, abs=0.002)


def test_clopper_pearson_bound_matches_known_values():
    from memseg_edge.calibration.threshold import binomial_cdf, clopper_pearson_upper

    assert clopper_pearson_upper(0, 21) == pytest.approx(0.1329, abs=1e-4)
    # At the bound, seeing k or fewer events has probability 5 %.
    for k, n in ((1, 30), (3, 100), (10, 67)):
        assert binomial_cdf(k, n, clopper_pearson_upper(k, n)) == pytest.approx(0.05, abs=1e-6)
    assert clopper_pearson_upper(5, 5) == 1.0


def test_a_threshold_for_a_bounded_map_stays_reachable():
    """Scores of a map bounded to [0, 1] that crowd near 1 (the fused map on a clean product): the margin
    above the highest good score must not carry the threshold to 1 or beyond, where no part would fail."""
    scores = np.r_[np.linspace(0.30, 0.97, 20), 0.995]
    plain = threshold_for_false_reject_rate(scores, 0.01)
    assert plain["threshold"] >= 1.0            # what the unbounded rule does: every part would pass
    bounded = threshold_for_false_reject_rate(scores, 0.01, upper=1.0)
    assert 0.995 < bounded["threshold"] < 1.0
    assert bounded["achieved_frr"] == 0.0
    wide = threshold_for_false_reject_rate(np.linspace(0.1, 0.3, 21), 0.01, upper=1.0)
    assert wide["threshold"] == threshold_for_false_reject_rate(np.linspace(0.1, 0.3, 21), 0.01)["threshold"]
