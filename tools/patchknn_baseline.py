#!/usr/bin/env python
"""A same-encoder patch-kNN baseline (PatchCore-style) to put beside MemSeg's figures.

    python tools/patchknn_baseline.py --data ../shared/data --category magnetic_tile \
        --backbone-weights ../shared/weights/mobilenet_v2-imagenet-features.pth --json knn.json

What it does, following the PatchCore recipe (Roth et al., 2022) with MemSeg's frozen encoder: features of
the stride-8 and stride-16 levels, each locally averaged (3x3), the coarser upsampled to stride 8 and
concatenated; a memory of patches from *all* good training images, reduced by greedy k-centre selection
(coreset) from a random subset; each test patch scored by its distance to the nearest memory patch; the
patch map upsampled to the image and smoothed (Gaussian, sigma 4); image score = the map's maximum.
Pixel metrics are computed at each mask's own resolution, as ``memseg-edge eval`` does. Test images are
only scored, never used to choose anything.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from memseg_edge.train import metrics
from memseg_edge.train.config import DataConfig
from memseg_edge.train.datasets import discover, load_images, load_test_full
from memseg_edge.train.evaluate import format_report, upsample_maps
from memseg_edge.train.memory import kcentre_coreset
from memseg_edge.train.torch_model import MemSeg
from memseg_edge.train.config import ModelConfig


def patch_features(model: MemSeg, images: np.ndarray, batch: int = 16) -> torch.Tensor:
    """RGB uint8 ``[N, S, S, 3]`` -> patch features ``[N, C, S/8, S/8]``."""
    pool = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 255.0
            _, feats = model.encoder.frozen_features(model.normalise(x))
            f8, f16 = pool(feats[1]), pool(feats[2])
            f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
            out.append(torch.cat([f8, f16], 1))
    return torch.cat(out)


def greedy_coreset(x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``k`` rows of ``x [n, d]`` chosen by greedy k-centre (each new row the farthest from those
    chosen so far), from a random first row: the trainer's own ``kcentre_coreset``."""
    g = torch.Generator().manual_seed(seed)
    return kcentre_coreset(x, k, start=int(torch.randint(len(x), (1,), generator=g)))


@click.command()
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--category", required=True)
@click.option("--backbone", default="mobilenet_v2", show_default=True)
@click.option("--backbone-weights", required=True, help="The same encoder weights MemSeg used.")
@click.option("--image-size", default=256, show_default=True)
@click.option("--subset", default=100_000, show_default=True, help="Random training patches the coreset picks from.")
@click.option("--coreset", default=10_000, show_default=True, help="Memory patches kept.")
@click.option("--sigma", default=4.0, show_default=True, help="Gaussian smoothing of the map (pixels).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(data, category, backbone, backbone_weights, image_size, subset, coreset, sigma, json_path):
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = MemSeg(ModelConfig(backbone=backbone, use_memory=False, standardise_images=False), image_size,
                   weights=backbone_weights).eval()
    ds = discover(DataConfig(root=data, category=category))
    train = load_images(ds.train_good, image_size)
    feats = patch_features(model, train)
    d = feats.shape[1]
    bank = feats.permute(0, 2, 3, 1).reshape(-1, d)
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(bank), generator=g)[:min(subset, len(bank))]
    bank = bank[pick]
    bank = bank[greedy_coreset(bank, min(coreset, len(bank)))]
    print(f"memory: {len(bank)} patches of {d} features from {len(train)} good training images "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    images, _, native = load_test_full(ds.test, image_size)
    maps = []
    for i in tqdm(range(0, len(images), 8), desc="score", unit="batch"):
        f = patch_features(model, images[i:i + 8])
        n, _, h, w = f.shape
        q = f.permute(0, 2, 3, 1).reshape(-1, d)
        dist = torch.cat([torch.cdist(q[j:j + 4096], bank).min(1).values for j in range(0, len(q), 4096)])
        m = dist.reshape(n, 1, h, w)
        m = F.interpolate(m, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0].numpy()
        maps.extend(cv2.GaussianBlur(x, (0, 0), sigma) for x in m)
    maps = np.stack(maps).astype(np.float32)
    scores = maps.reshape(len(maps), -1).max(1)
    defects = [it.defect for it in ds.test]
    labels = np.array([dd != "good" for dd in defects])
    result = metrics.evaluate_maps(upsample_maps(maps, [m.shape for m in native]), native, scores, labels, defects)
    result["method"] = (f"patch-kNN (PatchCore-style): {backbone} stride-8+16 features, coreset {len(bank)} of "
                        f"{len(pick)} random training patches, map sigma {sigma}, image score = map max")
    result["seconds"] = time.perf_counter() - t0
    print(format_report(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
