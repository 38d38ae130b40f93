"""The plant line end to end, every piece real and on loopback: an emulated Basler camera (pylon's
emulator streaming bottle test images, software trigger) -> `memseg-edge run` (the bottle bundle,
onnxruntime) -> `memseg-edge plc-gateway` -> an OPC UA client subscribed with a queue and a Modbus TCP
client, both running the Ack handshake. Then the runtime is killed and restarted."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import cv2
import pytest
import zmq

os.environ.setdefault("PYLON_CAMEMU", "2")      # before pypylon's first import in this process

from memseg_edge.frames import encode  # noqa: E402
from memseg_edge.plc import VerdictListener  # noqa: E402

from conftest import MVTEC, wait_for_line, wait_until  # noqa: E402

pytest.importorskip("asyncua", reason="asyncua absent: pip install 'memseg-edge[plant]'")
pytest.importorskip("pymodbus", reason="pymodbus absent: pip install 'memseg-edge[plant]'")
pytest.importorskip("pypylon", reason="pypylon absent: pip install 'memseg-edge[pylon]'")

from test_plc_gateway import _modbus_handshake, _opcua_handshake, _opcua_nodes, _opcua_values  # noqa: E402

from memseg_edge.gateway import modbus as mb  # noqa: E402

CLI = [sys.executable, "-m", "memseg_edge.cli"]
STALE_MS = 1000
N = 12


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(bundle, frames_url, results_url) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([*CLI, "run", "--model", str(bundle), "--zmq", frames_url, "--results", results_url,
                             "--heartbeat", "0.2", "--threads", "1", "--stats-every", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _emulated_camera(folder):
    from memseg_edge.cameras import CameraSettings
    from memseg_edge.cameras.pylon import PylonCamera, list_cameras

    if not [c for c in list_cameras() if c["serial"] == "0815-0000"]:
        pytest.skip("pylon's camera emulator shows no camera 0815-0000")
    h, w = cv2.imread(str(next(folder.glob("*.png")))).shape[:2]
    features = {"TestImageSelector": "Off", "ImageFileMode": "On", "ImageFilename": str(folder),
                "Width": str(w), "Height": str(h)}
    return PylonCamera("0815-0000", CameraSettings(trigger="software", pixel_format="BGR8Packed", features=features),
                       name="top")


def _push(camera, url: str, count: int) -> list[int]:
    """A camera station: each software-triggered frame, with the camera's own frame id, to the runtime."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(url)
    ids, stop = [], threading.Event()
    for grab in camera.grabs(stop):
        sock.send_multipart(encode(grab.image, "png", camera.name, grab.frame_id))
        ids.append(grab.frame_id)
        if len(ids) == count:
            stop.set()
        time.sleep(0.1)
    sock.close()
    ctx.term()
    return ids


@pytest.mark.slow
def test_emulated_camera_to_run_to_gateway_every_result_once_in_order_and_fail_safe(bottle_model, tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    src = MVTEC / "bottle" / "test"
    picks = [p for kind in ("good", "broken_large", "contamination") for p in sorted((src / kind).glob("*.png"))[:4]]
    for i, p in enumerate(picks):
        (folder / f"{i:02d}.png").write_bytes(p.read_bytes())
    camera = _emulated_camera(folder)
    frames_url, results_url = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"
    opcua_port, modbus_port = _port(), _port()
    run = _run(bottle_model["bundle"], frames_url, results_url)
    gateway = subprocess.Popen([*CLI, "plc-gateway", results_url, "--opcua", str(opcua_port), "--modbus",
                                str(modbus_port), "--stale-ms", str(STALE_MS), "--camera", "top"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    zmq_verdicts: list[dict] = []
    stop = threading.Event()
    listener = VerdictListener(results_url, heartbeat_timeout=5.0)
    sub = threading.Thread(target=lambda: listener.listen(stop=stop, on_verdict=zmq_verdicts.append), daemon=True)
    sub.start()
    try:
        wait_for_line(gateway, "ready:", 120)

        async def line():
            opc = asyncio.create_task(_opcua_handshake(opcua_port, "top", N, timeout=180))
            mod = asyncio.create_task(_modbus_handshake(modbus_port, 0, N, timeout=180))
            await asyncio.sleep(1.0)
            ids = await asyncio.to_thread(_push, camera, frames_url, N)
            return ids, await opc, await mod

        ids, (opc, opc_seqs), mod = asyncio.run(line())
        wait_until(lambda: len(zmq_verdicts) >= N, 30)
        want = [(b["seq"], b["frame_id"], b["verdict"]) for b in zmq_verdicts[:N]]
        assert [b["frame_id"] for b in zmq_verdicts[:N]] == ids            # the camera's own frame counter
        assert {b["verdict"] for b in zmq_verdicts} <= {"PASS", "FAIL"}
        assert [(v["Seq"], v["FrameId"], v["Verdict"]) for v in opc] == want
        assert [(v["Seq"], v["FrameId"], v["Verdict"]) for v in mod] == want
        assert opc_seqs == [b["seq"] for b in zmq_verdicts[:N]]
        for o, m, b in zip(opc, mod, zmq_verdicts):
            assert o["Score"] == b["score"]
            assert m["Score"] == pytest.approx(min(b["score"], 65.535), abs=0.0006)
            assert o["Pass"] is m["Pass"] is (b["verdict"] == "PASS")

        # kill the runtime: Healthy and Pass go false within --stale-ms of its last heartbeat
        off_opc, off_mb = asyncio.run(_until_unhealthy(opcua_port, modbus_port, lambda: run.send_signal(signal.SIGKILL)))
        run.wait(10)
        limit = STALE_MS / 1000.0 + 0.3          # + the last heartbeat's age at the kill (<= 0.2 s) and polling
        assert off_opc is not None and off_opc <= limit, off_opc
        assert off_mb is not None and off_mb <= limit, off_mb
        print(f"\nverdicts {[b['verdict'] for b in zmq_verdicts[:N]]}; runtime killed -> Healthy/Pass false after "
              f"{off_opc * 1000:.0f} ms (OPC UA), {off_mb * 1000:.0f} ms (Modbus) with --stale-ms {STALE_MS}")

        # restart it: healthy again, and new results flow through the handshake
        run = _run(bottle_model["bundle"], frames_url, results_url)
        wait_until(lambda: _healthy(modbus_port), 60)

        async def again():
            mod = asyncio.create_task(_modbus_handshake(modbus_port, 0, 2, timeout=120))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(_push, camera, frames_url, 2)
            return await mod

        after = asyncio.run(again())
        assert [v["Seq"] for v in after] == [1, 2]                         # the restarted runtime counts anew
    finally:
        stop.set()
        sub.join(5)
        listener.close()
        for proc in (gateway, run):
            proc.send_signal(signal.SIGINT)
        for proc in (gateway, run):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _healthy(port) -> bool:
    from pymodbus.client import ModbusTcpClient

    client = ModbusTcpClient("127.0.0.1", port=port)
    try:
        client.connect()
        bits = client.read_coils(0, count=mb.COILS_PER_SLOT).bits
        return bool(bits[mb.C_HEALTHY])
    finally:
        client.close()


async def _until_unhealthy(opcua_port, modbus_port, kill):
    from asyncua import Client
    from pymodbus.client import AsyncModbusTcpClient

    async with Client(f"opc.tcp://127.0.0.1:{opcua_port}/", timeout=10) as client:
        nodes = await _opcua_nodes(client, "top")
        mbc = AsyncModbusTcpClient("127.0.0.1", port=modbus_port)
        await mbc.connect()
        v = await _opcua_values(client, nodes, ["Healthy"])
        assert v["Healthy"] is True
        kill()
        t0 = time.monotonic()
        off_opc = off_mb = None
        while time.monotonic() - t0 < 5 and (off_opc is None or off_mb is None):
            v = await _opcua_values(client, nodes, ["Healthy", "Pass"])
            if off_opc is None and v["Healthy"] is False and v["Pass"] is False:
                off_opc = time.monotonic() - t0
            bits = (await mbc.read_coils(0, count=mb.COILS_PER_SLOT)).bits
            if off_mb is None and not bits[mb.C_HEALTHY] and not bits[mb.C_PASS]:
                off_mb = time.monotonic() - t0
            await asyncio.sleep(0.01)
        mbc.close()
        return off_opc, off_mb
