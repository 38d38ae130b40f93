#!/usr/bin/env python
"""Compare training runs on the defect probe (train/probe.py): held-out good images of each run, with
compact blob defects of a family the trainer never synthesises. Test images are never read.

    python tools/probe_validation.py runs/a runs/b --data ../shared/data/mvtec_ad --category bottle \
        --textures ../shared/data/dtd/images --sigmas 0,4 --json probe.json --preview probe.png

For every run and every map-smoothing sigma (applied after the model; 0 = as trained) it prints image
AUROC, pixel AUROC and AUPRO overall and per probe kind. Runs must share the held-out split (same seed,
memory size and hold-out fraction); the tool refuses otherwise, since their probes would differ.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import cv2
import numpy as np

from memseg_edge.train.datasets import load_images
from memseg_edge.train.plots import _contour_image
from memseg_edge.train.probe import describe_probe, make_probe_set, parse_kinds, run_probe
from memseg_edge.train.synthesis import _label, list_textures
from memseg_edge.train.trainer import load_run, predict_maps


def _preview(probe, path: Path, n: int = 8) -> None:
    """A strip of probe samples (one per kind, cycling) with their masks outlined in red."""
    tiles = []
    bad = [i for i, k in enumerate(probe.kinds) if k != "good"]
    step = max(1, len(bad) // n)
    for i in bad[::step][:n]:
        tile = _contour_image(probe.images[i], probe.masks[i])
        _label(tile, probe.kinds[i])
        tiles.append(tile)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(tiles, axis=1), cv2.COLOR_RGB2BGR))


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--category", required=True)
@click.option("--textures", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Texture folder for the 'texture' probe kind (without it, that kind is left out).")
@click.option("--sigmas", default="0,4", show_default=True, help="Map smoothing sigmas to compare, comma-separated.")
@click.option("--seed", default=0, show_default=True, help="Seed of the probe defects (not of the split).")
@click.option("--kinds", default=None,
              help="Probe kinds, comma-separated (default: the six every recipe choice used: "
                   "stain, shade, smudge, texture, scratch, crack; also: uneven).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--preview", type=click.Path(path_type=Path), default=None, help="PNG strip of probe samples.")
def main(runs, data, category, textures, sigmas, seed, kinds, json_path, preview):
    sig = [float(s) for s in sigmas.split(",") if s.strip()]
    try:
        kinds = parse_kinds(kinds, textures)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--kinds") from None
    tex = list_textures(textures) if textures else []
    results, names_key, probes = {}, None, {}
    for run in runs:
        model, ckpt, cfg, split = load_run(run, data, category)
        names = tuple(p.name for p in split.holdout)
        if names_key is None:
            names_key = names
        elif names != names_key:
            raise click.ClickException(f"{run}: its held-out images differ from {runs[0]}'s; compare runs that "
                                       "share seed, memory size and hold-out fraction")
        # one probe per way of preparing the images (size, data.resize): the same held-out images, the
        # same seeded defect recipe
        key = (ckpt["image_size"], cfg.data.resize)
        if key not in probes:
            probes[key] = make_probe_set(load_images(split.holdout, *key), cfg.synthesis.foreground, tex, kinds, seed)
            print(f"probe ({key[0]} px, {key[1]}): {len(split.holdout)} held-out good images + "
                  f"{len(probes[key].kinds) - len(split.holdout)} probe defects ({', '.join(kinds)}); test images "
                  "are not read", flush=True)
            if preview:
                _preview(probes[key], preview.with_name(f"{preview.stem}-{key[1]}{preview.suffix}")
                         if len(probes) > 1 else preview)
        probe = probes[key]
        res = run_probe(lambda x: predict_maps(model, x, "cpu"), probe, int(ckpt["top_k"]), sig)
        results[str(run)] = res
        for name, r in res.items():
            print(f"{run}  {name}: {describe_probe(r)}", flush=True)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
