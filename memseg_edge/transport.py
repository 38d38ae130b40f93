"""ZeroMQ endpoints and CurveZMQ keys, shared by ``run``, ``camera`` and ``plc-listen``.

Endpoint rule (one rule for every command, binding or connecting):

=========================  ===================================================
written                    means
=========================  ===================================================
``5555``                   ``tcp://127.0.0.1:5555`` (a bare port: this machine only)
``HOST:PORT``              ``tcp://HOST:PORT``
``tcp://``, ``ipc://``,    used as written
``inproc://``
=========================  ===================================================

A socket listens on every network interface only when the user writes so (``*:5555``,
``tcp://*:5555``, ``0.0.0.0:5555``, ``[::]:5555``, and every other spelling of the unspecified
address, such as ``0:5555`` or ``tcp://0x0:5555``, which :func:`all_interfaces` recognises so that
``run`` warns); ``localhost`` is written as ``127.0.0.1`` for binds, because libzmq reads a bind
address as an interface name first. IPv6 addresses are written in brackets (``tcp://[::1]:5555``).
``tcp://127.0.0.1:*`` binds a free port (the bound address is reported), which tests and the demo use.

CurveZMQ (the ZeroMQ guide's "Ironhouse" pattern): the runtime is the server and holds
``server.key_secret``; camera stations and PLC gateways are clients, each with its own key pair and
the server's public ``server.key``. The runtime accepts only clients whose public key it holds, by
role: a key in ``stations/`` may send frames (``--zmq``, ``--reply``), a key in ``subscribers/`` may
read verdicts (``--results``), a key in ``authorized/`` may do both. ``memseg-edge keys DIR`` writes
this layout with ``zmq.auth.create_certificates``.
"""
from __future__ import annotations

import ipaddress
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVER_NAME = "server"
AUTHORIZED_DIR = "authorized"        # clients of every role
ROLE_DIRS = {"stations": "stations", "subscribers": "subscribers"}   # ZAP domain -> folder of its clients' keys
_SCHEMES = ("tcp://", "ipc://", "inproc://")
_HOST_PORT = re.compile(r"^(?P<host>\[[^\]]+\]|[^:/\s]+):(?P<port>\d+|\*)$")


class EndpointError(ValueError):
    """An endpoint the user wrote that cannot be used; the message says what is accepted."""


def endpoint(text: str | int, *, bind: bool) -> str:
    """Normalise an endpoint as the module docstring says. ``bind``: the caller binds (``*`` allowed)."""
    raw = str(text).strip()
    if not raw:
        raise EndpointError("empty endpoint: write a port (5555), HOST:PORT, tcp://HOST:PORT or ipc:///path")
    if raw.startswith(_SCHEMES):
        url = raw
    elif raw.isdigit():
        url = f"tcp://127.0.0.1:{raw}"
    else:
        m = _HOST_PORT.match(raw)
        if m is None:
            raise EndpointError(f"cannot read endpoint {raw!r}: write a port (5555), HOST:PORT, tcp://HOST:PORT, "
                                "ipc:///path/to/socket or tcp://*:5555 (all interfaces)")
        url = f"tcp://{raw}"
    if url.startswith("tcp://"):
        hostport = url[len("tcp://"):]
        m = _HOST_PORT.match(hostport)
        if m is None:
            raise EndpointError(f"cannot read endpoint {raw!r}: a tcp endpoint is tcp://HOST:PORT")
        host, port = m.group("host"), m.group("port")
        if port != "*" and not 0 < int(port) < 65536:
            raise EndpointError(f"port {port} in {raw!r} is out of range (1-65535)")
        if bind and host == "localhost":
            url = f"tcp://127.0.0.1:{port}"
        if not bind and (host in ("*", "0.0.0.0") or port == "*"):
            raise EndpointError(f"{raw!r} is a listening address; to connect, name the runtime's host and port "
                                "(e.g. 127.0.0.1:5555 or line3-edge:5555)")
    elif url.startswith("ipc://") and len(url) - len("ipc://") > 107:
        raise EndpointError(f"ipc path in {raw!r} is longer than the 107 characters a Unix socket allows: "
                            "use a shorter path (e.g. under /tmp)")
    return url


def all_interfaces(url: str) -> bool:
    """True when a bind endpoint listens on every network interface: ``*`` or any spelling of the
    unspecified address (``0.0.0.0``, ``0``, ``0.0``, ``0x0``, ``::``, ``0:0::0``...)."""
    if not url.startswith("tcp://"):
        return False
    m = _HOST_PORT.match(url[len("tcp://"):])
    if m is None:
        return False
    host = m.group("host")
    if host == "*":
        return True
    if host.startswith("["):
        try:
            return ipaddress.IPv6Address(host[1:-1]).is_unspecified
        except ValueError:
            return False
    try:   # inet_aton reads the shorthand forms the C library (and so libzmq) accepts: 0, 0.0, 0x0
        return socket.inet_aton(host) == b"\0\0\0\0"
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# CurveZMQ
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CurveServer:
    public: bytes
    secret: bytes
    authorized: Path        # folder of the clients' public keys


@dataclass(frozen=True)
class CurveClient:
    public: bytes
    secret: bytes
    server_public: bytes


def make_keys(folder: str | Path, clients: tuple[str, ...] = ("station",), *, stations: tuple[str, ...] = (),
              subscribers: tuple[str, ...] = ()) -> list[Path]:
    """Write the server's key pair and one pair per client; ``clients`` may do everything
    (``authorized/<name>.key``), ``stations`` only send frames (``stations/``), ``subscribers`` only read
    verdicts (``subscribers/``). Returns the files written. Existing files are kept (a new server key
    would lock every station out)."""
    import zmq.auth

    folder = Path(folder)
    roles = [(name, AUTHORIZED_DIR) for name in clients] + [(name, ROLE_DIRS["stations"]) for name in stations] + \
        [(name, ROLE_DIRS["subscribers"]) for name in subscribers]
    for name, _ in roles:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or name == SERVER_NAME:
            raise ValueError(f"client name {name!r}: use letters, digits, '_', '.', '-' (and not 'server')")
    written = []
    for name, role_dir in [(SERVER_NAME, None), *roles]:
        public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
        if not secret.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            public, secret = (Path(p) for p in zmq.auth.create_certificates(str(folder), name))
            written += [public, secret]
        if role_dir is not None:
            target = folder / role_dir / public.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(public, target)
            written.append(target)
    return written


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a ZeroMQ certificate ({exc}): make keys with `memseg-edge keys DIR`") from exc
    if need_secret and not secret:
        raise ValueError(f"{path} holds no secret key: pass the .key_secret file's folder")
    return public, secret


def load_server_keys(folder: str | Path) -> CurveServer:
    """The runtime's keys from ``folder`` (``server.key_secret``; clients in ``authorized/``, ``stations/``,
    ``subscribers/``)."""
    folder = Path(folder)
    secret_file = folder / f"{SERVER_NAME}.key_secret"
    if not secret_file.is_file():
        raise ValueError(f"{secret_file} not found: make the keys with `memseg-edge keys {folder}` "
                         "(the runtime's machine needs server.key_secret and the authorized/ folder)")
    public, secret = _load(secret_file, need_secret=True)
    authorized = folder / AUTHORIZED_DIR
    if not any(any((folder / d).glob("*.key")) for d in (AUTHORIZED_DIR, *ROLE_DIRS.values())):
        raise ValueError(f"no client keys in {authorized}, {folder / 'stations'} or {folder / 'subscribers'}: with "
                         "CurveZMQ the runtime accepts only stations and PLC gateways whose public key is there "
                         f"(`memseg-edge keys {folder} --client NAME` adds one)")
    return CurveServer(public, secret, authorized)


def load_client_keys(folder: str | Path, name: str | None = None) -> CurveClient:
    """A station's or gateway's keys from ``folder``: ``server.key`` and ``<name>.key_secret`` (``name``
    may be omitted when the folder holds one client secret)."""
    folder = Path(folder)
    server_file = folder / f"{SERVER_NAME}.key"
    if not server_file.is_file():
        raise ValueError(f"{server_file} not found: copy the runtime's server.key (its public key) into {folder}")
    server_public, _ = _load(server_file, need_secret=False)
    if name is None:
        candidates = sorted(p for p in folder.glob("*.key_secret") if p.stem != SERVER_NAME)
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise ValueError(f"expected one client secret key (NAME.key_secret) in {folder}, found {found}: "
                             "pass --curve-client NAME")
        secret_file = candidates[0]
    else:
        secret_file = folder / f"{name}.key_secret"
        if not secret_file.is_file():
            raise ValueError(f"{secret_file} not found: make it with `memseg-edge keys {folder} --client {name}`")
    public, secret = _load(secret_file, need_secret=True)
    return CurveClient(public, secret, server_public)


def secure_server(sock: Any, keys: CurveServer | None, role: str | None = None) -> None:
    """Make a bound socket a CurveZMQ server (before ``bind``) that admits the clients of ``role``
    (a key of :data:`ROLE_DIRS`; None: the ``authorized/`` clients only)."""
    if keys is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    if role is not None:
        sock.zap_domain = role.encode()


def allow_ipv6(sock: Any, url: str) -> None:
    """libzmq binds and connects to IPv6 addresses (``tcp://[::1]:5555``) only with the IPV6 option set."""
    if url.startswith("tcp://["):
        import zmq

        sock.setsockopt(zmq.IPV6, 1)


def secure_client(sock: Any, keys: CurveClient | None) -> None:
    """Make a connecting socket a CurveZMQ client (before ``connect``)."""
    if keys is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


def start_authenticator(ctx: Any, keys: CurveServer | None):
    """The ZAP handler that admits only authorized client keys (a thread of pyzmq's); ``None`` without keys."""
    if keys is None:
        return None
    from zmq.auth.thread import ThreadAuthenticator

    import zmq.auth

    def public_keys(folder: Path) -> set[bytes]:
        return set(zmq.auth.load_certificates(str(folder))) if folder.is_dir() else set()

    class _Role:
        """ZAP credentials for one domain: the authorized/ keys and the role's own."""
        def __init__(self, allowed: set[bytes]):
            self.allowed = allowed

        def callback(self, domain: str, z85_key: bytes) -> bool:
            return z85_key in self.allowed

    everyone = public_keys(keys.authorized)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    for domain, sub in ROLE_DIRS.items():
        auth.configure_curve_callback(domain, credentials_provider=_Role(everyone | public_keys(keys.authorized.parent / sub)))
    auth.configure_curve_callback("*", credentials_provider=_Role(everyone))
    return auth
