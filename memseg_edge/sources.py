"""Where frames come from: a camera (OpenCV index), a video file or an image folder; and the camera
station that publishes them to a runtime (``memseg-edge camera``).

A *live* source (a camera) never waits for the consumer: when the runtime falls behind, the oldest
frames are dropped there. A *file* source (video, images) is paced by its consumer, so every image of a
folder is judged. A camera that stops delivering (unplugged, driver reset) is reopened with
exponential back-off, forever, until the process stops; each such event is counted and logged once.
A camera that has *never* delivered a frame within ``open_timeout`` seconds is a configuration error
(wrong index, no camera): :class:`SourceFailed`. OpenCV's own warnings on every open attempt are kept
quiet; the message logged once says what happened.

The station side is the ZeroMQ "pipeline" pattern: PUSH connects to the runtime's PULL, and ZeroMQ
reconnects by itself when the runtime restarts. ``linger`` keeps queued frames deliverable at exit.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np

from .frames import BAD_IMAGE, BadFrame, encode, safe_camera_name
from .preprocess import list_images

Problem = Callable[[str, str], None]     # (kind, message): count, and log the first of a kind


class SourceFailed(RuntimeError):
    """A source that cannot work as configured (e.g. a camera that never opened); the message says why."""


def _sanitize(name: str) -> str:
    """A valid camera name (frames.CAMERA_NAME: also a safe folder name) from a file or folder name."""
    return safe_camera_name(name, default="camera")


def read_bgr(path: str | Path) -> np.ndarray | None:
    """An image file as OpenCV's 8-bit BGR ``[H, W, 3]`` or mono ``[H, W]`` (16-bit scaled like
    :func:`memseg_edge.preprocess.to_rgb`, alpha dropped); ``None`` when unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        return None
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        return None
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


class Capture:
    """A frame source. ``frames(stop)`` yields BGR/mono uint8 images, or a :class:`BadFrame` for an item
    that could not be read (so a runtime can answer it with an ``ERROR`` verdict)."""

    name: str = "camera"
    live: bool = False
    endless: bool = False          # never runs out (a camera), even when it is paced by its consumer
    own_frame_ids: bool = False    # frame ids come from the source (``last_frame_id`` after each frame)
    last_frame_id: int | None = None
    fps: float = 0.0   # the source's own rate, 0 when unknown or unlimited

    def frames(self, stop: threading.Event) -> Iterator[np.ndarray | BadFrame]:
        raise NotImplementedError

    def label(self, index: int) -> str | None:
        """What the ``index``-th frame is, for people (an image's file name); None when nothing to add."""
        return None


def _open_quietly(index: int):
    """``cv2.VideoCapture(index)`` without OpenCV's warnings (it prints some on every failed attempt)."""
    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging is None:
        return cv2.VideoCapture(index)
    level = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_ERROR)
    try:
        return cv2.VideoCapture(index)
    finally:
        logging.setLogLevel(level)


class CameraCapture(Capture):
    live = True
    endless = True

    def __init__(self, index: int, name: str | None = None, problem: Problem | None = None,
                 backoff: tuple[float, float] = (0.5, 10.0), open_timeout: float = 0.0):
        self.index = int(index)
        self.name = _sanitize(name or f"camera{self.index}")
        self._problem = problem or (lambda kind, msg: None)
        self._backoff = backoff
        self.open_timeout = float(open_timeout)   # 0: retry forever, even when it never opened

    def frames(self, stop: threading.Event) -> Iterator[np.ndarray | BadFrame]:
        delay = self._backoff[0]
        cap = None
        started, delivered = time.monotonic(), False
        while not stop.is_set():
            if not delivered and self.open_timeout > 0 and time.monotonic() - started >= self.open_timeout:
                if cap is not None:
                    cap.release()
                raise SourceFailed(f"camera {self.index} delivered no frame within {self.open_timeout:g} s of "
                                   "starting: check the index (ls /dev/video*) and that no other program holds the "
                                   "camera, or wait longer with --camera-timeout S (0 = retry forever)")
            if cap is None:
                cap = _open_quietly(self.index)
                if not cap.isOpened():
                    cap.release()
                    cap = None
                    self._problem("camera unavailable", f"camera {self.index} cannot be opened; retrying with back-off "
                                                        f"up to {self._backoff[1]:.0f} s")
                    stop.wait(self._until_timeout(delay, started, delivered))
                    delay = min(delay * 2, self._backoff[1])
                    continue
                self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
            ok, image = cap.read()
            if not ok or image is None:
                cap.release()
                cap = None
                self._problem("camera disconnects", f"camera {self.index} stopped delivering frames; reconnecting")
                stop.wait(self._until_timeout(delay, started, delivered))
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            delivered = True
            yield image
        if cap is not None:
            cap.release()

    def _until_timeout(self, delay: float, started: float, delivered: bool) -> float:
        """The back-off, cut short so that a camera that never opened fails at its timeout, not after it."""
        if delivered or self.open_timeout <= 0:
            return delay
        return max(0.0, min(delay, started + self.open_timeout - time.monotonic()))


class VideoCapture(Capture):
    def __init__(self, path: str | Path, name: str | None = None, loop: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"video {self.path} not found")
        cap = cv2.VideoCapture(str(self.path))
        ok = cap.isOpened()
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) if ok else 0.0
        cap.release()
        if not ok:
            raise ValueError(f"OpenCV cannot open video {self.path} (unsupported format or codec)")
        self.name = _sanitize(name or self.path.stem)
        self.loop = loop

    def frames(self, stop: threading.Event) -> Iterator[np.ndarray | BadFrame]:
        while not stop.is_set():
            cap = cv2.VideoCapture(str(self.path))
            n = 0
            try:
                while not stop.is_set():
                    ok, image = cap.read()
                    if not ok or image is None:
                        break
                    n += 1
                    yield image
            finally:
                cap.release()
            if not self.loop or n == 0:
                return


class ImageFolderCapture(Capture):
    def __init__(self, folder: str | Path, name: str | None = None, loop: bool = False):
        self.folder = Path(folder)
        self.files = list_images(self.folder)
        if not self.files:
            raise ValueError(f"no images (.png, .jpg, .jpeg, .bmp, .tif, .tiff) in {self.folder}")
        self.name = _sanitize(name or self.folder.name)
        self.loop = loop

    def label(self, index: int) -> str | None:
        return self.files[index % len(self.files)].name

    def frames(self, stop: threading.Event) -> Iterator[np.ndarray | BadFrame]:
        while not stop.is_set():
            for path in self.files:
                if stop.is_set():
                    return
                image = read_bgr(path)
                yield image if image is not None else BadFrame(BAD_IMAGE, f"cannot read image {path.name}")
            if not self.loop:
                return


def open_capture(kind: str, spec: Any, name: str | None = None, loop: bool = False,
                 problem: Problem | None = None, camera_timeout: float = 0.0) -> Capture:
    """``kind``: camera (spec: index), video (file), images (folder). ``camera_timeout``: see
    :class:`CameraCapture` ``open_timeout``."""
    if kind == "camera":
        return CameraCapture(int(spec), name, problem, open_timeout=camera_timeout)
    if kind == "video":
        return VideoCapture(spec, name, loop)
    if kind == "images":
        return ImageFolderCapture(spec, name, loop)
    raise ValueError(f"unknown source kind {kind!r}")


# ------------------------------------------------------------------------------------------------
# the camera station
# ------------------------------------------------------------------------------------------------

def publish_frames(capture: Capture, endpoint: str, *, encoding: str = "jpeg", fps: float | None = None,
                   count: int | None = None, curve: Any = None, linger_s: float = 10.0,
                   stop: threading.Event | None = None, log: Callable[[str], None] = print,
                   context: Any = None) -> dict:
    """Capture frames and PUSH them to a runtime's frame endpoint (connects; the runtime binds).

    ``fps``: frames per second (``None``: the source's own rate for a camera, 10 for files; 0: as fast as
    possible). ``count``: stop after that many frames. A live camera's frame that cannot be queued at
    once (runtime unreachable and ZeroMQ's queue full) is skipped and counted; a file's frame waits.
    Returns ``{"sent", "skipped", "unreadable", "seconds"}``."""
    import zmq

    stop = stop or threading.Event()
    if fps is None:
        fps = capture.fps if (capture.live or capture.endless) else 10.0
    ctx = context or zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 64)
    sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    from .transport import allow_ipv6, secure_client

    allow_ipv6(sock, endpoint)
    secure_client(sock, curve)
    sock.connect(endpoint)
    sent = skipped = unreadable = 0
    waiting_logged = False
    t_start = time.monotonic()
    next_t = t_start
    try:
        for item in capture.frames(stop):
            if isinstance(item, BadFrame):
                unreadable += 1
                log(f"warning: {item}; skipped")
                continue
            if fps and fps > 0:
                next_t += 1.0 / fps
                delay = next_t - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
                if delay < -1.0:   # fell far behind (slow source): do not burst to catch up
                    next_t = time.monotonic()
            frame_id = capture.last_frame_id if capture.own_frame_ids else sent
            parts = encode(item, encoding, capture.name, frame_id)
            while True:
                try:
                    sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                    sent += 1
                    break
                except zmq.Again:
                    if capture.live:
                        skipped += 1
                        break
                    if not waiting_logged:
                        waiting_logged = True
                        log(f"waiting for the runtime at {endpoint} (frames are queued until it accepts them)")
                    if stop.wait(0.05):
                        break
            if stop.is_set() or (count is not None and sent >= count):
                break
    finally:
        seconds = time.monotonic() - t_start
        t_close = time.monotonic()
        sock.close()          # keeps queued frames for up to linger_s while they are delivered
        if context is None:
            ctx.term()
        if time.monotonic() - t_close >= linger_s * 0.95 and linger_s > 0:
            log(f"warning: the runtime at {endpoint} did not take every queued frame within {linger_s:.0f} s; "
                "some frames may not have been delivered")
    return {"sent": sent, "skipped": skipped, "unreadable": unreadable, "seconds": seconds}
