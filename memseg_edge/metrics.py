"""Prometheus metrics of the runtime (``memseg-edge run --metrics PORT``), with prometheus-client.

The runtime calls one small object, :class:`RuntimeMetrics`, from wherever it already counts (the same
places that feed :mod:`memseg_edge.runtime_stats`); scraping happens in prometheus-client's own HTTP
thread and never touches the pipeline. Each call is a lock and an add: cheap enough for every frame.

=======================================  =========  ==========================================
name                                     type       what
=======================================  =========  ==========================================
``memseg_frames_received_total``         counter    frames accepted from any source
``memseg_verdicts_total{camera,verdict}`` counter   verdicts published (PASS, FAIL, ERROR)
``memseg_errors_total{kind}``            counter    ERROR verdicts and bad input, by kind
``memseg_dropped_total``                 counter    frames dropped because the runtime was behind
``memseg_queue_depth``                   gauge      frames waiting to be judged
``memseg_batch_size``                    histogram  frames per inference batch
``memseg_latency_seconds{stage}``        histogram  per-stage latency (decode, preprocess, infer, ...)
``memseg_model_info{model,precision,backend,...}`` info  the model that judges
=======================================  =========  ==========================================
"""
from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def serve(registry: Any, port: int, host: str = "127.0.0.1") -> tuple[Any, int]:
    """Serve ``registry`` on ``http://HOST:PORT/metrics`` in a daemon thread (``port`` 0: a free one).
    Returns ``(server, bound port)``; ``server.shutdown()`` stops it."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(int(port), addr=host, registry=registry)
    return server, server.server_address[1]


class RuntimeMetrics:
    """The runtime's metrics on their own registry (two runtimes in one process do not collide)."""

    def __init__(self, registry: Any = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._received = Counter("memseg_frames_received", "Frames accepted from any source.", registry=r)
        self._verdicts = Counter("memseg_verdicts", "Verdicts published.", ["camera", "verdict"], registry=r)
        self._errors = Counter("memseg_errors", "Errors by kind (ERROR verdicts and bad input).", ["kind"],
                               registry=r)
        self._dropped = Counter("memseg_dropped", "Frames dropped because the runtime was behind.", registry=r)
        self._queue = Gauge("memseg_queue_depth", "Frames waiting to be judged.", registry=r)
        self._batch = Histogram("memseg_batch_size", "Frames per inference batch.", buckets=BATCH_BUCKETS, registry=r)
        self._latency = Histogram("memseg_latency_seconds", "Latency per pipeline stage.", ["stage"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self._model = Info("memseg_model", "The model that judges.", registry=r)
        self._server = None
        self.port: int | None = None
        self._children: dict = {}     # labelled children, looked up once (labels() takes a lock and builds a key)

    # -- what the runtime calls -------------------------------------------------------------------
    def frame_received(self, n: int = 1) -> None:
        self._received.inc(n)

    def _child(self, metric, *labels):
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def verdict(self, camera: str, verdict: str) -> None:
        self._child(self._verdicts, camera, verdict).inc()

    def error(self, kind: str) -> None:
        self._child(self._errors, kind).inc()

    def dropped(self, n: int = 1) -> None:
        self._dropped.inc(n)

    def queue_depth(self, n: int) -> None:
        self._queue.set(n)

    def queue_depth_from(self, read) -> None:
        """Read the queue depth at scrape time (``read()`` -> int) instead of on every frame."""
        self._queue.set_function(lambda: float(read()))

    def batch(self, size: int) -> None:
        self._batch.observe(size)

    def latency(self, stage: str, seconds: float) -> None:
        self._child(self._latency, stage).observe(seconds)

    def model_info(self, model: str, precision: str, backend: str, **extra: str) -> None:
        self._model.info({"model": str(model), "precision": str(precision), "backend": str(backend),
                          **{k: str(v) for k, v in extra.items()}})

    # -- serving ------------------------------------------------------------------------------------
    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint; returns the bound port."""
        self._server, self.port = serve(self.registry, port, host)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
