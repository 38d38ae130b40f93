#!/usr/bin/env python
"""Which held-out good images set a run's threshold, and how far above the rest they sit (no test image).

    python benchmarks/issue10/threshold-outlier/heldout_scores.py RUN [--top 8] [--json out.json]

Scores the run's held-out good images (the ones its checkpoint names) and the synthetic anomalies the
trainer's validation makes from them (same seed), and prints the highest good scores with each image's
name, native size and mean grey level, beside the synthetic anomalies' score quantiles: whether the
threshold is set by one image far above the others or by the bulk of the good images.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np


@click.command()
@click.argument("run", type=click.Path(exists=True))
@click.option("--top", default=8, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False))
def main(run, top, json_path):
    import torch
    from PIL import Image

    from memseg_edge.scoring import image_scores
    from memseg_edge.train.checkpoint import load_model
    from memseg_edge.train.config import MemSegConfig
    from memseg_edge.train.datasets import discover, load_images
    from memseg_edge.train.synthesis import AnomalySynthesizer
    from memseg_edge.train.trainer import predict_maps

    torch.set_num_threads(2)
    run = Path(run)
    model, ckpt = load_model(run / "checkpoint.pt" if run.is_dir() else run)
    cfg = MemSegConfig.load(run / "config.yaml") if run.is_dir() else MemSegConfig.load(run.parent / "config.yaml")
    names = set(ckpt["data"]["holdout_images"])
    paths = [p for p in discover(cfg.data).train_good if p.name in names]
    assert len(paths) == len(names), "held-out images not found"
    size = int(ckpt["image_size"])
    holdout = load_images(paths, size, cfg.data.resize)
    good = image_scores(predict_maps(model, holdout, "cpu"), cfg.eval.top_k)
    rng = np.random.default_rng([cfg.train.seed, 7919])  # the trainer's validation pairs
    synth = AnomalySynthesizer(cfg.synthesis)
    bad = image_scores(predict_maps(model, np.stack([synth(img, rng)[0] for img in holdout]), "cpu"), cfg.eval.top_k)
    thr = float(ckpt["threshold"]["threshold"])
    order = np.argsort(-good)
    print(f"{run}: threshold {thr:.4f}; {len(good)} held-out good images, synthetic anomalies of them {len(bad)}")
    print(f"good scores: median {np.median(good):.4f}, 90th pct {np.quantile(good, 0.9):.4f}, highest {good.max():.4f}")
    print(f"synthetic anomaly scores: 10th pct {np.quantile(bad, 0.1):.4f}, median {np.median(bad):.4f}; "
          f"missed at the threshold {100 * np.mean(bad < thr):.1f} %")
    rows = []
    for i in order[:top]:
        img = Image.open(paths[i])
        grey = float(np.asarray(img.convert("L"), np.float32).mean())
        below = float(np.mean(bad < good[i]))
        rows.append({"name": paths[i].name, "score": float(good[i]), "size": list(img.size), "grey": grey,
                     "synthetic_below": below})
        print(f"  {paths[i].name:>12s}  score {good[i]:.4f}  {img.size[0]}x{img.size[1]}  mean grey {grey:5.1f}  "
              f"synthetic anomalies below it {100 * below:5.1f} %")
    if json_path:
        Path(json_path).write_text(json.dumps({"threshold": thr, "good": good.tolist(), "synthetic": bad.tolist(),
                                               "names": [p.name for p in paths], "top": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
