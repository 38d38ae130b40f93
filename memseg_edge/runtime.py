"""The line-side runtime (``memseg-edge run``): frames in, verdicts out, nothing lost silently.

One module per stage: ``runtime_ingest`` (the ingest queue, and admission of messages and captured
frames), ``runtime_sockets`` (binding, and the socket thread), ``runtime_decode``, ``runtime_infer``,
``runtime_publish``; ``runtime_pipeline`` is what they share; this module is the :class:`Runtime` that
starts and stops them; ``runtime_model`` and ``runtime_config`` are what it is given.

Threads and queues; every ZeroMQ socket belongs to exactly one thread (created and bound in
:meth:`Runtime.start`, so bind errors surface there, then handed over)::

  stations --PUSH--> [PULL]   \\                                            drop-oldest per camera when full
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
import threading
import time
from typing import Any, Callable

from .runtime_config import ConfigError, RuntimeConfig
from .runtime_decode import Decoder
from .runtime_infer import Inference
from .runtime_ingest import Admission, IngestQueue
from .runtime_model import LoadedModel, load_model
from .runtime_pipeline import Job, Pipeline
from .runtime_publish import Publisher
from .runtime_sockets import Sockets, SocketThread, bind_sockets

__all__ = ["ConfigError", "RuntimeConfig", "LoadedModel", "load_model", "Runtime", "IngestQueue", "Job"]


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
        if not (config.zmq or config.reply or config.cameras or config.videos or config.images or config.pylon):
            raise ConfigError("no frame source: give --zmq ENDPOINT (camera stations), --camera IDX, --pylon SERIAL, "
                              "--video FILE, --images DIR or --reply ENDPOINT")
        self.line = Pipeline(config, model, self.threshold, self.max_batch, log)
        self.stats = self.line.stats
        self.admission = Admission(self.line)
        self.ingest = self.admission.ingest
        self._publisher: Publisher | None = None
        self._threads: list[threading.Thread] = []
        self._source_threads: list[threading.Thread] = []
        self.endpoints: dict[str, Any] = {}
        self._sockets = Sockets()
        self._ctx = None
        self._auth = None
        self._saver = None
        self.metrics = None        # RuntimeMetrics (--metrics)
        self.previews = None       # PreviewPublisher (--previews)
        self._started = False
        self._shut = False

    @property
    def failure(self) -> str | None:
        """Why the runtime stopped on its own (a stage failed, a camera never opened), or None."""
        return self.line.failure

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        import zmq

        from .sources import open_capture
        from .transport import load_server_keys, start_authenticator

        cfg = self.config
        captures = []
        for kind, specs in (("camera", cfg.cameras), ("video", cfg.videos), ("images", cfg.images)):
            for spec in specs:
                captures.append(open_capture(kind, spec, problem=lambda k, m: self.stats.problem(k, m, frame=False),
                                             camera_timeout=cfg.camera_timeout_s))
        captures += self._pylon_cameras()
        names = [c.name for c in captures]
        if len(set(names)) != len(names):
            raise ConfigError("two local sources have the same camera name (" + ", ".join(sorted(
                {n for n in names if names.count(n) > 1})) + "): verdicts could not be told apart")
        keys = load_server_keys(cfg.curve_keys) if cfg.curve_keys else None
        self._start_metrics()
        if cfg.save_failures:
            from .overlay import FailureSaver

            self._saver = FailureSaver(cfg.save_failures, cfg.save_budget_mb, self.stats.event, self.log)
        self._ctx = ctx = zmq.Context()
        try:
            self._auth = start_authenticator(ctx, keys)
            self._sockets = bind_sockets(ctx, cfg, keys)
            if cfg.previews:
                self.previews = self._bind_previews(ctx, keys)
        except Exception:
            self._close_sockets()
            self._close_plant()
            if self._saver is not None:
                self._saver.close()
            raise
        self.endpoints = self._sockets.endpoints()
        self.endpoints["previews"] = self.previews.endpoint if self.previews else None
        self.endpoints["metrics"] = (f"http://{cfg.metrics_host}:{self.metrics.port}/metrics" if self.metrics
                                     else None)
        self.admission.expect_sources(len(captures), bool(cfg.zmq or cfg.reply or any(
            c.live or getattr(c, "endless", False) for c in captures)))
        self._publisher = Publisher(self.line, self._sockets.pub, self._sockets.reply_out, self._saver,
                                    self._on_verdict, metrics=self.metrics, previews=self.previews)
        keep_rgb = bool(cfg.save_failures or cfg.display or self.previews)
        stages = ((SocketThread(self.line, self._sockets, self.admission).run, "sockets"),
                  (Decoder(self.line, keep_rgb=keep_rgb).run, "decode"),
                  (Inference(self.line, keep_pass_maps=bool(cfg.display or cfg.save_passes or self.previews),
                             metrics=self.metrics).run, "inference"),
                  (self._publisher.run, "publisher"))
        for target, name in stages:
            t = threading.Thread(target=self._stage, args=(target, name), name=f"memseg-{name}", daemon=True)
            self._threads.append(t)
        for cap in captures:
            t = threading.Thread(target=self.admission.source_loop, args=(cap,), name=f"memseg-source-{cap.name}",
                                 daemon=True)
            self._source_threads.append(t)
        for t in self._threads + self._source_threads:
            t.start()
        self._started = True

    def _pylon_cameras(self) -> list:
        cfg = self.config
        if not cfg.pylon:
            return []
        from .cameras import CameraSettings
        from .cameras.pylon import PylonCamera, require_pypylon

        try:
            require_pypylon()
        except RuntimeError as exc:
            raise ConfigError(f"--pylon: {exc}") from None
        from .frames import CAMERA_RULE, safe_camera_name, valid_camera_name

        settings = cfg.camera_settings or CameraSettings()
        cameras = []
        for spec in cfg.pylon:
            device, _, name = spec.partition("=")
            if name and not valid_camera_name(name):
                raise ConfigError(f"--pylon {spec}: {CAMERA_RULE}")
            if not device:
                raise ConfigError(f"--pylon {spec}: give a serial number or an index before '='")
            cameras.append(PylonCamera(device, settings, name=name or safe_camera_name(f"pylon-{device}"),
                                       problem=lambda k, m: self.stats.problem(k, m, frame=False)))
        return cameras

    def _start_metrics(self) -> None:
        cfg = self.config
        if cfg.metrics_port is None:
            return
        from .metrics import RuntimeMetrics

        try:
            metrics = RuntimeMetrics()       # imports prometheus_client
        except ImportError:
            raise ConfigError("--metrics needs prometheus-client: pip install 'memseg-edge[plant]'") from None
        try:
            metrics.serve(cfg.metrics_port, cfg.metrics_host)
        except OSError as exc:
            raise ConfigError(f"--metrics {cfg.metrics_port}: cannot listen on {cfg.metrics_host}:{cfg.metrics_port} "
                              f"({exc.strerror or exc}); another program on that port?") from None
        m = self.model
        metrics.model_info(m.model_id[:12], m.precision, m.kind, path=str(m.path), image_size=str(m.image_size),
                           threshold=f"{self.threshold:.6g}")
        metrics.queue_depth_from(lambda: len(self.ingest))
        self.metrics = metrics
        self.stats.sink = metrics

    def _bind_previews(self, ctx, keys):
        import zmq

        from .previews import PreviewPublisher

        try:
            return PreviewPublisher(self.config.previews, fps=self.config.preview_fps, curve=keys, context=ctx,
                                    role="subscribers")
        except zmq.ZMQError as exc:
            raise ConfigError(f"--previews: cannot bind {self.config.previews}: {exc.strerror}") from None

    def _close_plant(self) -> None:
        if self.previews is not None:
            self.previews.close()
            self.previews = None
        if self.metrics is not None:
            self.stats.sink = None
            self.metrics.close()
            self.metrics = None

    def request_stop(self) -> None:
        self.line.stop.set()

    def _stage(self, target: Callable[[], None], name: str) -> None:
        """Run one pipeline thread; if it raises, say so loudly and stop the runtime with a failure."""
        try:
            target()
        except BaseException as exc:
            self.line.failed(f"the {name} thread stopped ({type(exc).__name__}: {exc}); frames in flight get no "
                             "verdict and heartbeats stop")

    @property
    def stopping(self) -> bool:
        return self.line.stop.is_set()

    def run(self, on_tick: Callable[[], bool] | None = None) -> dict:
        """Start, print stats every ``stats_every`` seconds until stopped, shut down; returns the final
        snapshot. ``on_tick`` (main thread, ~20 times a second) returns False to stop (the display uses it)."""
        if not self._started:
            self.start()
        next_stats = time.monotonic() + self.config.stats_every if self.config.stats_every > 0 else float("inf")
        try:
            while not self.line.stop.wait(0.05):
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
        """Flush and close: no new frames are accepted, what is queued is judged and published, a last
        heartbeat goes out, then the sockets close; idempotent."""
        if self._shut or not self._started:
            return
        self._shut = True
        self.line.stop.set()
        if self.failure is not None:   # a stage is gone: the others may wait for it forever
            timeout = min(timeout, 5.0)
        deadline = time.monotonic() + timeout
        for t in self._source_threads:
            t.join(max(0.1, min(5.0, deadline - time.monotonic())))
        self.line.net_quiet.wait(max(0.1, deadline - time.monotonic()))
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
                self.line.failure = f"{', '.join(stuck)} did not finish within {timeout:.0f} s"
            self.log(f"warning: {', '.join(stuck)} did not finish within {timeout:.0f} s (a hung backend?); "
                     "exiting without flushing")
        else:
            self._close_plant()      # the preview socket lives in this context: closed before it is destroyed
            self._close_sockets()
        self._close_plant()

    def wait(self, timeout: float | None = None) -> bool:
        """Until a stop was requested (not the shutdown itself)."""
        return self.line.stop.wait(timeout)

    def latest(self) -> tuple | None:
        """For the display: (rgb, amap, verdict, score, camera, frame_id) of the latest verdict, or None."""
        return self._publisher.latest if self._publisher else None

    def _close_sockets(self) -> None:
        self._sockets.close()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.destroy(linger=1000)   # term(), after closing any socket a failure left open
            self._ctx = None
