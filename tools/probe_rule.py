#!/usr/bin/env python
"""Apply a recipe choice's rule to the probe of both products (BENCHMARKS.md writes each rule before its numbers).

    python tools/probe_rule.py probe-bottle.json probe-magnetic_tile.json --per-arm 2 --min-change 0.003

Each JSON is one product's ``tools/probe_validation.py --json`` output, its runs given to that tool in the order
"today's runs, then the candidate's" (``--per-arm`` of each, one per seed). For each product the two arms' means
over their runs of image AUROC, pixel AUROC and AUPRO (at ``--sigma``) and of their mean; then the change of that
mean, averaged over the products. The candidate passes if that change is at least ``--min-change`` (negative for a
non-inferiority rule) and no product's arm mean of any one figure falls by more than ``--max-loss``. The verdict
is printed; the exit status is 0 either way (a rejected candidate is a result, not an error).
"""
from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import click

FIGURES = ("image_auroc", "pixel_auroc", "aupro")


def arm_means(probe: dict, runs: list[str], sigma: str) -> dict[str, float]:
    """Means over ``runs`` of each figure and of their three-figure mean."""
    rows = [probe[r][f"sigma={sigma}"] for r in runs]
    out = {f: mean(float(r[f]) for r in rows) for f in FIGURES}
    out["mean3"] = mean(out[f] for f in FIGURES)
    return out


def decide(probes: dict[str, dict], per_arm: int, min_change: float, max_loss: float, sigma: str = "0") -> dict:
    """``probes``: product -> probe JSON. Returns per-product arm means, the two-product change and the verdict."""
    products, changes, losses = {}, [], []
    for product, probe in probes.items():
        runs = list(probe)
        if len(runs) != 2 * per_arm:
            raise click.UsageError(f"{product}: the probe holds {len(runs)} runs, expected {2 * per_arm} "
                                   f"({per_arm} of today's, then {per_arm} of the candidate's)")
        base, cand = arm_means(probe, runs[:per_arm], sigma), arm_means(probe, runs[per_arm:], sigma)
        products[product] = {"today": base, "candidate": cand, "today_runs": runs[:per_arm],
                             "candidate_runs": runs[per_arm:]}
        changes.append(cand["mean3"] - base["mean3"])
        losses += [f"{product} {f} {cand[f] - base[f]:+.4f}" for f in FIGURES if cand[f] - base[f] < -max_loss]
    change = mean(changes)
    return {"products": products, "change": change, "losses_over_limit": losses, "min_change": min_change,
            "max_loss": max_loss, "passes": bool(change >= min_change - 1e-12 and not losses)}


@click.command()
@click.argument("probe_jsons", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--per-arm", type=click.IntRange(min=1), default=2, show_default=True,
              help="Runs per arm in each JSON (today's first, then the candidate's).")
@click.option("--min-change", type=float, required=True,
              help="Least change of the two-product mean of the three-figure mean (e.g. 0.003; -0.003 for non-inferiority).")
@click.option("--max-loss", type=float, default=0.01, show_default=True,
              help="Most any one figure of one product may fall.")
@click.option("--sigma", default="0", show_default=True, help="The probe's map smoothing to read.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the decision here too.")
def main(probe_jsons, per_arm, min_change, max_loss, sigma, json_path):
    probes = {Path(p).stem.replace("probe-", ""): json.loads(Path(p).read_text()) for p in probe_jsons}
    res = decide(probes, per_arm, min_change, max_loss, sigma)
    for product, r in res["products"].items():
        b, c = r["today"], r["candidate"]
        click.echo(f"{product}: today {', '.join(r['today_runs'])}; candidate {', '.join(r['candidate_runs'])}")
        click.echo("  " + "  ".join(f"{f} {b[f]:.4f} -> {c[f]:.4f} ({c[f] - b[f]:+.4f})" for f in (*FIGURES, "mean3")))
    click.echo(f"two-product mean change {res['change']:+.4f} (the rule asks >= {min_change:+.4f}); figures falling "
               f"more than {max_loss}: {', '.join(res['losses_over_limit']) or 'none'} -> "
               f"{'PASSES' if res['passes'] else 'does not pass'}")
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
