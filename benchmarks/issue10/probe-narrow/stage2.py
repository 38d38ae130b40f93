"""Apply stage 2 of H's rule (BENCHMARKS.md, "a narrower decoder head", written before the numbers) to the two
products' probe JSONs of all four runs each: usage stage2.py PROBE_BOTTLE.json PROBE_MAGNETIC_TILE.json.
H is adopted if the mean over the two products of the two-model mean of (image + pixel AUROC + AUPRO) / 3 is no
more than 0.003 below today's, and no product's two-model mean loses more than 0.01 on any of the three."""
import json
import sys
from statistics import mean

RUNS = {"bottle": (["runs/ks/bottle-short", "runs/h/bottle-base-seed1"], ["runs/h/bottle", "runs/h/bottle-seed1"]),
        "magnetic_tile": (["runs/ks/magnetic_tile", "runs/h/magnetic_tile-base-seed1"],
                          ["runs/h/magnetic_tile", "runs/h/magnetic_tile-seed1"])}
M = ("image_auroc", "pixel_auroc", "aupro")


def arm(d, runs):
    rs = [d[r]["sigma=0"] for r in runs]
    out = {m: mean(r[m] for r in rs) for m in M}
    out["mean3"] = mean(out[m] for m in M)
    return out


changes, fails = [], []
for prod, path in zip(RUNS, sys.argv[1:3]):
    d = json.load(open(path))
    base, cand = (arm(d, runs) for runs in RUNS[prod])
    changes.append(cand["mean3"] - base["mean3"])
    fails += [f"{prod} {m} {cand[m] - base[m]:+.4f}" for m in M if cand[m] - base[m] < -0.01]
    print(f"{prod:14s} two-seed means, today -> H: " + "  ".join(
        f"{m} {base[m]:.4f} -> {cand[m]:.4f} ({cand[m] - base[m]:+.4f})" for m in (*M, "mean3")))
c = mean(changes)
ok = c >= -0.003 and not fails
print(f"H, stage 2: two-product mean change {c:+.4f} (the rule allows down to -0.003); losses over 0.01: "
      f"{fails or 'none'} -> {'ADOPTED' if ok else 'rejected'}")
