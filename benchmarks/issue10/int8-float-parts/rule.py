#!/usr/bin/env python
"""The INT8 float-parts rule (BENCHMARKS.md, written before any number), applied to the probe JSONs of
`run.sh`:  python rule.py BOTTLE_PROBE.json MAGNETIC_TILE_PROBE.json"""
import json
import sys

MEASURES = ("image_auroc", "pixel_auroc", "aupro")
BETTER, WORSE, SHARE, TIE = 0.002, 0.002, 0.5, 0.0005
bottle, other = (json.load(open(p)) for p in sys.argv[1:3])
probes = {"bottle": bottle, "magnetic_tile": other}
plans = {"I": "int8", "X": "X", "H": "H", "G": "G"}


def worst(plan):
    return min(p[plans[plan]]["change_vs_fp32"][m] for p in probes.values() for m in MEASURES)


for plan, key in plans.items():
    cells = "  ".join(f"{name} " + " / ".join(f"{p[key]['change_vs_fp32'][m]:+.4f}" for m in MEASURES)
                      for name, p in probes.items())
    print(f"{plan}: {cells}  worst {worst(plan):+.4f}  INT8 share (bottle) {bottle[key].get('int8_share')}")
eligible = []
for plan in ("X", "H", "G"):
    key = plans[plan]
    better = worst(plan) >= worst("I") + BETTER
    no_loss = all(p[key]["change_vs_fp32"][m] >= p["int8"]["change_vs_fp32"][m] - WORSE
                  for p in probes.values() for m in MEASURES)
    share = bottle[key]["int8_share"] >= SHARE
    print(f"{plan}: worst {worst(plan) - worst('I'):+.4f} vs I (needs >= +{BETTER}) -> {better}; "
          f"no measure more than {WORSE} worse than I -> {no_loss}; INT8 share >= {SHARE} -> {share}")
    if better and no_loss and share:
        eligible.append(plan)
if not eligible:
    print("none eligible: I stays the default INT8 plan")
else:
    best = max(worst(p) for p in eligible)
    near = [p for p in eligible if worst(p) >= best - TIE]
    pick = max(near, key=lambda p: bottle[plans[p]]["int8_share"])
    print(f"eligible: {', '.join(eligible)}; adopted: {pick}")
