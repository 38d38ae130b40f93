"""The memory module against a brute-force reference: the chosen sample (Eq. 4, ties to the lowest
index, and the per-level option), the difference maps, and the bank's scale."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memseg_edge.train.memory import MemoryBank

SHAPES = [(4, 8, 8), (6, 4, 4), (8, 2, 2)]


def brute_force(feats, banks, selection):
    """Per input, the explicit squared difference to every sample, summed, argmin by a Python loop."""
    n, m = feats[0].shape[0], banks[0].shape[0]
    per_level = np.zeros((len(feats), n, m))
    for level, (f, b) in enumerate(zip(feats, banks)):
        for i in range(n):
            for j in range(m):
                per_level[level, i, j] = ((f[i] - b[j]) ** 2).sum()
    if selection == "sum":
        idx = [int(np.argmin(per_level[:, i].sum(0))) for i in range(n)]
        diffs = [np.stack([(f[i] - b[idx[i]]) ** 2 for i in range(n)]) for f, b in zip(feats, banks)]
        return np.array(idx), diffs
    idx = np.array([[int(np.argmin(per_level[lv, i])) for lv in range(len(feats))] for i in range(n)])
    diffs = [np.stack([(f[i] - b[idx[i, lv]]) ** 2 for i in range(n)]) for lv, (f, b) in enumerate(zip(feats, banks))]
    return idx, diffs


@pytest.mark.parametrize("selection", ["sum", "per_level"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_memory_selection_matches_brute_force(selection, seed):
    g = torch.Generator().manual_seed(seed)
    m = 7
    bank = MemoryBank(SHAPES, m, selection)
    bank_feats = [torch.randn(m, *s, generator=g) for s in SHAPES]
    bank.fill(bank_feats)
    # Inputs near a random memory sample, so the argmin is meaningful, not a coin toss.
    near = torch.randint(0, m, (5,), generator=g)
    feats = [b[near] + 0.3 * torch.randn(5, *s, generator=g) for b, s in zip(bank_feats, SHAPES)]
    diffs, index = bank(feats)
    ref_idx, ref_diffs = brute_force([f.numpy().astype(np.float64) for f in feats],
                                     [b.numpy().astype(np.float64) for b in bank_feats], selection)
    np.testing.assert_array_equal(index.numpy(), ref_idx)
    for d, r in zip(diffs, ref_diffs):
        np.testing.assert_allclose(d.numpy(), r, rtol=1e-5, atol=1e-6)


def test_memory_ties_go_to_the_lowest_index():
    bank = MemoryBank(SHAPES, 4, "sum")
    one = [torch.ones(1, *s) for s in SHAPES]
    # Samples 1 and 3 are identical and equally close to the input; 0 and 2 are far away.
    bank.fill([torch.cat([5 * o, 2 * o, 9 * o, 2 * o]) for o in one])
    _, index = bank([o.clone() for o in one])
    assert index.tolist() == [1]


def test_memory_input_equal_to_a_sample_gives_zero_difference():
    g = torch.Generator().manual_seed(3)
    bank_feats = [torch.randn(5, *s, generator=g) for s in SHAPES]
    bank = MemoryBank(SHAPES, 5, "sum")
    bank.fill(bank_feats)
    diffs, index = bank([b[2:3] for b in bank_feats])
    assert index.tolist() == [2]
    assert all(float(d.abs().max()) < 1e-6 for d in diffs)


def test_memory_scale_is_the_mean_nearest_neighbour_difference():
    g = torch.Generator().manual_seed(4)
    bank_feats = [torch.randn(6, *s, generator=g) for s in SHAPES]
    bank = MemoryBank(SHAPES, 6, "sum")
    bank.fill(bank_feats)
    for b, scale in zip(bank_feats, bank.scales()):
        x = b.flatten(1).double()
        d = torch.cdist(x, x) ** 2
        d.fill_diagonal_(float("inf"))
        expected = d.min(1).values.mean() / x.shape[1]
        assert float(scale) == pytest.approx(float(expected), rel=1e-4)


def test_memory_refuses_features_of_the_wrong_shape():
    bank = MemoryBank(SHAPES, 3, "sum")
    with pytest.raises(ValueError, match="do not match"):
        bank.fill([torch.zeros(2, *s) for s in SHAPES])
    with pytest.raises(ValueError, match="selection"):
        MemoryBank(SHAPES, 3, "nearest")
