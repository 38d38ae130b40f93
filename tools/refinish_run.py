#!/usr/bin/env python
"""Finish a run again with settings that act after training only, without training again.

    python tools/refinish_run.py runs/short-fused/magnetic_tile --memory-rebuild-samples 120 --out runs/refill/magnetic_tile
    python tools/refinish_run.py runs/short-fused/bottle --distance-weight 0.75 --out runs/w75/bottle

``--memory-rebuild-samples N`` (``model.memory_rebuild_samples``): the bank filled again from N good images
(the memory samples and a seeded pick of the training images; never a held-out image nor one that sets the
fusion normalisers), at the bank's size; 0 gives a refilled run its trained bank back.
``--memory-rebuild-choice validation`` (``model.memory_rebuild_choice``): the run finished with both banks and
the refilled one kept only where the trainer's synthetic validation gains (``trainer.REBUILD_MARGIN``).
``--distance-weight W`` (``model.distance_weight``): the memory distance's weight in the fused map.
``--position-normalisers`` / ``--no-position-normalisers`` (``model.position_normalisers``): the fused map's
normalisers per position (set from the fusion's calibration images) or one per frame.
Either way the weights are copied unchanged and what training does after its last iteration is done again
(the fusion normalisers, the threshold, the synthetic validation: ``trainer.finish_model``), so the run
written is the one the same command would have trained with those settings. Test images are never read.
Writes OUT/checkpoint.pt and OUT/config.yaml.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from memseg_edge.train.trainer import finish_again


@click.command()
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("--memory-rebuild-samples", type=click.IntRange(min=0),
              help="Good images the bank is filled from (more than the run's model.memory_samples; 0: as trained).")
@click.option("--memory-rebuild-choice", type=click.Choice(["always", "validation"]),
              help="With --memory-rebuild-samples: keep the refilled bank always, or only where the synthetic "
                   "validation gains (model.memory_rebuild_choice).")
@click.option("--distance-weight", type=float, help="The memory distance's weight in the fused map, in (0, 1).")
@click.option("--position-normalisers/--no-position-normalisers", default=None,
              help="Per-position normalisers in the fused map (model.position_normalisers), or one per frame.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New run folder (must not hold a checkpoint).")
def main(run: Path, memory_rebuild_samples: int | None, memory_rebuild_choice: str | None, distance_weight: float | None,
         position_normalisers: bool | None, out: Path) -> int:
    changes = {k: v for k, v in (("model.memory_rebuild_samples", memory_rebuild_samples),
                                 ("model.memory_rebuild_choice", memory_rebuild_choice),
                                 ("model.distance_weight", distance_weight),
                                 ("model.position_normalisers", position_normalisers)) if v is not None}
    if not changes:
        raise click.UsageError("nothing to change: give --memory-rebuild-samples, --memory-rebuild-choice, "
                               "--distance-weight and/or --[no-]position-normalisers")
    if (out / "checkpoint.pt").exists():
        raise click.ClickException(f"{out} already holds a checkpoint; choose another folder")
    try:
        finish_again(run, out, changes)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
