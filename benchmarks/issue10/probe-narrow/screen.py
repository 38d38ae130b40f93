"""Apply stage 1 of H's rule (BENCHMARKS.md, "a narrower decoder head", written before the numbers) to the two
products' probe JSONs: usage screen.py PROBE_BOTTLE.json PROBE_MAGNETIC_TILE.json.
H is rejected if, on either product, its probe mean of the three is more than 0.010 below today's, or any one of
the three more than 0.020 below; otherwise it goes to stage 2 (a second seed per arm, the adoption rule)."""
import json
import sys
from statistics import mean

RUNS = {"bottle": ("runs/ks/bottle-short", "runs/h/bottle"),
        "magnetic_tile": ("runs/ks/magnetic_tile", "runs/h/magnetic_tile")}
M = ("image_auroc", "pixel_auroc", "aupro")

fails = []
for prod, path in zip(RUNS, sys.argv[1:3]):
    d = json.load(open(path))
    base, cand = (dict(d[r]["sigma=0"]) for r in RUNS[prod])
    for x in (base, cand):
        x["mean3"] = mean(x[m] for m in M)
    if cand["mean3"] - base["mean3"] < -0.010:
        fails.append(f"{prod} mean of the three {cand['mean3'] - base['mean3']:+.4f}")
    fails += [f"{prod} {m} {cand[m] - base[m]:+.4f}" for m in M if cand[m] - base[m] < -0.020]
    print(f"{prod:14s} seed 0, today -> H: " + "  ".join(
        f"{m} {base[m]:.4f} -> {cand[m]:.4f} ({cand[m] - base[m]:+.4f})" for m in (*M, "mean3")))
print(f"H, stage 1: losses beyond the screen: {fails or 'none'} -> "
      f"{'rejected' if fails else 'passes the screen: stage 2 (a second seed per arm) decides'}")
