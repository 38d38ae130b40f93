"""The runtime's ZeroMQ sockets: binding them (so bind errors surface before ``ready``) and the socket
thread, which reads frames from stations (PULL) and requesters (ROUTER), hands each message to
:class:`memseg_edge.runtime_ingest.Admission` with a bounded amount of work per message, passes the
publisher's replies back to requesters, and counts connection events."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .runtime_config import ConfigError, RuntimeConfig
from .runtime_ingest import Admission
from .runtime_pipeline import Pipeline

INTERNAL_ERROR = "internal error"
TRANSPORT_LIMIT_FACTOR = 4           # ZeroMQ drops a connection whose message part exceeds this x --max-message-mb


@dataclass
class Sockets:
    """Every socket of a runtime; each is used by one thread only (its docstring says which)."""
    pulls: list = field(default_factory=list)    # socket thread: frames from stations
    router: Any = None                           # socket thread: request-reply
    pub: Any = None                              # publisher thread: verdicts and heartbeats
    reply_in: Any = None                         # socket thread: replies from the publisher (inproc)
    reply_out: Any = None                        # publisher thread
    monitors: list = field(default_factory=list)  # socket thread: connection events of pulls and router

    def endpoints(self) -> dict[str, Any]:
        import zmq

        return {"frames": [s.getsockopt_string(zmq.LAST_ENDPOINT) for s in self.pulls],
                "results": self.pub.getsockopt_string(zmq.LAST_ENDPOINT),
                "reply": self.router.getsockopt_string(zmq.LAST_ENDPOINT) if self.router else None}

    def close(self) -> None:
        for s in self.monitors + self.pulls:
            s.close(0)
        for s in (self.router, self.pub, self.reply_in, self.reply_out):
            if s is not None:
                s.close()
        self.monitors, self.pulls = [], []
        self.router = self.pub = self.reply_in = self.reply_out = None


def bind_sockets(ctx: Any, cfg: RuntimeConfig, keys: Any) -> Sockets:
    """Create and bind every socket of ``cfg``; :class:`ConfigError` when an endpoint cannot be bound (the
    caller then destroys ``ctx``, which closes the sockets made so far)."""
    import zmq

    from .transport import allow_ipv6, secure_server

    monitor_events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
    for name in ("EVENT_HANDSHAKE_FAILED_AUTH", "EVENT_HANDSHAKE_FAILED_PROTOCOL", "EVENT_HANDSHAKE_FAILED_NO_DETAIL"):
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
    s = Sockets()
    s.pulls = [bound(zmq.PULL, url, "stations", RCVHWM=100, MAXMSGSIZE=wire_max, LINGER=0) for url in cfg.zmq]
    s.router = bound(zmq.ROUTER, cfg.reply, "stations", RCVHWM=100, SNDHWM=1000, MAXMSGSIZE=wire_max,
                     LINGER=1000) if cfg.reply else None
    s.pub = bound(zmq.PUB, cfg.results, "subscribers", SNDHWM=10000, LINGER=1000)
    s.reply_in = ctx.socket(zmq.PULL)
    s.reply_in.setsockopt(zmq.LINGER, 0)
    s.reply_in.bind("inproc://memseg-replies")
    s.reply_out = ctx.socket(zmq.PUSH)
    s.reply_out.setsockopt(zmq.LINGER, 0)
    s.reply_out.connect("inproc://memseg-replies")
    s.monitors = [x.get_monitor_socket(monitor_events) for x in s.pulls + [s.router] if x]
    return s


class SocketThread:
    """The thread that owns ``pulls``, ``router``, ``reply_in`` and ``monitors`` (see the module docstring)."""

    def __init__(self, line: Pipeline, sockets: Sockets, admission: Admission):
        self.line = line
        self.stats = line.stats
        self.sockets = sockets
        self.admission = admission

    def run(self) -> None:
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
        inputs = list(self.sockets.pulls) + ([self.sockets.router] if self.sockets.router else [])
        for s in inputs + [self.sockets.reply_in] + self.sockets.monitors:
            poller.register(s, zmq.POLLIN)
        router = self.sockets.router

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
                    parts = self.sockets.reply_in.recv_multipart(zmq.NOBLOCK)
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
                if accepting and self.line.stop.is_set():
                    accepting = False
                    for s in inputs:
                        poller.unregister(s)
                    self.line.net_quiet.set()
                events = dict(poller.poll(50))
                for s in self.sockets.pulls:
                    if accepting and s in events:
                        for _ in range(256):   # fair between sockets: a bounded burst each
                            message = receive(s, 2)
                            if message is None:
                                break
                            self._guard(self.admission.on_frame, *message)
                if router is not None and accepting and router in events:
                    for _ in range(256):
                        message = receive(router, 4)
                        if message is None:
                            break
                        self._guard(self.admission.on_request, *message, reply)
                if self.sockets.reply_in in events:
                    drain_replies()
                for m in self.sockets.monitors:
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
                if not accepting and self.line.published_all.is_set():
                    drain_replies()   # the publisher's last replies are in the inproc pipe by now
                    break
        finally:
            self.line.net_quiet.set()

    def _guard(self, fn: Callable, *args) -> None:
        """Bad input must never stop the socket thread: an unexpected exception is counted and logged once."""
        try:
            fn(*args)
        except Exception as exc:
            self.stats.problem(INTERNAL_ERROR, f"{type(exc).__name__}: {exc} while handling a message", frame=False)
