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
    assert np.sum(scores >= t["threshold"]) == 5
    assert t["achieved_frr"] == pytest.approx(0.05)
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
