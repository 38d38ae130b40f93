#!/usr/bin/env python
"""Candidate F on the defect probe: the memory step's distance map fused into the model's output map
(BENCHMARKS.md, "Recipe choice: the memory distance fused into the output map"). No retraining: each
run's checkpoint is scored as it is and with F, on the same probe, in one process.

    python tools/probe_fusion.py runs/short/bottle --data ../shared/data/mvtec_ad --category bottle \
        --textures ../shared/data/dtd/images --json fusion-bottle.json

D = per level, the channel mean of the normalised squared difference to the nearest bank vector, upsampled
to the image and averaged over the levels. F = 0.5 * (p / q_p + D / q_D), q_* the 99th percentile of the
pixels of p and D over up to ``--calibration`` good images of the run's training pool (never its memory
samples, the held-out images the probe uses, or test images). Test images are never read.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np
import torch

from memseg_edge.scoring import image_scores
from memseg_edge.train import metrics
from memseg_edge.train.datasets import load_images
from memseg_edge.train.probe import describe_probe, make_probe_set, probe_kinds
from memseg_edge.train.synthesis import list_textures
from memseg_edge.train.torch_model import distance_map
from memseg_edge.train.trainer import fusion_calibration_images, load_run, to_tensor


@torch.no_grad()
def maps_and_distances(model, images: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The decoder's anomaly probability p (whatever the run's ``distance_fusion``) and the memory distance
    map D, both ``[N, H, W]`` float32."""
    model.eval()
    ps, ds = [], []
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i:i + batch_size], "cpu")
        ps.append(model.component_maps(x)[0][:, 0].numpy())   # the decoder's probability, fused or not
        diffs, _ = model.memory(model.memory_features(x))
        ds.append(distance_map([d / s for d, s in zip(diffs, model.memory.scales())])[:, 0].numpy())
    return np.concatenate(ps), np.concatenate(ds)


def scores(maps: np.ndarray, probe, top_k: int) -> dict:
    return metrics.evaluate_maps(maps, probe.masks, image_scores(maps, top_k), probe.labels, probe.kinds)


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--category", required=True)
@click.option("--textures", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Texture folder for the 'texture' probe kind (without it, that kind is left out).")
@click.option("--calibration", default=64, show_default=True,
              help="At most this many training-pool good images set the normalisers q_p and q_D.")
@click.option("--seed", default=0, show_default=True, help="Seed of the probe defects (the calibration pick is the run's own, as training makes it).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(runs, data, category, textures, calibration, seed, json_path):
    kinds = probe_kinds(textures)
    tex = list_textures(textures) if textures else []
    results = {}
    for run in runs:
        model, ckpt, cfg, split = load_run(run, data, category)
        if model.memory is None:
            raise click.ClickException(f"{run}: the model has no memory step; F needs one")
        size = int(ckpt["image_size"])
        pick = fusion_calibration_images(split.train, cfg.train.seed, calibration)
        p_cal, d_cal = maps_and_distances(model, load_images(pick, size, cfg.data.resize))
        q_p, q_d = float(np.percentile(p_cal, 99)), float(np.percentile(d_cal, 99))
        probe = make_probe_set(load_images(split.holdout, size, cfg.data.resize), cfg.synthesis.foreground, tex,
                               kinds, seed)
        p, d = maps_and_distances(model, probe.images)
        top_k = int(ckpt["top_k"])
        fused = 0.5 * (p / max(q_p, 1e-12) + d / max(q_d, 1e-12))
        res = {"q_p": q_p, "q_D": q_d, "calibration_images": len(pick),
               "model": scores(p, probe, top_k), "distance": scores(d, probe, top_k), "F": scores(fused, probe, top_k)}
        results[str(run)] = res
        print(f"{run}: {len(split.holdout)} held-out good + {len(probe.kinds) - len(split.holdout)} probe defects; "
              f"q_p {q_p:.4g}, q_D {q_d:.4g} from {len(pick)} training-pool images", flush=True)
        for name in ("model", "distance", "F"):
            print(f"  {name:8s} {describe_probe(res[name])}", flush=True)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
