#!/usr/bin/env python
"""Precision variants of a bundle on the defect probe, not the test set: choose an INT8 (or FP16) plan
without reading a test image (BENCHMARKS.md, "INT8 choice: the frozen encoder kept in float").

    python tools/probe_precision.py runs/short-fused/magnetic_tile \
        --variant E=runs/int8-e/magnetic_tile/model.int8.onnx \
        --data ../shared/data --category magnetic_tile --textures ../shared/data/dtd/images --json probe.json

RUN is a training run (its ``config.yaml`` gives the held-out split: the probe is built from the run's
held-out good images, never trained on, plus the six probe defect kinds of ``train/probe.py``). The
variants are RUN/bundle's ``model.onnx`` / ``model.fp16.onnx`` / ``model.int8.onnx`` that exist (or
those of ``--bundle``) and each ``--variant NAME=FILE.onnx``; every variant runs in onnxruntime on the
same probe, and each is printed with its change against FP32 (``model.onnx``) on image AUROC, pixel
AUROC and AUPRO, and the most negative of the three ("worst").
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import yaml

from memseg_edge.backends import OnnxRuntimeBackend
from memseg_edge.bundle import PRECISION_FILES, load_bundle
from memseg_edge.train.config import DataConfig, MemSegConfig
from memseg_edge.train.datasets import discover, load_images, run_split
from memseg_edge.train.probe import describe_probe, make_probe_set, probe_kinds, run_probe
from memseg_edge.train.synthesis import list_textures

MEASURES = ("image_auroc", "pixel_auroc", "aupro")


def changes(result: dict, reference: dict) -> dict:
    """Each measure's change against the reference, and the most negative of them as ``worst``."""
    d = {m: float(result[m] - reference[m]) for m in MEASURES}
    d["worst"] = min(d.values())
    return d


def _int8_share(path: Path) -> float | None:
    """The share of the multiply-adds an INT8 file runs in INT8, as ``calibrate`` recorded it in the
    ``model.json`` beside it (None for other files or older bundles)."""
    meta = path.parent / "model.json"
    if not meta.is_file():
        return None
    entry = (json.loads(meta.read_text()).get("files") or {}).get(path.name) or {}
    return entry.get("int8_share")


def _variant(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise click.BadParameter(f"{spec!r}: write NAME=FILE.onnx")
    if not Path(path).is_file():
        raise click.BadParameter(f"{path}: no such file")
    return name, Path(path)


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The bundle whose variants to compare [default: RUN/bundle].")
@click.option("--variant", "extra", multiple=True, help="NAME=FILE.onnx: one more variant (repeatable).")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--category", required=True)
@click.option("--textures", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Texture folder for the 'texture' probe kind (without it, that kind is left out).")
@click.option("--seed", default=0, show_default=True, help="Seed of the probe defects (not of the split).")
@click.option("--threads", default=1, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(run, bundle, extra, data, category, textures, seed, threads, json_path):
    bundle_dir = bundle or run / "bundle"
    if not (run / "config.yaml").is_file():
        raise click.ClickException(f"{run}: no config.yaml; give a training run's folder (its held-out split)")
    try:
        b, _ = load_bundle(bundle_dir)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(f"{e} (export one with `memseg-edge export {run}`, or give --bundle)")
    variants = {p: bundle_dir / f for p, f in PRECISION_FILES.items() if (bundle_dir / f).is_file()}
    for spec in extra:
        name, path = _variant(spec)
        if name in variants:
            raise click.BadParameter(f"{name!r} is already a variant of the bundle; pick another name")
        variants[name] = path
    if "fp32" not in variants:
        raise click.ClickException(f"{bundle_dir}: no model.onnx to compare against")

    cfg = MemSegConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    ds = discover(DataConfig(root=str(data), category=category, image_size=b.image_size))
    split = run_split(cfg, ds.train_good)
    kinds = probe_kinds(textures)
    probe = make_probe_set(load_images(split.holdout, b.image_size, b.meta.get("resize", "stretch")),
                           cfg.synthesis.foreground,
                           list_textures(textures) if textures else [], kinds, seed)
    print(f"probe: {len(split.holdout)} held-out good images + {len(probe.kinds) - len(split.holdout)} probe "
          f"defects ({', '.join(kinds)}); test images are not read", flush=True)

    results = {}
    for name, path in variants.items():
        backend = OnnxRuntimeBackend(path, threads=threads)
        r = run_probe(lambda x: backend.infer(x)[0][:, 0], probe, int(b.meta["top_k"]))["sigma=0"]
        share = _int8_share(path)
        results[name] = {"file": str(path), **r, **({"int8_share": share} if share is not None else {})}
        print(f"{name:>8}  {describe_probe(r)}" + (f"  (INT8 share of the work {share:.0%})" if share is not None else ""),
              flush=True)
    ref = results["fp32"]
    for name, r in results.items():
        if name != "fp32":
            r["change_vs_fp32"] = changes(r, ref)
            c = r["change_vs_fp32"]
            print(f"{name:>8} - fp32: image {c['image_auroc']:+.4f}  pixel {c['pixel_auroc']:+.4f}  "
                  f"AUPRO {c['aupro']:+.4f}  worst {c['worst']:+.4f}")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
