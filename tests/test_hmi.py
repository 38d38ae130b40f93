"""The operator screen: the preview messages (format, rate limit), the screen's state, and the page
itself in headless Chromium (Debian's, driven by Playwright) while frames flow."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from memseg_edge import verdicts as vd
from memseg_edge.hmi import HmiServer
from memseg_edge.previews import PreviewPublisher, parse_preview

from conftest import MVTEC
from gateway_fixtures import FakeRuntime, wait_for

CHROMIUM = os.environ.get("MEMSEG_CHROMIUM", "/usr/bin/chromium")


def _bottles() -> list[np.ndarray]:
    """RGB frames: real bottle test images where present, a drawn stand-in elsewhere."""
    root = MVTEC / "bottle" / "test"
    files = [root / "good" / "000.png", root / "broken_large" / "000.png", root / "contamination" / "001.png"]
    if all(f.is_file() for f in files):
        return [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
    out = []
    for i in range(3):
        img = np.full((320, 320, 3), 30, np.uint8)
        cv2.circle(img, (160, 160), 100 + 10 * i, (200, 190, 170), -1)
        out.append(img)
    return out


def _amap(i: int, defect: bool = True) -> np.ndarray:
    """A stand-in anomaly map: a hot blob for a defect, near zero otherwise."""
    amap = np.full((40, 40), 0.03, np.float32)
    if defect:
        amap = cv2.GaussianBlur(amap, (0, 0), 1)
        cv2.circle(amap, (14 + i % 12, 12 + i % 14), 4, 0.95, -1)
        amap = cv2.GaussianBlur(amap, (0, 0), 1.5)
    return amap


class Line:
    """Verdicts (a stand-in runtime) and previews (the real publisher) for camera 'top', flowing at
    ``rate`` frames per second in a thread: every third frame is a FAIL."""

    def __init__(self, rate: float = 12.0):
        self.rt = FakeRuntime(heartbeat_s=0.1).start_heartbeats()
        self.pub = PreviewPublisher("tcp://127.0.0.1:*", fps=4.0)
        self.frames = _bottles()
        self.rate = rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flow, daemon=True)
        self.n = 0

    def start(self):
        self._thread.start()
        return self

    def _flow(self):
        while not self._stop.is_set():
            i = self.n
            verdict = vd.FAIL if i % 3 == 1 else vd.PASS
            score = 0.8 if verdict == vd.FAIL else 0.2
            body = self.rt.verdict("top", i, verdict, score=score)
            self.pub.publish("top", self.frames[i % 3], _amap(i, verdict == vd.FAIL), verdict=verdict, score=score, threshold=0.5,
                             frame_id=i, seq=body["seq"])
            self.n += 1
            self._stop.wait(1.0 / self.rate)

    def close(self):
        self._stop.set()
        self._thread.join()
        self.pub.close()
        self.rt.close()


def test_previews_are_rate_limited_per_camera_with_rejects_besides(tmp_path):
    pub = PreviewPublisher("tcp://127.0.0.1:*", fps=5.0, max_side=160)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"preview.")
    sub.connect(pub.endpoint)
    time.sleep(0.3)
    frames = _bottles()
    got = []
    try:
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < 2.0:             # up to 100 frames/s offered for two seconds
            verdict = vd.FAIL if i % 2 == 0 else vd.PASS
            pub.publish("top", frames[i % 3], _amap(i), verdict=verdict, score=0.1, threshold=0.5, frame_id=i, seq=i)
            i += 1
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            if sub.poll(100):
                got.append(parse_preview(sub.recv_multipart()))
    finally:
        sub.close(0)
        ctx.term()
        pub.close()
    passes = [h for h, _ in got if h["verdict"] == "PASS"]
    fails = [h for h, _ in got if h["verdict"] == "FAIL"]
    assert i > 4 * 5.0 * elapsed                                  # far more offered than allowed
    for kind in (passes, fails):                                  # 5/s each, the rejects besides the passes
        assert 0.6 * 5.0 * elapsed <= len(kind) <= 5.0 * elapsed + 1, (len(kind), elapsed)
    header, jpeg = got[0]
    assert set(header) >= {"v", "type", "camera", "frame_id", "seq", "verdict", "score", "threshold", "ts",
                           "width", "height", "overlay"}
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[:2] == (header["height"], header["width"]) and max(image.shape[:2]) == 160
    assert header["overlay"] is True
    with pytest.raises(ValueError):
        parse_preview([b"preview.top", b"{}", b"not a jpeg"])


def test_hmi_state_follows_verdicts_heartbeats_and_previews():
    line = Line().start()
    hmi = HmiServer(line.rt.endpoint, line.pub.endpoint, port=0, stale_s=0.5, log=lambda m: None).start()
    try:
        def state():
            return json.loads(urllib.request.urlopen(hmi.url + "state", timeout=5).read())

        s = wait_for(lambda: (lambda s: s if s["cameras"] and s["cameras"][0]["rejects"] and
                              s["health"]["frames_per_s"] is not None else None)(state()), timeout=10)
        cam = s["cameras"][0]
        assert cam["camera"] == "top" and s["health"]["healthy"] and s["model"] == "abcdef012345"
        assert cam["counts"]["FAIL"] >= 1 and 0 < cam["reject_rate"] < 1
        assert cam["latency_p50"] == 2.5
        assert 6 < s["health"]["frames_per_s"] < 18             # the line runs at up to 12 frames/s
        jpeg = urllib.request.urlopen(hmi.url + "preview/top", timeout=5).read()
        assert jpeg[:2] == b"\xff\xd8"
        rej = urllib.request.urlopen(f"{hmi.url}reject/top/{cam['rejects'][0]['id']}", timeout=5).read()
        assert rej[:2] == b"\xff\xd8"
        line.rt.extra = {"oldest_wait_s": 0.9}                     # alive, but a frame waits too long
        wait_for(lambda: state()["health"]["stalled"] and not state()["health"]["healthy"], timeout=3)
        line.rt.extra = {}
        wait_for(lambda: state()["health"]["healthy"], timeout=3)
        line.rt.stop_heartbeats()
        wait_for(lambda: not state()["health"]["healthy"], timeout=3)
    finally:
        hmi.stop()
        line.close()


def test_hmi_page_updates_live_in_headless_chromium(tmp_path):
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.skip(f"Chromium absent at {CHROMIUM}: apt-get install chromium (CI's .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright absent: pip install playwright")
    line = Line().start()
    hmi = HmiServer(line.rt.endpoint, line.pub.endpoint, port=0, stale_s=1.0, log=lambda m: None).start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(hmi.url)
            page.evaluate("window.__loaded_once = true")          # survives only if the page never reloads
            card = page.locator('section.card[data-camera="top"]')
            card.wait_for(timeout=10000)
            page.wait_for_function("document.querySelector('.live').naturalWidth > 0", timeout=10000)
            seen_frames, seen_verdicts, seen_images = set(), set(), set()
            end = time.monotonic() + 4.0
            while time.monotonic() < end:
                seen_frames.add(card.locator(".frame").inner_text())
                seen_verdicts.add(card.locator(".verdict").inner_text())
                seen_images.add(card.locator(".live").get_attribute("data-frame"))
                time.sleep(0.1)
            assert len(seen_frames) >= 5, seen_frames                     # verdicts keep arriving
            assert {"PASS", "FAIL"} <= seen_verdicts
            assert len(seen_images) >= 4, seen_images                     # the image keeps changing
            assert page.evaluate("document.querySelector('.live').naturalWidth") > 0
            assert card.locator(".gallery img").count() >= 1
            page.wait_for_function("[...document.querySelectorAll('.gallery img')].every(i => i.naturalWidth > 0)",
                                   timeout=5000)
            assert page.locator("#health").inner_text() == "runtime OK"
            assert page.evaluate("window.__loaded_once") is True
            fits = page.evaluate("document.documentElement.scrollWidth <= 1280")
            assert fits, "the page is wider than a 1280x800 panel"
            shot = Path(os.environ.get("MEMSEG_HMI_SCREENSHOT", tmp_path / "hmi.png"))
            page.screenshot(path=str(shot))
            line.rt.stop_heartbeats()                                       # the runtime goes silent
            page.wait_for_function("document.querySelector('#health').innerText === 'RUNTIME SILENT'", timeout=5000)
            browser.close()
    finally:
        hmi.stop()
        line.close()
