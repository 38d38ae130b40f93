"""Apply the K / S rule (BENCHMARKS.md, written before the numbers) to the two products' probe JSONs."""
import json, sys
from pathlib import Path
HERE = Path(__file__).parent
from statistics import mean
P = {"bottle": (str(HERE / "probe-bottle.json"), ["runs/short-fused/bottle", "runs/seed1/bottle"],
                ["runs/nosmooth/bottle", "runs/nosmooth/bottle-seed1"]),
     "magnetic_tile": (str(HERE / "probe-magnetic_tile.json"), ["runs/std/magnetic_tile", "runs/std/magnetic_tile-seed1"],
                       ["runs/nosmooth/magnetic_tile", "runs/nosmooth/magnetic_tile-seed1"])}
M = ("image_auroc", "pixel_auroc", "aupro")

def arm(d, runs, sigma):
    rs = [d[r][f"sigma={sigma}"] for r in runs]
    out = {m: mean(r[m] for r in rs) for m in M}
    out["mean3"] = mean(out[m] for m in M)
    out["kinds"] = {k: mean(r["per_defect"][k]["aupro"] for r in rs) for k in rs[0]["per_defect"]}
    return out

arms = {}
for prod, (path, base, k) in P.items():
    d = json.load(open(path))
    arms[prod] = {"base": arm(d, base, 0), "K": arm(d, k, 0), "S": arm(d, base, 4), "K+S": arm(d, k, 4)}
verdicts = {}
for cand in ("K", "S", "K+S"):
    gains, fails = [], []
    for prod, a in arms.items():
        b, c = a["base"], a[cand]
        gains.append(c["mean3"] - b["mean3"])
        for m in M:
            if c[m] - b[m] < -0.01:
                fails.append(f"{prod} {m} {c[m] - b[m]:+.4f}")
        for kind in b["kinds"]:
            if c["kinds"][kind] - b["kinds"][kind] < -0.02:
                fails.append(f"{prod} {kind} AUPRO {c['kinds'][kind] - b['kinds'][kind]:+.4f}")
        print(f"{cand:4s} {prod:14s} " + "  ".join(f"{m} {b[m]:.4f}->{c[m]:.4f} ({c[m] - b[m]:+.4f})" for m in (*M, "mean3")))
        print("     kinds AUPRO: " + "  ".join(f"{k.removeprefix('probe-')} {b['kinds'][k]:.4f}->{c['kinds'][k]:.4f}" for k in b["kinds"]))
    g = mean(gains)
    ok = g >= 0.003 and not fails
    verdicts[cand] = (ok, g)
    print(f"{cand}: two-product mean gain {g:+.4f}; losses beyond the rule: {fails or 'none'} -> {'PASSES' if ok else 'fails'}\n")
print({k: (v[0], round(v[1], 4)) for k, v in verdicts.items()})
