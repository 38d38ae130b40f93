"""MemSeg's memory module (paper section 3.2): features of N good images form the memory bank; an input
is compared with every memory sample and the difference to the closest one is passed on.

Vectorised and ONNX-friendly: the distance to every sample comes from one matrix product
(|x|^2 - 2 x.b + |b|^2), so the N x features difference tensor is never materialised; then ArgMin,
Gather and the exact squared difference to the chosen sample. No per-sample Python loop.

``patch`` selection (this project's, for products whose images are not aligned: textures, loose parts):
the bank holds, per level, a coreset of feature vectors taken from every position of the memory
images, and every input position is compared with its nearest bank vector, wherever it came from. The
paper's whole-image selection compares position (i, j) of the input with position (i, j) of one memory
image, which only means something when the parts are aligned in the frame.
"""
from __future__ import annotations

import torch
from torch import nn

SELECTIONS = ("sum", "per_level", "patch")
DEFAULT_PATCHES = 4096
PATCH_BLOCK = 512


class MemoryBank(nn.Module):
    """Memory features ``[M, C_l, H_l, W_l]`` per level (buffers, saved in the checkpoint); with ``patch``
    selection, ``[P_l, C_l]``: ``P_l = min(patches, M * H_l * W_l)`` vectors chosen from all positions of
    the M memory images by a greedy k-centre coreset.

    ``forward(feats)`` with input features ``[N, C_l, H_l, W_l]`` returns the squared differences to the
    chosen memory features per level (same shapes) and the chosen index: ``[N]`` (``sum``: one sample for
    all levels, paper Eq. 4), ``[N, L]`` (``per_level``) or ``[N, H_0, W_0]`` (``patch``: the bank vector
    chosen at each position of the finest level). Ties go to the lowest index.
    """

    def __init__(self, shapes: list[tuple[int, int, int]], num_samples: int, selection: str = "sum",
                 patches: int = DEFAULT_PATCHES):
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"memory selection must be one of {SELECTIONS}, found {selection!r}")
        if selection == "patch" and patches < 1:
            raise ValueError(f"memory patches must be at least 1, found {patches}")
        self.selection = selection
        self.num_samples = num_samples
        self.num_levels = len(shapes)
        for i, (c, h, w) in enumerate(shapes):
            if selection == "patch":
                self.register_buffer(f"bank{i}", torch.zeros(min(patches, num_samples * h * w), c))
                # |b|^2 of every bank vector: derived from the bank (not saved), so the exported graph holds
                # it as P numbers rather than a second, squared copy of the bank.
                self.register_buffer(f"norm{i}", torch.zeros(min(patches, num_samples * h * w)), persistent=False)
            else:
                self.register_buffer(f"bank{i}", torch.zeros(num_samples, c, h, w))
            self.register_buffer(f"scale{i}", torch.ones(()))
        if selection == "patch":
            self.register_load_state_dict_post_hook(lambda module, _keys: module._update_norms())

    @torch.no_grad()
    def _update_norms(self) -> None:
        for i, bank in enumerate(self.banks()):
            getattr(self, f"norm{i}").copy_((bank.double() ** 2).sum(1))

    def banks(self) -> list[torch.Tensor]:
        return [getattr(self, f"bank{i}") for i in range(self.num_levels)]

    def scales(self) -> list[torch.Tensor]:
        """Per level, the typical squared difference between good images (a scalar): the mean, over
        memory samples, of the per-element squared difference to the nearest other memory sample."""
        return [getattr(self, f"scale{i}") for i in range(self.num_levels)]

    @torch.no_grad()
    def fill(self, feats: list[torch.Tensor]) -> None:
        """Store the memory samples' features (one tensor ``[M, C, H, W]`` per level) and their scales."""
        if self.selection == "patch":
            self._fill_patches(feats)
            return
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

    @torch.no_grad()
    def _fill_patches(self, feats: list[torch.Tensor]) -> None:
        for bank, scale, f in zip(self.banks(), self.scales(), feats):
            m, c, h, w = f.shape
            # Any number of images (a bank refilled after training holds more than ``num_samples``), as long
            # as they give the bank its size: the exported graph and every runtime see the same shapes.
            if c != bank.shape[1] or m * h * w < bank.shape[0]:
                raise ValueError(f"memory features {tuple(f.shape)} do not match the patch bank {tuple(bank.shape)}")
            vectors = f.permute(0, 2, 3, 1).reshape(-1, c)
            source = torch.arange(m, device=f.device).repeat_interleave(h * w)
            chosen = kcentre_coreset(vectors, bank.shape[0])
            bank.copy_(vectors[chosen])
            self._update_norms()
            # Typical good-to-good difference: each memory image's positions against the bank vectors that
            # came from the other memory images (an image is never its own nearest neighbour).
            if m > 1:
                total, count = 0.0, 0
                bank_source = source[chosen]
                for i in range(m):
                    own = bank_source == i
                    d = self.level_distances(vectors[source == i], bank)
                    d[:, own] = float("inf")
                    total += float(d.min(1).values.sum())
                    count += h * w
                scale.fill_(total / count / c)
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
        if self.selection == "patch":
            return self._forward_patches(feats, banks)
        dists = [self.level_distances(f, b) for f, b in zip(feats, banks)]
        if self.selection == "sum":
            index = torch.stack(dists, 0).sum(0).argmin(1)
            chosen = [b.index_select(0, index) for b in banks]
        else:
            index = torch.stack([d.argmin(1) for d in dists], 1)
            chosen = [b.index_select(0, index[:, i]) for i, b in enumerate(banks)]
        diffs = [(f - c) ** 2 for f, c in zip(feats, chosen)]
        return diffs, index

    def _forward_patches(self, feats: list[torch.Tensor], banks: list[torch.Tensor]):
        norms = [getattr(self, f"norm{i}") for i in range(self.num_levels)]
        # Exported: one vectorised graph. In PyTorch: queries in blocks of PATCH_BLOCK positions, so the
        # [positions x bank] distances of a batch never need gigabytes, and each block stays in cache
        # (4x faster on CPU-2 than the whole matrix at once).
        block = None if torch.onnx.is_in_onnx_export() else PATCH_BLOCK
        diffs, indices = zip(*(nearest_patch_difference(f, b, n, block) for f, b, n in zip(feats, banks, norms)))
        return list(diffs), indices[0]


def nearest_patch_difference(f: torch.Tensor, bank: torch.Tensor, norms: torch.Tensor | None = None,
                             block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Input features ``[N, C, H, W]``, bank ``[P, C]`` -> squared difference to the nearest bank vector at
    every position ``[N, C, H, W]`` and its index ``[N, H, W]`` (ties: the lowest index). The nearest
    vector minimises ``|b|^2 - 2 x.b`` (``|x|^2`` is the same for every candidate): one matrix product.
    Everything reads the bank through its transpose, so an exported graph holds one copy of it;
    ``norms``: ``|b|^2`` per bank vector ``[P]`` (computed here when not given); ``block``: compare that
    many positions at a time (``None``: all at once, the exported graph's form)."""
    n, c, h, w = f.shape
    bank_t = bank.t()  # [C, P]
    if norms is None:
        norms = (bank_t * bank_t).sum(0)
    q = f.flatten(2).transpose(1, 2)  # [N, HW, C]
    if block is None:
        index = ((-2.0 * q) @ bank_t + norms).argmin(-1)  # [N, HW]
    else:
        flat = q.reshape(n * h * w, c)
        index = torch.empty(n * h * w, dtype=torch.long, device=f.device)
        for i in range(0, len(flat), block):
            index[i:i + block] = torch.addmm(norms, flat[i:i + block], bank_t, alpha=-2.0).argmin(-1)
        index = index.reshape(n, h * w)
    chosen = bank_t.index_select(1, index.flatten()).reshape(c, n, h, w).transpose(0, 1)
    return (f - chosen) ** 2, index.reshape(n, h, w)


@torch.no_grad()
def kcentre_coreset(vectors: torch.Tensor, size: int, start: int | None = None) -> torch.Tensor:
    """Indices of ``size`` rows of ``vectors [K, C]`` chosen greedily, each the row farthest from those
    already chosen (k-centre), starting from row ``start`` (default: the row nearest the mean).
    Deterministic; all rows if ``size >= K``."""
    k = len(vectors)
    if size >= k:
        return torch.arange(k, device=vectors.device)
    vectors = vectors.double()  # the |a|^2 - 2 a.b + |b|^2 form below loses small distances in float32
    norms = (vectors * vectors).sum(1)
    if start is None:
        start = int(((vectors - vectors.mean(0)) ** 2).sum(1).argmin())
    chosen = torch.empty(size, dtype=torch.long, device=vectors.device)
    chosen[0] = start
    nearest = (norms - 2.0 * (vectors @ vectors[start]) + norms[start]).clamp_min(0.0)
    for i in range(1, size):
        nxt = int(nearest.argmax())
        chosen[i] = nxt
        torch.minimum(nearest, norms - 2.0 * (vectors @ vectors[nxt]) + norms[nxt], out=nearest)
    return chosen
