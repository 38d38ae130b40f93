#!/usr/bin/env python3
"""What the plant hooks cost the runtime per frame, before they are wired into `memseg-edge run`:

* metrics: the calls one judged frame makes on memseg_edge.metrics.RuntimeMetrics (frame received,
  verdict, four stage latencies, queue depth; one batch observation per --batch frames), microseconds
  per frame on the calling thread;
* previews: memseg_edge.previews.PreviewPublisher offered every frame at --fps frames per second (the
  caller's cost per frame, and the CPU its own thread spends drawing, resizing and encoding what the
  rate limit lets through, as a share of one core).

    tools/plant_overhead.py --frames 20000 --fps 30 --seconds 5
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from memseg_edge.metrics import RuntimeMetrics
from memseg_edge.previews import PreviewPublisher


def metrics_cost(frames: int, batch: int) -> float:
    m = RuntimeMetrics()
    t0 = time.perf_counter()
    for i in range(frames):
        m.frame_received()
        for stage in ("decode", "preprocess", "infer", "publish"):
            m.latency(stage, 0.001)
        m.verdict("top", "PASS" if i % 7 else "FAIL")
        m.queue_depth(i % 5)
        if i % batch == 0:
            m.batch(batch)
    return (time.perf_counter() - t0) / frames * 1e6


def previews_cost(fps: float, seconds: float, preview_fps: float, size: int) -> tuple[float, float, int]:
    pub = PreviewPublisher("tcp://127.0.0.1:*", fps=preview_fps)
    rgb = np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)
    amap = np.random.default_rng(1).random((size // 4, size // 4)).astype(np.float32)
    n, caller = 0, 0.0
    cpu0, t_start = time.process_time(), time.perf_counter()
    while time.perf_counter() - t_start < seconds:
        t0 = time.perf_counter()
        pub.publish("top", rgb, amap, verdict="FAIL" if n % 5 == 0 else "PASS", score=0.3, threshold=0.5,
                    frame_id=n, seq=n)
        caller += time.perf_counter() - t0
        n += 1
        time.sleep(max(0.0, t_start + n / fps - time.perf_counter()))
    time.sleep(0.3)                                 # let the worker finish
    cpu = time.process_time() - cpu0 - caller       # the publisher thread (and the pacing loop, small)
    wall = time.perf_counter() - t_start
    sent = pub.sent
    pub.close()
    return caller / n * 1e6, cpu / wall, sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--fps", type=float, default=30.0, help="frames per second offered to the preview publisher")
    ap.add_argument("--preview-fps", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=320, help="frame side in pixels")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"metrics: {metrics_cost(args.frames, args.batch):.1f} us per frame on the runtime's thread")
    per_call, core_share, sent = previews_cost(args.fps, args.seconds, args.preview_fps, args.size)
    print(f"previews: {per_call:.1f} us per frame on the runtime's thread; publisher thread {100 * core_share:.1f} % "
          f"of a core for {sent} previews in {args.seconds:g} s ({args.fps:g} frames/s offered, "
          f"{args.preview_fps:g}/s + {args.preview_fps:g} rejects/s allowed, {args.size}x{args.size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
