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

from memseg_edge.train.checkpoint import read_checkpoint
from memseg_edge.train.config import MemSegConfig
from memseg_edge.train.trainer import finish_again


def add_distance_fusion(run: Path, out: Path, log=print) -> Path:
    """``run``'s checkpoint with ``model.distance_fusion`` on, finished as training finishes; returns the
    new checkpoint's path."""
    cfg = MemSegConfig.from_dict(read_checkpoint(run / "checkpoint.pt" if run.is_dir() else run)["config"])
    if cfg.model.distance_fusion:
        raise click.ClickException(f"{run} already has model.distance_fusion on")
    if not cfg.model.use_memory:
        raise click.ClickException(f"{run} has no memory step (model.use_memory: false); the fusion needs one")
    try:
        return finish_again(run, out, {"model.distance_fusion": True}, log)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


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
