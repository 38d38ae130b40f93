"""The publisher: one verdict per ticket, in ticket order (so each camera's verdicts keep its frames'
order even when an ``ERROR`` is known before the frames ahead of it are judged), heartbeats that prove
frames are being judged (the seq of the last verdict, the age of the oldest frame not yet answered, the
time of the last verdict), replies to requesters and triggers, overlays and the display's latest frame.
Pattern: pub-sub with sequence numbers and heartbeats (ZeroMQ guide)."""
from __future__ import annotations

import queue
import time
from typing import Any, Callable

from . import verdicts as vd
from .runtime_infer import SCORE_NOT_FINITE
from .runtime_pipeline import STOP, Job, Pipeline, Trigger

MAX_PENDING_REORDER = 10000          # safety valve: never hold more results than this for ordering
MAX_WAITING_TRIGGERS = 1000


class Publisher:
    """The thread that owns the PUB socket and the reply pipe's sending end."""

    def __init__(self, line: Pipeline, pub: Any, reply_out: Any, saver: Any = None,
                 on_verdict: Callable[[dict, str | None], Any] | None = None, metrics: Any = None,
                 previews: Any = None):
        self.line = line
        self.stats = line.stats
        self.pub = pub
        self.reply_out = reply_out
        self.saver = saver
        self.on_verdict = on_verdict
        self.metrics = metrics          # RuntimeMetrics (--metrics): verdicts by camera
        self.previews = previews        # PreviewPublisher (--previews): rate-limited, encoded in its own thread
        self.seq = 0
        self.last_verdict_ts: float | None = None
        self.latest: tuple | None = None       # for the display: (rgb, amap, verdict, score, camera, frame_id)

    def run(self) -> None:
        pending: dict[int, Job] = {}
        next_ticket = 0
        triggers: list[Trigger] = []
        interval = self.line.config.heartbeat_s
        next_hb = time.monotonic()
        reorder_warned = False
        try:
            while True:
                now = time.monotonic()
                if now >= next_hb:
                    self.heartbeat()
                    next_hb = now + interval
                wait = next_hb - now
                if triggers:
                    wait = min(wait, max(0.0, min(t.deadline for t in triggers) - time.perf_counter()))
                try:
                    item = self.line.results.get(timeout=max(wait, 0.0))
                except queue.Empty:
                    item = None
                if item is STOP:
                    break
                if isinstance(item, Trigger):
                    if len(triggers) >= MAX_WAITING_TRIGGERS:
                        self.reply(item.envelope, self.trigger_error(item, "too many triggers waiting"))
                    else:
                        triggers.append(item)
                elif isinstance(item, Job):
                    if item.ticket < next_ticket:   # late, after the safety valve let later ones go first
                        self.emit(item, triggers)
                    else:
                        pending[item.ticket] = item
                    while next_ticket in pending:
                        self.emit(pending.pop(next_ticket), triggers)
                        next_ticket += 1
                    if len(pending) > MAX_PENDING_REORDER:
                        if not reorder_warned:
                            reorder_warned = True
                            self.line.log(f"warning: more than {MAX_PENDING_REORDER} verdicts wait for an earlier frame; "
                                     "publishing them out of arrival order")
                        next_ticket = min(pending)
                        while next_ticket in pending:
                            self.emit(pending.pop(next_ticket), triggers)
                            next_ticket += 1
                if triggers:
                    now_pc = time.perf_counter()
                    for t in [t for t in triggers if t.deadline <= now_pc]:
                        triggers.remove(t)
                        self.reply(t.envelope, self.trigger_error(
                            t, f"no frame from camera {t.camera} within {self.line.config.trigger_timeout_s:g} s"))
            for ticket in sorted(pending):
                self.emit(pending.pop(ticket), triggers)
            for t in triggers:
                self.reply(t.envelope, self.trigger_error(t, "runtime stopped before a frame came"))
            self.heartbeat()
        finally:   # an exception here is reported by _stage; the socket thread must not wait for it
            self.line.published_all.set()

    def trigger_error(self, trig: Trigger, why: str) -> bytes:
        return vd.dumps(vd.verdict_body(seq=None, camera=trig.camera, frame_id=None, verdict=vd.ERROR, score=None,
                                        threshold=self.line.threshold, latency_ms=None, model=self.line.model.model_id,
                                        error=f"trigger: {why}"))

    def reply(self, envelope: list[bytes], body: bytes) -> None:
        import zmq

        try:   # never let a requester stall the verdict stream
            self.reply_out.send_multipart(envelope + [body], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.stats.problem("replies not delivered", "more replies waiting than the socket thread can send",
                               frame=False)

    def heartbeat(self) -> None:
        body = vd.heartbeat_body(seq=self.seq, ts=time.time(), counters=self.stats.counters(),
                                 oldest_wait_s=self.line.ingest.oldest_wait(time.perf_counter()),
                                 last_verdict_ts=self.last_verdict_ts)
        self.pub.send_multipart([vd.HEARTBEAT_TOPIC, vd.dumps(body)])

    def emit(self, job: Job, triggers: list[Trigger]) -> None:
        t0 = time.perf_counter()
        if job.error is not None:
            verdict, score = vd.ERROR, None
        else:
            verdict, score = vd.decide(job.score, self.line.threshold), job.score
            if verdict == vd.ERROR:
                job.error = f"{SCORE_NOT_FINITE}: score {job.score}"
        self.seq += 1
        body = vd.verdict_body(seq=self.seq, camera=job.camera, frame_id=job.frame_id, verdict=verdict, score=score,
                               threshold=self.line.threshold, latency_ms=(t0 - job.t_in) * 1000.0,
                               model=self.line.model.model_id, error=job.error)
        data = vd.dumps(body)
        self.pub.send_multipart([vd.verdict_topic(job.camera), data])
        self.last_verdict_ts = time.time()
        self.line.ingest.done(job.ticket)
        t1 = time.perf_counter()
        if verdict == vd.ERROR:
            self.stats.count(verdicts=1)
        else:
            self.stats.count(verdicts=1, judged=1, **{"passed" if verdict == vd.PASS else "failed": 1})
        self.stats.timings(publish=t1 - t0, total=t1 - job.t_in)
        if self.metrics is not None:
            self.metrics.verdict(job.camera, verdict)
        if self.previews is not None and job.rgb is not None and self.previews.wants(job.camera, verdict):
            self.previews.publish(job.camera, job.rgb, job.amap, verdict=verdict, score=score,
                                  threshold=self.line.threshold, frame_id=job.frame_id, seq=self.seq)
        if job.reply_to is not None:
            self.reply(job.reply_to, data)
        if triggers:
            for t in [t for t in triggers if t.camera == job.camera and job.ticket >= t.after_ticket]:
                triggers.remove(t)
                self.reply(t.envelope, data)
        if self.saver is not None and job.rgb is not None and (
                verdict == vd.FAIL or (verdict == vd.PASS and self.line.config.save_passes)):
            self.saver.offer(job.rgb, job.amap, job.camera, job.frame_id, job.score, self.line.threshold, verdict)
        if self.line.config.display and job.rgb is not None:
            self.latest = (job.rgb, job.amap, verdict, score, job.camera, job.frame_id)
        job.rgb = job.amap = None
        if self.on_verdict is not None:
            self.on_verdict(body, job.label)
