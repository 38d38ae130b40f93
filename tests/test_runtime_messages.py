"""The line-side messages and rules, without a model: frames in (every encoding, every kind of bad
input), verdicts out, the endpoint rule, the drop-oldest queue, and the PLC listener's checks."""
from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest
import zmq

from memseg_edge import frames as fr
from memseg_edge import verdicts as vd
from memseg_edge.plc import VerdictListener
from memseg_edge.runtime import IngestQueue, Job
from memseg_edge.transport import EndpointError, all_interfaces, endpoint


def _image(h=48, w=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
    return img


@pytest.mark.parametrize("encoding", ["bgr8", "rgb8", "mono8", "png", "jpeg"])
def test_every_encoding_decodes_to_the_captured_rgb(encoding):
    bgr = _image()
    parts = fr.encode(bgr, encoding, "line3-top", 7)
    header = fr.parse_frame(parts)
    assert (header.camera, header.frame_id, header.width, header.height) == ("line3-top", 7, 64, 48)
    rgb = fr.decode(header, parts[1])
    if encoding == "mono8":
        expected = cv2.cvtColor(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2RGB)
    else:
        expected = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    tolerance = 12 if encoding == "jpeg" else 0
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - expected).mean() <= tolerance


def _header(**over) -> bytes:
    h = {"v": 1, "camera": "cam", "frame_id": 5, "ts": 1.5, "width": 4, "height": 2, "encoding": "bgr8"}
    h.update(over)
    h = {k: v for k, v in h.items() if v is not DROP}
    return json.dumps(h).encode()


DROP = object()
JPEG = cv2.imencode(".jpg", _image())[1].tobytes()
PNG = cv2.imencode(".png", _image())[1].tobytes()

BAD = [  # (message parts, kind, frame_id the ERROR verdict must carry or None)
    ([b"only one part"], fr.MALFORMED, None),
    ([_header(), b"x" * 24, b"extra"], fr.MALFORMED, 5),
    ([b"\xff\xfe not utf8", b""], fr.BAD_HEADER, None),
    ([b"{not json", b""], fr.BAD_HEADER, None),
    ([b"[1, 2]", b""], fr.BAD_HEADER, None),
    ([_header(v=2), b"x" * 24], fr.BAD_HEADER, 5),
    ([_header(camera="bad camera name!"), b"x" * 24], fr.BAD_HEADER, 5),
    ([_header(camera=DROP), b"x" * 24], fr.BAD_HEADER, 5),
    ([_header(frame_id=DROP), b"x" * 24], fr.BAD_HEADER, None),
    ([_header(frame_id={"a": 1}), b"x" * 24], fr.BAD_HEADER, None),
    ([_header(ts="now"), b"x" * 24], fr.BAD_HEADER, 5),
    ([_header(width=-4), b"x" * 24], fr.WRONG_SIZE, 5),
    ([_header(height=10 ** 9), b"x" * 24], fr.WRONG_SIZE, 5),
    ([_header(width=16384, height=16384), b"x" * 24], fr.WRONG_SIZE, 5),   # a decompression bomb's header
    ([_header(width="4"), b"x" * 24], fr.WRONG_SIZE, 5),
    ([_header(encoding="yuv422"), b"x" * 24], fr.UNKNOWN_ENCODING, 5),
    ([_header(), b"x" * 23], fr.WRONG_SIZE, 5),
    ([_header(encoding="mono8"), b"x" * 24], fr.WRONG_SIZE, 5),
    ([_header(encoding="jpeg", width=64, height=48), JPEG[: len(JPEG) // 2]], fr.BAD_IMAGE, 5),
    ([_header(encoding="jpeg", width=64, height=48), b"not a jpeg at all"], fr.BAD_IMAGE, 5),
    ([_header(encoding="jpeg", width=32, height=48), JPEG], fr.WRONG_SIZE, 5),
    ([_header(encoding="png", width=64, height=48), PNG[:-20]], fr.BAD_IMAGE, 5),
    ([_header(encoding="png", width=64, height=48), JPEG], fr.BAD_IMAGE, 5),
    ([_header(encoding="png", width=64, height=49), PNG], fr.WRONG_SIZE, 5),
]


@pytest.mark.parametrize("parts,kind,frame_id", BAD, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(BAD)])
def test_bad_frames_are_refused_with_their_kind_and_frame_id(parts, kind, frame_id):
    with pytest.raises(fr.BadFrame) as err:
        fr.parse_frame(parts)
    assert err.value.kind == kind
    assert err.value.frame_id == frame_id


def test_a_corrupt_but_complete_jpeg_is_caught_at_decoding():
    data = bytearray(JPEG)
    sof = data.find(b"\xff\xda")           # start of scan: trash the entropy-coded data after it
    data[sof + 20: sof + 400] = b"\xff\xd0" * 190
    header = fr.parse_frame([_header(encoding="jpeg", width=64, height=48), bytes(data)])
    try:
        rgb = fr.decode(header, bytes(data))
    except fr.BadFrame as bad:
        assert bad.kind in (fr.BAD_IMAGE, fr.WRONG_SIZE) and bad.frame_id == 5
    else:  # libjpeg may recover such data; then it must still be a frame of the declared size
        assert rgb.shape == (48, 64, 3)


def test_verdict_and_heartbeat_bodies_follow_the_design():
    body = vd.verdict_body(seq=3, camera="cam", frame_id=9, verdict="FAIL", score=np.float32(0.75), threshold=0.5,
                           latency_ms=12.34567, model="ab" * 32)
    assert list(body) == ["v", "type", "seq", "camera", "frame_id", "verdict", "score", "threshold", "latency_ms",
                          "model"]
    assert body["model"] == "ab" * 6 and body["latency_ms"] == 12.346 and body["score"] == 0.75
    err = vd.verdict_body(seq=4, camera="cam", frame_id=10, verdict="ERROR", score=0.9, threshold=0.5, latency_ms=1,
                          model="ab", error="dropped: runtime overloaded")
    assert err["score"] is None and err["error"] == "dropped: runtime overloaded"
    parsed = vd.parse([vd.verdict_topic("cam"), vd.dumps(err)])
    assert parsed == err
    hb = vd.heartbeat_body(seq=4, ts=1.0, counters={"judged": 3})
    assert vd.parse([vd.HEARTBEAT_TOPIC, vd.dumps(hb)])["seq"] == 4
    with pytest.raises(ValueError):
        vd.parse([b"verdict.cam", b"{}"])
    assert vd.decide(0.5, 0.5) == "FAIL" and vd.decide(0.49, 0.5) == "PASS"


@pytest.mark.parametrize("written,bind,url,everywhere", [
    ("5555", True, "tcp://127.0.0.1:5555", False),
    ("localhost:5555", True, "tcp://127.0.0.1:5555", False),
    ("*:5555", True, "tcp://*:5555", True),
    ("tcp://0.0.0.0:5555", True, "tcp://0.0.0.0:5555", True),
    ("line3-edge:5555", False, "tcp://line3-edge:5555", False),
    ("ipc:///tmp/frames", True, "ipc:///tmp/frames", False),
    ("tcp://127.0.0.1:*", True, "tcp://127.0.0.1:*", False),
])
def test_endpoint_rule_binds_to_this_machine_unless_told(written, bind, url, everywhere):
    assert endpoint(written, bind=bind) == url
    assert all_interfaces(url) == everywhere


@pytest.mark.parametrize("written,bind", [("*:5555", False), ("5555x", True), ("tcp://host", True), ("70000", True),
                                          ("ipc://" + "/x" * 60, True)])
def test_endpoint_rule_refuses_what_cannot_work(written, bind):
    with pytest.raises(EndpointError):
        endpoint(written, bind=bind)


def test_ingest_queue_drops_the_oldest_and_keeps_arrival_order():
    dropped = []
    q = IngestQueue(max_frames=3, max_bytes=10 ** 9, on_drop=dropped.append)
    jobs = [Job("cam", i, 0.0, nbytes=10) for i in range(5)]
    for j in jobs:
        assert q.put(j)
    assert [j.frame_id for j in dropped] == [0, 1]
    assert [j.ticket for j in jobs] == [0, 1, 2, 3, 4]
    assert [q.get().frame_id for _ in range(3)] == [2, 3, 4]
    # memory bound too: a frame bigger than the budget pushes out everything older
    q2 = IngestQueue(max_frames=100, max_bytes=100, on_drop=dropped.append)
    q2.put(Job("cam", "a", 0.0, nbytes=60))
    q2.put(Job("cam", "b", 0.0, nbytes=60))
    assert dropped[-1].frame_id == "a" and len(q2) == 1
    q2.close()
    assert q2.get().frame_id == "b" and q2.get() is None


def test_ingest_queue_makes_file_sources_wait_instead_of_dropping():
    dropped = []
    q = IngestQueue(max_frames=2, max_bytes=10 ** 9, on_drop=dropped.append)
    q.put(Job("a", 0, 0.0))
    q.put(Job("a", 1, 0.0))
    later = Job("a", 2, 0.0)
    t = threading.Thread(target=q.put, args=(later,), kwargs={"wait": True})
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and later.ticket == -1
    assert q.get().frame_id == 0
    t.join(2)
    assert later.ticket == 2 and not dropped


class _FakeRuntime:
    """A PUB socket the test writes verdicts and heartbeats to, as a runtime would."""

    def __init__(self, ctx, url):
        self.sock = ctx.socket(zmq.PUB)
        self.sock.bind(url)

    def verdict(self, seq):
        body = vd.verdict_body(seq=seq, camera="cam", frame_id=seq, verdict="PASS", score=0.1, threshold=0.5,
                               latency_ms=1.0, model="abc")
        self.sock.send_multipart([vd.verdict_topic("cam"), vd.dumps(body)])

    def heartbeat(self, seq):
        self.sock.send_multipart([vd.HEARTBEAT_TOPIC, vd.dumps(vd.heartbeat_body(seq=seq, ts=time.time(), counters={}))])


def test_listener_reports_gaps_restarts_and_heartbeat_loss(tmp_path):
    ctx = zmq.Context()
    url = f"ipc://{tmp_path}/v"
    pub = _FakeRuntime(ctx, url)
    events = []
    with VerdictListener(url, heartbeat_timeout=0.5, context=ctx) as listener:
        connected = threading.Event()
        deadline = time.monotonic() + 5
        while not connected.is_set() and time.monotonic() < deadline:   # subscriptions take a moment
            pub.heartbeat(0)
            listener.listen(timeout=0.1, on_event=lambda k, m, i: connected.set() if k == "connected" else None)
        assert connected.is_set()
        for seq in (1, 2, 4, 5):
            pub.verdict(seq)
        pub.heartbeat(7)          # verdicts 6 and 7 never arrived
        pub.verdict(1)            # a restarted runtime
        rep = listener.listen(count=5, timeout=5, on_event=lambda k, m, i: events.append((k, i)))
        assert rep.gaps == [(3, 3), (6, 7)] and rep.missing == 3
        assert rep.restarts == 1
        assert not rep.ok
        listener.listen(timeout=1.0, on_event=lambda k, m, i: events.append((k, i)))
    assert ("heartbeat_lost" in [k for k, _ in events])
    pub.sock.close(0)
    ctx.destroy(linger=0)


def test_plc_listen_exit_code_tells_the_line_controller_what_happened(tmp_path):
    from click.testing import CliRunner

    from memseg_edge.cli import main

    ctx = zmq.Context()
    url = f"ipc://{tmp_path}/v"
    pub = _FakeRuntime(ctx, url)

    def runtime_with_a_gap():
        for _ in range(20):            # heartbeats while the listener subscribes
            pub.heartbeat(0)
            time.sleep(0.05)
        for seq in (1, 2, 4):
            pub.verdict(seq)

    t = threading.Thread(target=runtime_with_a_gap)
    t.start()
    result = CliRunner().invoke(main, ["plc-listen", url, "--count", "3", "--timeout", "10", "--json"])
    t.join()
    assert result.exit_code == 1, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["gaps"] == [[3, 3]] and summary["verdicts"] == 3

    t = threading.Thread(target=lambda: [pub.heartbeat(4) or time.sleep(0.05) for _ in range(20)])
    t.start()
    result = CliRunner().invoke(main, ["plc-listen", url, "--count", "5", "--timeout", "0.8"])
    t.join()
    assert result.exit_code == 2, result.output    # healthy, but the expected verdicts did not come
    pub.sock.close(0)
    ctx.destroy(linger=0)
