"""What a PLC sees of the verdict stream: per camera the presented result, the backlog, the Ack, and the
health rules that make every fault read as not-PASS.

Protocol-free and single-threaded: :class:`GatewayState` is driven by one asyncio loop (the verdict
subscriber hands it messages, the OPC UA and Modbus servers hand it acknowledgements), and each
protocol renders :meth:`GatewayState.view` in its own terms. Each protocol has its own channels (own
backlog, own Ack), so an OPC UA client and a Modbus client can both run the handshake.

Handshake (``mode="handshake"``, the pattern PLC programmers know as "new data / acknowledge"): the
result on show stays until the PLC writes its ``seq`` to ``Ack``; then the next one in the backlog
comes up. The backlog is bounded; when full, the oldest waiting result is dropped, counted in
``overflows`` and the channel is flagged (Healthy false, Pass false) until the backlog has drained.
``mode="latest"``: the newest result is always on show; no Ack.

``Pass`` is true only when all of these hold: the runtime's heartbeat is younger than ``stale_s`` and
does not say the pipeline is stalled (its ``oldest_wait_s``, the age of the oldest frame not yet
answered, is not above ``stale_s``); the gateway has seen a heartbeat since it started; no verdict
was lost (seq gap) since the result on show was received; the backlog has not overflowed; the result on
show is a ``PASS``; and, in handshake mode, the PLC has not yet acknowledged it (a consumed PASS never
reads as the next part's).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .. import verdicts as vd

MODES = ("handshake", "latest")
VERDICT_CODES = {None: 0, vd.PASS: 1, vd.FAIL: 2, vd.ERROR: 3}


@dataclass
class Channel:
    """One camera as one protocol presents it."""
    camera: str
    backlog_limit: int
    presented: dict | None = None
    acked: bool = False
    queue: deque = field(default_factory=deque)
    overflowed: bool = False            # latched until the backlog drains
    overflows: int = 0
    acks: int = 0
    counts: dict = field(default_factory=lambda: {vd.PASS: 0, vd.FAIL: 0, vd.ERROR: 0})
    last_ack_value: int = 0


@dataclass(frozen=True)
class View:
    """One camera's values for a protocol to render; ``seq`` 0 and ``verdict`` "" before any result."""
    camera: str
    verdict: str
    verdict_code: int
    passed: bool              # the Pass rule of the module docstring
    failed: bool              # a result on show, not yet consumed, that is not a Pass: reject
    healthy: bool
    score: float
    threshold: float
    frame_id: int
    seq: int
    latency_ms: float
    model: str
    timestamp: float          # wall-clock seconds when the gateway received the result (0 before any)
    pass_count: int
    fail_count: int
    error_count: int
    ack: int
    backlog: int
    overflows: int
    overflowed: bool
    gap: bool
    stale: bool
    starting: bool


class GatewayState:
    """The rules. ``on_change(protocol, camera)`` is called after anything a protocol shows has changed
    (``camera`` None: every camera, e.g. health)."""

    def __init__(self, protocols: tuple[str, ...], *, mode: str = "handshake", backlog: int = 64,
                 stale_s: float = 3.0, cameras: tuple[str, ...] = (),
                 on_change: Callable[[str, str | None], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, found {mode!r}")
        self.mode = mode
        self.backlog_limit = int(backlog)
        self.stale_s = float(stale_s)
        self.protocols = tuple(protocols)
        self._clock = clock
        self._on_change = on_change or (lambda protocol, camera: None)
        self.channels: dict[str, dict[str, Channel]] = {p: {} for p in self.protocols}
        self.cameras: list[str] = []
        self.started = clock()
        self.last_heartbeat: float | None = None
        self.stalled = False
        self.heartbeats = 0               # the Modbus watchdog
        self.verdicts = 0
        self.gaps = 0                     # also the gap epoch: results received before the last gap are suspect
        self.restarts = 0
        self.stale_seconds = 0.0          # total time spent stale, for metrics
        self._stale_since: float | None = self.started
        self._was_healthy = False
        for cam in cameras:
            self.add_camera(cam)

    # -- inputs -----------------------------------------------------------------------------------
    def add_camera(self, camera: str) -> bool:
        if camera in self.cameras:
            return False
        self.cameras.append(camera)
        for p in self.protocols:
            self.channels[p][camera] = Channel(camera, self.backlog_limit)
        return True

    def on_verdict(self, body: dict) -> None:
        camera = str(body.get("camera"))
        self.add_camera(camera)
        self.verdicts += 1
        body = dict(body, _received=self._clock(), _wall=time.time(), _epoch=self.gaps)
        for p in self.protocols:
            ch = self.channels[p][camera]
            verdict = body.get("verdict")
            ch.counts[verdict if verdict in ch.counts else vd.ERROR] += 1
            if self.mode == "latest" or ch.presented is None or ch.acked:
                self._present(ch, body)
            else:
                if len(ch.queue) >= self.backlog_limit:
                    ch.queue.popleft()
                    ch.overflows += 1
                    ch.overflowed = True
                ch.queue.append(body)
            self._on_change(p, camera)

    def on_heartbeat(self, body: dict) -> None:
        self.heartbeats += 1
        self.last_heartbeat = self._clock()
        # the runtime's heartbeat says how long its oldest unanswered frame has waited (verdicts.py): a
        # frame waiting longer than --stale-ms means a stalled pipeline behind a live heartbeat
        wait = body.get("oldest_wait_s")
        self.stalled = isinstance(wait, (int, float)) and wait > self.stale_s
        self.tick()
        for p in self.protocols:
            self._on_change(p, None)

    def on_gap(self, first: int, last: int) -> None:
        """Verdicts ``first..last`` were lost; which cameras they were for is unknown, so every camera
        reads not-healthy until it shows a result received after the gap."""
        self.gaps += 1
        for p in self.protocols:
            self._on_change(p, None)

    def on_restart(self) -> None:
        self.restarts += 1

    def ack(self, protocol: str, camera: str, seq: int) -> bool:
        """The PLC acknowledged ``seq`` on ``camera``: the next result comes up. False when ``seq`` is not
        the one on show (ignored: a late or wrong Ack never skips a result)."""
        ch = self.channels.get(protocol, {}).get(camera)
        if ch is None:
            return False
        ch.last_ack_value = int(seq)
        if self.mode != "handshake" or ch.presented is None or ch.acked or int(seq) != _u32(ch.presented.get("seq")):
            self._on_change(protocol, camera)
            return False
        ch.acks += 1
        if ch.queue:
            self._present(ch, ch.queue.popleft())
        else:
            ch.acked = True
        if not ch.queue:
            ch.overflowed = False
        self._on_change(protocol, camera)
        return True

    def tick(self) -> bool:
        """Re-evaluate staleness (call every few ms); returns True when health changed (and says so)."""
        now = self._clock()
        healthy = self.runtime_healthy(now)
        if not healthy and self._stale_since is None:
            self._stale_since = now
        elif healthy and self._stale_since is not None:
            self.stale_seconds += now - self._stale_since
            self._stale_since = None
        if healthy != self._was_healthy:
            self._was_healthy = healthy
            for p in self.protocols:
                self._on_change(p, None)
            return True
        return False

    # -- reading ----------------------------------------------------------------------------------
    def heartbeat_age(self, now: float | None = None) -> float:
        now = self._clock() if now is None else now
        return now - (self.last_heartbeat if self.last_heartbeat is not None else self.started)

    def runtime_healthy(self, now: float | None = None) -> bool:
        return self.last_heartbeat is not None and not self.stalled and self.heartbeat_age(now) <= self.stale_s

    def stale_total(self) -> float:
        extra = self._clock() - self._stale_since if self._stale_since is not None else 0.0
        return self.stale_seconds + extra

    def view(self, protocol: str, camera: str) -> View:
        ch = self.channels[protocol][camera]
        body = ch.presented or {}
        runtime_ok = self.runtime_healthy()
        gap = ch.presented is not None and body["_epoch"] < self.gaps
        healthy = runtime_ok and not gap and not ch.overflowed
        verdict = body.get("verdict") if ch.presented is not None else None
        fresh = self.mode == "latest" or not ch.acked
        passed = healthy and verdict == vd.PASS and fresh
        return View(
            camera=camera, verdict=verdict or "", verdict_code=VERDICT_CODES.get(verdict, 3),
            passed=passed, failed=ch.presented is not None and fresh and not passed,
            healthy=healthy, score=_float(body.get("score")), threshold=_float(body.get("threshold")),
            frame_id=_int(body.get("frame_id")), seq=_u32(body.get("seq")), latency_ms=_float(body.get("latency_ms")),
            model=str(body.get("model") or ""), timestamp=float(body.get("_wall", 0.0)),
            pass_count=ch.counts[vd.PASS], fail_count=ch.counts[vd.FAIL], error_count=ch.counts[vd.ERROR],
            ack=ch.last_ack_value, backlog=len(ch.queue), overflows=ch.overflows, overflowed=ch.overflowed,
            gap=gap, stale=self.last_heartbeat is not None and not runtime_ok, starting=self.last_heartbeat is None)

    # -- internals --------------------------------------------------------------------------------
    def _present(self, ch: Channel, body: dict) -> None:
        ch.presented = body
        ch.acked = False


def _u32(x) -> int:
    return int(x) & 0xFFFFFFFF if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else 0


def _int(x) -> int:
    return int(x) if isinstance(x, int) and not isinstance(x, bool) else -1


def _float(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")
