"""The runtime's counters and stage latencies, and the rule for logging bad input: once per kind.

Counters account for every message: ``received`` = ``judged`` + ``dropped`` + ``errors`` (by kind) once
the pipeline is empty. Latencies are kept per stage in fixed-size rings (the last ``window`` frames), so
memory stays flat however long the runtime runs; p50/p99 are over that window.

A ``sink`` (:class:`memseg_edge.metrics.RuntimeMetrics`, ``run --metrics``) sees the same increments as
the counters here, outside the lock, so the Prometheus endpoint and ``--stats-json`` agree by construction.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable

import numpy as np

STAGES = ("queue", "decode", "preprocess", "inference", "publish", "total")


class _Ring:
    def __init__(self, size: int):
        self.values = np.zeros(size, np.float64)
        self.n = 0

    def add(self, value: float) -> None:
        self.values[self.n % len(self.values)] = value
        self.n += 1

    def percentiles(self) -> tuple[float, float] | None:
        if self.n == 0:
            return None
        data = self.values[:min(self.n, len(self.values))]
        p50, p99 = np.percentile(data, [50, 99])
        return float(p50), float(p99)


class RuntimeStats:
    """Thread-safe counters; ``problem(kind, message)`` counts and logs the first of each kind only."""

    def __init__(self, log: Callable[[str], None] = print, window: int = 4096):
        self._lock = threading.Lock()
        self._log = log
        self.started = time.monotonic()
        self.received = 0
        self.judged = 0
        self.passed = 0
        self.failed = 0
        self.dropped = 0
        self.errors: Counter[str] = Counter()
        self.events: Counter[str] = Counter()   # non-frame happenings: reconnects, replies, overlays...
        self.verdicts = 0
        self._logged: set[str] = set()
        self._rings = {s: _Ring(window) for s in STAGES}
        self._last_report = (time.monotonic(), 0)
        self.sink = None        # RuntimeMetrics (run --metrics): mirrors received, dropped, errors, latencies

    def _mirror(self, name: str, n: int) -> None:
        sink = self.sink
        if sink is None:
            return
        if name == "received":
            sink.frame_received(n)
        elif name == "dropped":
            sink.dropped(n)

    # -- counting ------------------------------------------------------------------------------
    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)
        self._mirror(name, n)

    def count(self, **increments: int) -> None:
        """Several counters at once (one lock for a verdict's bookkeeping)."""
        with self._lock:
            for name, n in increments.items():
                setattr(self, name, getattr(self, name) + n)
        if self.sink is not None:
            for name, n in increments.items():
                self._mirror(name, n)

    def event(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.events[name] += n

    def problem(self, kind: str, message: str, *, frame: bool = True) -> None:
        """Count one bad input (``frame``: it was a frame attempt, so it counts in ``errors``) or one
        non-frame problem (``events``), and log it the first time its kind is seen."""
        with self._lock:
            (self.errors if frame else self.events)[kind] += 1
            first = kind not in self._logged
            self._logged.add(kind)
        if frame and self.sink is not None:
            self.sink.error(kind)
        if first:
            self._log(f"warning: {kind}: {message} (further ones are counted, not logged)")

    def note_once(self, kind: str, message: str) -> None:
        """Log ``message`` the first time ``kind`` is seen, without counting anything."""
        with self._lock:
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            self._log(message)

    def timing(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._rings[stage].add(seconds * 1000.0)
        if self.sink is not None:
            self.sink.latency(stage, seconds)

    def timings(self, **seconds: float) -> None:
        """Several stages of one frame at once."""
        with self._lock:
            for stage, value in seconds.items():
                self._rings[stage].add(value * 1000.0)
        if self.sink is not None:
            for stage, value in seconds.items():
                self.sink.latency(stage, value)

    # -- reading -------------------------------------------------------------------------------
    def counters(self) -> dict:
        with self._lock:
            return {"received": self.received, "judged": self.judged, "pass": self.passed, "fail": self.failed,
                    "dropped": self.dropped, "errors": sum(self.errors.values()), "verdicts": self.verdicts}

    def snapshot(self) -> dict:
        with self._lock:
            elapsed = time.monotonic() - self.started
            return {
                "uptime_s": round(elapsed, 3),
                "received": self.received, "judged": self.judged, "pass": self.passed, "fail": self.failed,
                "dropped": self.dropped, "errors": dict(self.errors), "errors_total": sum(self.errors.values()),
                "verdicts": self.verdicts, "events": dict(self.events),
                "latency_ms": {s: r.percentiles() for s, r in self._rings.items()},
            }

    def report(self) -> str:
        """A few lines for the console: counters, frames/s since the last report and over the run, and p50/p99
        per stage."""
        snap = self.snapshot()
        now = time.monotonic()
        t0, judged0 = self._last_report
        self._last_report = (now, snap["judged"])
        rate_now = (snap["judged"] - judged0) / max(now - t0, 1e-9)
        rate_all = snap["judged"] / max(snap["uptime_s"], 1e-9)
        lines = [f"frames in {snap['received']}, judged {snap['judged']} (pass {snap['pass']}, fail {snap['fail']}), "
                 f"dropped {snap['dropped']}, errors {snap['errors_total']}; {rate_now:.1f} frames/s now, "
                 f"{rate_all:.1f} frames/s over {snap['uptime_s']:.0f} s"]
        if snap["errors"]:
            lines.append("  errors: " + ", ".join(f"{k} {v}" for k, v in sorted(snap["errors"].items())))
        if snap["events"]:
            lines.append("  events: " + ", ".join(f"{k} {v}" for k, v in sorted(snap["events"].items())))
        lat = [f"{s} {p[0]:.2f}/{p[1]:.2f}" for s, p in snap["latency_ms"].items() if p is not None]
        if lat:
            lines.append("  latency ms p50/p99: " + ", ".join(lat))
        return "\n".join(lines)
