"""`memseg-edge run` with the plant features switched on, as a user starts it: `--metrics PORT` (scraped
over HTTP and parsed with prometheus-client's own parser, compared with `--stats-json` at exit),
`--previews ENDPOINT` (what `memseg-edge hmi` reads), and Basler cameras through pylon's emulator with
`run --pylon` and `camera --pylon` (frame ids from the camera's own counter)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import cv2
import numpy as np
import pytest
import zmq

from memseg_edge.frames import encode
from memseg_edge.plc import VerdictListener

from conftest import wait_for_line, wait_until
from test_runtime_hardening import tiny_bundle

CLI = [sys.executable, "-m", "memseg_edge.cli"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict:
    """{(name, frozenset(labels)): value} of every sample on the endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _listen(url: str, verdicts: list, stop: threading.Event) -> threading.Thread:
    listener = VerdictListener(url, heartbeat_timeout=10.0)
    t = threading.Thread(target=lambda: listener.listen(stop=stop, on_verdict=verdicts.append), daemon=True)
    t.start()
    return t


def _previews(url: str, got: list, stop: threading.Event) -> threading.Thread:
    from memseg_edge.previews import parse_preview

    def work():
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"preview.")
        sub.connect(url)
        while not stop.is_set():
            if sub.poll(100):
                got.append(parse_preview(sub.recv_multipart()))
        sub.close(0)
        ctx.term()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def test_prometheus_counters_equal_stats_json_and_previews_flow(tmp_path):
    pytest.importorskip("prometheus_client", reason="prometheus-client absent: pip install 'memseg-edge[plant]'")
    bundle = tiny_bundle(tmp_path / "bundle", threshold=0.5)
    frames_url, results_url, previews_url = (f"tcp://127.0.0.1:{_port()}" for _ in range(3))
    metrics_port = _port()
    stats_json = tmp_path / "stats.json"
    proc = subprocess.Popen([*CLI, "run", "--model", str(bundle), "--zmq", frames_url, "--results", results_url,
                             "--metrics", str(metrics_port), "--previews", previews_url, "--preview-fps", "50",
                             "--stats-json", str(stats_json), "--heartbeat", "0.2", "--threads", "1",
                             "--stats-every", "0", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    verdicts: list[dict] = []
    previews: list = []
    stop = threading.Event()
    try:
        lines = wait_for_line(proc, " ready: ", 60)
        assert any(f"metrics on http://127.0.0.1:{metrics_port}/metrics" in line for line in lines), lines
        _listen(results_url, verdicts, stop)
        _previews(previews_url, previews, stop)
        time.sleep(0.5)                                   # subscriptions reach the PUB sockets
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 5000)
        push.connect(frames_url)
        # dark frames PASS (score = mean / 255), bright ones FAIL; two cameras; a corrupt JPEG and a
        # header that is not JSON are bad input (the first names a frame_id: an ERROR verdict)
        sent = 0
        for i in range(12):
            value = 30 if i % 3 else 220
            push.send_multipart(encode(np.full((48, 48, 3), value, np.uint8), "png", f"cam{i % 2}", i))
            sent += 1
            time.sleep(0.1)                               # a line's pace: previews of passes and rejects
        header, _ = encode(np.zeros((48, 48, 3), np.uint8), "jpeg", "cam0", 100)
        push.send_multipart([header, b"\xff\xd8\xff\xe0 not really a jpeg"])
        push.send_multipart([b"{not json", b"x"])
        push.close()
        ctx.term()
        wait_until(lambda: len(verdicts) >= sent + 1, 60)
        # previews are encoded in their own thread, newest first: on a busy machine they trail the verdicts
        wait_until(lambda: {h["verdict"] for h, _ in previews} >= {"PASS", "FAIL"}, 60)
        samples = _scrape(metrics_port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    stats = json.loads(stats_json.read_text())
    by_verdict = {v: sum(1 for b in verdicts if b["verdict"] == v) for v in ("PASS", "FAIL", "ERROR")}
    assert by_verdict == {"PASS": 8, "FAIL": 4, "ERROR": 1}, by_verdict

    # the Prometheus endpoint and --stats-json agree on every counter
    assert _value(samples, "memseg_frames_received_total") == stats["received"] == 14
    for verdict, key in (("PASS", "pass"), ("FAIL", "fail")):
        assert sum(_value(samples, "memseg_verdicts_total", camera=c, verdict=verdict)
                   for c in ("cam0", "cam1")) == stats[key] == by_verdict[verdict]
    total_verdicts = sum(v for (name, _), v in samples.items() if name == "memseg_verdicts_total")
    assert total_verdicts == stats["verdicts"] == 13
    assert _value(samples, "memseg_verdicts_total", camera="cam0", verdict="ERROR") == 1
    assert _value(samples, "memseg_dropped_total") == stats["dropped"] == 0
    errors = {dict(labels)["kind"]: v for (name, labels), v in samples.items() if name == "memseg_errors_total"}
    assert errors == {k: float(v) for k, v in stats["errors"].items()} and sum(errors.values()) == 2
    # every judged frame's inference latency is observed once; the model is described
    assert _value(samples, "memseg_latency_seconds_count", stage="inference") == stats["judged"] == 12
    assert _value(samples, "memseg_batch_size_sum") == 12
    info = [dict(labels) for (name, labels), _ in samples.items() if name == "memseg_model_info"]
    assert info and info[0]["precision"] == "fp32" and info[0]["backend"] == "onnxruntime"
    assert _value(samples, "memseg_queue_depth") == 0

    # previews: overlays of judged frames, JPEGs with the verdict's seq and score, rejects among them
    assert previews, "no preview arrived"
    by_seq = {b["seq"]: b for b in verdicts}
    for header, jpeg in previews:
        body = by_seq[header["seq"]]
        assert (header["camera"], header["frame_id"], header["verdict"]) == \
            (body["camera"], body["frame_id"], body["verdict"])
        assert header["overlay"] is True
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[:2] == (header["height"], header["width"])
    assert {h["verdict"] for h, _ in previews} >= {"PASS", "FAIL"}


def test_metrics_option_reports_a_busy_port_in_one_sentence(tmp_path):
    pytest.importorskip("prometheus_client", reason="prometheus-client absent: pip install 'memseg-edge[plant]'")
    bundle = tiny_bundle(tmp_path / "bundle")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([*CLI, "run", "--model", str(bundle), "--zmq", str(_port()), "--results", str(_port()),
                              "--metrics", str(port), "--threads", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"--metrics {port}: cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------------
# Basler cameras through pylon's emulator
# ------------------------------------------------------------------------------------------------

def _emulator_env(tmp_path):
    pypylon = pytest.importorskip("pypylon", reason="pypylon absent: pip install 'memseg-edge[pylon]'")
    del pypylon
    folder = tmp_path / "camera"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.full((64, 80, 3), 30 if i % 2 else 220, np.uint8))
    features = ["--camera-feature", "TestImageSelector=Off", "--camera-feature", "ImageFileMode=On",
                "--camera-feature", f"ImageFilename={folder}", "--camera-feature", "Width=80",
                "--camera-feature", "Height=64", "--pixel-format", "BGR8Packed"]
    return features, dict(os.environ, PYLON_CAMEMU="1", OMP_NUM_THREADS="1")


def _check_camera_ids(verdicts: list[dict], camera: str, n: int) -> None:
    mine = [b for b in verdicts if b["camera"] == camera]
    assert len(mine) >= n, verdicts
    ids = [b["frame_id"] for b in mine]
    assert all(isinstance(i, int) for i in ids)
    assert ids == list(range(ids[0], ids[0] + len(ids)))      # the camera's counter: consecutive, none dropped
    assert {b["verdict"] for b in mine} == {"PASS", "FAIL"}   # the folder's dark and bright images, judged


def test_run_pylon_judges_an_emulated_camera_with_software_trigger(tmp_path):
    features, env = _emulator_env(tmp_path)
    bundle = tiny_bundle(tmp_path / "bundle", threshold=0.5)
    results_url = f"tcp://127.0.0.1:{_port()}"
    stats_json = tmp_path / "stats.json"
    proc = subprocess.Popen([*CLI, "run", "--model", str(bundle), "--pylon", "0815-0000=top", "--trigger", "software",
                             *features, "--results", results_url, "--threads", "1", "--heartbeat", "0.2",
                             "--stats-every", "0", "--quiet", "--stats-json", str(stats_json)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    verdicts: list[dict] = []
    stop = threading.Event()
    try:
        try:
            lines = wait_for_line(proc, " ready: ", 60)
        except AssertionError as exc:
            if "no Basler camera with serial or index 0815-0000" in str(exc):
                pytest.skip("pylon's camera emulator shows no camera 0815-0000")
            raise
        assert any("pylon 0815-0000=top" in line for line in lines)
        _listen(results_url, verdicts, stop)
        wait_until(lambda: len(verdicts) >= 8, 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    # the subscriber joined while frames flowed: what it saw is a consecutive run of the camera's counter
    _check_camera_ids(verdicts, "top", 8)
    stats = json.loads(stats_json.read_text())
    assert stats["dropped"] == 0 and stats["errors_total"] == 0     # software trigger: the runtime paces the camera


def test_camera_pylon_station_feeds_a_runtime(tmp_path):
    features, env = _emulator_env(tmp_path)
    bundle = tiny_bundle(tmp_path / "bundle", threshold=0.5)
    frames_url, results_url = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"
    run = subprocess.Popen([*CLI, "run", "--model", str(bundle), "--zmq", frames_url, "--results", results_url,
                            "--threads", "1", "--heartbeat", "0.2", "--stats-every", "0", "--quiet"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    verdicts: list[dict] = []
    stop = threading.Event()
    try:
        wait_for_line(run, " ready: ", 60)
        _listen(results_url, verdicts, stop)
        time.sleep(0.5)
        station = subprocess.run([*CLI, "camera", "--pylon", "0815-0000", "--name", "side", "--trigger", "software",
                                  *features, "--publish", frames_url, "--count", "6", "--encoding", "png"],
                                 capture_output=True, text=True, timeout=120, env=env)
        if "no Basler camera with serial or index 0815-0000" in station.stderr:
            pytest.skip("pylon's camera emulator shows no camera 0815-0000")
        assert station.returncode == 0, station.stderr
        assert "sent 6 frames" in station.stderr
        wait_until(lambda: len(verdicts) >= 6, 60)
    finally:
        stop.set()
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(30)
        except subprocess.TimeoutExpired:
            run.kill()
    _check_camera_ids(verdicts, "side", 6)


def test_pylon_without_pypylon_or_with_a_bad_name_is_one_sentence(tmp_path):
    bundle = tiny_bundle(tmp_path / "bundle")
    out = subprocess.run([*CLI, "run", "--model", str(bundle), "--pylon", "0815-0000=bad name!", "--results",
                          str(_port()), "--threads", "1"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYLON_CAMEMU="1"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "camera must be 1-64 characters" in out.stderr or "pypylon is not installed" in out.stderr


# ------------------------------------------------------------------------------------------------
# frame ids from the camera's own counter (a jump = frames the camera lost), without hardware
# ------------------------------------------------------------------------------------------------

class _CountingCamera:
    """A Capture whose frame counter skips, as a GenICam camera's BlockID does when frames are lost."""

    name = "top"
    live = False
    endless = True
    own_frame_ids = True
    fps = 0.0
    last_frame_id = None

    def __init__(self, ids, go: threading.Event | None = None):
        self.ids = ids
        self.go = go          # set when a subscriber listens: verdicts published before that are not seen

    def label(self, index):
        return None

    def frames(self, stop):
        if self.go is not None:
            self.go.wait(30)
        for i, fid in enumerate(self.ids):
            if stop.is_set():
                return
            self.last_frame_id = fid
            yield np.full((40, 40, 3), 30 if i % 2 else 220, np.uint8)


CAMERA_IDS = [100, 101, 105, 106, 110]       # the camera lost 102-104 and 107-109


def test_runtime_verdicts_carry_the_cameras_own_frame_ids(tmp_path, monkeypatch):
    from memseg_edge.runtime import Runtime

    from test_runtime import connected_listener, runtime_config
    from test_runtime_hardening import Fake, fake_model

    go = threading.Event()
    camera = _CountingCamera(CAMERA_IDS, go)
    monkeypatch.setattr(Runtime, "_pylon_cameras", lambda self: [camera])
    runtime = Runtime(runtime_config(tmp_path, pylon=["0815-0000=top"]), fake_model(Fake()), log=lambda m: None)
    ctx = zmq.Context()
    got: list[dict] = []
    listener = None
    stop = threading.Event()
    try:
        runtime.start()
        listener = connected_listener(runtime.endpoints["results"], ctx, heartbeat_timeout=10)
        t = threading.Thread(target=lambda: listener.listen(stop=stop, on_verdict=got.append), daemon=True)
        t.start()
        go.set()
        wait_until(lambda: len(got) >= len(CAMERA_IDS), 30)
    finally:
        stop.set()
        runtime.stop()
        if listener is not None:
            t.join(5)
            listener.close()
        ctx.term()
    assert [b["frame_id"] for b in got] == CAMERA_IDS
    assert [b["verdict"] for b in got] == ["FAIL", "PASS", "FAIL", "PASS", "FAIL"]


def test_camera_station_sends_the_cameras_own_frame_ids(tmp_path):
    from memseg_edge.frames import parse_header
    from memseg_edge.sources import publish_frames

    url = f"ipc://{tmp_path}/frames"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(url)
    try:
        result = publish_frames(_CountingCamera(CAMERA_IDS), url, encoding="png", fps=0, log=lambda m: None,
                                context=ctx)
        ids = [parse_header(pull.recv_multipart()[0]).frame_id for _ in CAMERA_IDS]
    finally:
        pull.close(0)
        ctx.term()
    assert result["sent"] == len(CAMERA_IDS) and ids == CAMERA_IDS
