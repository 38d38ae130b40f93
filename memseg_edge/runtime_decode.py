"""The decode stage: each frame's pixels (JPEG/PNG/raw, or a captured image) to RGB and to the model's
input size; what cannot be decoded is answered ``ERROR``. A frame kept for an overlay or the display is
kept at most :data:`OVERLAY_MAX_SIDE` pixels on its long side, so memory does not grow with frame size."""
from __future__ import annotations

import time

import cv2
import numpy as np

from . import frames as fr
from .preprocess import prepare, to_rgb
from .runtime_pipeline import STOP, Pipeline

OVERLAY_MAX_SIDE = 1280              # a frame kept for an overlay or the display is shrunk to this (pixels)


def shrink(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """``rgb`` itself, or a copy at most ``max_side`` pixels on its long side (what an overlay needs)."""
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


class Decoder:
    def __init__(self, line: Pipeline, keep_rgb: bool):
        self.line = line
        self.keep_rgb = keep_rgb

    def run(self) -> None:
        size, fit = self.line.model.image_size, self.line.model.fit
        while True:
            job = self.line.ingest.get()
            if job is None:
                self.line.ready.put(STOP)
                return
            t0 = time.perf_counter()
            try:
                if job.header is not None:
                    rgb = fr.decode(job.header, job.payload)
                else:
                    rgb = to_rgb(job.image, "bgr")
                t1 = time.perf_counter()
                job.prepared = prepare(rgb, size, fit)
                t2 = time.perf_counter()
            except fr.BadFrame as bad:
                self.line.fail(job, bad.kind, str(bad))
                continue
            except Exception as exc:
                self.line.fail(job, fr.BAD_IMAGE, f"{type(exc).__name__}: {exc}")
                continue
            self.line.stats.timings(queue=t0 - job.t_in, decode=t1 - t0, preprocess=t2 - t1)
            job.rgb = shrink(rgb, OVERLAY_MAX_SIDE) if self.keep_rgb else None
            job.payload = job.image = None
            del rgb          # the full-size frame must not stay alive while this thread waits on a full queue
            job.t_ready = t2
            self.line.ready.put(job)
