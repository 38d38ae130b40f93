"""Apply Q's rule (BENCHMARKS.md, "per-position normalisers in the fused map", written before the numbers) to
the two products' probe JSONs: usage rule.py PROBE_BOTTLE.json PROBE_MAGNETIC_TILE.json."""
import json
import sys
from statistics import mean

RUNS = {"bottle": (["runs/kd/bottle-default", "runs/ks/bottle-short"], ["runs/q/bottle-default", "runs/q/bottle-short"]),
        "magnetic_tile": (["runs/kd/magnetic_tile-default", "runs/ks/magnetic_tile"],
                          ["runs/q/magnetic_tile-default", "runs/q/magnetic_tile-short"])}
M = ("image_auroc", "pixel_auroc", "aupro")


def arm(d, runs):
    rs = [d[r]["sigma=0"] for r in runs]
    out = {m: mean(r[m] for r in rs) for m in M}
    out["mean3"] = mean(out[m] for m in M)
    return out


gains, fails = [], []
for prod, path in zip(RUNS, sys.argv[1:3]):
    d = json.load(open(path))
    base, cand = (arm(d, runs) for runs in RUNS[prod])
    gains.append(cand["mean3"] - base["mean3"])
    for m in M:
        if cand[m] - base[m] < -0.01:
            fails.append(f"{prod} {m} {cand[m] - base[m]:+.4f}")
    print(f"{prod:14s} two-model means, today -> Q: " + "  ".join(
        f"{m} {base[m]:.4f} -> {cand[m]:.4f} ({cand[m] - base[m]:+.4f})" for m in (*M, "mean3")))
g = mean(gains)
ok = g >= 0.003 and not fails
print(f"Q: two-product mean gain {g:+.4f} (the rule asks +0.003); losses over 0.01: {fails or 'none'} -> "
      f"{'ADOPTED' if ok else 'rejected'}")
