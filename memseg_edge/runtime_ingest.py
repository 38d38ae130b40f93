"""Admission: how frames enter the pipeline. The ingest queue (bounded, with the drop policy and the
arrival tickets) and what the socket and source threads do with each message or captured frame: the
cheap checks, an ``ERROR`` for what cannot be judged, a ticket for the rest."""
from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from typing import Callable

from . import frames as fr
from . import verdicts as vd
from .sources import SourceFailed
from .runtime_pipeline import Job, Pipeline, Trigger

TOO_LARGE = "message too large"


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


class Admission:
    """Turns messages and captured frames into tickets in the ingest queue, or into ``ERROR`` verdicts."""

    def __init__(self, line: Pipeline):
        self.line = line
        cfg = line.config
        line.ingest = self.ingest = IngestQueue(cfg.queue_frames, int(cfg.queue_mb * (1 << 20)), self.on_drop,
                                                limit=cfg.max_frames, on_limit=self.on_limit)
        self._sources_left = 0
        self._endless = False
        self._sources_lock = threading.Lock()

    def expect_sources(self, n: int, endless: bool) -> None:
        """``n`` source threads will run; ``endless``: something else (a socket, a camera) never ends, so the
        runtime does not stop when the file sources are done."""
        self._sources_left, self._endless = n, endless

    def on_drop(self, job: Job) -> None:
        """Called by the ingest queue, under its lock, for the oldest frame it pushes out."""
        self.line.stats.add("dropped")
        self.line.stats.note_once("dropped", "warning: frames arrive faster than they are judged: the oldest waiting "
                                             f"frames are dropped and answered with ERROR '{vd.DROPPED}' (counted, "
                                             "not logged)")
        job.payload = job.image = None
        job.error = vd.DROPPED
        self.line.results.put(job)

    def on_limit(self) -> None:
        self.line.log(f"--max-frames {self.line.config.max_frames} reached: judging what is queued, then stopping")
        self.line.stop.set()

    def source_loop(self, capture) -> None:
        frame_id = 0
        own_ids = getattr(capture, "own_frame_ids", False)
        try:
            for item in capture.frames(self.line.stop):
                t_in = time.perf_counter()
                if own_ids:
                    frame_id = capture.last_frame_id
                if isinstance(item, fr.BadFrame):
                    item.frame_id, item.camera, item.label = frame_id, capture.name, capture.label(frame_id)
                    self.reject(item, t_in)
                else:
                    job = Job(capture.name, frame_id, t_in, image=item, nbytes=int(item.nbytes),
                              label=capture.label(frame_id))
                    if not self.ingest.put(job, wait=not capture.live, stop=self.line.stop):
                        break
                    self.line.stats.add("received")
                frame_id += 1
                if self.line.stop.is_set():
                    break
        except SourceFailed as exc:
            self.line.failed(str(exc))
        except Exception as exc:
            self.line.stats.problem("source failed", f"source {capture.name} stopped: {type(exc).__name__}: {exc}",
                                    frame=False)
        finally:
            with self._sources_lock:
                self._sources_left -= 1
                last = self._sources_left == 0
            if last and not self._endless:
                self.line.log("every file source is done: judging what is queued, then stopping")
                self.line.stop.set()

    def reject(self, bad: fr.BadFrame, t_in: float, reply_to: list[bytes] | None = None,
               reply: Callable[[list[bytes], bytes], None] | None = None) -> None:
        """A frame that cannot be judged: counted; an ERROR verdict when it named a frame_id."""
        if bad.frame_id is not None:
            job = Job(bad.camera or "unknown", bad.frame_id, t_in, reply_to=reply_to, error=f"{bad.kind}: {bad}",
                      label=getattr(bad, "label", None))
            if not self.ingest.ticket(job):
                self.line.stats.event("ignored (stopping)")
                return
            self.line.stats.add("received")
            self.line.stats.problem(bad.kind, str(bad))
            self.line.results.put(job)
            return
        self.line.stats.add("received")
        self.line.stats.problem(bad.kind, str(bad))
        if reply_to is not None and reply is not None:
            reply(reply_to, vd.dumps({"v": vd.VERDICT_VERSION, "type": "error", "error": f"{bad.kind}: {bad}"}))

    def on_frame(self, parts: list, n_parts: int, total: int, reply_to: list[bytes] | None = None,
                 reply: Callable[[list[bytes], bytes], None] | None = None) -> None:
        """``parts``: the first parts of a message of ``n_parts`` parts and ``total`` bytes."""
        t_in = time.perf_counter()
        try:
            limit = self.line.config.max_message_mb * (1 << 20)
            if total > limit or n_parts != 2:
                frame_id, camera = fr.named(parts[0]) if parts else (None, None)
                if total > limit:
                    raise fr.BadFrame(TOO_LARGE, f"a message of {total / (1 << 20):.1f} MB is more than "
                                                 f"--max-message-mb {self.line.config.max_message_mb:g}", frame_id, camera)
                raise fr.BadFrame(fr.MALFORMED, f"expected 2 message parts [header, payload], found {n_parts}",
                                  frame_id, camera)
            header = fr.parse_frame(parts)
        except fr.BadFrame as bad:
            self.reject(bad, t_in, reply_to, reply)
            return
        payload = parts[1]
        job = Job(header.camera, header.frame_id, t_in, header=header, payload=payload, reply_to=reply_to,
                  nbytes=len(payload))
        if self.ingest.put(job):
            self.line.stats.add("received")
        else:
            self.line.stats.event("ignored (stopping)")
            if reply_to is not None and reply is not None:
                reply(reply_to, vd.dumps({"v": vd.VERDICT_VERSION, "type": "error",
                                          "error": "runtime is stopping: frame not judged"}))

    def on_request(self, parts: list, n_parts: int, total: int, reply: Callable[[list[bytes], bytes], None]) -> None:
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
                    self.line.stats.problem("bad trigger", "a trigger needs \"camera\": NAME", frame=False)
                    reply(envelope, vd.dumps({"v": vd.VERDICT_VERSION, "type": "error",
                                              "error": "bad trigger: expected {\"trigger\": true, \"camera\": NAME}"}))
                    return
                self.line.stats.event("triggers")
                deadline = time.perf_counter() + self.line.config.trigger_timeout_s
                self.line.results.put(Trigger(envelope, camera, self.ingest.mark(), deadline))
                return
        self.on_frame(rest, n_rest, total, envelope, reply)
