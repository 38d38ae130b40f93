#!/usr/bin/env python
"""Turn on ``model.distance_fusion`` for a run trained without it, without training again.

    python tools/add_distance_fusion.py runs/short/bottle --out runs/short-fused/bottle

The fusion acts only on the map the model outputs at inference; training never sees it. So a run trained
without it, given what training does after its last iteration with it on (the normalisers q_p and q_D from
good training images, then the threshold and the synthetic validation on the held-out images:
``trainer.finish_model``), is the run the same command would have trained with it on. The weights and the
memory bank are copied unchanged; the run's own data split is checked against the checkpoint. Test
images are never read. Writes OUT/checkpoint.pt and OUT/config.yaml.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from memseg_edge.train.checkpoint import read_checkpoint, save_checkpoint
from memseg_edge.train.config import MemSegConfig
from memseg_edge.train.datasets import discover, run_split
from memseg_edge.train.synthesis import AnomalySynthesizer
from memseg_edge.train.torch_model import MemSeg
from memseg_edge.train.trainer import finish_model


def add_distance_fusion(run: Path, out: Path, log=print) -> Path:
    """``run``'s checkpoint with ``model.distance_fusion`` on, finished as training finishes; returns the
    new checkpoint's path."""
    ckpt = read_checkpoint(run / "checkpoint.pt" if run.is_dir() else run)
    cfg = MemSegConfig.from_dict(ckpt["config"])
    if cfg.model.distance_fusion:
        raise click.ClickException(f"{run} already has model.distance_fusion on")
    if not cfg.model.use_memory:
        raise click.ClickException(f"{run} has no memory step (model.use_memory: false); the fusion needs one")
    if ckpt.get("threshold") is None:
        raise click.ClickException(f"{run}'s checkpoint is not a finished run (no threshold): finish training first")
    cfg.model.distance_fusion = True
    model = MemSeg(cfg.model, int(ckpt["image_size"]), weights=None)
    missing, unexpected = model.load_state_dict(ckpt["model_state"], strict=False)
    if list(missing) != ["fusion_norm"] or unexpected:
        raise click.ClickException(f"{run}: its weights do not fit this model (missing {missing}, unexpected {unexpected})")
    split = run_split(cfg, discover(cfg.data).train_good)
    if ([p.name for p in split.memory] != ckpt["data"]["memory_images"]
            or [p.name for p in split.holdout] != ckpt["data"]["holdout_images"]):
        raise click.ClickException(f"{run}: the good images under {cfg.data.root} no longer split as they did in "
                                   "training (memory or held-out images differ); this needs the run's own data")
    threshold, validation = finish_model(model, cfg, split, AnomalySynthesizer(cfg.synthesis), "cpu", log)
    old = ckpt.get("validation") or {}
    validation = {**(validation or {}), "history": old.get("history", []), "train_seconds": old.get("train_seconds")}
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    path = save_checkpoint(out / "checkpoint.pt", model, cfg, iteration=int(ckpt["iteration"]), threshold=threshold,
                           data=ckpt["data"], backbone_weights=ckpt["backbone_weights"], validation=validation,
                           optimizer=ckpt.get("optimizer"), scheduler=ckpt.get("scheduler"),
                           train_seconds=ckpt.get("train_seconds"))
    log(f"checkpoint: {path}")
    return path


@click.command()
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New run folder (must not hold a checkpoint).")
def main(run: Path, out: Path) -> int:
    if (out / "checkpoint.pt").exists():
        raise click.ClickException(f"{out} already holds a checkpoint; choose another folder")
    add_distance_fusion(run, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
