"""Plant-side commands: plc-gateway, opcua-cert, hmi (registered on the main group by cli.py).

Each is a thin layer over a Python API a test can call directly (:mod:`memseg_edge.gateway`,
:mod:`memseg_edge.hmi`). asyncua, pymodbus and prometheus-client are imported when a command runs, never
when the CLI loads (they are the ``plant`` extra).
"""
from __future__ import annotations

import threading
from pathlib import Path

import click

from .runtime_cli import ENDPOINT_HELP, _client_keys, _curve_client_options, _endpoint, _log, _Signals

PLANT_EXTRA = "pip install 'memseg-edge[plant]'"


def _need(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise click.ClickException(f"{what} needs {module}, which is not installed: {PLANT_EXTRA}")


@click.command("plc-gateway", context_settings={"max_content_width": 110})
@click.argument("results_endpoint", metavar="RESULTS_ENDPOINT")
@click.option("--opcua", "opcua_port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
              help="Serve OPC UA on opc.tcp://HOST:PORT/ (4840 is the usual port; 0: a free one, reported).")
@click.option("--modbus", "modbus_port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
              help="Serve Modbus TCP on PORT (502 is the usual port and needs root on Linux; 0: a free one).")
@click.option("--mode", type=click.Choice(["handshake", "latest"]), default="handshake", show_default=True,
              help="handshake: each camera's results in order, the next only after the PLC wrote the current "
                   "seq to Ack; latest: always the newest result, no Ack.")
@click.option("--stale-ms", type=click.FloatRange(min=10), default=3000.0, show_default=True,
              help="No runtime heartbeat for this long: Healthy and Pass go false. Keep it above the runtime's "
                   "--heartbeat period.")
@click.option("--backlog", type=click.IntRange(min=1), default=64, show_default=True,
              help="Handshake: results held per camera behind the one on show; beyond it the oldest is dropped, "
                   "counted in Overflows and flagged until the backlog drains.")
@click.option("--camera", "cameras", multiple=True, metavar="NAME",
              help="Create this camera's OPC UA object and Modbus slot at start-up, in this order (repeatable); "
                   "others are added as their first verdict arrives.")
@click.option("--modbus-slots", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Camera slots in the Modbus map (32 holding registers and 8 coils each).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface the OPC UA, Modbus and metrics servers listen on (0.0.0.0: every interface).")
@click.option("--metrics", "metrics_port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
              help="Serve Prometheus metrics on http://HOST:PORT/metrics (backlog, acks, heartbeat age, stale time).")
@click.option("--opcua-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="OPC UA security on: the gateway's certificate (DER), made by `memseg-edge opcua-cert DIR`.")
@click.option("--opcua-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The gateway's private key (PEM) for --opcua-cert.")
@click.option("--opcua-trust", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of client certificates allowed to connect (default: trusted/ beside --opcua-cert).")
@click.option("--opcua-security", type=click.Choice(["both", "sign", "sign-encrypt"]), default="both",
              show_default=True, help="Basic256Sha256 modes offered with --opcua-cert.")
@click.option("--opcua-anonymous", is_flag=True,
              help="With --opcua-cert: also accept the anonymous user (still over a trusted, secured channel).")
@_curve_client_options
def plc_gateway_cmd(results_endpoint, opcua_port, modbus_port, mode, stale_ms, backlog, cameras, modbus_slots, host,
                    metrics_port, opcua_cert, opcua_key, opcua_trust, opcua_security, opcua_anonymous, curve_keys,
                    curve_client):
    """Serve a runtime's verdicts (RESULTS_ENDPOINT: its --results) to PLCs over OPC UA and Modbus TCP.

    \b
    Examples:
      memseg-edge plc-gateway 5556 --opcua 4840 --modbus 5020
      memseg-edge plc-gateway line3-edge:5556 --opcua 4840 --host 0.0.0.0 \\
          --opcua-cert pki/server.der --opcua-key pki/server.pem --stale-ms 2000 --metrics 9101

    OPC UA: Objects/MemSegEdge/<camera>/{Verdict, Pass, Score, Threshold, FrameId, Seq, LatencyMs, Model,
    Healthy, PassCount, FailCount, ErrorCount, Ack, ...} in namespace urn:memseg-edge. Modbus: 32 holding
    registers per camera slot (map in the module memseg_edge.gateway.modbus and README). Pass is true only
    for a fresh PASS with the runtime's heartbeat younger than --stale-ms, no lost verdict and no
    backlog overflow; the gateway's own start-up reads not-PASS.
    """
    from .gateway.service import Gateway, GatewayConfig

    for module, what, wanted in (("asyncua", "--opcua", opcua_port is not None),
                                 ("pymodbus", "--modbus", modbus_port is not None),
                                 ("prometheus_client", "--metrics", metrics_port is not None)):
        if wanted:
            _need(module, what)
    url = _endpoint(results_endpoint, bind=False, option="RESULTS_ENDPOINT")
    security = None
    if opcua_cert or opcua_key:
        if not (opcua_cert and opcua_key and opcua_port is not None):
            raise click.UsageError("OPC UA security needs --opcua PORT, --opcua-cert and --opcua-key")
        from .gateway.opcua import OpcUaSecurity

        trust = Path(opcua_trust) if opcua_trust else Path(opcua_cert).parent / "trusted"
        security = OpcUaSecurity(Path(opcua_cert), Path(opcua_key), trust, opcua_security, opcua_anonymous)
    elif opcua_anonymous or opcua_trust:
        raise click.UsageError("--opcua-anonymous and --opcua-trust only apply with --opcua-cert/--opcua-key")
    if host in ("0.0.0.0", "::", "*") and opcua_port is not None and security is None:
        _log("warning: OPC UA listens on every interface without security: anyone on the network can read verdicts "
             "and write Ack (use --opcua-cert)")
    try:
        config = GatewayConfig(results=url, opcua_port=opcua_port, modbus_port=modbus_port, host=host, mode=mode,
                               stale_ms=stale_ms, backlog=backlog, cameras=tuple(cameras), modbus_slots=modbus_slots,
                               metrics_port=metrics_port, opcua_security=security,
                               curve=_client_keys(curve_keys, curve_client))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    gateway = Gateway(config, log=_log)
    try:
        gateway.start(timeout=120)
    except (OSError, ValueError, RuntimeError) as exc:
        raise click.ClickException(f"the gateway could not start: {exc}") from None
    parts = [f"verdicts from {url}", f"mode {mode}", f"stale after {stale_ms:g} ms"]
    if gateway.opcua_port:
        parts.append(f"OPC UA on opc.tcp://{host}:{gateway.opcua_port}/"
                     + (f" (Basic256Sha256 {opcua_security})" if security else " (no security, anonymous)"))
    if gateway.modbus_port:
        parts.append(f"Modbus TCP on {host}:{gateway.modbus_port}")
    if gateway.metrics_port:
        parts.append(f"metrics on http://{host}:{gateway.metrics_port}/metrics")
    _log("ready: " + "; ".join(parts))
    done = threading.Event()
    with _Signals(done.set, "stopping the gateway"):
        while not done.wait(0.2):
            if gateway._thread is not None and not gateway._thread.is_alive():
                break
    gateway.stop()
    if gateway._error is not None:
        raise click.ClickException(f"the gateway stopped: {gateway._error}")


@click.command("opcua-cert", context_settings={"max_content_width": 110})
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--client", "clients", multiple=True, metavar="NAME",
              help="Also make a client pair NAME.der/NAME.pem and trust it (repeatable).")
@click.option("--host", default="localhost", show_default=True,
              help="Host name in the certificates' subject alternative names.")
@click.option("--days", type=click.IntRange(min=1), default=3650, show_default=True, help="Validity.")
def opcua_cert_cmd(folder, clients, host, days):
    """Make self-signed OPC UA certificates for `plc-gateway --opcua-cert` (as `keys` does for CurveZMQ).

    \b
    Writes, in FOLDER:
      server.der, server.pem     the gateway's certificate and private key
      NAME.der, NAME.pem         one pair per --client (a PLC, SCADA or test client)
      trusted/NAME.der           the client certificates the gateway accepts
    Existing files are kept. A PLC that makes its own certificate: copy it (DER) into trusted/.
    Application URIs: urn:memseg-edge:plc-gateway (gateway), urn:memseg-edge:client:NAME (clients).
    """
    _need("asyncua", "opcua-cert")
    from .gateway.opcua import make_certificate

    for name in ("server", *clients):
        if name != "server" and (not name.replace("-", "").replace("_", "").isalnum()):
            raise click.BadParameter(f"{name!r}: use letters, digits, '-' and '_'", param_hint="--client")
        for path in make_certificate(folder, name, host=host, days=days):
            click.echo(f"{path}")


@click.command("hmi", context_settings={"max_content_width": 110})
@click.option("--results", required=True, metavar="ENDPOINT",
              help="The runtime's verdict endpoint (its --results). " + ENDPOINT_HELP)
@click.option("--previews", required=True, metavar="ENDPOINT", help="The runtime's preview endpoint (its --previews).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="HTTP port of the page.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface the page is served on (0.0.0.0: the panel PC is another machine).")
@click.option("--stale-ms", type=click.FloatRange(min=10), default=3000.0, show_default=True,
              help="No heartbeat for this long: the screen says the runtime is silent.")
@_curve_client_options
def hmi_cmd(results, previews, port, host, stale_ms, curve_keys, curve_client):
    """The operator screen: a web page with, per camera, the latest frame and its anomaly overlay, verdict,
    score against the threshold, counters, reject rate and the last rejects; runtime health and model.

    \b
    Examples:
      memseg-edge hmi --results 5556 --previews 5557            # then open http://127.0.0.1:8080/
      memseg-edge hmi --results line3-edge:5556 --previews line3-edge:5557 --host 0.0.0.0 --port 80

    Live updates by server-sent events; laid out for a 1280x800 panel. It only subscribes: it cannot slow
    the runtime down, and previews it is too slow for are dropped.
    """
    from .hmi import HmiServer

    res_url = _endpoint(results, bind=False, option="--results")
    prev_url = _endpoint(previews, bind=False, option="--previews")
    try:
        server = HmiServer(res_url, prev_url, port=port, host=host, stale_s=stale_ms / 1000.0,
                           curve=_client_keys(curve_keys, curve_client), log=_log)
    except OSError as exc:
        raise click.ClickException(f"cannot serve on {host}:{port}: {exc}") from None
    server.start()
    _log(f"operator screen on {server.url} (verdicts {res_url}, previews {prev_url})")
    done = threading.Event()
    with _Signals(done.set, "stopping the screen"):
        while not done.wait(0.5):
            pass
    server.stop()


def register(group: click.Group) -> None:
    """Add the plant commands to ``group``."""
    for command in (plc_gateway_cmd, opcua_cert_cmd, hmi_cmd):
        group.add_command(command)
