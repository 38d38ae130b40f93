"""The runtime as the line uses it: real ZeroMQ sockets (ipc under tmp_path), the onnxruntime backend on
the 96 px bottle bundle, the command line in subprocesses where the process boundary is the point.

What a plant relies on: one verdict per frame, in order, with eval's score; gap-free sequence numbers;
bad input and overload never stop the runtime and every message is accounted for; memory stays flat;
the edge side never imports torch.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from memseg_edge import frames as fr
from memseg_edge.plc import VerdictListener
from memseg_edge.preprocess import list_images, load_rgb, prepare
from memseg_edge.runtime import LoadedModel, Runtime, RuntimeConfig, load_model

from conftest import MVTEC

CLI = [sys.executable, "-m", "memseg_edge.cli"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(bottle_model) -> Path:
    return bottle_model["bundle"]


@pytest.fixture(scope="module")
def model(bundle) -> LoadedModel:
    return load_model(bundle)


def bottle_subset(folder: Path, per_defect: int = 1, good: int = 2) -> tuple[Path, list[Path]]:
    """A flat folder of a few bottle test images (good and each defect type), names in a known order;
    returns (folder, the original files in that order)."""
    folder.mkdir(parents=True, exist_ok=True)
    originals = []
    for defect_dir in sorted((MVTEC / "bottle" / "test").iterdir()):
        n = good if defect_dir.name == "good" else per_defect
        originals += list_images(defect_dir)[:n]
    for i, src in enumerate(originals):
        (folder / f"{i:02d}_{src.parent.name}_{src.name}").symlink_to(src)
    return folder, originals


def runtime_config(tmp_path: Path, **over) -> RuntimeConfig:
    cfg = dict(results=f"ipc://{tmp_path}/results", zmq=[f"ipc://{tmp_path}/frames"], stats_every=0,
               heartbeat_s=0.2)
    cfg.update(over)
    return RuntimeConfig(**cfg)


def connected_listener(url: str, ctx, **kw) -> VerdictListener:
    """A listener that has seen the first heartbeat, so no verdict is lost to the subscription's start."""
    listener = VerdictListener(url, context=ctx, **kw)
    seen = threading.Event()
    listener.listen(timeout=30, stop=seen, on_event=lambda k, m, i: seen.set() if k == "connected" else None)
    if not seen.is_set():
        listener.close()
        raise AssertionError(f"no heartbeat from {url}")
    return listener


def bgr_frame(rng, size=96) -> np.ndarray:
    return cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (7, 7), 0)


class CliProcess:
    """A ``memseg-edge`` subprocess whose stderr is collected line by line."""

    def __init__(self, args: list[str], prelude: str | None = None):
        cmd = [sys.executable, "-c", prelude + "\nfrom memseg_edge.cli import main\nmain(prog_name='memseg-edge')",
               *args] if prelude else [*CLI, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            if " ready: " in line:
                self.ready.set()

    def wait_ready(self, timeout=60):
        if not self.ready.wait(timeout):
            self.proc.kill()
            raise AssertionError("runtime not ready:\n" + "\n".join(self.lines))

    def finish(self, timeout=60) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        out = self.proc.stdout.read()
        self._reader.join(5)
        return code, out, "\n".join(self.lines)


# Imported by `run` under this hook, any torch import fails loudly and is recorded.
NO_TORCH = """
import sys, atexit
class _NoTorch:
    tried = []
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            self.tried.append(name)
            raise ImportError('the edge runtime must not import ' + name)
        return None
_hook = _NoTorch()
sys.meta_path.insert(0, _hook)
atexit.register(lambda: print('TORCH_CHECK', _hook.tried, [m for m in sys.modules if m.split('.')[0] == 'torch'],
                              file=sys.stderr, flush=True))
sys.argv[0] = 'memseg-edge'
"""


# ------------------------------------------------------------------------------------------------
# the acceptance path
# ------------------------------------------------------------------------------------------------

def test_bottle_images_through_camera_station_get_eval_scores_in_order(bundle, tmp_path):
    """camera (subprocess) -> run (subprocess, torch import blocked) -> plc-listen (subprocess): one verdict per
    image, in order, no gap, with the score `eval` computes for the same bundle and image."""
    from memseg_edge.scoring import image_scores
    from memseg_edge.train.config import DataConfig
    from memseg_edge.train.evaluate import evaluate, load_predictor

    images_dir, originals = bottle_subset(tmp_path / "images")
    n = len(originals)
    frames_url, results_url = f"ipc://{tmp_path}/frames", f"ipc://{tmp_path}/results"
    run = CliProcess(["run", "--model", str(bundle), "--zmq", frames_url, "--results", results_url,
                      "--max-frames", str(n), "--heartbeat", "0.2", "--stats-every", "0",
                      "--stats-json", str(tmp_path / "stats.json")], prelude=NO_TORCH)
    run.wait_ready()
    listen = subprocess.Popen([*CLI, "plc-listen", results_url, "--json", "--count", str(n), "--timeout", "120"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # start the camera once the listener has subscribed (its first output line is the "connected" event)
    first = json.loads(listen.stdout.readline())
    assert first["event"] == "connected", first
    camera = subprocess.run([*CLI, "camera", "--images", str(images_dir), "--publish", frames_url, "--encoding", "png",
                             "--fps", "0", "--name", "bottle-cam"], capture_output=True, text=True, timeout=120)
    assert camera.returncode == 0, camera.stderr
    out, err = listen.communicate(timeout=150)
    assert listen.returncode == 0, err + out
    code, _, run_log = run.finish()
    assert code == 0, run_log

    lines = [json.loads(line) for line in out.splitlines()]
    verdicts = [v for v in lines if v.get("type") == "verdict"]
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["gaps"] == [] and summary["heartbeat_losses"] == 0
    assert [v["frame_id"] for v in verdicts] == list(range(n))
    assert {v["camera"] for v in verdicts} == {"bottle-cam"}
    assert [v["seq"] for v in verdicts] == list(range(verdicts[0]["seq"], verdicts[0]["seq"] + n))
    assert all(v["verdict"] in ("PASS", "FAIL") for v in verdicts)

    # eval's own path: its loader (shared preprocessing), its predictor, its image score
    predict, meta = load_predictor(bundle)
    from memseg_edge.train.datasets import load_images

    expected = image_scores(predict(load_images(originals, meta["image_size"])), meta["top_k"])
    got = np.array([v["score"] for v in verdicts], np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # eval's threshold and verdict rule on a dataset made of the same images
    subset = tmp_path / "subset"
    for src in originals:
        dst = subset / "bottle" / "test" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)
        masks = subset / "bottle" / "ground_truth" / src.parent.name
        if src.parent.name != "good" and not masks.exists():
            masks.parent.mkdir(parents=True, exist_ok=True)
            masks.symlink_to(MVTEC / "bottle" / "ground_truth" / src.parent.name)
    train_good = subset / "bottle" / "train" / "good"    # eval's dataset layout needs one; it is not used
    train_good.mkdir(parents=True)
    (train_good / "000.png").symlink_to(list_images(MVTEC / "bottle" / "train" / "good")[0])
    result = evaluate(bundle, DataConfig(root=str(subset), category="bottle"), progress=False, log=lambda *a: None)
    threshold = result["threshold"]["value"]
    assert all(v["threshold"] == pytest.approx(threshold, abs=1e-12) for v in verdicts)
    assert [v["verdict"] for v in verdicts] == ["FAIL" if s >= threshold else "PASS" for s in expected]

    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["received"] == stats["judged"] == n and stats["dropped"] == 0 and stats["errors_total"] == 0
    assert "TORCH_CHECK [] []" in run_log


def test_run_never_imports_torch(bundle, tmp_path):
    code = "import sys, memseg_edge.cli, memseg_edge.runtime, memseg_edge.trt_backend, memseg_edge.plc, " \
           "memseg_edge.sources, memseg_edge.demo; print([m for m in sys.modules if m.split('.')[0] == 'torch'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    images_dir, originals = bottle_subset(tmp_path / "images", per_defect=0, good=2)
    run = CliProcess(["run", "--model", str(bundle), "--images", str(images_dir), "--results",
                      f"ipc://{tmp_path}/results", "--stats-every", "0", "--stats-json", str(tmp_path / "s.json")],
                     prelude=NO_TORCH)
    code, _, log = run.finish(timeout=120)
    assert code == 0, log
    assert json.loads((tmp_path / "s.json").read_text())["judged"] == len(originals)
    assert "TORCH_CHECK [] []" in log


# ------------------------------------------------------------------------------------------------
# bad input, overload
# ------------------------------------------------------------------------------------------------

def _fuzz_messages(rng: random.Random, good_payload: bytes, jpeg: bytes, png: bytes, n: int):
    """``n`` malformed messages: (parts, frame_id or None). A frame_id means an ERROR verdict is owed."""
    def header(fid, **over):
        h = {"v": 1, "camera": "fuzz", "frame_id": fid, "ts": time.time(), "width": 96, "height": 96,
             "encoding": "bgr8"}
        h.update(over)
        return json.dumps(h).encode()

    out = []
    for i in range(n):
        fid = f"bad-{i}"
        kind = rng.randrange(12)
        if kind == 0:
            out.append(([bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 40)))], None))
        elif kind == 1:
            out.append(([header(fid), good_payload, b"third part"], fid))
        elif kind == 2:
            out.append(([b"{" + bytes(rng.getrandbits(8) for _ in range(10)), good_payload], None))
        elif kind == 3:
            out.append(([header(fid, v=rng.choice([0, 2, "1", None])), good_payload], fid))
        elif kind == 4:
            out.append(([header(fid, encoding=rng.choice(["yuyv", "BGR8", "", 7, "h264"])), good_payload], fid))
        elif kind == 5:
            cut = rng.randrange(0, len(good_payload) - 1)
            out.append(([header(fid), good_payload[:cut]], fid))
        elif kind == 6:
            cut = rng.randrange(0, len(jpeg) - 2)
            out.append(([header(fid, encoding="jpeg"), jpeg[:cut]], fid))
        elif kind == 7:
            data = bytearray(png)
            at = data.find(b"IDAT") + 8 + rng.randrange(0, 200)
            data[at:at + 32] = bytes(rng.getrandbits(8) for _ in range(32))
            out.append(([header(fid, encoding="png"), bytes(data)], fid))   # passes the cheap checks, fails decoding
        elif kind == 8:
            h = json.loads(header(fid))
            del h["frame_id"]
            out.append(([json.dumps(h).encode(), good_payload], None))
        elif kind == 9:
            out.append(([header(fid, camera=rng.choice(["", "a b", "x" * 65, 5])), good_payload], fid))
        elif kind == 10:
            out.append(([header(fid, width=rng.choice([0, -1, 96.0, "96", 10 ** 6])), good_payload], fid))
        else:
            out.append(([json.dumps(rng.choice([[1], "s", 3, None])).encode(), good_payload], None))
    return out


def test_fuzz_runtime_stays_up_judges_every_good_frame_and_counts_every_bad_one(model, tmp_path):
    rng = random.Random(5)
    nprng = np.random.default_rng(5)
    good = [bgr_frame(nprng) for _ in range(8)]
    jpeg = cv2.imencode(".jpg", good[0])[1].tobytes()
    png = cv2.imencode(".png", good[0])[1].tobytes()
    bad = _fuzz_messages(rng, good[0].tobytes(), jpeg, png, 2500)
    n_good = 60
    good_at = set(rng.sample(range(len(bad) + n_good), n_good))   # good frames spread through the noise
    bad_iter, messages, i = iter(bad), [], 0
    for pos in range(len(bad) + n_good):
        if pos in good_at:
            enc = ["bgr8", "jpeg", "png", "rgb8", "mono8"][i % 5]
            messages.append((fr.encode(good[i % 8], enc, "good", i), i, True))
            i += 1
        else:
            parts, fid = next(bad_iter)
            messages.append((parts, fid, False))
    messages.append((fr.encode(good[0], "bgr8", "good", n_good), n_good, True))   # still up at the very end
    n_good += 1
    owed = n_good + sum(fid is not None for _, fid, ok in messages if not ok)

    runtime = Runtime(runtime_config(tmp_path, queue_frames=100000), model, log=lambda m: None)
    runtime.start()
    ctx = zmq.Context()
    try:
        listener = connected_listener(runtime.endpoints["results"], ctx)
        push = ctx.socket(zmq.PUSH)
        push.connect(runtime.endpoints["frames"][0])
        for parts, _, _ in messages:
            push.send_multipart(parts)
        got = []
        report = listener.listen(count=owed, timeout=120, on_verdict=got.append)
        push.close(0)
        listener.close()
    finally:
        stats = runtime.stop()
        ctx.destroy(linger=0)
    assert report.ok and not report.timed_out, report.summary()
    by_key = {(v["camera"], v["frame_id"]): v for v in got}
    assert len(by_key) == len(got) == owed
    goods = [v for v in got if v["camera"] == "good"]
    assert [v["frame_id"] for v in goods] == list(range(n_good))
    assert all(v["verdict"] in ("PASS", "FAIL") for v in goods)
    errors = [v for v in got if v["camera"] != "good"]
    assert all(v["verdict"] == "ERROR" and v["error"] for v in errors)
    n_bad = len(bad)
    assert stats["received"] == n_good + n_bad
    assert stats["judged"] == n_good and stats["dropped"] == 0
    assert stats["errors_total"] == n_bad
    assert set(stats["errors"]) <= {fr.MALFORMED, fr.BAD_HEADER, fr.UNKNOWN_ENCODING, fr.WRONG_SIZE, fr.BAD_IMAGE}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_overload_drops_the_oldest_counts_every_drop_and_memory_stays_flat(model, tmp_path):
    size, n_sources, seconds = 256, 3, 4.0
    nprng = np.random.default_rng(1)
    frame = bgr_frame(nprng, size)
    one = prepare(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), model.image_size)[None]
    model.backend.infer(one)
    t0 = time.perf_counter()
    for _ in range(10):
        model.backend.infer(one)
    model_rate = 10 / (time.perf_counter() - t0)   # frames/s at batch 1, the runtime's setting here
    send_rate = 4 * model_rate / n_sources         # each source; together four times what the model can do

    runtime = Runtime(runtime_config(tmp_path, queue_frames=8, max_batch=1), model, log=lambda m: None)
    runtime.start()
    ctx = zmq.Context()
    got: list[dict] = []
    sent = [0] * n_sources
    rss: list[tuple[float, float]] = []
    try:
        listener = connected_listener(runtime.endpoints["results"], ctx)
        stop_listening = threading.Event()
        lt = threading.Thread(target=listener.listen, kwargs={"stop": stop_listening, "on_verdict": got.append})
        lt.start()

        def source(k: int) -> None:
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 10)
            sock.connect(runtime.endpoints["frames"][0])
            next_t = time.perf_counter()
            end = next_t + seconds
            while time.perf_counter() < end:
                sock.send_multipart(fr.encode(frame, "bgr8", f"src{k}", sent[k]))
                sent[k] += 1
                next_t += 1 / send_rate
                time.sleep(max(0.0, next_t - time.perf_counter()))
            sock.close(linger=5000)

        sources = [threading.Thread(target=source, args=(k,)) for k in range(n_sources)]
        t_start = time.monotonic()
        for t in sources:
            t.start()
        while any(t.is_alive() for t in sources):
            rss.append((time.monotonic() - t_start, _rss_mb()))
            time.sleep(0.1)
        total = sum(sent)
        deadline = time.monotonic() + 60
        while len(got) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        stop_listening.set()
        lt.join(5)
        listener.close()
    finally:
        stats = runtime.stop()
        ctx.destroy(linger=0)
    assert total >= 2 * model_rate * seconds, f"senders too slow to overload the model ({total} frames)"
    assert len(got) == total and listener.report.ok, listener.report.summary()
    dropped = [v for v in got if v["verdict"] == "ERROR"]
    assert dropped and all(v["error"] == "dropped: runtime overloaded" for v in dropped)
    assert stats["dropped"] == len(dropped) and stats["judged"] == total - len(dropped) == stats["received"] - len(dropped)
    for k in range(n_sources):   # every frame of every source answered once, in the order it was sent
        assert [v["frame_id"] for v in got if v["camera"] == f"src{k}"] == list(range(sent[k]))
    assert runtime.ingest.max_depth <= 8
    settled = [m for t, m in rss if t >= 1.0]
    assert max(settled) - settled[0] < 40, f"memory grew under overload: {rss}"


# ------------------------------------------------------------------------------------------------
# request-reply, triggers, batching, CurveZMQ, overlays, shutdown
# ------------------------------------------------------------------------------------------------

def test_request_reply_answers_frames_and_triggers(model, tmp_path):
    cfg = runtime_config(tmp_path, reply=f"ipc://{tmp_path}/reply", trigger_timeout_s=0.5)
    runtime = Runtime(cfg, model, log=lambda m: None)
    runtime.start()
    ctx = zmq.Context()
    rng = np.random.default_rng(2)
    try:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 30000)
        req.connect(runtime.endpoints["reply"])
        req.send_multipart(fr.encode(bgr_frame(rng), "png", "gate", "part-17"))
        body = json.loads(req.recv())
        assert body["type"] == "verdict" and body["frame_id"] == "part-17" and body["verdict"] in ("PASS", "FAIL")
        assert isinstance(body["seq"], int) and body["camera"] == "gate"

        req.send_multipart([b"not json", b"x"])     # malformed, no frame_id: an error body, never silence
        assert json.loads(req.recv())["type"] == "error"

        req.send(json.dumps({"trigger": True, "camera": "line1"}).encode())
        time.sleep(0.1)
        push = ctx.socket(zmq.PUSH)
        push.connect(runtime.endpoints["frames"][0])
        push.send_multipart(fr.encode(bgr_frame(rng), "bgr8", "other", 1))
        push.send_multipart(fr.encode(bgr_frame(rng), "bgr8", "line1", 41))
        body = json.loads(req.recv())
        assert (body["camera"], body["frame_id"]) == ("line1", 41)

        req.send(json.dumps({"trigger": True, "camera": "idle-cam"}).encode())
        body = json.loads(req.recv())
        assert body["verdict"] == "ERROR" and "no frame from camera idle-cam" in body["error"]
        push.close(0)
        req.close(0)
    finally:
        runtime.stop()
        ctx.destroy(linger=0)


def test_a_station_started_before_the_runtime_loses_nothing_and_leavers_change_nothing(model, tmp_path):
    """Frames queue at the station until the runtime binds; a subscriber or a requester that vanishes mid-stream
    does not disturb the runtime or the other subscribers."""
    from memseg_edge.sources import ImageFolderCapture, publish_frames

    images_dir, originals = bottle_subset(tmp_path / "images", per_defect=1, good=1)
    cfg = runtime_config(tmp_path, reply=f"ipc://{tmp_path}/reply")
    station = threading.Thread(target=publish_frames, args=(ImageFolderCapture(images_dir, name="early"),
                                                            cfg.zmq[0]), kwargs={"encoding": "jpeg", "fps": 0})
    station.start()                 # nothing is listening yet
    time.sleep(0.5)
    runtime = Runtime(cfg, model, log=lambda m: None)
    ctx = zmq.Context()
    rng = np.random.default_rng(7)
    try:
        leaver = ctx.socket(zmq.SUB)          # subscribes, then disappears without a word
        leaver.setsockopt(zmq.SUBSCRIBE, b"")
        leaver.connect(cfg.results)
        runtime.start()
        listener = connected_listener(runtime.endpoints["results"], ctx)
        got = []
        listener.listen(count=len(originals), timeout=60, on_verdict=got.append)
        station.join(30)
        leaver.close(0)
        req = ctx.socket(zmq.REQ)             # asks, then goes away before the answer
        req.connect(runtime.endpoints["reply"])
        req.send_multipart(fr.encode(bgr_frame(rng), "bgr8", "gone", 1))
        req.close(linger=2000)                # the request leaves; nobody is there for the reply
        push = ctx.socket(zmq.PUSH)
        push.connect(runtime.endpoints["frames"][0])
        push.send_multipart(fr.encode(bgr_frame(rng), "bgr8", "early", 99))
        listener.listen(count=2, timeout=60, on_verdict=got.append)
        push.close(0)
        listener.close()
    finally:
        stats = runtime.stop()
        ctx.destroy(linger=0)
    assert [v["frame_id"] for v in got if v["camera"] == "early"] == [*range(len(originals)), 99]
    assert listener.report.ok and stats["judged"] == len(originals) + 2


class _SlowFake:
    """A backend that records its batches; the first call is slow so frames pile up behind it."""

    def __init__(self, fail_on: int | None = None):
        self.batches: list[int] = []
        self.fail_on = fail_on

    def infer(self, images):
        self.batches.append(len(images))
        if len(self.batches) == 1:
            time.sleep(0.5)
        if self.fail_on is not None and len(self.batches) == self.fail_on:
            raise RuntimeError("device lost")
        n = len(images)
        amap = np.full((n, 1, 32, 32), 0.25, np.float32)
        return amap, images.reshape(n, -1).mean(axis=1).astype(np.float32) / 255


def _fake_model(backend) -> LoadedModel:
    return LoadedModel(backend, "fake", Path("fake.onnx"), 32, 0.5, "f" * 64, None)


def test_frames_from_several_sources_batch_up_to_max_batch_and_keep_camera_order(tmp_path):
    fake = _SlowFake(fail_on=3)
    runtime = Runtime(runtime_config(tmp_path, zmq=[f"ipc://{tmp_path}/a", f"ipc://{tmp_path}/b"], max_batch=4,
                                     max_wait_ms=300), _fake_model(fake), log=lambda m: None)
    runtime.start()
    ctx = zmq.Context()
    rng = np.random.default_rng(3)
    try:
        listener = connected_listener(runtime.endpoints["results"], ctx)
        socks = []
        for url in runtime.endpoints["frames"]:
            s = ctx.socket(zmq.PUSH)
            s.connect(url)
            socks.append(s)
        socks[0].send_multipart(fr.encode(bgr_frame(rng, 64), "bgr8", "a", 0))   # occupies the slow first call
        deadline = time.monotonic() + 10
        while not fake.batches and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(1, 6):
            socks[0].send_multipart(fr.encode(bgr_frame(rng, 64), "bgr8", "a", i))
            socks[1].send_multipart(fr.encode(bgr_frame(rng, 64), "jpeg", "b", i))
        got = []
        listener.listen(count=11, timeout=30, on_verdict=got.append)
        time.sleep(0.5)
        socks[1].send_multipart(fr.encode(bgr_frame(rng, 64), "bgr8", "b", 6))   # alone: waits, then goes alone
        listener.listen(count=1, timeout=30, on_verdict=got.append)
        for s in socks:
            s.close(0)
        listener.close()
    finally:
        stats = runtime.stop()
        ctx.destroy(linger=0)
    assert fake.batches[0] == 1 and max(fake.batches) == 4 and fake.batches[-1] == 1
    assert sum(fake.batches) == 12
    assert [v["frame_id"] for v in got if v["camera"] == "a"] == list(range(6))
    assert [v["frame_id"] for v in got if v["camera"] == "b"] == list(range(1, 7))
    failed = [v for v in got if v["verdict"] == "ERROR"]    # the third batch raised: its frames are ERROR
    assert len(failed) == fake.batches[2] and all("inference failed" in v["error"] for v in failed)
    assert stats["errors"] == {"inference failed": len(failed)}
    assert [v["seq"] for v in got] == list(range(got[0]["seq"], got[0]["seq"] + 12))


def test_curve_keys_admit_authorized_stations_only(model, tmp_path):
    from click.testing import CliRunner

    from memseg_edge.cli import main
    from memseg_edge.transport import load_client_keys, make_keys, secure_client

    keys = tmp_path / "keys"
    result = CliRunner().invoke(main, ["keys", str(keys), "--client", "station", "--client", "plc"])
    assert result.exit_code == 0, result.output
    intruder = tmp_path / "intruder"
    make_keys(intruder, ("station",))
    (intruder / "server.key").write_bytes((keys / "server.key").read_bytes())   # knows the server, not authorized
    logs = []
    runtime = Runtime(runtime_config(tmp_path, curve_keys=str(keys)), model, log=logs.append)
    runtime.start()
    ctx = zmq.Context()
    rng = np.random.default_rng(4)
    try:
        listener = connected_listener(runtime.endpoints["results"], ctx, curve=load_client_keys(keys, "plc"))
        for frame_id, who in ((1, load_client_keys(intruder)), (2, load_client_keys(keys, "station"))):
            s = ctx.socket(zmq.PUSH)
            # the intruder's handshake may fail before its send: PUSH then has no peer and would block for ever
            # (stations send without blocking, sources.py); the refused frame never arrives either way
            s.setsockopt(zmq.SNDTIMEO, 5000)
            secure_client(s, who)
            s.connect(runtime.endpoints["frames"][0])
            try:
                s.send_multipart(fr.encode(bgr_frame(rng), "bgr8", "station", frame_id))
            except zmq.Again:
                assert frame_id == 1, "the authorised station could not send"
            s.close(linger=500)
        got = []
        listener.listen(count=1, timeout=30, on_verdict=got.append)
        listener.listen(timeout=1.0, on_verdict=got.append)
        listener.close()
        plain = VerdictListener(runtime.endpoints["results"], context=ctx, heartbeat_timeout=1.0)
        rep = plain.listen(timeout=1.5)          # without keys: nothing, not even heartbeats
        plain.close()
    finally:
        stats = runtime.stop()
        ctx.destroy(linger=0)
    assert [v["frame_id"] for v in got] == [2]
    assert rep.heartbeats == 0 and rep.verdicts == 0
    assert stats["events"].get("handshake failed", 0) >= 1


def test_save_failures_keeps_the_newest_overlays_within_the_budget(model, tmp_path):
    out = tmp_path / "rejects"
    images_dir, originals = bottle_subset(tmp_path / "images", per_defect=2, good=2)
    budget_mb = 0.05
    cfg = runtime_config(tmp_path, zmq=[], images=[str(images_dir)], threshold=0.0, save_failures=str(out),
                         save_budget_mb=budget_mb)
    runtime = Runtime(cfg, model, log=lambda m: None)
    stats = runtime.run()          # the folder source ends, so run() returns
    saved = sorted(out.rglob("*.jpg"))
    sizes = sum(p.stat().st_size for p in saved)
    assert stats["fail"] == len(originals)       # threshold 0: everything fails
    assert saved and sizes <= budget_mb * (1 << 20)
    assert stats["events"].get("overlays deleted (budget)", 0) >= 1
    newest = max(int(p.name.split("_")[1]) for p in saved)   # <stamp>_<frame_id>_<score>.jpg
    assert newest == len(originals) - 1
    img = cv2.imread(str(saved[-1]))
    assert img is not None and img.shape[:2] == load_rgb(originals[-1]).shape[:2]


@pytest.mark.parametrize("save_passes", [False, True])
def test_pass_overlays_are_kept_only_when_asked(model, tmp_path, save_passes):
    out = tmp_path / "overlays"
    images_dir, originals = bottle_subset(tmp_path / "images", per_defect=1, good=1)
    cfg = runtime_config(tmp_path, zmq=[], images=[str(images_dir)], threshold=2.0, save_failures=str(out),
                         save_passes=save_passes)
    stats = Runtime(cfg, model, log=lambda m: None).run()
    saved = sorted(out.rglob("*.jpg"))
    assert stats["pass"] == len(originals)       # threshold 2 (scores are probabilities): everything passes
    assert len(saved) == (len(originals) if save_passes else 0)
    assert all(p.name.endswith("_pass.jpg") for p in saved)


def test_sigterm_judges_the_frames_in_flight_then_exits(bundle, tmp_path):
    frames_url, results_url = f"ipc://{tmp_path}/frames", f"ipc://{tmp_path}/results"
    run = CliProcess(["run", "--model", str(bundle), "--zmq", frames_url, "--results", results_url,
                      "--heartbeat", "0.05", "--stats-every", "0", "--max-batch", "1", "--queue", "300"])
    run.wait_ready()
    ctx = zmq.Context()
    rng = np.random.default_rng(6)
    n = 200
    frame = bgr_frame(rng, 640)[:480]
    try:
        listener = connected_listener(results_url, ctx)
        push = ctx.socket(zmq.PUSH)
        push.connect(frames_url)
        for i in range(n):     # decoding and judging these takes the runtime a good fraction of a second
            push.send_multipart(fr.encode(frame, "jpeg", "cam", i))
        got = []
        all_in = threading.Event()
        listener.listen(timeout=30, stop=all_in, on_verdict=got.append,
                        on_heartbeat=lambda hb: all_in.set() if hb["counters"]["received"] == n else None)
        assert all_in.is_set(), "the runtime did not receive every frame"
        assert len(got) < n, "too fast to test: every frame was judged before the signal"
        run.proc.send_signal(signal.SIGTERM)
        listener.listen(count=n - len(got), timeout=60, on_verdict=got.append)
        code, _, log = run.finish()
        push.close(0)
        listener.close()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
        ctx.destroy(linger=0)
    assert code == 0, log
    assert [v["frame_id"] for v in got] == list(range(n))
    assert "SIGTERM" in log and f"final: frames in {n}, judged {n}" in log


# ------------------------------------------------------------------------------------------------
# sources, display, errors a user can act on
# ------------------------------------------------------------------------------------------------

def test_a_missing_camera_is_retried_with_backoff_and_logged_once(tmp_path):
    logs = []
    runtime = Runtime(runtime_config(tmp_path, cameras=[97]), _fake_model(_SlowFake()), log=logs.append)
    runtime.start()
    try:
        time.sleep(2.0)
        assert not runtime.stopping
    finally:
        stats = runtime.stop()
    assert stats["events"].get("camera unavailable", 0) >= 2
    assert sum("camera 97 cannot be opened" in line for line in logs) == 1


def test_display_without_a_gui_is_a_clear_error(bundle, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from memseg_edge.cli import main

    args = ["run", "--model", str(bundle), "--zmq", f"ipc://{tmp_path}/f", "--results", f"ipc://{tmp_path}/r",
            "--display"]
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "needs a desktop session" in result.output
    if "GUI:" in cv2.getBuildInformation() and "NONE" in cv2.getBuildInformation().split("GUI:")[1][:40]:
        monkeypatch.setenv("DISPLAY", ":99")
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "pip install opencv-python" in result.output


def test_run_refuses_what_cannot_work_with_actionable_messages(bundle, tmp_path):
    from click.testing import CliRunner

    from memseg_edge.cli import main

    base = ["run", "--model", str(bundle), "--results", f"ipc://{tmp_path}/r"]
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 1 and "no frame source" in r.output
    r = CliRunner().invoke(main, base + ["--zmq", "*:5555x"])
    assert r.exit_code == 2 and "cannot read endpoint" in r.output
    r = CliRunner().invoke(main, ["camera", "--images", str(tmp_path), "--publish", "*:5555"])
    assert r.exit_code == 2 and "listening address" in r.output
    for command in ("run", "camera", "plc-listen", "keys", "demo"):
        r = CliRunner().invoke(main, [command, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output


# ------------------------------------------------------------------------------------------------
# the demo
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_runs_the_whole_line_on_a_fresh_machine(tmp_path):
    """No data, no GPU, no download: synthetic product, a short training, camera -> runtime -> listener."""
    pytest.importorskip("torch", reason="the demo trains a model: pip install 'memseg-edge[train]'")
    from memseg_edge.demo import run_demo

    lines: list[str] = []
    result = run_demo(tmp_path / "demo", iterations=5, log=lines.append)
    assert len(result["verdicts"]) == 12 and result["listener"].ok
    assert [v["frame_id"] for v in result["verdicts"]] == list(range(12))
    assert (result["bundle"] / "model.json").is_file()
    assert any("plumbing demo" in line for line in lines)
    # every frame gets an overlay (PASS ones too), so a first user always has maps to look at
    assert len(result["overlays"]) == 12
    assert all(p.is_relative_to(tmp_path / "demo" / "overlays") for p in result["overlays"])
