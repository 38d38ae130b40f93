#!/usr/bin/env python3
"""Latency the PLC gateway adds to a verdict: published on the runtime's ZeroMQ endpoint -> the new
value readable by a PLC client, over OPC UA (polling Read, and a subscription) and Modbus TCP (polling
FC3). Everything on loopback; the gateway is the real `memseg-edge plc-gateway` in its own process
(--mode latest, so no Ack round trip is counted); this script plays the runtime (a PUB socket sending
verdict and heartbeat messages built by memseg_edge.verdicts) and the PLC clients.

Each verdict is published only after the previous one was seen, and the client polls as fast as it
can, so a figure is publish -> first read that returns it (the read's own round trip included).

    tools/gateway_latency.py --count 300
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import zmq

from memseg_edge import verdicts as vd
from memseg_edge.gateway import modbus as mb
from memseg_edge.gateway.opcua import NAMESPACE


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Publisher:
    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.seq = 0
        self.last_hb = 0.0

    def heartbeat(self, force: bool = False) -> None:
        if force or time.monotonic() - self.last_hb > 0.2:
            self.last_hb = time.monotonic()
            body = vd.heartbeat_body(seq=self.seq, ts=time.time(), counters={})
            self.sock.send_multipart([vd.HEARTBEAT_TOPIC, vd.dumps(body)])

    def verdict(self) -> tuple[int, float]:
        self.heartbeat()
        self.seq += 1
        body = vd.verdict_body(seq=self.seq, camera="top", frame_id=self.seq, verdict=vd.PASS, score=0.1,
                               threshold=0.5, latency_ms=1.0, model="latency")
        t0 = time.perf_counter()
        self.sock.send_multipart([vd.verdict_topic("top"), vd.dumps(body)])
        return self.seq, t0


async def measure_opcua_poll(pub: Publisher, port: int, count: int) -> list[float]:
    from asyncua import Client

    out = []
    async with Client(f"opc.tcp://127.0.0.1:{port}/", timeout=10) as client:
        ns = await client.get_namespace_index(NAMESPACE)
        seq_node = await client.nodes.objects.get_child([f"{ns}:MemSegEdge", f"{ns}:top", f"{ns}:Seq"])
        for _ in range(count):
            seq, t0 = pub.verdict()
            while await seq_node.read_value() != seq:
                pass
            out.append(time.perf_counter() - t0)
            await asyncio.sleep(0.01)
    return out


async def measure_opcua_subscription(pub: Publisher, port: int, count: int, interval_ms: float) -> list[float]:
    from asyncua import Client

    seen: asyncio.Queue = asyncio.Queue()

    class Handler:
        def datachange_notification(self, node, val, data):
            seen.put_nowait((val, time.perf_counter()))

    out = []
    async with Client(f"opc.tcp://127.0.0.1:{port}/", timeout=10) as client:
        ns = await client.get_namespace_index(NAMESPACE)
        seq_node = await client.nodes.objects.get_child([f"{ns}:MemSegEdge", f"{ns}:top", f"{ns}:Seq"])
        sub = await client.create_subscription(interval_ms, Handler())
        await sub.subscribe_data_change(seq_node, queuesize=100)
        await asyncio.sleep(0.5)
        while not seen.empty():
            seen.get_nowait()
        for _ in range(count):
            seq, t0 = pub.verdict()
            while True:
                val, t1 = await asyncio.wait_for(seen.get(), 5)
                if val == seq:
                    break
            out.append(t1 - t0)
            await asyncio.sleep(0.01)
        await sub.delete()
    return out


async def measure_modbus_poll(pub: Publisher, port: int, count: int) -> list[float]:
    from pymodbus.client import AsyncModbusTcpClient

    out = []
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    for _ in range(count):
        seq, t0 = pub.verdict()
        while True:
            regs = (await client.read_holding_registers(mb.R_SEQ, count=2)).registers
            if (regs[0] << 16 | regs[1]) == seq:
                break
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)
    client.close()
    return out


def _row(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]   # noqa: E731
    return f"| {name} | {len(ms)} | {statistics.median(ms):.2f} | {p(0.99):.2f} | {ms[-1]:.2f} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=300, help="verdicts per measurement")
    ap.add_argument("--interval-ms", type=float, default=10.0, help="OPC UA subscription publishing interval")
    args = ap.parse_args()

    pub = Publisher()
    opcua_port, modbus_port = _port(), _port()
    gateway = subprocess.Popen([sys.executable, "-m", "memseg_edge.cli", "plc-gateway", pub.endpoint, "--opcua",
                                str(opcua_port), "--modbus", str(modbus_port), "--mode", "latest", "--camera", "top"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in gateway.stderr:
            if "ready:" in line:
                break
        else:
            raise SystemExit("plc-gateway did not start")
        time.sleep(0.5)
        pub.heartbeat(force=True)

        async def all_of_them():
            return {
                "OPC UA, polling Read of Seq": await measure_opcua_poll(pub, opcua_port, args.count),
                f"OPC UA, subscription ({args.interval_ms:g} ms publishing interval)":
                    await measure_opcua_subscription(pub, opcua_port, args.count, args.interval_ms),
                "Modbus TCP, polling FC3 of seq": await measure_modbus_poll(pub, modbus_port, args.count),
            }

        results = asyncio.run(all_of_them())
    finally:
        gateway.terminate()
        gateway.wait(20)
    print(f"gateway latency, verdict published -> value readable ({platform.node()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f})")
    print("| path | verdicts | p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in results.items():
        print(_row(name, values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
