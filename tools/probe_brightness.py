#!/usr/bin/env python
"""Candidate U on the defect probe: a low-frequency brightness term L fused into the output map
(BENCHMARKS.md, "Recipe choice: a low-frequency brightness term in the fused map"). No retraining: each
run's checkpoint is scored with today's fused map and with L added, on the same probe, in one process.

    python tools/probe_brightness.py runs/short-fused/bottle runs/seed1/bottle --data ../shared/data/mvtec_ad \\
        --category bottle --textures ../shared/data/dtd/images --json brightness-bottle.json

R = the image's grey level (channel mean, in [0, 1]) blurred by a Gaussian of sigma = side / 16 (reflected
border), divided by the image's mean grey level (+ 1/255); mu, s = per-position mean and standard deviation
of R over the run's memory samples; L = |R - mu| / (s + 0.02). F = 0.5 (p / q_p + D / q_D) as the model
computes it, F_U = 0.5 (p / q_p + D / q_D + L / q_L), each q the 99th percentile over the run's own fusion-
calibration images (never a memory sample, a held-out image or a test image); both bounded as the model
bounds its map, F / (F + c), c the highest image score over those images. ``--only-brightness`` scores L
alone. Test images are never read.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import cv2
import numpy as np
from probe_fusion import maps_and_distances, scores

from memseg_edge.scoring import image_scores
from memseg_edge.train.datasets import load_images
from memseg_edge.train.probe import describe_probe, make_probe_set, parse_kinds
from memseg_edge.train.synthesis import list_textures
from memseg_edge.train.trainer import fusion_calibration_images, load_run

SPREAD_FLOOR = 0.02
"""Added to the memory samples' per-position spread of R: a flat region of the memory is not infinitely strict."""


def relative_brightness(images: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[N, H, W, 3]`` -> R ``[N, H, W]`` float32: the blurred grey level over the image's mean."""
    grey = images.astype(np.float32).mean(axis=3) / 255.0
    sigma = min(images.shape[1:3]) / 16.0
    low = np.stack([cv2.GaussianBlur(g, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for g in grey])
    return low / (grey.mean(axis=(1, 2), keepdims=True) + 1.0 / 255.0)


def brightness_deviation(images: np.ndarray, mu: np.ndarray, spread: np.ndarray) -> np.ndarray:
    return np.abs(relative_brightness(images) - mu) / (spread + SPREAD_FLOOR)


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--category", required=True)
@click.option("--textures", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Texture folder for the 'texture' probe kind (without it, that kind is left out).")
@click.option("--kinds", default=None, help="Probe kinds, comma-separated (default: the six every recipe choice used).")
@click.option("--only-brightness", is_flag=True, help="Score L alone (no model maps).")
@click.option("--seed", default=0, show_default=True, help="Seed of the probe defects.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(runs, data, category, textures, kinds, only_brightness, seed, json_path):
    try:
        kinds = parse_kinds(kinds, textures)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--kinds") from None
    tex = list_textures(textures) if textures else []
    results = {}
    for run in runs:
        model, ckpt, cfg, split = load_run(run, data, category)
        if model.memory is None:
            raise click.ClickException(f"{run}: the model has no memory step")
        size = int(ckpt["image_size"])
        memory_r = relative_brightness(load_images(split.memory, size, cfg.data.resize))
        mu, spread = memory_r.mean(axis=0), memory_r.std(axis=0)
        probe = make_probe_set(load_images(split.holdout, size, cfg.data.resize), cfg.synthesis.foreground, tex,
                               kinds, seed)
        top_k = int(ckpt["top_k"])
        pick = load_images(fusion_calibration_images(split.train, cfg.train.seed), size, cfg.data.resize)
        q_l = float(np.percentile(brightness_deviation(pick, mu, spread), 99))
        l_map = brightness_deviation(probe.images, mu, spread)
        if only_brightness:
            res = {"q_L": q_l, "L": scores(l_map, probe, top_k)}
        else:
            p_cal, d_cal = maps_and_distances(model, pick)
            l_cal = brightness_deviation(pick, mu, spread)
            q_p, q_d = float(np.percentile(p_cal, 99)), float(np.percentile(d_cal, 99))
            p, d = maps_and_distances(model, probe.images)
            res = {"q_p": q_p, "q_D": q_d, "q_L": q_l}
            for name, f_cal, f in (("F", 0.5 * (p_cal / q_p + d_cal / q_d), 0.5 * (p / q_p + d / q_d)),
                                   ("F+L", 0.5 * (p_cal / q_p + d_cal / q_d + l_cal / q_l),
                                    0.5 * (p / q_p + d / q_d + l_map / q_l))):
                # bounded as the model bounds its map (MemSeg.calibrate_fusion): the image score is a top-k
                # mean, which a monotone bound does not leave in the same order
                c = float(image_scores(f_cal, top_k).max())
                res[name] = scores(f / (f + c), probe, top_k)
        results[str(run)] = res
        print(f"{run}: {len(split.holdout)} held-out good + {len(probe.kinds) - len(split.holdout)} probe defects "
              f"({', '.join(kinds)}); q_L {q_l:.4g}", flush=True)
        for name in [k for k in ("L", "F", "F+L") if k in res]:
            print(f"  {name:4s} {describe_probe(res[name])}", flush=True)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
