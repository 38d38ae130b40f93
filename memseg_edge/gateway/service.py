"""The gateway process: the verdict subscriber, the OPC UA and Modbus servers and the metrics endpoint
around one :class:`~memseg_edge.gateway.state.GatewayState`.

Threads: the ZeroMQ subscriber (:class:`memseg_edge.plc.VerdictListener`, the same parser and seq/
heartbeat rules as ``plc-listen``) runs in its own thread and hands every message to the asyncio loop
with ``call_soon_threadsafe``; the state, both protocol servers and the staleness tick run on that one
loop, so the state needs no lock. Prometheus is served from prometheus-client's HTTP thread and reads
the state at scrape time.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .state import GatewayState


@dataclass
class GatewayConfig:
    results: str                        # the runtime's verdict endpoint (connect)
    opcua_port: int | None = None       # 0: a free port (tests)
    modbus_port: int | None = None
    host: str = "127.0.0.1"
    mode: str = "handshake"
    stale_ms: float = 3000.0
    backlog: int = 64
    cameras: tuple[str, ...] = ()
    modbus_slots: int = 8
    metrics_port: int | None = None
    opcua_security: Any = None          # memseg_edge.gateway.opcua.OpcUaSecurity
    curve: Any = None                   # memseg_edge.transport.CurveClient
    protocols: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        self.protocols = tuple(p for p, port in (("opcua", self.opcua_port), ("modbus", self.modbus_port))
                               if port is not None)
        if not self.protocols:
            raise ValueError("nothing to serve: give --opcua PORT and/or --modbus PORT")


class Gateway:
    """``start()`` runs everything in a background thread and returns once the servers listen (ports
    in ``opcua_port``/``modbus_port``/``metrics_port``); ``stop()`` ends it. ``run()`` does the same in
    the calling thread until ``stop()``."""

    def __init__(self, config: GatewayConfig, log: Callable[[str], None] = print):
        self.config = config
        self.log = log
        self.state: GatewayState | None = None
        self.faces: dict[str, Any] = {}
        self.opcua_port = self.modbus_port = self.metrics_port = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._listener_thread: threading.Thread | None = None
        self._metrics_server = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "Gateway":
        self._thread = threading.Thread(target=self.run, name="plc-gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the gateway did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(lambda: None)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:   # reported to start(); the CLI shows it
            self._error = exc
            self._ready.set()
            if self._thread is None:
                raise

    async def _main(self) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self.state = GatewayState(cfg.protocols, mode=cfg.mode, backlog=cfg.backlog, stale_s=cfg.stale_ms / 1000.0,
                                  cameras=cfg.cameras, on_change=self._changed)
        if cfg.opcua_port is not None:
            from .opcua import OpcUaFace

            self.faces["opcua"] = OpcUaFace(self.state, cfg.opcua_port, cfg.host, cfg.opcua_security, log=self.log)
        if cfg.modbus_port is not None:
            from .modbus import ModbusFace

            self.faces["modbus"] = ModbusFace(self.state, cfg.modbus_port, cfg.host, cfg.modbus_slots, log=self.log)
        if "opcua" in self.faces and cfg.opcua_port == 0:
            self.faces["opcua"].port = _free_port(cfg.host)
        try:
            for face in self.faces.values():
                await face.start()
            self.opcua_port = self.faces["opcua"].port if "opcua" in self.faces else None
            self.modbus_port = self.faces["modbus"].port if "modbus" in self.faces else None
            if cfg.metrics_port is not None:
                self._serve_metrics()
            self._listener_thread = threading.Thread(target=self._listen, name="plc-gateway-sub", daemon=True)
            self._listener_thread.start()
            self._ready.set()
            period = max(0.005, min(0.05, cfg.stale_ms / 1000.0 / 20))
            while not self._stop.is_set():
                self.state.tick()
                await asyncio.sleep(period)
        finally:
            self._stop.set()
            for face in self.faces.values():
                try:
                    await face.stop()
                except Exception as exc:   # noqa: BLE001 - stopping must go on
                    self.log(f"warning: stopping {face.protocol}: {exc}")
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            if self._listener_thread is not None:
                self._listener_thread.join(5)

    def _changed(self, protocol: str, camera: str | None) -> None:
        face = self.faces.get(protocol)
        if face is not None:
            face.changed(camera)

    # -- the subscriber thread ----------------------------------------------------------------------
    def _listen(self) -> None:
        from ..plc import VerdictListener

        loop, state = self._loop, self.state

        def post(fn, *args):
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:   # loop closed: shutting down
                self._stop.set()

        def on_event(kind: str, message: str, info: dict) -> None:
            if kind == "gap":
                post(state.on_gap, info["first"], info["last"])
            elif kind == "restart":
                post(state.on_restart)
            if kind in ("gap", "restart", "heartbeat_lost", "heartbeat_back", "connected", "malformed", "stalled",
                        "stall_over"):
                self.log(message)

        stale_s = self.config.stale_ms / 1000.0   # the listener's stall rule is the state's (oldest_wait_s > stale)
        with VerdictListener(self.config.results, heartbeat_timeout=stale_s, stall_timeout=stale_s,
                             curve=self.config.curve) as listener:
            listener.listen(stop=self._stop, on_verdict=lambda body: post(state.on_verdict, body),
                            on_heartbeat=lambda body: post(state.on_heartbeat, body), on_event=on_event)

    # -- metrics ------------------------------------------------------------------------------------
    def _serve_metrics(self) -> None:
        from prometheus_client import CollectorRegistry

        from ..metrics import serve

        registry = CollectorRegistry()
        registry.register(_GatewayCollector(self))
        self._metrics_server, self.metrics_port = serve(registry, self.config.metrics_port, self.config.host)


class _GatewayCollector:
    """Reads the state at scrape time (plain int/float reads of a structure the loop thread owns)."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.gateway.state
        backlog = GaugeMetricFamily("memseg_gateway_backlog", "Results waiting for the PLC's Ack.",
                                    labels=["protocol", "camera"])
        acks = CounterMetricFamily("memseg_gateway_acks", "Results the PLC acknowledged.", labels=["protocol", "camera"])
        overflows = CounterMetricFamily("memseg_gateway_overflows", "Results dropped: backlog full.",
                                        labels=["protocol", "camera"])
        results = CounterMetricFamily("memseg_gateway_results", "Verdicts received.", labels=["camera", "verdict"])
        for protocol, channels in list(st.channels.items()):
            for camera, ch in list(channels.items()):
                backlog.add_metric([protocol, camera], len(ch.queue))
                acks.add_metric([protocol, camera], ch.acks)
                overflows.add_metric([protocol, camera], ch.overflows)
        first = st.protocols[0]
        for camera, ch in list(st.channels[first].items()):
            for verdict, n in ch.counts.items():
                results.add_metric([camera, verdict], n)
        yield backlog
        yield acks
        yield overflows
        yield results
        yield GaugeMetricFamily("memseg_gateway_heartbeat_age_seconds", "Seconds since the runtime's last heartbeat "
                                "(since start-up before the first).", value=st.heartbeat_age())
        yield GaugeMetricFamily("memseg_gateway_runtime_healthy", "1 when the heartbeat is fresh and not stalled.",
                                value=1.0 if st.runtime_healthy() else 0.0)
        yield CounterMetricFamily("memseg_gateway_stale_seconds", "Total time the runtime was stale or unseen.",
                                  value=st.stale_total())
        yield CounterMetricFamily("memseg_gateway_heartbeats", "Heartbeats received.", value=st.heartbeats)
        yield CounterMetricFamily("memseg_gateway_gaps", "Seq gaps (lost verdicts) seen.", value=st.gaps)


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
