#!/usr/bin/env python
"""Give a finished run a memory bank filled from more good images (``model.memory_rebuild_samples``),
without training again.

    python tools/refill_memory.py runs/short-fused/magnetic_tile --samples 120 --out runs/refill/magnetic_tile

The refill acts after the last iteration only, so the run this writes is the one the same command would
have trained with ``model.memory_rebuild_samples: SAMPLES``: the weights copied unchanged, the bank filled
from the memory samples and a seeded pick of the training images (never a held-out image nor one that sets
the fusion normalisers), at the bank's size, then the fusion normalisers, the threshold and the synthetic
validation set again (``trainer.finish_model``). ``--samples 0`` gives a refilled run its trained bank back.
Test images are never read. Writes OUT/checkpoint.pt and OUT/config.yaml.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from memseg_edge.train.trainer import finish_again


@click.command()
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("--samples", required=True, type=click.IntRange(min=0),
              help="Good images the bank is filled from (more than the run's model.memory_samples; 0: as trained).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New run folder (must not hold a checkpoint).")
def main(run: Path, samples: int, out: Path) -> int:
    if (out / "checkpoint.pt").exists():
        raise click.ClickException(f"{out} already holds a checkpoint; choose another folder")
    try:
        finish_again(run, out, {"model.memory_rebuild_samples": samples})
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
