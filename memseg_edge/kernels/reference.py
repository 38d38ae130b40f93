"""The memory-bank step in numpy: the definition the fused kernel is checked against (on a GPU) and
that is held equal to the exported standard-op subgraph and to ``train.memory.MemoryBank`` (in CI).

Distances are summed directly as ``sum((x - b)^2)`` in float64 (the kernel sums the same terms in
float32; the export expands ``|x|^2 - 2 x.b + |b|^2``): all three agree on the index unless two samples
are closer than float32 rounding, and exactly on ties between identical samples.

Selection, the kernel's too (memory_argmin_l2.cu): ties go to the lowest index, and a NaN distance counts
as the smallest, as in ``np.argmin`` and ``torch.argmin`` (the first NaN wins). So a NaN anywhere in an
image's features (of a level that is summed) selects sample 0, and a NaN in bank sample ``m`` makes every
image select the first such ``m``; the NaN then shows in that image's diffs. The kernel sums in float32:
where a distance overflows float32 (above ~3.4e38) it reads ``inf`` there and a finite value here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SELECTIONS = ("sum", "per_level")


def level_distances(x: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Squared L2 distance of every input ``[N, ...]`` to every sample ``[M, ...]`` -> ``[N, M]`` float64."""
    xf = np.asarray(x, np.float64).reshape(len(x), -1)
    bf = np.asarray(bank, np.float64).reshape(len(bank), -1)
    return np.stack([((xf - b) ** 2).sum(1) for b in bf], axis=1)


def memory_step(features: Sequence[np.ndarray], banks: Sequence[np.ndarray],
                selection: str = "sum", dtype=None) -> tuple[list[np.ndarray], np.ndarray]:
    """Features ``[N, C_l, H_l, W_l]`` and banks ``[M, C_l, H_l, W_l]`` per level -> (diffs per level,
    ``(x - bank[idx])^2`` in ``dtype`` (default: the features' dtype; ``np.float64`` to measure a kernel's
    rounding); index int32 ``[N]`` (``sum``) or ``[N, L]``
    (``per_level``)). Ties go to the lowest index (``np.argmin`` keeps the first)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, found {selection!r}")
    if len(features) != len(banks) or not features:
        raise ValueError(f"need one bank per feature level, found {len(features)} and {len(banks)}")
    dists = [level_distances(f, b) for f, b in zip(features, banks)]
    if selection == "sum":
        index = np.argmin(np.sum(dists, axis=0), axis=1).astype(np.int32)
        picks = [index] * len(banks)
    else:
        index = np.stack([np.argmin(d, axis=1) for d in dists], axis=1).astype(np.int32)
        picks = [index[:, i] for i in range(len(banks))]
    diffs = []
    for f, b, pick in zip(features, banks, picks):
        d = np.asarray(f, np.float64) - np.asarray(b, np.float64)[pick]
        diffs.append((d * d).astype(dtype or np.asarray(f).dtype))
    return diffs, index
