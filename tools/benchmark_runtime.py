#!/usr/bin/env python
"""How much the runtime costs on top of the bare backend, and how many frames its ZeroMQ ingest takes.

    python tools/benchmark_runtime.py BUNDLE --images DIR [--frames 64] [--repeats 5] [--threads N]

1. Overhead at batch 1 (the runtime with ``--max-batch 1``, in this process, over ipc sockets): the same
   images, prepared to the model's size and sent as ``bgr8`` frames, so the backend does the same work in
   both; measured in one run, alternating bare/runtime, median over the repeats.

   * bare: ``backend.infer(image[None])`` for each image, one after the other;
   * runtime, streaming: every frame sent at once (queue large enough that none is dropped), time from
     the first send to the last verdict received;
   * runtime, closed loop: one frame at a time, each sent when the previous verdict came back.

   Ratio = runtime time / bare time (target <= 1.10 at batch 1 on a CPU).
2. Ingest: frames/s the runtime takes in over ZeroMQ for 256x256 frames (``bgr8`` raw and ``jpeg``), with
   a backend that returns at once, so the number is the socket thread + decode + publish, not the model.
   One station (its own process) floods the runtime for ``--ingest-seconds``, then sends at 80% of the
   rate the flood showed, which the runtime should take without drops.

Prints the machine description first: numbers from different machines (or a loaded one) do not compare.
"""
from __future__ import annotations

import argparse
import os
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import zmq

from memseg_edge import __version__
from memseg_edge import frames as fr
from memseg_edge.preprocess import list_images, load_rgb, prepare
from memseg_edge.runtime import LoadedModel, Runtime, RuntimeConfig, load_model


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return "\n".join([
        f"machine: {platform.node()} {platform.system()} {platform.release()} {platform.machine()}",
        f"cpu: {cpu}, {os.cpu_count()} logical cores; load average {', '.join(f'{x:.2f}' for x in load)} "
        "(other work on the machine skews every number)",
        f"python {platform.python_version()}, memseg-edge {__version__}, onnxruntime {onnxruntime.__version__}, "
        f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), opencv {cv2.__version__}, numpy {np.__version__}",
    ])


class _Listener:
    """A SUB socket in a thread, counting verdicts and noting when each frame_id's verdict came."""

    def __init__(self, ctx, url: str):
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 100000)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(url)
        self.arrived: dict = {}
        self.target = 1
        self.heartbeat = threading.Event()
        self.cond = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import json

        while not self._stop:
            if not self.sock.poll(50):
                continue
            topic, body = self.sock.recv_multipart()
            if topic == b"heartbeat":
                self.heartbeat.set()
                continue
            t = time.perf_counter()
            msg = json.loads(body)
            with self.cond:
                self.arrived[msg["frame_id"]] = (t, msg)
                if len(self.arrived) >= self.target:   # wake the waiter once, not per verdict
                    self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        with self.cond:
            self.target = n
            while len(self.arrived) < n:
                if not self.cond.wait(max(0.0, end - time.monotonic())):
                    raise TimeoutError(f"{len(self.arrived)}/{n} verdicts after {timeout} s")

    def close(self):
        self._stop = True
        self.thread.join(2)
        self.sock.close(0)


def _start(model: LoadedModel, tmp: Path, tag: str, **over) -> tuple[Runtime, "_Listener", zmq.Socket, zmq.Context]:
    cfg = RuntimeConfig(results=f"ipc://{tmp}/{tag}-r", zmq=[f"ipc://{tmp}/{tag}-f"], stats_every=0, heartbeat_s=0.2,
                        **over)
    runtime = Runtime(cfg, model, log=lambda m: None)
    runtime.start()
    ctx = zmq.Context()
    listener = _Listener(ctx, runtime.endpoints["results"])
    if not listener.heartbeat.wait(10):
        raise RuntimeError("no heartbeat from the runtime")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 100000)
    push.connect(runtime.endpoints["frames"][0])
    return runtime, listener, push, ctx


def overhead(model: LoadedModel, images: list[np.ndarray], repeats: int, tmp: Path, plant: bool = False) -> None:
    """Bare backend vs the runtime; ``plant``: with ``--metrics`` (scraped once a second) and ``--previews``
    (a subscriber reading them) on, as a plant runs it."""
    n = len(images)
    pixels = [cv2.cvtColor(im, cv2.COLOR_RGB2BGR).tobytes() for im in images]
    base = fr.encode(cv2.cvtColor(images[0], cv2.COLOR_RGB2BGR), "bgr8", "bench", 0)[0]

    def messages(first_id: int) -> list[list[bytes]]:   # made before the clock starts
        return [[_with_id(base, first_id + i), pixels[i]] for i in range(n)]

    extra = dict(metrics_port=0, previews=f"ipc://{tmp}/previews") if plant else {}
    tag = "overhead-plant" if plant else "overhead"
    runtime, listener, push, ctx = _start(model, tmp, tag, max_batch=1, max_wait_ms=0, queue_frames=n + 8, **extra)
    plant_stop = threading.Event()
    plant_seen = {"previews": 0, "scrapes": 0}
    if plant:
        def scrape_and_watch():
            import urllib.request

            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(runtime.endpoints["previews"])
            next_scrape = time.monotonic()
            while not plant_stop.is_set():
                if sub.poll(50):
                    sub.recv_multipart()
                    plant_seen["previews"] += 1
                if time.monotonic() >= next_scrape:
                    urllib.request.urlopen(runtime.endpoints["metrics"], timeout=5).read()
                    plant_seen["scrapes"] += 1
                    next_scrape += 1.0
            sub.close(0)

        plant_thread = threading.Thread(target=scrape_and_watch, daemon=True)
        plant_thread.start()
    for im in images[:3]:        # warm up the session outside the timings
        model.backend.infer(im[None])
    bare_t, stream_t, loop_lat, bare_lat = [], [], [], []
    offset = 0
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for im in images:
                t = time.perf_counter()
                model.backend.infer(im[None])
                bare_lat.append(time.perf_counter() - t)
            bare_t.append(time.perf_counter() - t0)

            listener.arrived.clear()
            msgs = messages(offset)
            t0 = time.perf_counter()
            for parts in msgs:
                push.send_multipart(parts, copy=False)
            listener.wait_for(n)
            stream_t.append(max(t for t, _ in listener.arrived.values()) - t0)
            offset += n

            listener.arrived.clear()
            msgs = messages(offset)
            for i, parts in enumerate(msgs):
                t = time.perf_counter()
                push.send_multipart(parts, copy=False)
                listener.wait_for(i + 1)
                loop_lat.append(listener.arrived[offset + i][0] - t)
            offset += n
    finally:
        if plant:
            plant_stop.set()
            plant_thread.join(5)
        listener.close()
        push.close(0)
        stats = runtime.stop()
        ctx.term()
    ratios = [s / b for s, b in zip(stream_t, bare_t)]
    print(f"\n1{'b' if plant else ''}. runtime overhead at batch 1 ({n} frames at {model.image_size}x{model.image_size}, "
          f"bgr8, {repeats} repeats, {model.kind})"
          + (f", with --metrics and --previews on ({plant_seen['scrapes']} scrapes, {plant_seen['previews']} previews "
             "received)" if plant else ""))
    print(f"   bare backend          {1000 * statistics.median(bare_t) / n:8.2f} ms/frame   "
          f"(per call p50 {1000 * statistics.median(bare_lat):.2f} ms)")
    print(f"   runtime, streaming    {1000 * statistics.median(stream_t) / n:8.2f} ms/frame   "
          f"ratio {statistics.median(ratios):.3f} (median; each repeat: {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"   runtime, closed loop  {1000 * statistics.median(loop_lat):8.2f} ms/frame   "
          f"ratio {statistics.median(loop_lat) / statistics.median(bare_lat):.3f} (median round trip / median call: "
          f"+{1000 * (statistics.median(loop_lat) - statistics.median(bare_lat)):.2f} ms of latency per frame)")
    print("   runtime stages p50/p99 ms: " + ", ".join(
        f"{k} {v[0]:.2f}/{v[1]:.2f}" for k, v in stats["latency_ms"].items() if v))
    print(f"   target <= 1.10: {'met' if statistics.median(ratios) <= 1.10 else 'NOT met'} (streaming ratio)")


def _with_id(header: bytes, frame_id: int) -> bytes:
    import json

    h = json.loads(header)
    h["frame_id"] = frame_id
    return json.dumps(h, separators=(",", ":")).encode()


class _Null:
    """A backend that answers at once: what is left is the runtime's own work."""

    def __init__(self, size: int):
        self.size = size

    def infer(self, images):
        n = len(images)
        return np.zeros((n, 1, self.size, self.size), np.float32), np.zeros(n, np.float32)


def _station(url: str, encoding: str, size: int, seconds: float, rate: float | None, result) -> None:
    """A camera station in its own process: pushes one frame, re-numbered, at ``rate`` frames/s (``None``: as
    fast as it can)."""
    rng = np.random.default_rng(0)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (9, 9), 0)
    parts = fr.encode(frame, encoding, "bench", 0)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 1000)
    push.setsockopt(zmq.LINGER, 10000)
    push.connect(url)
    sent = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        push.send_multipart([_with_id(parts[0], sent), parts[1]], copy=False)
        sent += 1
        if rate:
            ahead = t0 + sent / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
    result.put((sent, time.perf_counter() - t0, len(parts[1])))
    push.close()
    ctx.term()


def _ingest_run(encoding: str, size: int, seconds: float, rate: float | None, tmp: Path, tag: str) -> dict | None:
    """One station against a runtime with a null backend; the runtime's counters and how long it took."""
    import multiprocessing as mp

    null = LoadedModel(_Null(size), "null", Path("null"), size, 0.5, "0" * 64, None)
    cfg = RuntimeConfig(results=f"ipc://{tmp}/{tag}-r", zmq=[f"ipc://{tmp}/{tag}-f"], stats_every=0, heartbeat_s=0.5,
                        max_batch=8, max_wait_ms=0, queue_frames=256)
    runtime = Runtime(cfg, null, log=lambda m: None)
    runtime.start()
    spawn = mp.get_context("spawn")
    result = spawn.Queue()
    station = spawn.Process(target=_station, args=(runtime.endpoints["frames"][0], encoding, size, seconds, rate,
                                                   result))
    sent = t_first = t_last = None
    try:
        station.start()
        last_received, last_change, answered = 0, time.perf_counter(), 0
        deadline = time.perf_counter() + seconds + 120
        while time.perf_counter() < deadline:
            counters = runtime.stats.counters()
            now = time.perf_counter()
            if t_first is None and counters["received"] > 0:
                t_first = now
            if sent is None:
                try:
                    sent, t_sent, nbytes = result.get_nowait()
                except queue.Empty:
                    pass
            if counters["received"] != last_received:
                last_received, last_change = counters["received"], now
            if counters["verdicts"] >= counters["received"] and counters["verdicts"] > answered:
                answered, t_last = counters["verdicts"], now
            if sent is not None and counters["verdicts"] >= sent:
                break
            # or the station has exited (its queue delivered or given up) and nothing came in for a while
            if sent is not None and not station.is_alive() and now - last_change > 0.5 \
                    and counters["verdicts"] >= counters["received"]:
                break
            time.sleep(0.005)
        station.join(30)
        snap = runtime.stats.snapshot()
    finally:
        runtime.stop()
    if sent is None or t_first is None or t_last is None:
        return None
    return {"sent": sent, "sent_rate": sent / t_sent, "nbytes": nbytes, "span": t_last - t_first, **snap}


def ingest(seconds: float, tmp: Path) -> None:
    size = 256
    print(f"\n2. ZeroMQ ingest, {size}x{size} frames, one station in its own process, a backend that answers at "
          "once (so this is the runtime's own capacity): first a flood, then paced at 80% of what the flood "
          "showed")
    for encoding in ("bgr8", "jpeg"):
        flood = _ingest_run(encoding, size, seconds, None, tmp, f"flood-{encoding}")
        if flood is None:
            print(f"   {encoding:5s}: the station or the runtime did not finish in time")
            continue
        capacity = flood["judged"] / flood["span"]
        paced = _ingest_run(encoding, size, seconds, 0.8 * capacity, tmp, f"paced-{encoding}")
        print(f"   {encoding:5s} ({flood['nbytes'] / 1024:6.1f} KiB/frame): flood at {flood['sent_rate']:6.0f} frames/s "
              f"-> judged {capacity:6.0f} frames/s, dropped {flood['dropped']} of {flood['received']}; decode p50 "
              f"{flood['latency_ms']['decode'][0]:.2f} ms, publish p50 {flood['latency_ms']['publish'][0]:.3f} ms")
        if paced is not None:
            print(f"          paced at {paced['sent_rate']:6.0f} frames/s -> judged {paced['judged']} of "
                  f"{paced['received']}, dropped {paced['dropped']}; latency p50/p99 "
                  f"{paced['latency_ms']['total'][0]:.2f}/{paced['latency_ms']['total'][1]:.2f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="a bundle folder or .onnx file (or an .engine on a GPU machine)")
    ap.add_argument("--images", required=True, help="folder of images (e.g. MVTec bottle/test/good)")
    ap.add_argument("--count", type=int, default=32, help="images read from --images")
    ap.add_argument("--frames", type=int, default=64, help="frames per overhead run (the images, cycled)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--ingest-seconds", type=float, default=3.0)
    ap.add_argument("--plant", action="store_true",
                    help="also measure the overhead with --metrics (scraped every second) and --previews (read by a "
                         "subscriber) on")
    args = ap.parse_args(argv)
    print(machine())
    model = load_model(args.bundle, threads=args.threads)
    print(f"model: {model.describe()}")
    files = list_images(args.images)[: args.count]
    if not files:
        print(f"no images in {args.images}", file=sys.stderr)
        return 1
    images = [prepare(load_rgb(p), model.image_size, model.fit) for p in files]
    images = [images[i % len(images)] for i in range(max(args.frames, 1))]
    with tempfile.TemporaryDirectory(prefix="memseg-bench-") as tmp:
        overhead(model, images, args.repeats, Path(tmp))
        if args.plant:
            overhead(model, images, args.repeats, Path(tmp), plant=True)
        ingest(args.ingest_seconds, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
