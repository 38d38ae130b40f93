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


# --- patch selection: every position against its nearest bank vector, wherever it came from ---------

def _vectors(feats: torch.Tensor) -> torch.Tensor:
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


@pytest.mark.parametrize("seed", [0, 1])
def test_patch_selection_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    m = 3
    bank = MemoryBank(SHAPES, m, "patch", patches=40)
    bank.fill([torch.randn(m, *s, generator=g) for s in SHAPES])
    feats = [torch.randn(2, *s, generator=g) for s in SHAPES]
    diffs, index = bank(feats)
    for level, (f, b, d) in enumerate(zip(feats, bank.banks(), diffs)):
        f64, b64 = f.double().numpy(), b.double().numpy()
        n, c, h, w = f.shape
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    dist = ((b64 - f64[i, :, y, x]) ** 2).sum(1)
                    j = int(np.argmin(dist))
                    if level == 0:
                        assert int(index[i, y, x]) == j
                    np.testing.assert_allclose(d[i, :, y, x].numpy(), (f64[i, :, y, x] - b64[j]) ** 2,
                                               rtol=1e-5, atol=1e-6)
    assert index.shape == (2, SHAPES[0][1], SHAPES[0][2])


def test_patch_selection_does_not_need_alignment():
    """A memory image moved in the frame is still good: the whole-image comparison sees a difference
    everywhere, the patch comparison (bank holding every vector) sees none."""
    g = torch.Generator().manual_seed(5)
    shapes = [(4, 8, 8)]
    feats = [torch.randn(2, 4, 8, 8, generator=g)]
    moved = [torch.roll(feats[0][1:2], shifts=(3, 2), dims=(2, 3))]
    whole = MemoryBank(shapes, 2, "sum")
    whole.fill(feats)
    patch = MemoryBank(shapes, 2, "patch", patches=10_000)
    patch.fill(feats)
    assert patch.banks()[0].shape == (128, 4)  # every position of both images
    assert float(whole(moved)[0][0].mean()) > 0.5
    assert float(patch(moved)[0][0].abs().max()) < 1e-6


def test_patch_bank_is_a_k_centre_coreset():
    """Farthest-point order: each chosen vector was the farthest from those before it, so no vector is
    farther from the coreset than the closest two chosen ones are from each other; deterministic."""
    g = torch.Generator().manual_seed(6)
    feats = [torch.randn(4, *s, generator=g) for s in SHAPES]
    a = MemoryBank(SHAPES, 4, "patch", patches=20)
    b = MemoryBank(SHAPES, 4, "patch", patches=20)
    a.fill(feats)
    b.fill(feats)
    for f, bank, other in zip(feats, a.banks(), b.banks()):
        assert torch.equal(bank, other)
        vectors = _vectors(f).double()
        chosen = bank.double()
        assert len(chosen) == min(20, len(vectors))
        # Every bank row is one of the memory vectors.
        assert float(torch.cdist(chosen, vectors).min(1).values.max()) < 1e-5
        if len(chosen) < len(vectors):
            pair = torch.cdist(chosen, chosen)
            pair.fill_diagonal_(float("inf"))
            cover = torch.cdist(vectors, chosen).min(1).values.max()
            assert float(cover) <= float(pair.min()) + 1e-6


def test_patch_scale_is_the_nearest_difference_to_other_images_vectors():
    g = torch.Generator().manual_seed(7)
    m = 3
    feats = [torch.randn(m, *s, generator=g) for s in SHAPES]
    bank = MemoryBank(SHAPES, m, "patch", patches=10_000)  # every vector kept: the scale is exact
    bank.fill(feats)
    for f, scale in zip(feats, bank.scales()):
        per_image = [_vectors(f[i:i + 1]).double() for i in range(m)]
        total, count = 0.0, 0
        for i in range(m):
            others = torch.cat([v for j, v in enumerate(per_image) if j != i])
            total += float((torch.cdist(per_image[i], others) ** 2).min(1).values.sum())
            count += len(per_image[i])
        assert float(scale) == pytest.approx(total / count / f.shape[1], rel=1e-4)


@pytest.mark.parametrize("block", [7, 512])
def test_patch_blocks_equal_the_exported_vectorised_form(monkeypatch, block):
    """PyTorch compares positions in blocks (memory, cache); the exported graph compares all at once.
    Both choose the same vectors and give the same differences, for blocks that do not divide the
    position count too."""
    import memseg_edge.train.memory as memory

    monkeypatch.setattr(memory, "PATCH_BLOCK", block)
    g = torch.Generator().manual_seed(8)
    bank = MemoryBank(SHAPES, 3, "patch", patches=30)
    bank.fill([torch.randn(3, *s, generator=g) for s in SHAPES])
    feats = [torch.randn(4, *s, generator=g) for s in SHAPES]
    diffs, index = bank(feats)
    for i, (f, b, d) in enumerate(zip(feats, bank.banks(), diffs)):
        ref, ref_index = memory.nearest_patch_difference(f, b, getattr(bank, f"norm{i}"), block=None)
        if i == 0:
            assert torch.equal(ref_index, index)
        torch.testing.assert_close(d, ref, rtol=0, atol=1e-6)


def test_patch_bank_norms_follow_the_bank_through_a_state_dict():
    """The squared norms are derived (not saved): loading a bank's state recomputes them."""
    g = torch.Generator().manual_seed(9)
    a = MemoryBank(SHAPES, 3, "patch", patches=30)
    a.fill([torch.randn(3, *s, generator=g) for s in SHAPES])
    b = MemoryBank(SHAPES, 3, "patch", patches=30)
    state = a.state_dict()
    assert not any(k.startswith("norm") for k in state)
    b.load_state_dict(state)
    for i, bank in enumerate(b.banks()):
        torch.testing.assert_close(getattr(b, f"norm{i}"), (bank.double() ** 2).sum(1).float())
    feats = [torch.randn(2, *s, generator=g) for s in SHAPES]
    assert all(torch.equal(x, y) for x, y in zip(a(feats)[0], b(feats)[0]))


def test_patch_bank_refuses_bad_settings():
    with pytest.raises(ValueError, match="at least 1"):
        MemoryBank(SHAPES, 3, "patch", patches=0)
    bank = MemoryBank(SHAPES, 3, "patch", patches=8)
    with pytest.raises(ValueError, match="do not match"):   # other channels
        bank.fill([torch.zeros(3, s[0] + 1, *s[1:]) for s in SHAPES])
    small = MemoryBank([(4, 2, 2)], 3, "patch", patches=12)
    with pytest.raises(ValueError, match="do not match"):   # 2 images hold 8 vectors, the bank 12
        small.fill([torch.zeros(2, 4, 2, 2)])
    # more images than the bank was built for (a bank refilled after training): the same size, filled
    small.fill([torch.arange(5 * 16, dtype=torch.float32).reshape(5, 4, 2, 2)])
    assert small.banks()[0].shape == (12, 4) and small.banks()[0].abs().sum() > 0
