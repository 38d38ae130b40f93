"""The line-side runtime (``memseg-edge run``): frames in, verdicts out, nothing lost silently.

Threads and queues; every ZeroMQ socket belongs to exactly one thread (created and bound in
:meth:`Runtime.start`, so bind errors surface there, then handed over)::

  stations --PUSH--> [PULL]   \\                                            drop-oldest when full
  gateways --REQ---> [ROUTER]  > socket thread --(header checks)--> ingest queue -----------------+
  cameras / videos / folders -> source threads ----------------------->     (bounded: frames, MB) |
                                                                                                  v
                                          decode thread: pixels (JPEG/PNG/raw) -> RGB -> prepare(size)
                                                                                                  v
                                                                          ready queue (bounded, blocking)
                                                                                                  v
                                inference thread: a batch = up to --max-batch frames or --max-wait-ms
                                                  after the first is ready, whichever comes first
                                                                                                  v
  PLC gateways <--[PUB]-- publisher thread <-- results, put back in arrival order (tickets) <-----+
  requesters   <--[ROUTER]-- socket thread <--inproc-- replies from the publisher

Patterns (ZeroMQ guide): pipeline (PUSH/PULL) for frames, pub-sub with sequence numbers and heartbeats
for verdicts, an asynchronous ROUTER for request-reply so that a slow requester never blocks anyone.

Every frame that enters gets an arrival *ticket*; the publisher emits exactly one verdict per ticket, in
ticket order, so verdicts keep each camera's order even when a bad frame's ``ERROR`` or a dropped frame's
``ERROR`` is known long before the frames ahead of it are judged. Back-pressure: when frames arrive faster
than they are judged, the ingest queue fills and the oldest frame *of the camera with the most frames
waiting* is dropped (counted, and answered with ``ERROR`` "dropped: runtime overloaded"), so one flooding
station cannot get the others' frames dropped; every other queue is bounded and blocks, so memory stays
flat (a frame kept for an overlay is kept at most :data:`OVERLAY_MAX_SIDE` pixels on its long side). File
sources (videos, image folders) wait for room instead of dropping.

The socket thread does a bounded amount of work per message (frames.py); decoding happens in the decode
thread. Heartbeats carry the age of the oldest frame received and not yet answered and the time of the
last verdict, so a subscriber can tell a stalled pipeline from a healthy idle one.

A pipeline thread that raises is a bug: it is logged as an error, the runtime stops, and
:attr:`Runtime.failure` says why (``memseg-edge run`` then exits non-zero), never a clean exit.

Shutdown (SIGINT/SIGTERM, ``--max-frames``, the end of every file source): no new frames are accepted,
what is queued is judged and published, a last heartbeat goes out, then the sockets close.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from . import frames as fr
from . import verdicts as vd
from .preprocess import prepare, to_rgb
from .runtime_stats import RuntimeStats
from .sources import SourceFailed

STOP = object()                      # end-of-stream marker between the pipeline threads
INFERENCE_FAILED = "inference failed"
INTERNAL_ERROR = "internal error"
SCORE_NOT_FINITE = "score not finite"
TOO_LARGE = "message too large"
TRANSPORT_LIMIT_FACTOR = 4           # ZeroMQ drops a connection whose message part exceeds this x --max-message-mb
OVERLAY_MAX_SIDE = 1280              # a frame kept for an overlay or the display is shrunk to this (pixels)
MAX_PENDING_REORDER = 10000          # safety valve: never hold more results than this for ordering
MAX_WAITING_TRIGGERS = 1000


class ConfigError(ValueError):
    """A runtime setting that cannot work; the message says what to change."""


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    backend: Any                 # .infer(images uint8 [N, S, S, 3]) -> (maps [N, 1, S, S], scores [N])
    kind: str                    # onnxruntime | tensorrt | tensorrt-rtx
    path: Path
    image_size: int
    threshold: float | None
    model_id: str                # sha256 of the file that judges (prefix goes into every verdict)
    max_batch: int | None        # None: any batch

    def describe(self) -> str:
        return f"{self.path} ({self.kind}, {self.image_size}x{self.image_size}, model {self.model_id[:12]})"


def load_model(path: str | Path, *, threads: int | None = None, log: Callable[[str], Any] = print) -> LoadedModel:
    """A bundle folder or ``.onnx`` file (onnxruntime) or a ``.engine`` file (TensorRT, needs a GPU)."""
    path = Path(path)
    if path.suffix == ".engine":
        from .trt_backend import TensorRTBackend

        backend = TensorRTBackend(path, log=log)
        info = backend.info
        return LoadedModel(backend, backend.name, path, info.image_size, info.threshold, info.engine_sha256,
                           backend.max_batch)
    if path.is_dir() or path.suffix == ".onnx":
        from .backends import OnnxRuntimeBackend
        from .bundle import sha256_file

        backend = OnnxRuntimeBackend(path, threads=threads)
        entry = backend.bundle.meta.get("files", {}).get(backend.onnx_path.name, {})
        sha = entry.get("sha256") or sha256_file(backend.onnx_path)
        return LoadedModel(backend, "onnxruntime", backend.onnx_path, backend.image_size, backend.bundle.threshold,
                           sha, None)
    raise ConfigError(f"--model {path}: expected a bundle folder (model.json + model.onnx), one of its .onnx files, "
                      "or a TensorRT .engine file built by `memseg-edge build-engine`")


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------

@dataclass
class RuntimeConfig:
    """Everything ``memseg-edge run`` takes; endpoints already normalised (:func:`memseg_edge.transport.endpoint`)."""
    results: str
    zmq: list[str] = field(default_factory=list)
    reply: str | None = None
    cameras: list[int] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    threshold: float | None = None
    max_batch: int | None = None
    max_wait_ms: float = 5.0
    queue_frames: int = 32
    queue_mb: float = 256.0
    max_message_mb: float = 64.0
    save_failures: str | None = None
    save_passes: bool = False            # with save_failures: PASS overlays too (to review what the line passes)
    save_budget_mb: float = 500.0
    camera_timeout_s: float = 10.0       # a camera that never delivers a frame within this stops the runtime; 0: never
    display: bool = False
    max_frames: int | None = None
    stats_every: float = 10.0
    heartbeat_s: float = 1.0
    trigger_timeout_s: float = 5.0
    curve_keys: str | None = None


@dataclass(eq=False)
class Job:
    """One frame on its way through the pipeline."""
    camera: str
    frame_id: Any
    t_in: float                           # perf_counter() when it was received
    header: fr.FrameHeader | None = None  # network frames
    payload: Any = None                   # network frames: the pixels or encoded file (zmq.Frame or bytes)
    image: np.ndarray | None = None       # local sources: BGR/mono as captured
    reply_to: list[bytes] | None = None   # the requester's envelope (ROUTER), for request-reply frames
    nbytes: int = 0
    ticket: int = -1
    rgb: np.ndarray | None = None         # kept only for overlays / the display
    prepared: np.ndarray | None = None
    t_ready: float = 0.0
    score: float | None = None
    amap: np.ndarray | None = None
    error: str | None = None
    label: str | None = None              # local sources: what the frame is (an image's file name)


@dataclass(eq=False)
class Trigger:
    envelope: list[bytes]
    camera: str
    after_ticket: int
    deadline: float


def shrink(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """``rgb`` itself, or a copy at most ``max_side`` pixels on its long side (what an overlay needs)."""
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


# ------------------------------------------------------------------------------------------------
# the ingest queue
# ------------------------------------------------------------------------------------------------

class IngestQueue:
    """Bounded FIFO (frames and bytes) between the receivers and the decode thread. Assigns each frame its
    arrival ticket under the same lock that appends it, so FIFO order is ticket order. When full, the
    oldest waiting frame of the camera with the most frames waiting (most bytes, when the byte bound is
    what is exceeded) is dropped and handed to ``on_drop``; ``put(wait=True)`` waits for room instead.
    It also remembers when every ticketed frame arrived until :meth:`done` is called for it, so
    :meth:`oldest_wait` is the age of the oldest frame not yet answered, wherever it is in the pipeline."""

    def __init__(self, max_frames: int, max_bytes: int, on_drop: Callable[[Job], None], limit: int | None = None,
                 on_limit: Callable[[], None] | None = None):
        self._cond = threading.Condition()
        self._items: deque[Job] = deque()
        self._bytes = 0
        self._next = 0
        self._closed = False
        self.max_frames = max(1, int(max_frames))
        self.max_bytes = int(max_bytes)
        self._on_drop = on_drop
        self._limit = limit
        self._on_limit = on_limit or (lambda: None)
        self.max_depth = 0
        self._frames_of: Counter[str] = Counter()
        self._bytes_of: Counter[str] = Counter()
        self._unanswered: OrderedDict[int, float] = OrderedDict()   # ticket -> t_in, in ticket order

    def _admit(self, job: Job) -> bool:
        if self._closed or (self._limit is not None and self._next >= self._limit):
            return False
        job.ticket = self._next
        self._unanswered[job.ticket] = job.t_in
        self._next += 1
        if self._limit is not None and self._next == self._limit:
            self._on_limit()
        return True

    def put(self, job: Job, *, wait: bool = False, stop: threading.Event | None = None) -> bool:
        """Append ``job``; False when closed or past the frame limit (then it was not taken)."""
        with self._cond:
            if wait:
                while not self._closed and len(self._items) >= self.max_frames:
                    if stop is not None and stop.is_set():
                        return False
                    self._cond.wait(0.1)
            if not self._admit(job):
                return False
            self._items.append(job)
            self._bytes += job.nbytes
            self._frames_of[job.camera] += 1
            self._bytes_of[job.camera] += job.nbytes
            while len(self._items) > self.max_frames or (self._bytes > self.max_bytes and len(self._items) > 1):
                self._on_drop(self._evict(by_bytes=len(self._items) <= self.max_frames))
            self.max_depth = max(self.max_depth, len(self._items))
            self._cond.notify_all()
            return True

    def _evict(self, by_bytes: bool) -> Job:
        """Remove the oldest frame of the camera holding the most frames (or bytes) in the queue."""
        share = self._bytes_of if by_bytes else self._frames_of
        most = max(share.values())
        for i, job in enumerate(self._items):
            if share[job.camera] == most:
                del self._items[i]
                self._forget(job)
                return job
        raise AssertionError("the queue's per-camera counts disagree with its items")

    def _forget(self, job: Job) -> None:
        self._bytes -= job.nbytes
        for counts, n in ((self._frames_of, 1), (self._bytes_of, job.nbytes)):
            counts[job.camera] -= n
            if counts[job.camera] <= 0:
                del counts[job.camera]

    def done(self, ticket: int) -> None:
        """The frame with this ticket has been answered."""
        with self._cond:
            self._unanswered.pop(ticket, None)

    def oldest_wait(self, now: float) -> float:
        """Seconds the oldest frame not yet answered has waited (``now``: a ``perf_counter()`` value); 0.0
        when every frame has been answered."""
        with self._cond:
            if not self._unanswered:
                return 0.0
            return max(0.0, now - next(iter(self._unanswered.values())))

    def ticket(self, job: Job) -> bool:
        """Give ``job`` a ticket without queueing it (a frame answered at once, e.g. a bad header)."""
        with self._cond:
            return self._admit(job)

    def mark(self) -> int:
        """The ticket the next frame will get."""
        with self._cond:
            return self._next

    def get(self) -> Job | None:
        """The oldest frame; ``None`` once closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return None
            job = self._items.popleft()
            self._forget(job)
            self._cond.notify_all()
            return job

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


# ------------------------------------------------------------------------------------------------
# the runtime
# ------------------------------------------------------------------------------------------------

class Runtime:
    """``start()`` binds and starts the threads; ``run()`` also prints stats until stopped and shuts down;
    ``request_stop()`` is safe from signal handlers and any thread; ``stop()`` = request + orderly shutdown.
    ``on_verdict(body, label)`` (optional) sees every verdict body after it was published (publisher thread:
    it must return at once); ``label`` names a local source's frame (an image's file name) or is None."""

    def __init__(self, config: RuntimeConfig, model: LoadedModel, log: Callable[[str], Any] = print,
                 on_verdict: Callable[[dict, str | None], Any] | None = None):
        self.config = config
        self.model = model
        self.log = log
        self._on_verdict = on_verdict
        threshold = config.threshold if config.threshold is not None else model.threshold
        if threshold is None:
            raise ConfigError(f"{model.path} records no decision threshold: pass --threshold T")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            where = "--threshold" if config.threshold is not None else f"the threshold recorded for {model.path}"
            raise ConfigError(f"{where} is {threshold!r}, not a finite number: every score would be judged against "
                              "it; pass --threshold T with a number (the score at which a part fails)")
        self.threshold = float(threshold)
        max_batch = config.max_batch or model.max_batch or 8
        if model.max_batch is not None and max_batch > model.max_batch:
            raise ConfigError(f"--max-batch {max_batch} is larger than the engine's largest batch ({model.max_batch}): "
                              f"use --max-batch {model.max_batch} or rebuild the engine with a larger --max-batch")
        self.max_batch = int(max_batch)
        if not (config.zmq or config.reply or config.cameras or config.videos or config.images):
            raise ConfigError("no frame source: give --zmq ENDPOINT (camera stations), --camera IDX, --video FILE, "
                              "--images DIR or --reply ENDPOINT")
        self.stats = RuntimeStats(log)
        self._stop = threading.Event()
        self._net_quiet = threading.Event()     # the socket thread admits no more frames
        self._published_all = threading.Event()
        self._results: queue.Queue = queue.Queue()
        # decoded frames ready for the model: enough slack that scheduling jitter never leaves the model idle
        self._ready: queue.Queue = queue.Queue(maxsize=max(8, 2 * self.max_batch))
        self.ingest = IngestQueue(config.queue_frames, int(config.queue_mb * (1 << 20)), self._on_drop,
                                  limit=config.max_frames, on_limit=self._on_limit)
        self._keep_rgb = bool(config.save_failures or config.display)
        self._keep_pass_maps = bool(config.display or config.save_passes)
        self._latest: tuple | None = None       # for the display: (rgb, amap, verdict, score, camera, frame_id)
        self._seq = 0
        self._last_verdict_ts: float | None = None
        self.failure: str | None = None         # why the runtime stopped on its own, when it was not asked to
        self._threads: list[threading.Thread] = []
        self._source_threads: list[threading.Thread] = []
        self._sources_left = 0
        self._sources_lock = threading.Lock()
        self.endpoints: dict[str, Any] = {}
        self._pulls: list = []          # sockets: each used by one thread only (see the module docstring)
        self._monitors: list = []
        self._router = self._pub = self._reply_in = self._reply_out = None
        self._ctx = None
        self._auth = None
        self._saver = None
        self._started = False
        self._shut = False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        import zmq

        from .sources import open_capture
        from .transport import allow_ipv6, load_server_keys, secure_server, start_authenticator

        cfg = self.config
        captures = []
        for kind, specs in (("camera", cfg.cameras), ("video", cfg.videos), ("images", cfg.images)):
            for spec in specs:
                captures.append(open_capture(kind, spec, problem=lambda k, m: self.stats.problem(k, m, frame=False),
                                             camera_timeout=cfg.camera_timeout_s))
        keys = load_server_keys(cfg.curve_keys) if cfg.curve_keys else None
        if cfg.save_failures:
            from .overlay import FailureSaver

            self._saver = FailureSaver(cfg.save_failures, cfg.save_budget_mb, self.stats.event, self.log)
        self._ctx = ctx = zmq.Context()
        try:
            self._auth = start_authenticator(ctx, keys)
            monitor_events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
            for name in ("EVENT_HANDSHAKE_FAILED_AUTH", "EVENT_HANDSHAKE_FAILED_PROTOCOL",
                         "EVENT_HANDSHAKE_FAILED_NO_DETAIL"):
                monitor_events |= getattr(zmq, name, 0)

            def bound(kind: int, url: str, role: str, **opts) -> Any:
                sock = ctx.socket(kind)
                for opt, value in opts.items():
                    sock.setsockopt(getattr(zmq, opt), value)
                allow_ipv6(sock, url)
                secure_server(sock, keys, role)
                try:
                    sock.bind(url)
                except zmq.ZMQError as exc:
                    sock.close(0)
                    raise ConfigError(f"cannot bind {url}: {exc.strerror} (another runtime on it? a wrong address "
                                      "for this machine?)") from None
                return sock

            # frames up to --max-message-mb are judged; bigger ones up to the transport limit get an ERROR verdict;
            # beyond it ZeroMQ drops the connection (the header never arrives, so nothing can be answered)
            wire_max = int(TRANSPORT_LIMIT_FACTOR * cfg.max_message_mb * (1 << 20))
            self._pulls = [bound(zmq.PULL, url, "stations", RCVHWM=100, MAXMSGSIZE=wire_max, LINGER=0)
                           for url in cfg.zmq]
            self._router = bound(zmq.ROUTER, cfg.reply, "stations", RCVHWM=100, SNDHWM=1000, MAXMSGSIZE=wire_max,
                                 LINGER=1000) if cfg.reply else None
            self._pub = bound(zmq.PUB, cfg.results, "subscribers", SNDHWM=10000, LINGER=1000)
            self._reply_in = ctx.socket(zmq.PULL)
            self._reply_in.setsockopt(zmq.LINGER, 0)
            self._reply_in.bind("inproc://memseg-replies")
            self._reply_out = ctx.socket(zmq.PUSH)
            self._reply_out.setsockopt(zmq.LINGER, 0)
            self._reply_out.connect("inproc://memseg-replies")
            self._monitors = [s.get_monitor_socket(monitor_events) for s in self._pulls + [self._router] if s]
        except Exception:
            self._close_sockets()
            if self._saver is not None:
                self._saver.close()
            raise
        self.endpoints = {
            "frames": [s.getsockopt_string(zmq.LAST_ENDPOINT) for s in self._pulls],
            "results": self._pub.getsockopt_string(zmq.LAST_ENDPOINT),
            "reply": self._router.getsockopt_string(zmq.LAST_ENDPOINT) if self._router else None,
        }
        self._sources_left = len(captures)
        self._endless = bool(cfg.zmq or cfg.reply or any(c.live for c in captures))
        for target, name in ((self._socket_loop, "sockets"), (self._decode_loop, "decode"),
                             (self._infer_loop, "inference"), (self._publish_loop, "publisher")):
            t = threading.Thread(target=self._stage, args=(target, name), name=f"memseg-{name}", daemon=True)
            self._threads.append(t)
        for cap in captures:
            t = threading.Thread(target=self._source_loop, args=(cap,), name=f"memseg-source-{cap.name}", daemon=True)
            self._source_threads.append(t)
        for t in self._threads + self._source_threads:
            t.start()
        self._started = True

    def request_stop(self) -> None:
        self._stop.set()

    def _stage(self, target: Callable[[], None], name: str) -> None:
        """Run one pipeline thread; if it raises, say so loudly and stop the runtime with a failure."""
        try:
            target()
        except BaseException as exc:
            self._failed(f"the {name} thread stopped ({type(exc).__name__}: {exc}); frames in flight get no verdict "
                         "and heartbeats stop")

    def _failed(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            self.log(f"error: {why}")
        self.request_stop()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, on_tick: Callable[[], bool] | None = None) -> dict:
        """Start, print stats every ``stats_every`` seconds until stopped, shut down; returns the final
        snapshot. ``on_tick`` (main thread, ~20 times a second) returns False to stop (the display uses it)."""
        if not self._started:
            self.start()
        next_stats = time.monotonic() + self.config.stats_every if self.config.stats_every > 0 else float("inf")
        try:
            while not self._stop.wait(0.05):
                if on_tick is not None and not on_tick():
                    self.request_stop()
                if time.monotonic() >= next_stats:
                    self.log(self.stats.report())
                    next_stats += self.config.stats_every
        finally:
            self.shutdown()
        self.log("final: " + self.stats.report())
        return self.stats.snapshot()

    def stop(self, timeout: float = 60.0) -> dict:
        self.request_stop()
        self.shutdown(timeout)
        return self.stats.snapshot()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Flush and close (see the module docstring); idempotent."""
        if self._shut or not self._started:
            return
        self._shut = True
        self._stop.set()
        if self.failure is not None:   # a stage is gone: the others may wait for it forever
            timeout = min(timeout, 5.0)
        deadline = time.monotonic() + timeout
        for t in self._source_threads:
            t.join(max(0.1, min(5.0, deadline - time.monotonic())))
        self._net_quiet.wait(max(0.1, deadline - time.monotonic()))
        self.ingest.close()
        stuck = []
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
            if t.is_alive():
                stuck.append(t.name)
        if self._saver is not None:
            self._saver.close()
        if stuck:   # a socket may only be closed by the thread that uses it: leave them to the process exit
            if self.failure is None:
                self.failure = f"{', '.join(stuck)} did not finish within {timeout:.0f} s"
            self.log(f"warning: {', '.join(stuck)} did not finish within {timeout:.0f} s (a hung backend?); "
                     "exiting without flushing")
        else:
            self._close_sockets()

    def wait(self, timeout: float | None = None) -> bool:
        """Until a stop was requested (not the shutdown itself)."""
        return self._stop.wait(timeout)

    def latest(self) -> tuple | None:
        return self._latest

    def _close_sockets(self) -> None:
        for s in self._monitors + self._pulls:
            s.close(0)
        for s in (self._router, self._pub, self._reply_in, self._reply_out):
            if s is not None:
                s.close()
        self._monitors, self._pulls = [], []
        self._router = self._pub = self._reply_in = self._reply_out = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.destroy(linger=1000)   # term(), after closing any socket a failure left open
            self._ctx = None

    # -- admission (socket thread and source threads) --------------------------------------------
    def _on_drop(self, job: Job) -> None:
        """Called by the ingest queue, under its lock, for the oldest frame it pushes out."""
        self.stats.add("dropped")
        self.stats.note_once("dropped", "warning: frames arrive faster than they are judged: the oldest waiting frames "
                                        f"are dropped and answered with ERROR '{vd.DROPPED}' (counted, not logged)")
        job.payload = job.image = None
        job.error = vd.DROPPED
        self._results.put(job)

    def _on_limit(self) -> None:
        self.log(f"--max-frames {self.config.max_frames} reached: judging what is queued, then stopping")
        self.request_stop()

    def _source_loop(self, capture) -> None:
        frame_id = 0
        try:
            for item in capture.frames(self._stop):
                t_in = time.perf_counter()
                if isinstance(item, fr.BadFrame):
                    item.frame_id, item.camera, item.label = frame_id, capture.name, capture.label(frame_id)
                    self._reject(item, t_in)
                else:
                    job = Job(capture.name, frame_id, t_in, image=item, nbytes=int(item.nbytes),
                              label=capture.label(frame_id))
                    if not self.ingest.put(job, wait=not capture.live, stop=self._stop):
                        break
                    self.stats.add("received")
                frame_id += 1
                if self._stop.is_set():
                    break
        except SourceFailed as exc:
            self._failed(str(exc))
        except Exception as exc:
            self.stats.problem("source failed", f"source {capture.name} stopped: {type(exc).__name__}: {exc}",
                               frame=False)
        finally:
            with self._sources_lock:
                self._sources_left -= 1
                last = self._sources_left == 0
            if last and not self._endless:
                self.log("every file source is done: judging what is queued, then stopping")
                self.request_stop()

    def _reject(self, bad: fr.BadFrame, t_in: float, reply_to: list[bytes] | None = None,
                reply: Callable[[list[bytes], bytes], None] | None = None) -> None:
        """A frame that cannot be judged: counted; an ERROR verdict when it named a frame_id."""
        if bad.frame_id is not None:
            job = Job(bad.camera or "unknown", bad.frame_id, t_in, reply_to=reply_to, error=f"{bad.kind}: {bad}",
                      label=getattr(bad, "label", None))
            if not self.ingest.ticket(job):
                self.stats.event("ignored (stopping)")
                return
            self.stats.add("received")
            self.stats.problem(bad.kind, str(bad))
            self._results.put(job)
            return
        self.stats.add("received")
        self.stats.problem(bad.kind, str(bad))
        if reply_to is not None and reply is not None:
            reply(reply_to, vd.dumps({"v": vd.VERDICT_VERSION, "type": "error", "error": f"{bad.kind}: {bad}"}))

    def _on_frame(self, parts: list, n_parts: int, total: int, reply_to: list[bytes] | None = None,
                  reply: Callable[[list[bytes], bytes], None] | None = None) -> None:
        """``parts``: the first parts of a message of ``n_parts`` parts and ``total`` bytes."""
        t_in = time.perf_counter()
        try:
            limit = self.config.max_message_mb * (1 << 20)
            if total > limit or n_parts != 2:
                frame_id, camera = fr.named(parts[0]) if parts else (None, None)
                if total > limit:
                    raise fr.BadFrame(TOO_LARGE, f"a message of {total / (1 << 20):.1f} MB is more than --max-message-mb "
                                                 f"{self.config.max_message_mb:g}", frame_id, camera)
                raise fr.BadFrame(fr.MALFORMED, f"expected 2 message parts [header, payload], found {n_parts}",
                                  frame_id, camera)
            header = fr.parse_frame(parts)
        except fr.BadFrame as bad:
            self._reject(bad, t_in, reply_to, reply)
            return
        payload = parts[1]
        job = Job(header.camera, header.frame_id, t_in, header=header, payload=payload, reply_to=reply_to,
                  nbytes=len(payload))
        if self.ingest.put(job):
            self.stats.add("received")
        else:
            self.stats.event("ignored (stopping)")
            if reply_to is not None and reply is not None:
                reply(reply_to, vd.dumps({"v": vd.VERDICT_VERSION, "type": "error",
                                          "error": "runtime is stopping: frame not judged"}))

    def _on_request(self, parts: list, n_parts: int, total: int, reply: Callable[[list[bytes], bytes], None]) -> None:
        """A ROUTER message: ``[identity, (empty,) header, payload]`` from REQ/DEALER; a frame or a trigger."""
        if len(parts) >= 2 and len(parts[1]) == 0:
            envelope, rest = [bytes(p) for p in parts[:2]], parts[2:]
        else:
            envelope, rest = [bytes(parts[0])], parts[1:]
        n_rest = n_parts - len(envelope)
        if n_rest == 1:
            try:
                obj = fr.load_json(rest[0])
            except fr.BadFrame:
                obj = None
            if isinstance(obj, dict) and obj.get("trigger") is True:
                camera = obj.get("camera")
                if not fr.valid_camera_name(camera):
                    self.stats.problem("bad trigger", "a trigger needs \"camera\": NAME", frame=False)
                    reply(envelope, vd.dumps({"v": vd.VERDICT_VERSION, "type": "error",
                                              "error": "bad trigger: expected {\"trigger\": true, \"camera\": NAME}"}))
                    return
                self.stats.event("triggers")
                deadline = time.perf_counter() + self.config.trigger_timeout_s
                self._results.put(Trigger(envelope, camera, self.ingest.mark(), deadline))
                return
        self._on_frame(rest, n_rest, total, envelope, reply)

    # -- the socket thread -----------------------------------------------------------------------
    def _socket_loop(self) -> None:
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        def receive(sock, keep: int) -> tuple[list, int, int] | None:
            """One message without holding more than its first ``keep`` parts: (parts, number of parts, bytes)."""
            try:
                first = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            parts, n, total, more = [first], 1, len(first), first.more
            while more:
                part = sock.recv(copy=False)
                n += 1
                total += len(part)
                more = part.more
                if n <= keep + 1:      # one more than a valid message has, so the count is reported right
                    parts.append(part)
            return parts, n, total

        poller = zmq.Poller()
        inputs = list(self._pulls) + ([self._router] if self._router else [])
        for s in inputs + [self._reply_in] + self._monitors:
            poller.register(s, zmq.POLLIN)
        router = self._router

        def reply(envelope: list[bytes], body: bytes) -> None:
            try:
                router.send_multipart(envelope + [body], flags=zmq.NOBLOCK)
                self.stats.event("replies")
            except zmq.ZMQError:
                self.stats.problem("replies not delivered", "a requester is gone or not reading its replies",
                                   frame=False)

        def drain_replies() -> None:
            """Hand the publisher's replies (inproc) to their requesters."""
            while True:
                try:
                    parts = self._reply_in.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
                if router is not None:
                    reply(parts[:-1], parts[-1])

        event_names = {zmq.EVENT_ACCEPTED: "station connected", zmq.EVENT_DISCONNECTED: "station disconnected"}
        for name in ("EVENT_HANDSHAKE_FAILED_AUTH", "EVENT_HANDSHAKE_FAILED_PROTOCOL",
                     "EVENT_HANDSHAKE_FAILED_NO_DETAIL"):
            if hasattr(zmq, name):
                event_names[getattr(zmq, name)] = "handshake failed"
        accepting = True
        try:
            while True:
                if accepting and self._stop.is_set():
                    accepting = False
                    for s in inputs:
                        poller.unregister(s)
                    self._net_quiet.set()
                events = dict(poller.poll(50))
                for s in self._pulls:
                    if accepting and s in events:
                        for _ in range(256):   # fair between sockets: a bounded burst each
                            message = receive(s, 2)
                            if message is None:
                                break
                            self._guard(self._on_frame, *message)
                if router is not None and accepting and router in events:
                    for _ in range(256):
                        message = receive(router, 4)
                        if message is None:
                            break
                        self._guard(self._on_request, *message, reply)
                if self._reply_in in events:
                    drain_replies()
                for m in self._monitors:
                    if m in events:
                        try:
                            ev = recv_monitor_message(m, zmq.NOBLOCK)
                        except zmq.Again:
                            continue
                        kind = event_names.get(ev.get("event"), "socket events")
                        endpoint = ev.get("endpoint", b"")
                        endpoint = endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else endpoint
                        if kind == "handshake failed":
                            self.stats.problem(kind, f"a peer on {endpoint} failed the ZeroMQ handshake (wrong or "
                                                     "unauthorized CurveZMQ key, or no encryption where it is required)",
                                               frame=False)
                        else:
                            self.stats.event(kind)
                            self.stats.note_once(kind, f"{kind} on {endpoint}")
                if not accepting and self._published_all.is_set():
                    drain_replies()   # the publisher's last replies are in the inproc pipe by now
                    break
        finally:
            self._net_quiet.set()

    def _guard(self, fn: Callable, *args) -> None:
        """Bad input must never stop the socket thread: an unexpected exception is counted and logged once."""
        try:
            fn(*args)
        except Exception as exc:
            self.stats.problem(INTERNAL_ERROR, f"{type(exc).__name__}: {exc} while handling a message", frame=False)

    # -- decode -----------------------------------------------------------------------------------
    def _decode_loop(self) -> None:
        size = self.model.image_size
        while True:
            job = self.ingest.get()
            if job is None:
                self._ready.put(STOP)
                return
            t0 = time.perf_counter()
            try:
                if job.header is not None:
                    rgb = fr.decode(job.header, job.payload)
                else:
                    rgb = to_rgb(job.image, "bgr")
                t1 = time.perf_counter()
                job.prepared = prepare(rgb, size)
                t2 = time.perf_counter()
            except fr.BadFrame as bad:
                self._fail(job, bad.kind, str(bad))
                continue
            except Exception as exc:
                self._fail(job, fr.BAD_IMAGE, f"{type(exc).__name__}: {exc}")
                continue
            self.stats.timings(queue=t0 - job.t_in, decode=t1 - t0, preprocess=t2 - t1)
            job.rgb = shrink(rgb, OVERLAY_MAX_SIDE) if self._keep_rgb else None
            job.payload = job.image = None
            job.t_ready = t2
            self._ready.put(job)

    def _fail(self, job: Job, kind: str, message: str) -> None:
        self.stats.problem(kind, message)
        job.payload = job.image = job.prepared = job.rgb = None
        job.error = f"{kind}: {message}"
        self._results.put(job)

    # -- inference --------------------------------------------------------------------------------
    def _infer_loop(self) -> None:
        max_wait = self.config.max_wait_ms / 1000.0
        while True:
            first = self._ready.get()
            if first is STOP:
                self._results.put(STOP)
                return
            batch, finished = [first], False
            deadline = first.t_ready + max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    nxt = self._ready.get(timeout=remaining) if remaining > 0 else self._ready.get_nowait()
                except queue.Empty:
                    break
                if nxt is STOP:
                    finished = True
                    break
                batch.append(nxt)
            self._infer_batch(batch)
            if finished:
                self._results.put(STOP)
                return

    def _infer_batch(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        try:
            amap, score = self.model.backend.infer(np.stack([j.prepared for j in batch]))
        except Exception as exc:
            for j in batch:
                self._fail(j, INFERENCE_FAILED, f"{type(exc).__name__}: {exc}")
            return
        dt = time.perf_counter() - t0
        for i, job in enumerate(batch):
            self.stats.timing("inference", dt)
            job.prepared = None
            job.score = float(score[i])
            if not math.isfinite(job.score):   # NaN compares false with any threshold: it would pass
                self._fail(job, SCORE_NOT_FINITE, f"the model returned a score of {job.score} for this frame")
                continue
            if job.rgb is not None and (job.score >= self.threshold or self._keep_pass_maps):
                job.amap = np.array(amap[i, 0], copy=True)
            self._results.put(job)

    # -- publishing -------------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        pending: dict[int, Job] = {}
        next_ticket = 0
        triggers: list[Trigger] = []
        interval = self.config.heartbeat_s
        next_hb = time.monotonic()
        reorder_warned = False
        try:
            while True:
                now = time.monotonic()
                if now >= next_hb:
                    self._heartbeat()
                    next_hb = now + interval
                wait = next_hb - now
                if triggers:
                    wait = min(wait, max(0.0, min(t.deadline for t in triggers) - time.perf_counter()))
                try:
                    item = self._results.get(timeout=max(wait, 0.0))
                except queue.Empty:
                    item = None
                if item is STOP:
                    break
                if isinstance(item, Trigger):
                    if len(triggers) >= MAX_WAITING_TRIGGERS:
                        self._reply(item.envelope, self._trigger_error(item, "too many triggers waiting"))
                    else:
                        triggers.append(item)
                elif isinstance(item, Job):
                    if item.ticket < next_ticket:   # late, after the safety valve let later ones go first
                        self._emit(item, triggers)
                    else:
                        pending[item.ticket] = item
                    while next_ticket in pending:
                        self._emit(pending.pop(next_ticket), triggers)
                        next_ticket += 1
                    if len(pending) > MAX_PENDING_REORDER:
                        if not reorder_warned:
                            reorder_warned = True
                            self.log(f"warning: more than {MAX_PENDING_REORDER} verdicts wait for an earlier frame; "
                                     "publishing them out of arrival order")
                        next_ticket = min(pending)
                        while next_ticket in pending:
                            self._emit(pending.pop(next_ticket), triggers)
                            next_ticket += 1
                if triggers:
                    now_pc = time.perf_counter()
                    for t in [t for t in triggers if t.deadline <= now_pc]:
                        triggers.remove(t)
                        self._reply(t.envelope, self._trigger_error(
                            t, f"no frame from camera {t.camera} within {self.config.trigger_timeout_s:g} s"))
            for ticket in sorted(pending):
                self._emit(pending.pop(ticket), triggers)
            for t in triggers:
                self._reply(t.envelope, self._trigger_error(t, "runtime stopped before a frame came"))
            self._heartbeat()
        finally:   # an exception here is reported by _stage; the socket thread must not wait for it
            self._published_all.set()

    def _trigger_error(self, trig: Trigger, why: str) -> bytes:
        return vd.dumps(vd.verdict_body(seq=None, camera=trig.camera, frame_id=None, verdict=vd.ERROR, score=None,
                                        threshold=self.threshold, latency_ms=None, model=self.model.model_id,
                                        error=f"trigger: {why}"))

    def _reply(self, envelope: list[bytes], body: bytes) -> None:
        import zmq

        try:   # never let a requester stall the verdict stream
            self._reply_out.send_multipart(envelope + [body], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.stats.problem("replies not delivered", "more replies waiting than the socket thread can send",
                               frame=False)

    def _heartbeat(self) -> None:
        body = vd.heartbeat_body(seq=self._seq, ts=time.time(), counters=self.stats.counters(),
                                 oldest_wait_s=self.ingest.oldest_wait(time.perf_counter()),
                                 last_verdict_ts=self._last_verdict_ts)
        self._pub.send_multipart([vd.HEARTBEAT_TOPIC, vd.dumps(body)])

    def _emit(self, job: Job, triggers: list[Trigger]) -> None:
        t0 = time.perf_counter()
        if job.error is not None:
            verdict, score = vd.ERROR, None
        else:
            verdict, score = vd.decide(job.score, self.threshold), job.score
            if verdict == vd.ERROR:
                job.error = f"{SCORE_NOT_FINITE}: score {job.score}"
        self._seq += 1
        body = vd.verdict_body(seq=self._seq, camera=job.camera, frame_id=job.frame_id, verdict=verdict, score=score,
                               threshold=self.threshold, latency_ms=(t0 - job.t_in) * 1000.0,
                               model=self.model.model_id, error=job.error)
        data = vd.dumps(body)
        self._pub.send_multipart([vd.verdict_topic(job.camera), data])
        self._last_verdict_ts = time.time()
        self.ingest.done(job.ticket)
        t1 = time.perf_counter()
        if verdict == vd.ERROR:
            self.stats.count(verdicts=1)
        else:
            self.stats.count(verdicts=1, judged=1, **{"passed" if verdict == vd.PASS else "failed": 1})
        self.stats.timings(publish=t1 - t0, total=t1 - job.t_in)
        if job.reply_to is not None:
            self._reply(job.reply_to, data)
        if triggers:
            for t in [t for t in triggers if t.camera == job.camera and job.ticket >= t.after_ticket]:
                triggers.remove(t)
                self._reply(t.envelope, data)
        if self._saver is not None and job.rgb is not None and (
                verdict == vd.FAIL or (verdict == vd.PASS and self.config.save_passes)):
            self._saver.offer(job.rgb, job.amap, job.camera, job.frame_id, job.score, self.threshold, verdict)
        if self.config.display and job.rgb is not None:
            self._latest = (job.rgb, job.amap, verdict, score, job.camera, job.frame_id)
        job.rgb = job.amap = None
        if self._on_verdict is not None:
            self._on_verdict(body, job.label)
