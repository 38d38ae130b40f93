#!/usr/bin/env python3
"""FP32 / FP16 / INT8 variants of one bundle, side by side, with onnxruntime on the CPU: accuracy on the
test images (the same evaluation as ``memseg-edge eval``), file size, median latency at batch 1 and
throughput at batch 8. All variants are timed in the same process, interleaved round by round, so their
ratio is fair even on a noisy machine. Prints a markdown table for BENCHMARKS.md.

    python tools/benchmark_precision.py BUNDLE --data ROOT --category NAME [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


from memseg_edge.backends import OnnxRuntimeBackend
from memseg_edge.bundle import PRECISION_FILES
from memseg_edge.train.config import DataConfig
from memseg_edge.train.datasets import discover, load_test
from memseg_edge.train.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (median reported)")
    ap.add_argument("--iters", type=int, default=10, help="batch-1 inferences per round")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    variants = {p: args.bundle / f for p, f in PRECISION_FILES.items() if (args.bundle / f).is_file()}
    data = DataConfig(root=args.data, category=args.category)
    rows = {}
    for precision, path in variants.items():
        r = evaluate(path, data, progress=False, log=lambda *a: None)
        rows[precision] = {"image_auroc": r["image_auroc"], "pixel_auroc": r["pixel_auroc"], "aupro": r["aupro"],
                           "mb": path.stat().st_size / 1e6, "threshold": r.get("threshold")}

    backends = {p: OnnxRuntimeBackend(path, threads=args.threads) for p, path in variants.items()}
    size = next(iter(backends.values())).image_size
    images = load_test(discover(data).test[:8], size)[0]
    for b in backends.values():  # warm-up
        b.infer(images[:1])
        b.infer(images)
    lat = {p: [] for p in backends}
    thr = {p: [] for p in backends}
    for _ in range(args.rounds):
        for p, b in backends.items():
            times = []
            for i in range(args.iters):
                t = time.perf_counter()
                b.infer(images[i % 8:i % 8 + 1])
                times.append(time.perf_counter() - t)
            lat[p].append(statistics.median(times) * 1e3)
            t = time.perf_counter()
            b.infer(images)
            thr[p].append(len(images) / (time.perf_counter() - t))
    for p in rows:
        rows[p]["latency_ms_b1"] = statistics.median(lat[p])
        rows[p]["images_per_s_b8"] = statistics.median(thr[p])
    base = rows.get("fp32")
    print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} CPU cores, onnxruntime "
          f"{__import__('onnxruntime').__version__}, threads {args.threads or 'default'}, {args.rounds} rounds")
    print("| variant | file | MB | image AUROC | pixel AUROC | AUPRO | threshold (own?) | false rejects | missed "
          "| batch-1 latency ms (median) | batch-8 images/s (median) | latency vs FP32 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for p, r in rows.items():
        ratio = r["latency_ms_b1"] / base["latency_ms_b1"] if base else float("nan")
        t = r["threshold"] or {}
        at = (f"{t['value']:.4f} ({'own' if 'scored with' in t['rule'] else 'training'}) | "
              f"{100 * t['false_reject_rate']:.1f} % | {100 * t['miss_rate']:.1f} %") if t else "- | - | -"
        print(f"| {p.upper()} | {variants[p].name} | {r['mb']:.1f} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
              f"{r['aupro']:.4f} | {at} | {r['latency_ms_b1']:.1f} | {r['images_per_s_b8']:.1f} | {ratio:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
