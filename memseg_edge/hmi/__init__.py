"""``memseg-edge hmi``: the operator screen, a web page served by this process.

It only subscribes (verdicts as ``plc-listen`` does, previews as :mod:`memseg_edge.previews` defines
them), so it can never slow judging. Threads: one ZeroMQ subscriber for verdicts
(:class:`memseg_edge.plc.VerdictListener`), one for previews, and the standard library's threading
HTTP server. The page (``page.html``, no external assets) gets the line's state as server-sent events
(``/events``, at most ~6 updates per second) and the images by URL (``/preview/<camera>``,
``/reject/<camera>/<n>``), so nothing reloads.

HTTP endpoints: ``/`` the page; ``/events`` SSE stream of :meth:`LineView.snapshot` JSON; ``/state``
the same once; ``/preview/<camera>`` the newest preview JPEG; ``/reject/<camera>/<id>`` one of the last
rejects' JPEGs.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

PAGE = Path(__file__).with_name("page.html")
GALLERY = 8            # rejects kept per camera
LATENCY_WINDOW = 500   # verdicts per camera for p50/p99
RATE_WINDOW_S = 10.0   # heartbeats over which frames/s is measured


class _Camera:
    def __init__(self, name: str):
        self.name = name
        self.last: dict | None = None
        self.counts = {"PASS": 0, "FAIL": 0, "ERROR": 0}
        self.latency = deque(maxlen=LATENCY_WINDOW)
        self.preview: bytes | None = None
        self.preview_header: dict | None = None
        self.preview_id = 0
        self.rejects: deque = deque(maxlen=GALLERY)     # (id, header, jpeg)


class LineView:
    """What the screen shows, fed by the subscribers; thread-safe. ``version`` moves on every change."""

    def __init__(self, stale_s: float = 3.0, clock: Callable[[], float] = time.monotonic):
        self.stale_s = float(stale_s)
        self._clock = clock
        self._lock = threading.Condition()
        self.version = 0
        self.cameras: dict[str, _Camera] = {}
        self.started = clock()
        self.last_heartbeat: float | None = None
        self.heartbeat: dict | None = None
        self._rate: deque = deque()          # (runtime ts, received) from heartbeats
        self.model = ""
        self._next_id = 0

    def _cam(self, name: str) -> _Camera:
        cam = self.cameras.get(name)
        if cam is None:
            cam = self.cameras[name] = _Camera(name)
        return cam

    def _changed(self) -> None:
        self.version += 1
        self._lock.notify_all()

    def on_verdict(self, body: dict) -> None:
        with self._lock:
            cam = self._cam(str(body.get("camera")))
            cam.last = body
            verdict = body.get("verdict")
            cam.counts[verdict if verdict in cam.counts else "ERROR"] += 1
            if isinstance(body.get("latency_ms"), (int, float)):
                cam.latency.append(float(body["latency_ms"]))
            self.model = str(body.get("model") or self.model)
            self._changed()

    def on_heartbeat(self, body: dict) -> None:
        with self._lock:
            now = self._clock()
            self.last_heartbeat = now
            self.heartbeat = body
            received = (body.get("counters") or {}).get("received")
            ts = body.get("ts")          # the runtime's clock: arrival times jitter on a busy machine
            if isinstance(received, int) and isinstance(ts, (int, float)):
                if self._rate and (received < self._rate[-1][1] or ts <= self._rate[-1][0]):
                    self._rate.clear()       # the runtime restarted
                self._rate.append((float(ts), received))
                while self._rate and ts - self._rate[0][0] > RATE_WINDOW_S:
                    self._rate.popleft()
            self._changed()

    def on_preview(self, header: dict, jpeg: bytes) -> None:
        with self._lock:
            cam = self._cam(str(header.get("camera")))
            self._next_id += 1
            cam.preview, cam.preview_header, cam.preview_id = jpeg, header, self._next_id
            if header.get("verdict") in ("FAIL", "ERROR"):
                cam.rejects.appendleft((self._next_id, header, jpeg))
            self._changed()

    def preview(self, camera: str) -> bytes | None:
        with self._lock:
            cam = self.cameras.get(camera)
            return cam.preview if cam else None

    def reject(self, camera: str, ident: int) -> bytes | None:
        with self._lock:
            cam = self.cameras.get(camera)
            for i, _, jpeg in (cam.rejects if cam else ()):
                if i == ident:
                    return jpeg
            return None

    def wait(self, version: int, timeout: float) -> int:
        with self._lock:
            self._lock.wait_for(lambda: self.version != version, timeout)
            return self.version

    def snapshot(self) -> dict:
        with self._lock:
            now = self._clock()
            age = None if self.last_heartbeat is None else now - self.last_heartbeat
            fps = None
            if len(self._rate) >= 2 and self._rate[-1][0] - self._rate[0][0] >= 1.0:   # a steady figure, not a blip
                fps = (self._rate[-1][1] - self._rate[0][1]) / (self._rate[-1][0] - self._rate[0][0])
            counters = (self.heartbeat or {}).get("counters") or {}
            cams = []
            for cam in self.cameras.values():
                total = sum(cam.counts.values())
                lat = sorted(cam.latency)
                last = cam.last or {}
                cams.append({
                    "camera": cam.name, "verdict": last.get("verdict"), "score": last.get("score"),
                    "threshold": last.get("threshold"), "frame_id": last.get("frame_id"), "seq": last.get("seq"),
                    "error": last.get("error"), "counts": dict(cam.counts), "total": total,
                    "reject_rate": (cam.counts["FAIL"] + cam.counts["ERROR"]) / total if total else None,
                    "latency_p50": _pct(lat, 0.50), "latency_p99": _pct(lat, 0.99),
                    "preview_id": cam.preview_id,
                    "preview": {k: (cam.preview_header or {}).get(k) for k in ("frame_id", "verdict", "score", "seq")},
                    "rejects": [{"id": i, "frame_id": h.get("frame_id"), "verdict": h.get("verdict"),
                                 "score": h.get("score")} for i, h, _ in cam.rejects],
                })
            wait = (self.heartbeat or {}).get("oldest_wait_s")
            stalled = isinstance(wait, (int, float)) and wait > self.stale_s
            return {"version": self.version, "model": self.model,
                    "health": {"connected": self.last_heartbeat is not None,
                               "healthy": age is not None and age <= self.stale_s and not stalled,
                               "stalled": stalled, "oldest_wait_s": wait,
                               "heartbeat_age_s": age, "frames_per_s": fps, "dropped": counters.get("dropped"),
                               "received": counters.get("received"), "errors": counters.get("errors"),
                               "stale_s": self.stale_s},
                    "cameras": cams}


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class HmiServer:
    """``start()`` subscribes and serves; ``port`` is the bound HTTP port; ``stop()`` ends it all."""

    def __init__(self, results: str, previews: str, *, port: int = 8080, host: str = "127.0.0.1",
                 stale_s: float = 3.0, curve: Any = None, log: Callable[[str], None] = print):
        self.results, self.previews = results, previews
        self.view = LineView(stale_s)
        self.curve = curve
        self.log = log
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.httpd = ThreadingHTTPServer((host, int(port)), _handler(self.view, self._stop))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.host = host

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> "HmiServer":
        for target, name in ((self._listen_verdicts, "hmi-verdicts"), (self._listen_previews, "hmi-previews"),
                             (self.httpd.serve_forever, "hmi-http")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self.view._lock:
            self.view._lock.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self._threads:
            t.join(5)

    def _listen_verdicts(self) -> None:
        from ..plc import VerdictListener

        with VerdictListener(self.results, heartbeat_timeout=self.view.stale_s, curve=self.curve) as listener:
            listener.listen(stop=self._stop, on_verdict=self.view.on_verdict, on_heartbeat=self.view.on_heartbeat)

    def _listen_previews(self) -> None:
        import zmq

        from ..previews import PREVIEW_TOPIC_PREFIX, parse_preview
        from ..transport import secure_client

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 16)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        secure_client(sock, self.curve)
        sock.setsockopt(zmq.SUBSCRIBE, PREVIEW_TOPIC_PREFIX)
        sock.connect(self.previews)
        bad = 0
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                try:
                    header, jpeg = parse_preview(sock.recv_multipart())
                except ValueError as exc:
                    bad += 1
                    if bad == 1:
                        self.log(f"malformed preview ignored: {exc}")
                    continue
                self.view.on_preview(header, jpeg)
        finally:
            sock.close(0)


def _handler(view: LineView, stop: threading.Event):
    page = PAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):   # quiet: the screen polls images all day
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = urlparse(self.path).path
            parts = [unquote(p) for p in path.strip("/").split("/")] if path != "/" else []
            if not parts:
                return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            if parts == ["state"]:
                return self._send(HTTPStatus.OK, json.dumps(view.snapshot()).encode(), "application/json")
            if parts == ["events"]:
                return self._events()
            if parts[0] == "preview" and len(parts) == 2:
                jpeg = view.preview(parts[1])
            elif parts[0] == "reject" and len(parts) == 3 and parts[2].isdigit():
                jpeg = view.reject(parts[1], int(parts[2]))
            else:
                return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
            if jpeg is None:
                return self._send(HTTPStatus.NOT_FOUND, b"no image yet", "text/plain")
            return self._send(HTTPStatus.OK, jpeg, "image/jpeg")

        def _events(self):
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            version = -1
            try:
                while not stop.is_set():
                    snap = view.snapshot()
                    version = snap["version"]
                    self.wfile.write(b"data: " + json.dumps(snap).encode() + b"\n\n")
                    self.wfile.flush()
                    time.sleep(0.15)                        # at most ~6 updates a second
                    view.wait(version, timeout=1.0)         # or once a second for the heartbeat age
            except (OSError, ValueError):   # the page went away, or the server is stopping
                pass

    return Handler
