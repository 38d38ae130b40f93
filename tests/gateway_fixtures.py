"""A stand-in runtime for gateway tests: a real PUB socket publishing verdict and heartbeat messages
built by :mod:`memseg_edge.verdicts`, with a heartbeat thread that can be stopped (a dead runtime)."""
from __future__ import annotations

import threading
import time

import zmq

from memseg_edge import verdicts as vd


class FakeRuntime:
    def __init__(self, heartbeat_s: float = 0.05, url: str = "tcp://127.0.0.1:*"):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(url)
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.seq = 0
        self.heartbeat_s = heartbeat_s
        self.extra: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.sent: list[dict] = []

    def start_heartbeats(self) -> "FakeRuntime":
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def stop_heartbeats(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        while not self._stop.is_set():
            self.heartbeat()
            self._stop.wait(self.heartbeat_s)

    def heartbeat(self) -> None:
        with self._lock:
            counters = {"received": len(self.sent), "dropped": 0, "errors": 0}
            body = vd.heartbeat_body(seq=self.seq, ts=time.time(), counters=counters) | self.extra
            self.sock.send_multipart([vd.HEARTBEAT_TOPIC, vd.dumps(body)])

    def verdict(self, camera: str, frame_id, verdict: str = vd.PASS, score: float | None = 0.1,
                skip: int = 0) -> dict:
        with self._lock:
            self.seq += 1 + skip
            body = vd.verdict_body(seq=self.seq, camera=camera, frame_id=frame_id, verdict=verdict,
                                   score=score, threshold=0.5, latency_ms=2.5, model="abcdef012345",
                                   error="test error" if verdict == vd.ERROR else None)
            self.sock.send_multipart([vd.verdict_topic(camera), vd.dumps(body)])
            self.sent.append(body)
            return body

    def close(self) -> None:
        self.stop_heartbeats()
        self.sock.close(0)
        self.ctx.term()


def wait_for(predicate, timeout: float = 5.0, step: float = 0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")
