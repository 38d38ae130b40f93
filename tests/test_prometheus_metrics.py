"""The runtime's Prometheus metrics (memseg_edge.metrics): scraped over HTTP on loopback and read back
with prometheus-client's own text parser, under the names the issue's contract fixes."""
from __future__ import annotations

import sys
import subprocess
import urllib.request

import pytest

pytest.importorskip("prometheus_client", reason="prometheus-client absent: pip install 'memseg-edge[plant]'")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from memseg_edge.metrics import RuntimeMetrics  # noqa: E402


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict, family: str, sample: str, **labels) -> float:
    for s in families[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{sample} {labels} not in {family}")


def test_runtime_metrics_scrape_with_the_contract_names():
    m = RuntimeMetrics()
    port = m.serve(0)
    try:
        for _ in range(7):
            m.frame_received()
        for cam, verdict in [("top", "PASS")] * 4 + [("top", "FAIL"), ("side", "ERROR")]:
            m.verdict(cam, verdict)
        m.error("bad image")
        m.dropped(2)
        m.queue_depth(3)
        m.batch(4)
        m.batch(1)
        for stage, seconds in [("infer", 0.004), ("infer", 0.006), ("decode", 0.0003)]:
            m.latency(stage, seconds)
        m.model_info("abcdef012345", "int8", "onnxruntime", size="96x96")
        fams = scrape(port)
    finally:
        m.close()
    assert value(fams, "memseg_frames_received", "memseg_frames_received_total") == 7
    assert fams["memseg_frames_received"].type == "counter"
    assert value(fams, "memseg_verdicts", "memseg_verdicts_total", camera="top", verdict="PASS") == 4
    assert value(fams, "memseg_verdicts", "memseg_verdicts_total", camera="top", verdict="FAIL") == 1
    assert value(fams, "memseg_verdicts", "memseg_verdicts_total", camera="side", verdict="ERROR") == 1
    assert value(fams, "memseg_errors", "memseg_errors_total", kind="bad image") == 1
    assert value(fams, "memseg_dropped", "memseg_dropped_total") == 2
    assert value(fams, "memseg_queue_depth", "memseg_queue_depth") == 3
    assert value(fams, "memseg_batch_size", "memseg_batch_size_count") == 2
    assert value(fams, "memseg_batch_size", "memseg_batch_size_sum") == 5
    lat = fams["memseg_latency_seconds"]
    assert lat.type == "histogram"
    assert value(fams, "memseg_latency_seconds", "memseg_latency_seconds_count", stage="infer") == 2
    assert value(fams, "memseg_latency_seconds", "memseg_latency_seconds_sum", stage="infer") == pytest.approx(0.01)
    assert value(fams, "memseg_latency_seconds", "memseg_latency_seconds_bucket", stage="infer", le="0.005") == 1
    assert value(fams, "memseg_latency_seconds", "memseg_latency_seconds_bucket", stage="decode", le="0.0005") == 1
    info = [s for s in fams["memseg_model_info"].samples if s.name == "memseg_model_info"][0]
    assert info.labels == {"model": "abcdef012345", "precision": "int8", "backend": "onnxruntime", "size": "96x96"}


def test_two_runtimes_in_one_process_do_not_share_counters():
    a, b = RuntimeMetrics(), RuntimeMetrics()
    a.frame_received(3)
    pa, pb = a.serve(0), b.serve(0)
    try:
        assert value(scrape(pa), "memseg_frames_received", "memseg_frames_received_total") == 3
        assert value(scrape(pb), "memseg_frames_received", "memseg_frames_received_total") == 0
    finally:
        a.close()
        b.close()


def test_the_metrics_endpoint_listens_on_loopback_only():
    m = RuntimeMetrics()
    m.serve(0)
    try:
        assert m._server.server_address[0] == "127.0.0.1"
    finally:
        m.close()


def test_importing_the_cli_imports_no_plant_library():
    code = ("import sys, memseg_edge.cli; "
            "print(sorted(m for m in ('asyncua', 'pymodbus', 'pypylon', 'prometheus_client', 'playwright', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
