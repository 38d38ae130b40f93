"""C's rule (BENCHMARKS.md, "INT8 choice: a larger calibration set (C)"), applied to the probe JSONs that
tools/probe_precision.py wrote: in each, "fp32" is the bundle's model.onnx, "int8" the bundle's INT8 file (C,
256 calibration images) and "I" today's plan (64 images). Usage: python rule.py bottle.json magnetic_tile.json"""
import json
import sys

MEASURES = ("image_auroc", "pixel_auroc", "aupro")
changes = {"I": {}, "C": {}}
for path in sys.argv[1:]:
    probe = json.load(open(path))
    product = path.rsplit("/", 1)[-1].removesuffix(".json")
    for plan, key in (("I", "I"), ("C", "int8")):
        for m in MEASURES:
            changes[plan][(product, m)] = probe[key][m] - probe["fp32"][m]
for plan, c in changes.items():
    print(plan, "  ".join(f"{p} {m} {v:+.4f}" for (p, m), v in c.items()))
worst = {plan: min(c.values()) for plan, c in changes.items()}
gain = worst["C"] - worst["I"]
largest_loss = max(changes["I"][k] - changes["C"][k] for k in changes["C"])
print(f"worst change: I {worst['I']:+.4f}, C {worst['C']:+.4f} (C better by {gain:+.4f}; the rule asks >= 0.001)")
print(f"largest single measure worse under C than under I: {largest_loss:+.4f} (the rule allows <= 0.002)")
print("C adopted" if gain >= 0.001 and largest_loss <= 0.002 else "C rejected: today's plan (64 images) stays")
