"""The OPC UA face of the gateway (asyncua): one object per camera under ``Objects/MemSegEdge``.

Address space (namespace ``urn:memseg-edge``; every variable read-only except ``Ack``)::

    Objects/MemSegEdge/<camera>/
        Verdict     String   "PASS" | "FAIL" | "ERROR" ("" before the first result)
        Pass        Boolean  true only for a fresh PASS with the gateway healthy (gateway/state.py)
        Score       Double   NaN for ERROR
        Threshold   Double
        FrameId     Int64    -1 when the frame had no integer id
        Seq         UInt32   the runtime's seq of the result on show (0 before the first)
        LatencyMs   Double   frame received -> verdict sent, in the runtime
        Model       String   sha256 prefix of the model that judged
        Healthy     Boolean  heartbeat fresh, no seq gap, no backlog overflow
        PassCount, FailCount, ErrorCount   UInt32   results received for this camera since start-up
        Ack         UInt32   written by the PLC: the Seq it has consumed (handshake mode)
        Timestamp   DateTime when the gateway received the result
        Backlog     UInt32   results waiting behind the one on show
        Overflows   UInt32   results dropped because the backlog was full

Handshake for a PLC or SCADA client: subscribe to (or poll) ``Seq``; when it differs from what was
written to ``Ack``, read the other values, act, then write that ``Seq`` to ``Ack`` (as UInt32). The
gateway writes ``Seq`` after the other values of a result, so a notification of ``Seq`` means the
rest is already in place.

Security: without a certificate the endpoint is ``opc.tcp://HOST:PORT/``, anonymous, no security (a
bench setting, like plain ZeroMQ). With one, only ``Basic256Sha256`` Sign and SignAndEncrypt are
offered, client application certificates must be in the trust folder, and the user must identify with
an X.509 certificate unless anonymous users are allowed explicitly.
"""
from __future__ import annotations

import asyncio
import datetime
import math
from dataclasses import dataclass
from pathlib import Path

NAMESPACE = "urn:memseg-edge"
ROOT_NAME = "MemSegEdge"
APPLICATION_URI = "urn:memseg-edge:plc-gateway"
CLIENT_URI_PREFIX = "urn:memseg-edge:client:"

# (browse name, variant type name, View attribute or None)
VARIABLES = (
    ("Verdict", "String", "verdict"),
    ("Pass", "Boolean", "passed"),
    ("Score", "Double", "score"),
    ("Threshold", "Double", "threshold"),
    ("FrameId", "Int64", "frame_id"),
    ("LatencyMs", "Double", "latency_ms"),
    ("Model", "String", "model"),
    ("Healthy", "Boolean", "healthy"),
    ("PassCount", "UInt32", "pass_count"),
    ("FailCount", "UInt32", "fail_count"),
    ("ErrorCount", "UInt32", "error_count"),
    ("Timestamp", "DateTime", "timestamp"),
    ("Backlog", "UInt32", "backlog"),
    ("Overflows", "UInt32", "overflows"),
    ("Seq", "UInt32", "seq"),            # last: a change of Seq means the result is complete
    ("Ack", "UInt32", None),
)
SECURITY_MODES = {"sign": ("Basic256Sha256_Sign",), "sign-encrypt": ("Basic256Sha256_SignAndEncrypt",),
                  "both": ("Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt")}


@dataclass(frozen=True)
class OpcUaSecurity:
    """``certificate`` (DER) and ``private_key`` (PEM) of the gateway; ``trusted``: folder of client
    certificates (DER or PEM) allowed to connect; ``modes``: a key of ``SECURITY_MODES``."""
    certificate: Path
    private_key: Path
    trusted: Path
    modes: str = "both"
    allow_anonymous: bool = False


class OpcUaFace:
    """Serves :class:`memseg_edge.gateway.state.GatewayState` to OPC UA clients. Call :meth:`changed`
    (on the loop's thread) after the state changed; values are written in order by one task."""

    protocol = "opcua"

    def __init__(self, state, port: int, host: str = "127.0.0.1", security: OpcUaSecurity | None = None,
                 log=print):
        self.state = state
        self.port = int(port)
        self.host = host
        self.security = security
        self.log = log
        self.server = None
        self._ns = 0
        self._root = None
        self._nodes: dict[str, dict[str, object]] = {}
        self._last: dict[object, object] = {}
        self._pending: list = []
        self._wake = asyncio.Event()
        self._task = None

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/"

    async def start(self) -> None:
        from asyncua import Server, ua

        if self.security is not None:
            _check_trust(Path(self.security.trusted))
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("memseg-edge PLC gateway")
        await server.set_application_uri(APPLICATION_URI)
        if self.security is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        else:
            await self._secure(server)
        self._ns = await server.register_namespace(NAMESPACE)
        self._root = await server.nodes.objects.add_object(self._ns, ROOT_NAME)
        self.server = server
        for camera in self.state.cameras:
            await self._add_camera(camera)
        await server.start()
        self._task = asyncio.create_task(self._writer())

    async def _secure(self, server) -> None:
        from asyncua import ua
        from asyncua.crypto.truststore import TrustStore
        from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

        sec = self.security
        await server.load_certificate(str(sec.certificate))
        await server.load_private_key(str(sec.private_key))
        server.set_security_policy([getattr(ua.SecurityPolicyType, name) for name in SECURITY_MODES[sec.modes]])
        tokens = [ua.X509IdentityToken] + ([ua.AnonymousIdentityToken] if sec.allow_anonymous else [])
        server.set_identity_tokens(tokens)
        store = TrustStore([Path(sec.trusted)], [])
        await store.load()
        options = (CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT) \
            & ~CertificateValidatorOptions.REVOKED   # no CRL for self-signed plant certificates
        server.set_certificate_validator(CertificateValidator(options, store))
        # asyncua keeps the None channel open for discovery and would let a session be activated on it;
        # a session is admitted only on a channel with a (trusted, validated) client certificate
        server.iserver.set_user_manager(_CertifiedChannelUsers())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.server is not None:
            await self.server.stop()

    def changed(self, camera: str | None) -> None:
        cams = self.state.cameras if camera is None else [camera]
        for cam in cams:
            self._pending.append(self.state.view(self.protocol, cam))
        self._wake.set()

    async def _add_camera(self, camera: str) -> None:
        from asyncua import ua

        obj = await self._root.add_object(self._ns, camera)
        nodes = {}
        for name, vtype, _ in VARIABLES:
            variant = getattr(ua.VariantType, vtype)
            initial = _initial(vtype)
            node = await obj.add_variable(self._ns, name, ua.Variant(initial, variant), datatype=_datatype(vtype))
            nodes[name] = node
        ack = nodes["Ack"]
        await ack.set_writable(True)
        self.server.set_attribute_value_setter(ack.nodeid, self._ack_setter(camera))
        self._nodes[camera] = nodes

    def _ack_setter(self, camera: str):
        def setter(node_data, attr, value) -> None:
            node_data.attributes[attr].value = value
            seq = value.Value.Value if value.Value is not None else None
            if isinstance(seq, int):
                self.state.ack(self.protocol, camera, seq)

        return setter

    async def _writer(self) -> None:
        from asyncua import ua

        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                view = self._pending.pop(0)
                if view.camera not in self._nodes:
                    await self._add_camera(view.camera)
                nodes = self._nodes[view.camera]
                for name, vtype, attr in VARIABLES:
                    if attr is None:
                        continue
                    value = getattr(view, attr)
                    if vtype == "DateTime":
                        value = datetime.datetime.fromtimestamp(value, datetime.timezone.utc) if value else \
                            datetime.datetime(1601, 1, 1, tzinfo=datetime.timezone.utc)
                    node = nodes[name]
                    if _same(self._last.get(node.nodeid), value):
                        continue
                    self._last[node.nodeid] = value
                    await node.write_value(ua.Variant(value, getattr(ua.VariantType, vtype)))


def _check_trust(trusted: Path) -> None:
    if not trusted.is_dir() or not any(p.suffix in (".der", ".pem") for p in trusted.iterdir()):
        raise ValueError(f"no client certificates in {trusted}: with OPC UA security the gateway accepts only "
                         f"clients whose certificate is there (`memseg-edge opcua-cert {trusted.parent} --client "
                         "NAME` makes one, or copy the PLC's certificate there)")


class _CertifiedChannelUsers:
    """asyncua user manager: ``certificate`` is the X.509 identity token's certificate, or for an
    anonymous token the secure channel's client certificate (empty on an unsecured channel)."""

    def get_user(self, iserver, username=None, password=None, certificate=None):
        from asyncua.crypto.permission_rules import User, UserRole

        if not certificate:          # None, or b"" on an unsecured channel
            return None
        return User(role=UserRole.User)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a is not None and type(a) is type(b) and a == b


def _initial(vtype: str):
    return {"String": "", "Boolean": False, "Double": float("nan"), "Int64": -1, "UInt32": 0,
            "DateTime": datetime.datetime(1601, 1, 1, tzinfo=datetime.timezone.utc)}[vtype]


def _datatype(vtype: str):
    from asyncua import ua

    return ua.NodeId(getattr(ua.ObjectIds, vtype))


def make_certificate(folder: str | Path, name: str = "server", *, host: str = "localhost",
                     days: int = 3650) -> tuple[Path, Path]:
    """A self-signed OPC UA application certificate pair in ``folder``: ``NAME.der`` (certificate) and
    ``NAME.pem`` (private key). ``name`` "server" is the gateway's (application URI
    ``urn:memseg-edge:plc-gateway``); any other name is a client's (``urn:memseg-edge:client:NAME``), and
    a copy of its certificate goes to ``trusted/`` so the gateway accepts it. Existing files are kept."""
    from asyncua.crypto import cert_gen
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder = Path(folder)
    (folder / "trusted").mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / f"{name}.der", folder / f"{name}.pem"
    server = name == "server"
    uri = APPLICATION_URI if server else CLIENT_URI_PREFIX + name
    if not key_file.is_file() or not cert_file.is_file():
        key = cert_gen.generate_private_key()
        names = [x509.UniformResourceIdentifier(uri), x509.DNSName(host)]
        cert = cert_gen.generate_self_signed_app_certificate(
            key, f"memseg-edge {name}", {"organizationName": "memseg-edge"}, names,
            extended=[ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH], days=days)
        key_file.write_bytes(cert_gen.dump_private_key_as_pem(key))
        key_file.chmod(0o600)
        cert_file.write_bytes(cert.public_bytes(Encoding.DER))
    if not server:
        (folder / "trusted" / cert_file.name).write_bytes(cert_file.read_bytes())
    return cert_file, key_file
