"""Previews for the operator screen (``memseg-edge run --previews ENDPOINT``; read by ``memseg-edge hmi``).

Pattern: pub-sub, the runtime binds a PUB socket (as for verdicts) with a small send queue and never
blocks: a slow or absent screen loses previews, never frames. Each message is three parts::

    [b"preview.<camera>", header (UTF-8 JSON), JPEG]

header: ``v`` (1), ``type`` ("preview"), ``camera``, ``frame_id``, ``seq`` (the verdict's), ``verdict``,
``score``, ``threshold``, ``ts`` (seconds), ``width``, ``height`` (of the JPEG), ``overlay`` (true: the
anomaly map is blended in and the verdict written on it, as ``--save-failures`` draws it).

Rate: per camera at most ``fps`` previews per second, and besides those at most ``fps`` rejects (FAIL
or ERROR) per second, so the screen's gallery of rejects is not starved by a stream of passes. The
runtime's thread only checks the rate and hands over references (:meth:`PreviewPublisher.wants`,
:meth:`PreviewPublisher.publish`); drawing, resizing and JPEG encoding happen in the publisher's own
thread, which keeps only the newest pending pass and the newest pending reject per camera.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np

PREVIEW_VERSION = 1
PREVIEW_TOPIC_PREFIX = b"preview."
REJECTS = ("FAIL", "ERROR")


def preview_topic(camera: str) -> bytes:
    return PREVIEW_TOPIC_PREFIX + camera.encode()


def parse_preview(parts: list) -> tuple[dict, bytes]:
    """A received message -> ``(header, jpeg)``; ``ValueError`` when malformed."""
    if len(parts) != 3:
        raise ValueError(f"expected [topic, header, jpeg], found {len(parts)} parts")
    topic = bytes(parts[0])
    try:
        header = json.loads(bytes(parts[1]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("type") != "preview" or not topic.startswith(PREVIEW_TOPIC_PREFIX):
        raise ValueError("not a preview")
    jpeg = bytes(parts[2])
    if not jpeg.startswith(b"\xff\xd8"):
        raise ValueError("payload is not a JPEG")
    return header, jpeg


class PreviewPublisher:
    """Binds ``endpoint`` (a normalised ZeroMQ URL, e.g. from :func:`memseg_edge.transport.endpoint`).

    ``fps``: previews per camera per second (plus as many rejects); ``max_side``: the longer side of the
    JPEG in pixels; ``quality``: JPEG quality. ``curve``: a :class:`memseg_edge.transport.CurveServer`;
    ``role``: which of its client folders may subscribe (:data:`memseg_edge.transport.ROLE_DIRS`)."""

    def __init__(self, endpoint: str, *, fps: float = 2.0, max_side: int = 480, quality: int = 80,
                 curve: Any = None, context: Any = None, role: str | None = None):
        import zmq

        from .transport import secure_server

        self.fps = float(fps)
        self.max_side = int(max_side)
        self.quality = int(quality)
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, 8)
        self._sock.setsockopt(zmq.LINGER, 0)
        secure_server(self._sock, curve, role)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError:
            self._sock.close(0)
            if self._own_ctx:
                self._ctx.term()
            raise
        self.endpoint = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._last: dict[tuple[str, bool], float] = {}
        self._pending: dict[tuple[str, bool], tuple] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.sent = 0
        self.skipped = 0          # previews dropped by the rate limit or by a full send queue
        self._thread = threading.Thread(target=self._work, name="previews", daemon=True)
        self._thread.start()

    # -- the runtime's side: O(1), no copies, no encoding ------------------------------------------
    def wants(self, camera: str, verdict: str, now: float | None = None) -> bool:
        """Whether a preview of this verdict would be sent now (so the caller can skip preparing one)."""
        if self.fps <= 0:
            return False
        now = time.monotonic() if now is None else now
        last = self._last.get((camera, verdict in REJECTS))
        return last is None or now - last >= 1.0 / self.fps

    def publish(self, camera: str, rgb: np.ndarray | None, anomaly_map: np.ndarray | None, *, verdict: str,
                score: float | None, threshold: float, frame_id: Any, seq: int | None) -> bool:
        """Queue a preview of one judged frame (``rgb``: uint8 ``[H, W, 3]`` as judged; ``anomaly_map``:
        ``[h, w]`` in [0, 1], or None for ERROR). The arrays must not be modified afterwards. Returns False
        when the rate limit says no or there is no image (an ERROR before decoding)."""
        now = time.monotonic()
        if rgb is None or not self.wants(camera, verdict, now):
            self.skipped += 1
            return False
        self._last[(camera, verdict in REJECTS)] = now
        header = {"v": PREVIEW_VERSION, "type": "preview", "camera": camera, "frame_id": frame_id, "seq": seq,
                  "verdict": verdict, "score": None if score is None else float(score), "threshold": float(threshold),
                  "ts": time.time(), "overlay": anomaly_map is not None}
        with self._cond:   # one pending pass and one pending reject per camera: a pass never hides a reject
            self._pending[(camera, verdict in REJECTS)] = (header, rgb, anomaly_map)
            self._cond.notify()
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(5)
        self._sock.close(0)
        if self._own_ctx:
            self._ctx.term()

    # -- the publisher's thread ---------------------------------------------------------------------
    def _work(self) -> None:
        import zmq

        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                (camera, _), (header, rgb, amap) = self._pending.popitem()
            jpeg, (h, w) = self._encode(header, rgb, amap)
            header.update(width=w, height=h)
            try:
                self._sock.send_multipart([preview_topic(camera), json.dumps(header).encode(), jpeg], zmq.NOBLOCK)
                self.sent += 1
            except zmq.Again:
                self.skipped += 1

    def _encode(self, header: dict, rgb: np.ndarray, amap: np.ndarray | None) -> tuple[bytes, tuple[int, int]]:
        import cv2

        from .overlay import make_overlay

        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        caption = f"{header['camera']} frame {header['frame_id']}"
        bgr = make_overlay(rgb, amap, header["verdict"], header["score"], header["threshold"], caption=caption)
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise ValueError("OpenCV could not encode a preview")
        return data.tobytes(), bgr.shape[:2]
