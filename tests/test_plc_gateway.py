"""memseg-edge plc-gateway: the rules (handshake, backlog, fail-safe) and real OPC UA (asyncua) and
Modbus TCP (pymodbus) clients against the gateway on loopback, fed by a real ZeroMQ PUB socket."""
from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest

from memseg_edge import verdicts as vd
from memseg_edge.gateway.state import GatewayState

from gateway_fixtures import FakeRuntime, wait_for

asyncua = pytest.importorskip("asyncua", reason="asyncua absent: pip install 'memseg-edge[plant]'")
pytest.importorskip("pymodbus", reason="pymodbus absent: pip install 'memseg-edge[plant]'")

from memseg_edge.gateway import modbus as mb  # noqa: E402
from memseg_edge.gateway.opcua import NAMESPACE, VARIABLES, OpcUaSecurity, make_certificate  # noqa: E402
from memseg_edge.gateway.service import Gateway, GatewayConfig  # noqa: E402

STALE_MS = 400
CONTRACT = ["Verdict", "Pass", "Score", "Threshold", "FrameId", "Seq", "LatencyMs", "Model", "Healthy",
            "PassCount", "FailCount", "ErrorCount", "Ack"]


def body(seq, camera="top", verdict=vd.PASS, frame_id=None):
    return vd.verdict_body(seq=seq, camera=camera, frame_id=seq if frame_id is None else frame_id, verdict=verdict,
                           score=0.1 if verdict != vd.ERROR else None, threshold=0.5, latency_ms=1.0, model="m",
                           error="x" if verdict == vd.ERROR else None)


# ------------------------------------------------------------------------------------------------
# the rules, without a network
# ------------------------------------------------------------------------------------------------

def test_nothing_passes_before_the_first_heartbeat():
    st = GatewayState(("p",))
    st.on_verdict(body(1))
    v = st.view("p", "top")
    assert v.verdict == "PASS" and v.starting and not v.healthy and not v.passed and v.failed


def test_handshake_presents_the_next_result_only_after_its_ack():
    st = GatewayState(("p",))
    st.on_heartbeat({"seq": 0})
    for seq in (1, 2, 3):
        st.on_verdict(body(seq))
    assert st.view("p", "top").seq == 1 and st.view("p", "top").backlog == 2
    assert not st.ack("p", "top", 2)          # not the one on show: ignored
    assert st.view("p", "top").seq == 1
    assert st.ack("p", "top", 1)
    assert st.view("p", "top").seq == 2
    st.ack("p", "top", 2)
    st.ack("p", "top", 3)
    v = st.view("p", "top")
    assert v.seq == 3 and v.verdict == "PASS" and not v.passed and not v.failed   # consumed: never a stale PASS


def test_backlog_overflow_is_counted_flagged_and_cleared_when_drained():
    st = GatewayState(("p",), backlog=2)
    st.on_heartbeat({"seq": 0})
    for seq in range(1, 6):                    # 1 on show, 2 fit, 2 overflow
        st.on_verdict(body(seq))
    v = st.view("p", "top")
    assert v.overflows == 2 and v.overflowed and not v.healthy and not v.passed
    st.ack("p", "top", 1)
    assert st.view("p", "top").seq == 4       # 2 and 3 were the oldest waiting: dropped
    st.ack("p", "top", 4)
    v = st.view("p", "top")
    assert v.seq == 5 and not v.overflowed and v.healthy and v.passed


def test_a_seq_gap_makes_every_camera_unhealthy_until_it_shows_a_later_result():
    st = GatewayState(("p",), mode="latest")
    st.on_heartbeat({"seq": 0})
    st.on_verdict(body(1, "a"))
    st.on_verdict(body(2, "b"))
    st.on_gap(3, 3)
    assert not st.view("p", "a").passed and not st.view("p", "b").passed and st.view("p", "a").gap
    st.on_verdict(body(4, "a"))
    assert st.view("p", "a").passed and not st.view("p", "b").passed


def test_error_and_a_stalled_pipeline_never_pass():
    st = GatewayState(("p",), mode="latest")
    st.on_heartbeat({"seq": 0})
    st.on_verdict(body(1, verdict=vd.ERROR))
    v = st.view("p", "top")
    assert v.verdict_code == 3 and not v.passed and v.failed and v.error_count == 1
    st.on_verdict(body(2))
    assert st.view("p", "top").passed
    st.on_heartbeat({"seq": 2, "oldest_wait_s": 2.9})            # busy but within --stale-ms
    assert st.view("p", "top").passed
    st.on_heartbeat({"seq": 2, "oldest_wait_s": 3.1})            # alive, but a frame waits too long: stalled
    assert not st.view("p", "top").passed and not st.view("p", "top").healthy


def test_silence_longer_than_stale_turns_health_off():
    now = [0.0]
    st = GatewayState(("p",), mode="latest", stale_s=0.5, clock=lambda: now[0])
    st.on_heartbeat({"seq": 0})
    st.on_verdict(body(1))
    now[0] = 0.49
    assert st.view("p", "top").passed
    now[0] = 0.51
    assert not st.view("p", "top").passed and st.view("p", "top").stale


# ------------------------------------------------------------------------------------------------
# real clients on loopback
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def line():
    rt = FakeRuntime(heartbeat_s=0.05).start_heartbeats()
    gw = Gateway(GatewayConfig(results=rt.endpoint, opcua_port=0, modbus_port=0, stale_ms=STALE_MS, metrics_port=0,
                               cameras=("top",)), log=lambda m: None).start()
    wait_for(lambda: gw.state.runtime_healthy(), timeout=10)
    yield rt, gw
    gw.stop()
    rt.close()


async def _opcua_nodes(client, camera):
    ns = await client.get_namespace_index(NAMESPACE)
    obj = await client.nodes.objects.get_child([f"{ns}:MemSegEdge", f"{ns}:{camera}"])
    return {name: await obj.get_child(f"{ns}:{name}") for name, _, _ in VARIABLES}


async def _opcua_values(client, nodes, names):
    values = await client.read_values([nodes[n] for n in names])
    return dict(zip(names, values))


class _Queue:
    def __init__(self):
        self.items = asyncio.Queue()

    def datachange_notification(self, node, val, data):
        self.items.put_nowait(val)


async def _opcua_handshake(port, camera, n, timeout=20.0):
    """A SCADA-style client: subscribe to Seq with a queue, read the result, write Ack; n results."""
    from asyncua import Client, ua

    got, notified = [], []
    async with Client(f"opc.tcp://127.0.0.1:{port}/", timeout=10) as client:
        nodes = await _opcua_nodes(client, camera)
        handler = _Queue()
        sub = await client.create_subscription(5, handler)
        await sub.subscribe_data_change(nodes["Seq"], queuesize=1000)
        end = time.monotonic() + timeout
        acked = (await _opcua_values(client, nodes, ["Ack"]))["Ack"]
        while len(got) < n and time.monotonic() < end:
            try:
                seq = await asyncio.wait_for(handler.items.get(), 0.5)
            except asyncio.TimeoutError:
                continue
            notified.append(seq)
            if seq == 0 or seq == acked:
                continue
            v = await _opcua_values(client, nodes, ["Seq", "FrameId", "Verdict", "Score", "Pass"])
            assert v["Seq"] == seq
            got.append(v)
            await nodes["Ack"].write_value(ua.Variant(seq, ua.VariantType.UInt32))
            acked = seq
        await sub.delete()
    return got, [s for s in notified if s != 0]


async def _modbus_handshake(port, slot, n, timeout=20.0):
    from pymodbus.client import AsyncModbusTcpClient

    got = []
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    base = slot * mb.BLOCK_REGISTERS
    end = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        regs = (await client.read_holding_registers(base, count=mb.BLOCK_REGISTERS)).registers
        if not regs[mb.R_STATUS] & (1 << 7):      # no new result waiting for Ack
            await asyncio.sleep(0.005)
            continue
        seq = (regs[mb.R_SEQ] << 16) | regs[mb.R_SEQ + 1]
        coils = (await client.read_coils(slot * mb.COILS_PER_SLOT, count=mb.COILS_PER_SLOT)).bits
        got.append({"Seq": seq, "FrameId": (regs[mb.R_FRAME_ID] << 16) | regs[mb.R_FRAME_ID + 1],
                    "Verdict": mb.VERDICT_NAMES[regs[mb.R_VERDICT]], "Score": regs[mb.R_SCORE] / 1000.0,
                    "Pass": coils[mb.C_PASS]})
        rr = await client.write_registers(base + mb.R_ACK, [regs[mb.R_SEQ], regs[mb.R_SEQ + 1]])
        assert not rr.isError()
    client.close()
    return got


def test_opcua_address_space_is_the_contract(line):
    from asyncua import Client

    rt, gw = line

    async def browse():
        async with Client(f"opc.tcp://127.0.0.1:{gw.opcua_port}/", timeout=10) as client:
            ns = await client.get_namespace_index(NAMESPACE)
            root = await client.nodes.objects.get_child(f"{ns}:MemSegEdge")
            cams = [(await c.read_browse_name()) for c in await root.get_children()]
            obj = await root.get_child(f"{ns}:top")
            names = [(await c.read_browse_name()).Name for c in await obj.get_children()]
            endpoints = await client.get_endpoints()
            return cams, names, endpoints

    cams, names, endpoints = asyncio.run(browse())
    assert [(c.NamespaceIndex > 0, c.Name) for c in cams] == [(True, "top")]
    assert set(CONTRACT) <= set(names)
    assert {e.EndpointUrl for e in endpoints} == {f"opc.tcp://127.0.0.1:{gw.opcua_port}/"}
    assert {e.SecurityPolicyUri.rsplit("#", 1)[1] for e in endpoints} == {"None"}


def test_opcua_and_modbus_handshakes_each_get_every_result_once_in_order(line):
    rt, gw = line
    n = 30
    verdicts = [vd.FAIL if i % 4 == 1 else vd.ERROR if i % 7 == 3 else vd.PASS for i in range(n)]

    async def both():
        opc = asyncio.create_task(_opcua_handshake(gw.opcua_port, "top", n))
        mod = asyncio.create_task(_modbus_handshake(gw.modbus_port, 0, n))
        await asyncio.sleep(0.5)                      # both clients subscribed / polling
        first = len(rt.sent)
        for i, verdict in enumerate(verdicts):
            rt.verdict("top", 1000 + i, verdict, score=None if verdict == vd.ERROR else 0.2 + i / 100)
        return await opc, await mod, rt.sent[first:]

    (opc, opc_seqs), mod, sent = asyncio.run(both())
    want = [(b["seq"], b["frame_id"], b["verdict"]) for b in sent]
    assert [(v["Seq"], v["FrameId"], v["Verdict"]) for v in opc] == want
    assert [(v["Seq"], v["FrameId"], v["Verdict"]) for v in mod] == want
    assert opc_seqs == [b["seq"] for b in sent]         # exactly one notification per result
    for got_opc, got_mod, b in zip(opc, mod, sent):
        if b["verdict"] == vd.ERROR:
            assert got_opc["Score"] != got_opc["Score"] and got_mod["Score"] == 65.535   # NaN / "absent"
        else:
            assert got_opc["Score"] == pytest.approx(b["score"]) and got_mod["Score"] == pytest.approx(b["score"], abs=1e-3)
        assert got_opc["Pass"] is (b["verdict"] == vd.PASS) and got_mod["Pass"] is (b["verdict"] == vd.PASS)


def test_modbus_refuses_writes_outside_the_ack_registers(line):
    from pymodbus.client import AsyncModbusTcpClient

    rt, gw = line

    async def writes():
        client = AsyncModbusTcpClient("127.0.0.1", port=gw.modbus_port)
        await client.connect()
        out = {
            "verdict": await client.write_register(mb.R_VERDICT, 1),
            "seq_and_ack": await client.write_registers(mb.R_SEQ, [0, 0, 0, 0]),
            "score": await client.write_register(mb.R_SCORE, 0),
            "coil_pass": await client.write_coil(mb.C_PASS, True),
            "coils": await client.write_coils(0, [True] * 3),
            "ack": await client.write_register(mb.R_ACK + 1, 0),
        }
        client.close()
        return out

    out = asyncio.run(writes())
    for name in ("verdict", "seq_and_ack", "score", "coil_pass", "coils"):
        assert out[name].isError() and out[name].exception_code == 2, name     # illegal data address
    assert not out["ack"].isError()


def test_silence_turns_healthy_and_pass_false_within_stale_ms_and_recovery(line):
    from asyncua import Client, ua
    from pymodbus.client import AsyncModbusTcpClient

    rt, gw = line

    async def scenario():
        async with Client(f"opc.tcp://127.0.0.1:{gw.opcua_port}/", timeout=10) as client:
            nodes = await _opcua_nodes(client, "top")
            mbc = AsyncModbusTcpClient("127.0.0.1", port=gw.modbus_port)
            await mbc.connect()
            # drain what earlier tests left, then show one unacknowledged PASS
            for _ in range(200):
                v = await _opcua_values(client, nodes, ["Seq", "Ack", "Backlog"])
                if v["Seq"] == v["Ack"] and v["Backlog"] == 0:
                    break
                await nodes["Ack"].write_value(ua.Variant(v["Seq"], ua.VariantType.UInt32))
            while True:
                regs = (await mbc.read_holding_registers(0, count=mb.BLOCK_REGISTERS)).registers
                if not regs[mb.R_STATUS] & (1 << 7):
                    break
                await mbc.write_registers(mb.R_ACK, regs[mb.R_SEQ:mb.R_SEQ + 2])
            b = rt.verdict("top", 77, vd.PASS)

            async def state():
                v = await _opcua_values(client, nodes, ["Healthy", "Pass", "Seq"])
                bits = (await mbc.read_coils(0, count=mb.COILS_PER_SLOT)).bits
                return v["Healthy"], v["Pass"], v["Seq"], bits[mb.C_HEALTHY], bits[mb.C_PASS]

            for _ in range(200):
                s = await state()
                if s[2] == b["seq"]:
                    break
                await asyncio.sleep(0.01)
            assert s == (True, True, b["seq"], True, True)
            rt.stop_heartbeats()
            stopped = time.monotonic()
            off_at = None
            while time.monotonic() - stopped < 3.0:
                s = await state()
                if s[0] is False and s[1] is False and s[3] is False and s[4] is False:
                    off_at = time.monotonic() - stopped
                    break
                await asyncio.sleep(0.01)
            rt.start_heartbeats()
            back_at = None
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3.0:
                s = await state()
                if s == (True, True, b["seq"], True, True):   # the unconsumed PASS is valid again
                    back_at = time.monotonic() - t0
                    break
                await asyncio.sleep(0.01)
            mbc.close()
            return off_at, back_at

    off_at, back_at = asyncio.run(scenario())
    assert off_at is not None, "Healthy/Pass stayed true with the runtime silent"
    # the last heartbeat left up to one heartbeat period before the stop
    assert off_at <= STALE_MS / 1000.0 + 0.15, f"took {off_at * 1000:.0f} ms, --stale-ms is {STALE_MS}"
    assert off_at >= STALE_MS / 1000.0 - rt.heartbeat_s - 0.02, "went stale before --stale-ms"
    assert back_at is not None and back_at < 1.0


def test_gateway_metrics_scrape(line):
    from prometheus_client.parser import text_string_to_metric_families

    rt, gw = line
    text = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5).read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    st = gw.state
    assert samples[("memseg_gateway_acks_total", (("camera", "top"), ("protocol", "opcua")))] == \
        st.channels["opcua"]["top"].acks > 0
    assert samples[("memseg_gateway_backlog", (("camera", "top"), ("protocol", "modbus")))] == \
        len(st.channels["modbus"]["top"].queue)
    assert samples[("memseg_gateway_results_total", (("camera", "top"), ("verdict", "PASS")))] == \
        st.channels["opcua"]["top"].counts["PASS"] > 0
    assert samples[("memseg_gateway_heartbeats_total", ())] > 0
    assert samples[("memseg_gateway_stale_seconds_total", ())] > 0      # start-up and the silence test
    assert 0 <= samples[("memseg_gateway_heartbeat_age_seconds", ())] < STALE_MS / 1000.0


def test_modbus_gateway_start_up_gap_and_error_read_not_pass():
    rt = FakeRuntime(heartbeat_s=0.05)
    gw = Gateway(GatewayConfig(results=rt.endpoint, modbus_port=0, mode="latest", stale_ms=STALE_MS),
                 log=lambda m: None).start()
    from pymodbus.client import AsyncModbusTcpClient

    async def read():
        client = AsyncModbusTcpClient("127.0.0.1", port=gw.modbus_port)
        await client.connect()
        regs = (await client.read_holding_registers(0, count=mb.BLOCK_REGISTERS)).registers
        bits = (await client.read_coils(0, count=2 * mb.COILS_PER_SLOT)).bits
        client.close()
        return regs, bits

    try:
        time.sleep(0.3)                                           # subscriber connected
        rt.verdict("top", 1, vd.PASS)                             # no heartbeat yet: gateway starting
        wait_for(lambda: gw.state.verdicts == 1)
        regs, bits = asyncio.run(read())
        assert regs[mb.R_VERDICT] == 1 and regs[mb.R_STATUS] & (1 << 6) and not bits[mb.C_PASS]
        rt.start_heartbeats()
        wait_for(lambda: gw.state.runtime_healthy())
        regs, bits = asyncio.run(read())
        assert bits[mb.C_PASS] and bits[mb.C_HEALTHY] and regs[mb.R_WATCHDOG] > 0
        w0 = regs[mb.R_WATCHDOG]
        time.sleep(0.2)
        assert asyncio.run(read())[0][mb.R_WATCHDOG] > w0             # the watchdog moves with heartbeats
        rt.verdict("side", 1, vd.PASS)
        rt.verdict("top", 2, vd.PASS, skip=1)                         # a verdict was lost before this one
        wait_for(lambda: gw.state.gaps == 1 and gw.state.verdicts == 3)
        regs, bits = asyncio.run(read())
        side = slice(mb.COILS_PER_SLOT, 2 * mb.COILS_PER_SLOT)
        # the lost verdict's camera is unknown: "side" (last result before the gap) is not healthy, "top"
        # (showing a result after the gap) is
        assert bits[mb.C_PASS] and bits[mb.C_HEALTHY]
        assert not bits[side][mb.C_PASS] and not bits[side][mb.C_HEALTHY]
        rt.verdict("top", 3, vd.ERROR, score=None)
        wait_for(lambda: gw.state.verdicts == 4)
        regs, bits = asyncio.run(read())
        assert regs[mb.R_VERDICT] == 3 and not bits[mb.C_PASS] and bits[mb.C_FAIL]
        assert (regs[mb.R_ERROR_COUNT] << 16 | regs[mb.R_ERROR_COUNT + 1]) == 1
        name = b"".join(r.to_bytes(2, "big") for r in regs[mb.NAME_OFFSET:mb.NAME_OFFSET + mb.NAME_REGISTERS])
        assert name.rstrip(b"\0") == b"top"
    finally:
        gw.stop()
        rt.close()


# ------------------------------------------------------------------------------------------------
# OPC UA security
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("allow_anonymous", [False, True])
def test_opcua_with_security_refuses_clients_without_a_trusted_certificate(tmp_path, monkeypatch, allow_anonymous):
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    pki = tmp_path / "pki"
    server_cert, server_key = make_certificate(pki, "server")
    client_cert, client_key = make_certificate(pki, "scada")
    stranger = tmp_path / "stranger"
    other_cert, other_key = make_certificate(stranger, "intruder")
    rt = FakeRuntime(heartbeat_s=0.05).start_heartbeats()
    sec = OpcUaSecurity(server_cert, server_key, pki / "trusted", allow_anonymous=allow_anonymous)
    gw = Gateway(GatewayConfig(results=rt.endpoint, opcua_port=0, stale_ms=STALE_MS, opcua_security=sec),
                 log=lambda m: None).start()
    url = f"opc.tcp://127.0.0.1:{gw.opcua_port}/"
    wait_for(lambda: gw.state.runtime_healthy())        # subscribed (a PUB drops what it sends before)
    rt.verdict("top", 5, vd.FAIL)
    wait_for(lambda: gw.state.verdicts == 1)

    async def attempt(cert=None, key=None, name="scada", identity=True, mode=ua.MessageSecurityMode.SignAndEncrypt):
        client = Client(url, timeout=5)
        client.application_uri = f"urn:memseg-edge:client:{name}"
        if cert is not None:
            await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key), mode=mode)
            if identity:
                await client.load_client_certificate(str(cert))
                await client.load_private_key(str(key))
        try:
            async with client:
                ns = await client.get_namespace_index(NAMESPACE)
                node = await client.nodes.objects.get_child([f"{ns}:MemSegEdge", f"{ns}:top", f"{ns}:Verdict"])
                return await node.read_value()
        except Exception as exc:   # noqa: BLE001 - the refusal is the point
            return exc

    try:
        endpoints = asyncio.run(_endpoints(url))
        assert {e.SecurityPolicyUri.rsplit("#", 1)[1] for e in endpoints} == {"Basic256Sha256"}
        assert {e.SecurityMode.name for e in endpoints} == {"Sign", "SignAndEncrypt"}
        assert isinstance(asyncio.run(attempt()), Exception)                               # no security at all
        assert isinstance(asyncio.run(attempt(other_cert, other_key, "intruder")), Exception)  # untrusted cert
        anonymous = asyncio.run(attempt(client_cert, client_key, identity=False))
        assert anonymous == "FAIL" if allow_anonymous else isinstance(anonymous, Exception)
        assert asyncio.run(attempt(client_cert, client_key)) == "FAIL"
        assert asyncio.run(attempt(client_cert, client_key, mode=ua.MessageSecurityMode.Sign)) == "FAIL"
        # a hand-made client that ignores the endpoint list and asks for a session on the unsecured
        # discovery channel (asyncua's server keeps that channel open) is refused too
        monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda endpoints, mode, uri: endpoints[0]))
        sneaky = asyncio.run(attempt())
        assert isinstance(sneaky, ua.UaStatusCodeError), sneaky
    finally:
        gw.stop()
        rt.close()


async def _endpoints(url):
    from asyncua import Client

    client = Client(url, timeout=5)
    return await client.connect_and_get_server_endpoints()


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------

def test_plc_gateway_command_says_what_is_missing(tmp_path):
    from click.testing import CliRunner

    from memseg_edge.cli import main

    out = CliRunner().invoke(main, ["plc-gateway", "5556"])
    assert out.exit_code == 2 and "--opcua PORT and/or --modbus PORT" in out.output
    out = CliRunner().invoke(main, ["plc-gateway", "5556", "--opcua", "4840", "--opcua-anonymous"])
    assert out.exit_code == 2 and "only apply with --opcua-cert" in out.output
    out = CliRunner().invoke(main, ["opcua-cert", str(tmp_path / "pki"), "--client", "plc1"])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (tmp_path / "pki").rglob("*.der")) == ["plc1.der", "plc1.der", "server.der"]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = CliRunner().invoke(main, ["plc-gateway", "5556", "--opcua", "0", "--opcua-cert",
                                    str(tmp_path / "pki" / "server.der"), "--opcua-key",
                                    str(tmp_path / "pki" / "server.pem"), "--opcua-trust", str(empty)])
    assert out.exit_code != 0 and "no client certificates in" in out.output
