"""The inference stage: batches of decoded frames through the model. A batch is up to ``max_batch``
frames, or what is ready ``--max-wait-ms`` after its first frame, whichever comes first. A failed call
answers its whole batch ``ERROR``; a score that is not a finite number answers its frame ``ERROR`` (NaN
compares false with any threshold, so it would pass)."""
from __future__ import annotations

import math
import queue
import time
from typing import Any

import numpy as np

from .preprocess import over_image
from .runtime_pipeline import STOP, Job, Pipeline

INFERENCE_FAILED = "inference failed"
SCORE_NOT_FINITE = "score not finite"


class Inference:
    def __init__(self, line: Pipeline, keep_pass_maps: bool, metrics: Any = None):
        self.line = line
        self.keep_pass_maps = keep_pass_maps   # the map of a PASS frame is kept too (--save-passes, --display)
        self.metrics = metrics                 # RuntimeMetrics (--metrics): batch sizes

    def run(self) -> None:
        max_wait = self.line.config.max_wait_ms / 1000.0
        while True:
            first = self.line.ready.get()
            if first is STOP:
                self.line.results.put(STOP)
                return
            batch, finished = [first], False
            deadline = first.t_ready + max_wait
            while len(batch) < self.line.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    nxt = self.line.ready.get(timeout=remaining) if remaining > 0 else self.line.ready.get_nowait()
                except queue.Empty:
                    break
                if nxt is STOP:
                    finished = True
                    break
                batch.append(nxt)
            self.infer_batch(batch)
            if finished:
                self.line.results.put(STOP)
                return

    def infer_batch(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        try:
            amap, score = self.line.model.backend.infer(np.stack([j.prepared for j in batch]))
        except Exception as exc:
            for j in batch:
                self.line.fail(j, INFERENCE_FAILED, f"{type(exc).__name__}: {exc}")
            return
        dt = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.batch(len(batch))
        for i, job in enumerate(batch):
            self.line.stats.timing("inference", dt)
            job.prepared = None
            job.score = float(score[i])
            if not math.isfinite(job.score):   # NaN compares false with any threshold: it would pass
                self.line.fail(job, SCORE_NOT_FINITE, f"the model returned a score of {job.score} for this frame")
                continue
            if job.rgb is not None and (job.score >= self.line.threshold or self.keep_pass_maps):
                job.amap = over_image(amap[i, 0], *job.rgb.shape[:2], self.line.model.fit)   # the part over the frame
            self.line.results.put(job)
