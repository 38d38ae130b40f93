#!/usr/bin/env python
"""Whether a run's decoder can call a pixel anomalous (trainer.DECODER_COLLAPSE), for runs of any age.

    python tools/decoder_check.py runs/bottle runs/magnetic_tile [--json out.json]

Repeats the trainer's validation (its held-out good images, the synthetic anomalies it makes of them with the
run's seed) and prints, per run: the decoder's highest anomaly probability on those anomalies and the share of
their pixels it calls anomalous (probability >= 0.5), the ceiling its logits' bias alone gives (sigmoid of the
bias difference: what it outputs where every channel of its last block is off), and the synthetic anomalies
missed at the run's threshold. A run is *collapsed* when that highest probability is below 0.5. Runs trained
since the check exists print the same figures in their training log. No test image is read.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np


def check_run(run: Path) -> dict:
    import torch

    from memseg_edge.scoring import image_scores
    from memseg_edge.train.checkpoint import load_model
    from memseg_edge.train.config import MemSegConfig
    from memseg_edge.train.datasets import discover, load_images
    from memseg_edge.train.synthesis import AnomalySynthesizer
    from memseg_edge.train.trainer import predict_maps, validate_on_synthetic

    model, ckpt = load_model(run / "checkpoint.pt")
    cfg = MemSegConfig.load(run / "config.yaml")
    names = set(ckpt["data"]["holdout_images"])
    paths = [p for p in discover(cfg.data).train_good if p.name in names]
    if len(paths) != len(names):
        raise click.ClickException(f"{run}: {len(names) - len(paths)} of its held-out images are not under {cfg.data.root}")
    holdout = load_images(paths, int(ckpt["image_size"]), cfg.data.resize)
    good = image_scores(predict_maps(model, holdout, "cpu"), cfg.eval.top_k)
    threshold = float(ckpt["threshold"]["threshold"])
    v = validate_on_synthetic(model, holdout, good, AnomalySynthesizer(cfg.synthesis), cfg.train.seed, "cpu",
                              cfg.eval.top_k, threshold)
    bias = model.decoder.head[-1].bias.detach()
    return {"run": str(run), "decoder_max_probability": v["decoder_max_probability"],
            "decoder_anomalous_share": v["decoder_anomalous_share"],
            "bias_ceiling": float(torch.sigmoid(bias[1] - bias[0])), "collapsed": v["decoder_max_probability"] < 0.5,
            "miss_rate": v["miss_rate"], "image_auroc": v["image_auroc"], "pixel_auroc": v["pixel_auroc"],
            "decoder_activation": cfg.model.decoder_activation}


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False))
def main(runs, threads, json_path):
    import torch

    torch.set_num_threads(threads)
    rows = []
    for run in runs:
        r = check_run(Path(run))
        rows.append(r)
        click.echo(f"{run}: decoder ({r['decoder_activation']}) highest anomaly probability on the synthetic anomalies "
                   f"{r['decoder_max_probability']:.3f}, {100 * r['decoder_anomalous_share']:.1f} % of their pixels "
                   f">= 0.5; bias alone {r['bias_ceiling']:.3f}; {'COLLAPSED' if r['collapsed'] else 'not collapsed'}; "
                   f"synthetic anomalies missed at the threshold {100 * r['miss_rate']:.1f} % (image AUROC "
                   f"{r['image_auroc']:.4f})")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
