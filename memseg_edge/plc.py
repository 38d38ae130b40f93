"""The PLC side of the verdict stream: a reference gateway (``memseg-edge plc-listen``).

Pattern: a SUB socket connects to the runtime's PUB (the runtime binds); sequence numbers detect lost
verdicts and heartbeats detect silence (ZeroMQ guide, pub-sub with heartbeats). The rules a gateway to
a line controller must follow, and this one implements:

* ``seq`` goes up by exactly 1 per verdict, one counter for all cameras: a jump means verdicts were lost,
  and the parts they were for must be rejected (their verdicts are unknown).
* a heartbeat carries the ``seq`` of the last verdict: one ahead of the last verdict seen is a gap too.
* no heartbeat for ``heartbeat_timeout`` seconds: the runtime or the network is gone; reject every part
  until heartbeats come back.
* a heartbeat whose ``oldest_wait_s`` exceeds ``stall_timeout``: the runtime is alive but its pipeline is
  not judging (a hung model, a stuck stage); that is silence too: reject every part until it moves.
* a camera filter is exact: subscriptions match topics by prefix (``verdict.cam1`` also receives
  ``verdict.cam10`` and ``verdict.cam1.x``), so each verdict's ``camera`` is checked against the filter.
* ``seq`` going backwards: the runtime restarted; counting starts again from there.
* ``ERROR`` is a reject.

Gap checks need every verdict: they are off when only some cameras are subscribed.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from . import verdicts as vd


@dataclass
class ListenReport:
    verdicts: int = 0
    by_verdict: Counter = field(default_factory=Counter)
    heartbeats: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)   # (first missing seq, last missing seq)
    heartbeat_losses: int = 0
    stalls: int = 0
    restarts: int = 0
    malformed: int = 0
    timed_out: bool = False

    @property
    def missing(self) -> int:
        return sum(b - a + 1 for a, b in self.gaps)

    @property
    def ok(self) -> bool:
        return not self.gaps and not self.heartbeat_losses and not self.stalls

    def summary(self) -> str:
        parts = [f"{self.verdicts} verdicts ({', '.join(f'{k} {v}' for k, v in sorted(self.by_verdict.items())) or '-'})",
                 f"{self.heartbeats} heartbeats",
                 f"{len(self.gaps)} gaps ({self.missing} verdicts missing)",
                 f"{self.heartbeat_losses} heartbeat losses"]
        if self.stalls:
            parts.append(f"{self.stalls} pipeline stalls")
        if self.restarts:
            parts.append(f"{self.restarts} runtime restarts")
        if self.malformed:
            parts.append(f"{self.malformed} malformed messages")
        return ", ".join(parts)


class VerdictListener:
    """Subscribes to a runtime's verdict endpoint. ``listen()`` calls ``on_verdict(body)`` for each verdict
    and ``on_event(kind, message, info)`` for gaps, heartbeat loss/return, pipeline stalls
    (``stalled``/``stall_over``), restarts and the first heartbeat."""

    def __init__(self, endpoint: str, *, cameras: tuple[str, ...] = (), heartbeat_timeout: float = 3.0,
                 stall_timeout: float = 10.0, curve: Any = None, context: Any = None):
        import zmq

        from .transport import allow_ipv6, secure_client

        self.endpoint = endpoint
        self.cameras = tuple(cameras)
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.stall_timeout = float(stall_timeout)
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, 100000)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        allow_ipv6(self._sock, endpoint)
        secure_client(self._sock, curve)
        self._sock.setsockopt(zmq.SUBSCRIBE, vd.HEARTBEAT_TOPIC)
        if self.cameras:
            for cam in self.cameras:
                self._sock.setsockopt(zmq.SUBSCRIBE, vd.verdict_topic(cam))
        else:
            self._sock.setsockopt(zmq.SUBSCRIBE, vd.VERDICT_TOPIC_PREFIX)
        self._sock.connect(endpoint)
        self.report = ListenReport()
        self._last_seq: int | None = None
        self._last_hb: float | None = None
        self._lost = False
        self._stalled = False
        self._started = time.monotonic()

    def close(self) -> None:
        self._sock.close(0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def listen(self, *, count: int | None = None, timeout: float | None = None,
               stop: threading.Event | None = None,
               on_verdict: Callable[[dict], Any] | None = None,
               on_event: Callable[[str, str, dict], Any] | None = None,
               on_heartbeat: Callable[[dict], Any] | None = None) -> ListenReport:
        """Until ``count`` verdicts (counted from this call), ``timeout`` seconds, or ``stop``.
        ``on_heartbeat(body)`` sees each heartbeat (its ``counters`` are the runtime's)."""
        import zmq

        on_verdict = on_verdict or (lambda body: None)
        on_heartbeat = on_heartbeat or (lambda body: None)
        on_event = on_event or (lambda kind, msg, info: None)
        rep = self.report
        target = None if count is None else rep.verdicts + int(count)
        end = None if timeout is None else time.monotonic() + float(timeout)
        while True:
            if target is not None and rep.verdicts >= target:
                return rep
            now = time.monotonic()
            if end is not None and now >= end:
                rep.timed_out = True
                return rep
            if stop is not None and stop.is_set():
                return rep
            self._check_heartbeat(now, on_event)
            if not self._sock.poll(100):
                continue
            while True:
                try:
                    parts = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    body = vd.parse(parts)
                except ValueError as exc:
                    rep.malformed += 1
                    on_event("malformed", f"malformed message ignored: {exc}", {})
                    continue
                if body["type"] == "heartbeat":
                    self._on_heartbeat(body, on_event)
                    on_heartbeat(body)
                    if stop is not None and stop.is_set():
                        return rep
                else:
                    if self.cameras and body.get("camera") not in self.cameras:
                        continue       # a prefix match of the subscription, not one of ours
                    self._on_verdict(body, on_event)
                    on_verdict(body)
                    if target is not None and rep.verdicts >= target:
                        return rep

    # -- the rules ---------------------------------------------------------------------------------
    def _check_heartbeat(self, now: float, on_event) -> None:
        since = self._last_hb if self._last_hb is not None else self._started
        if not self._lost and now - since > self.heartbeat_timeout:
            self._lost = True
            self.report.heartbeat_losses += 1
            what = "no heartbeat yet" if self._last_hb is None else "no heartbeat"
            on_event("heartbeat_lost", f"HEARTBEAT LOST: {what} from {self.endpoint} for {now - since:.1f} s: reject "
                                       "every part until it is back", {"silent_s": round(now - since, 3)})

    def _check_stall(self, body: dict, on_event) -> None:
        wait = body.get("oldest_wait_s")
        if isinstance(wait, bool) or not isinstance(wait, (int, float)):
            return              # a runtime from before heartbeats carried it: only silence can be checked
        if not self._stalled and wait > self.stall_timeout:
            self._stalled = True
            self.report.stalls += 1
            on_event("stalled", f"PIPELINE STALLED: a frame has waited {wait:.1f} s for its verdict at "
                                f"{self.endpoint}: reject every part until verdicts move", {"oldest_wait_s": wait})
        elif self._stalled and wait <= self.stall_timeout:
            self._stalled = False
            on_event("stall_over", "pipeline moving again", {"oldest_wait_s": wait})

    def _seq_step(self, seq: int, on_event, source: str) -> None:
        if self.cameras:   # a partial subscription sees only some of the numbers
            self._last_seq = seq
            return
        last = self._last_seq
        if last is None:
            self._last_seq = seq
            return
        if seq < last or (source == "verdict" and seq == last):
            self.report.restarts += 1
            on_event("restart", f"runtime restarted (seq {seq} after {last}); counting again", {"seq": seq, "last": last})
        elif seq > last + (1 if source == "verdict" else 0):
            first, final = last + 1, seq - 1 if source == "verdict" else seq
            self.report.gaps.append((first, final))
            on_event("gap", f"GAP: verdicts {first}..{final} missing ({final - first + 1}): reject those parts",
                     {"first": first, "last": final})
        self._last_seq = seq

    def _on_heartbeat(self, body: dict, on_event) -> None:
        self.report.heartbeats += 1
        first = self._last_hb is None
        self._last_hb = time.monotonic()
        if self._lost:
            self._lost = False
            on_event("heartbeat_back", "heartbeat back", {})
        if first:
            on_event("connected", f"connected to {self.endpoint} (last verdict seq {body.get('seq')})",
                     {"seq": body.get("seq")})
        self._check_stall(body, on_event)
        seq = body.get("seq")
        if isinstance(seq, int):
            self._seq_step(seq, on_event, "heartbeat")

    def _on_verdict(self, body: dict, on_event) -> None:
        self.report.verdicts += 1
        self.report.by_verdict[str(body.get("verdict"))] += 1
        seq = body.get("seq")
        if isinstance(seq, int):
            self._seq_step(seq, on_event, "verdict")


def format_verdict(body: dict) -> str:
    """One line per verdict, for people."""
    score, thr = body.get("score"), body.get("threshold")
    score_txt = f"score {score:.6g}" if isinstance(score, (int, float)) else "score -"
    thr_txt = f"{thr:.6g}" if isinstance(thr, (int, float)) else "-"
    line = (f"seq {body.get('seq')}  {body.get('camera')}  frame {body.get('frame_id')}  {str(body.get('verdict')):5s}  "
            f"{score_txt} (thr {thr_txt})  {body.get('latency_ms')} ms")
    if body.get("error"):
        line += f"  error: {body['error']}"
    return line
