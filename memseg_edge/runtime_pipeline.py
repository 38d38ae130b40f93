"""What the pipeline's threads share: the frame on its way (:class:`Job`), a waiting trigger, the queues
between the stages, the stop signal, and the two ways a stage reports trouble: :meth:`Pipeline.fail`
(one frame cannot be judged: an ``ERROR`` verdict) and :meth:`Pipeline.failed` (a stage is broken: the
runtime stops with :attr:`Pipeline.failure`)."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import frames as fr
from .runtime_stats import RuntimeStats
from .runtime_config import RuntimeConfig
from .runtime_model import LoadedModel

STOP = object()                      # end-of-stream marker between the pipeline threads


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


class Pipeline:
    """The state the stages share. ``ingest`` is set by :class:`memseg_edge.runtime_ingest.Admission`, which
    owns the drop policy."""

    def __init__(self, config: RuntimeConfig, model: LoadedModel, threshold: float, max_batch: int,
                 log: Callable[[str], Any]):
        self.config = config
        self.model = model
        self.threshold = threshold
        self.max_batch = max_batch
        self.log = log
        self.stats = RuntimeStats(log)
        self.stop = threading.Event()
        self.net_quiet = threading.Event()       # the socket thread admits no more frames
        self.published_all = threading.Event()
        self.results: queue.Queue = queue.Queue()
        # decoded frames ready for the model: enough slack that scheduling jitter never leaves the model idle
        self.ready: queue.Queue = queue.Queue(maxsize=max(8, 2 * max_batch))
        self.ingest = None
        self.failure: str | None = None          # why the runtime stopped on its own, when it was not asked to

    def fail(self, job: Job, kind: str, message: str) -> None:
        """``job`` cannot be judged: counted, and answered ``ERROR`` with ``kind: message``."""
        self.stats.problem(kind, message)
        job.payload = job.image = job.prepared = job.rgb = None
        job.error = f"{kind}: {message}"
        self.results.put(job)

    def failed(self, why: str) -> None:
        """A stage cannot go on: logged as an error once, and the runtime stops."""
        if self.failure is None:
            self.failure = why
            self.log(f"error: {why}")
        self.stop.set()
