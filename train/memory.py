"""MemSeg's memory module (paper section 3.2): features of N good images form the memory bank; an input
is compared with every memory sample and the difference to the closest one is passed on.

Vectorised and ONNX-friendly: the distance to every sample comes from one matrix product
(|x|^2 - 2 x.b + |b|^2), so the N x features difference tensor is never materialised; then ArgMin,
Gather and the exact squared difference to the chosen sample. No per-sample Python loop.
"""
from __future__ import annotations

import torch
from torch import nn

SELECTIONS = ("sum", "per_level")


class MemoryBank(nn.Module):
    """Memory features ``[M, C_l, H_l, W_l]`` per level (buffers, saved in the checkpoint).

    ``forward(feats)`` with input features ``[N, C_l, H_l, W_l]`` returns the squared differences to the
    chosen sample per level (same shapes) and the chosen index: ``[N]`` (``sum``: one sample for all
    levels, paper Eq. 4) or ``[N, L]`` (``per_level``). Ties go to the lowest index.
    """

    def __init__(self, shapes: list[tuple[int, int, int]], num_samples: int, selection: str = "sum"):
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"memory selection must be one of {SELECTIONS}, found {selection!r}")
        self.selection = selection
        self.num_levels = len(shapes)
        for i, shape in enumerate(shapes):
            self.register_buffer(f"bank{i}", torch.zeros(num_samples, *shape))
            self.register_buffer(f"scale{i}", torch.ones(()))

    def banks(self) -> list[torch.Tensor]:
        return [getattr(self, f"bank{i}") for i in range(self.num_levels)]

    def scales(self) -> list[torch.Tensor]:
        """Per level, the typical squared difference between good images (a scalar): the mean, over
        memory samples, of the per-element squared difference to the nearest other memory sample."""
        return [getattr(self, f"scale{i}") for i in range(self.num_levels)]

    @torch.no_grad()
    def fill(self, feats: list[torch.Tensor]) -> None:
        """Store the memory samples' features (one tensor ``[M, C, H, W]`` per level) and their scales."""
        for bank, scale, f in zip(self.banks(), self.scales(), feats):
            if bank.shape != f.shape:
                raise ValueError(f"memory features {tuple(f.shape)} do not match the bank {tuple(bank.shape)}")
            bank.copy_(f)
            if len(f) > 1:
                d = self.level_distances(f, f)
                d.fill_diagonal_(float("inf"))
                scale.fill_(float(d.min(1).values.mean()) / f[0].numel())
            else:
                scale.fill_(float(f.var()))
            scale.clamp_(min=1e-12)

    @staticmethod
    def level_distances(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """Sum of squared differences of every input ``[N, ...]`` to every sample ``[M, ...]`` -> ``[N, M]``."""
        xf = x.flatten(1)
        bf = bank.flatten(1)
        cross = xf @ bf.t()
        d = (xf * xf).sum(1, keepdim=True) - 2.0 * cross + (bf * bf).sum(1).unsqueeze(0)
        return d.clamp_min(0.0)

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        banks = self.banks()
        dists = [self.level_distances(f, b) for f, b in zip(feats, banks)]
        if self.selection == "sum":
            index = torch.stack(dists, 0).sum(0).argmin(1)
            chosen = [b.index_select(0, index) for b in banks]
        else:
            index = torch.stack([d.argmin(1) for d in dists], 1)
            chosen = [b.index_select(0, index[:, i]) for i, b in enumerate(banks)]
        diffs = [(f - c) ** 2 for f, c in zip(feats, chosen)]
        return diffs, index
