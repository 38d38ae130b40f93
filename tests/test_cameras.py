"""Industrial cameras: the vendor-independent layer (reconnect, back-off, frame ids) with a scripted
fake vendor, and Basler's through pypylon against pylon's own camera emulator streaming real bottle
images, trigger included."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("PYLON_CAMEMU", "2")      # before pypylon's first import in this process

from memseg_edge.cameras import CameraSettings, GenICamCamera, Grab  # noqa: E402
from memseg_edge.cameras.base import CameraError  # noqa: E402

from conftest import MVTEC  # noqa: E402


class ScriptedCamera(GenICamCamera):
    """A vendor whose open fails ``open_failures`` times and whose stream breaks after ``break_after``."""
    vendor = "fake"

    def __init__(self, *a, open_failures=2, break_after=3, **kw):
        super().__init__("7", *a, **kw)
        self.open_failures, self.break_after = open_failures, break_after
        self.counter = 100
        self.features = {}
        self.opens = 0
        self.executed = []

    def _open(self):
        self.opens += 1
        if self.open_failures > 0:
            self.open_failures -= 1
            raise CameraError("not found")
        self.since_open = 0

    def _set(self, feature, value):
        if feature == "ExposureTimeAbs":
            return False
        self.features[feature] = value
        return True

    def _start(self):
        pass

    def _execute(self, command):
        self.executed.append(command)

    def _retrieve(self, timeout_ms):
        if self.since_open == self.break_after and self.opens < 4:
            raise CameraError("cable pulled")
        self.since_open += 1
        self.counter += 1
        return Grab(np.full((4, 4), self.counter % 256, np.uint8), self.counter, time.time())

    def _close(self):
        pass


def test_a_camera_that_fails_is_reopened_with_back_off_and_keeps_its_frame_counter():
    problems = []
    cam = ScriptedCamera(CameraSettings(trigger="software", exposure_us=1500.0, pixel_format="Mono8"),
                         problem=lambda kind, msg: problems.append(kind), backoff=(0.02, 0.05))
    stop = threading.Event()
    t0 = time.monotonic()
    ids = []
    for grab in cam.grabs(stop):
        ids.append(grab.frame_id)
        if len(ids) == 8:
            stop.set()
    elapsed = time.monotonic() - t0
    assert ids == list(range(101, 109))                 # the camera's own counter, nothing renumbered
    assert problems.count("camera unavailable") == 2 and problems.count("camera disconnects") == 1
    assert cam.reconnects == 1 and cam.opens == 4
    assert elapsed >= 0.02 + 0.04 + 0.02                # back-off 20 ms, 40 ms, then 20 ms after the break
    assert cam.features["TriggerMode"] == "On" and cam.features["TriggerSource"] == "Software"
    assert cam.features["ExposureTime"] == 1500.0 and cam.features["PixelFormat"] == "Mono8"
    assert cam.executed.count("TriggerSoftware") == 8 + 1   # one per frame, plus the one before the break


def test_unknown_trigger_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="software"):
        CameraSettings(trigger="line9")


# ------------------------------------------------------------------------------------------------
# Basler, through pylon's emulator
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pylon_emulator():
    pytest.importorskip("pypylon", reason="pypylon absent: pip install 'memseg-edge[pylon]'")
    from memseg_edge.cameras.pylon import list_cameras

    cams = [c for c in list_cameras() if c["serial"].startswith("0815-")]
    if not cams:
        pytest.skip("pylon's camera emulator shows no camera (PYLON_CAMEMU was set after pypylon loaded?)")
    return cams


@pytest.fixture(scope="module")
def bottle_folder(tmp_path_factory) -> Path:
    src = MVTEC / "bottle" / "test"
    if not src.is_dir():
        pytest.skip(f"MVTec AD bottle absent: expected at {src}")
    out = tmp_path_factory.mktemp("emulated")
    files = [src / "good" / "000.png", src / "broken_large" / "000.png", src / "contamination" / "000.png"]
    for i, f in enumerate(files):
        (out / f"{i:02d}.png").write_bytes(f.read_bytes())
    return out


def _emulated(folder: Path, **kw) -> CameraSettings:
    h, w = cv2.imread(str(next(folder.glob("*.png")))).shape[:2]
    features = {"TestImageSelector": "Off", "ImageFileMode": "On", "ImageFilename": str(folder),
                "Width": str(w), "Height": str(h)}
    return CameraSettings(features=features, **kw)


def test_pylon_software_trigger_streams_the_folder_with_the_cameras_frame_ids(pylon_emulator, bottle_folder):
    from memseg_edge.cameras.pylon import PylonCamera

    cam = PylonCamera("0815-0000", _emulated(bottle_folder, trigger="software", pixel_format="BGR8Packed"),
                      name="top")
    expected = [cv2.imread(str(p)) for p in sorted(bottle_folder.glob("*.png"))]
    stop = threading.Event()
    grabs = []
    for grab in cam.grabs(stop):
        grabs.append(grab)
        if len(grabs) == 5:
            stop.set()
    ids = [g.frame_id for g in grabs]
    assert ids == list(range(ids[0], ids[0] + 5))
    for i, g in enumerate(grabs):
        assert g.image.shape == expected[0].shape and g.image.dtype == np.uint8
        assert np.array_equal(g.image, expected[i % 3]), f"frame {i} is not image {i % 3} of the folder"


def test_pylon_trigger_on_demand_gives_no_frame_without_a_trigger(pylon_emulator, bottle_folder):
    from memseg_edge.cameras.pylon import PylonCamera

    cam = PylonCamera("0815-0001", _emulated(bottle_folder, trigger="software", auto_trigger=False,
                                             timeout_ms=300, pixel_format="Mono8", exposure_us=2500.0))
    cam.open()
    try:
        assert cam._retrieve(300) is None                  # nothing fired: nothing comes
        cam.trigger()
        grab = cam._retrieve(2000)
        assert grab is not None and grab.image.ndim == 2    # Mono8 as configured
        assert cam._cam.ExposureTime.Value == pytest.approx(2500.0)
        assert cam._retrieve(300) is None                  # one trigger, one frame
    finally:
        cam.close()


def test_pylon_hardware_trigger_waits_for_the_line_and_free_run_paces_itself(pylon_emulator, bottle_folder):
    from memseg_edge.cameras.pylon import PylonCamera

    hw = PylonCamera("0815-0000", _emulated(bottle_folder, trigger="line1", timeout_ms=300))
    hw.open()
    try:
        assert hw._cam.TriggerSource.Value == "Line1" and hw._cam.TriggerMode.Value == "On"
        assert hw._retrieve(300) is None                   # the emulator's line never fires
    finally:
        hw.close()
    free = PylonCamera("0815-0000", _emulated(bottle_folder, trigger="off", fps=20.0, pixel_format="BayerRG8"))
    stop = threading.Event()
    t0, n = time.monotonic(), 0
    for grab in free.grabs(stop):
        assert grab.image.ndim == 3 and grab.image.shape[2] == 3     # Bayer converted to BGR
        n += 1
        if n == 6:
            stop.set()
    assert time.monotonic() - t0 >= 5 / 20.0 * 0.8                   # about 20 frames/s, not as fast as possible


def test_pylon_missing_camera_is_retried_and_reported(pylon_emulator):
    from memseg_edge.cameras.pylon import PylonCamera

    problems = []
    cam = PylonCamera("no-such-serial", CameraSettings(), problem=lambda k, m: problems.append(m),
                      backoff=(0.05, 0.1))
    stop = threading.Event()
    threading.Timer(0.6, stop.set).start()
    assert list(cam.grabs(stop)) == []
    assert len(problems) >= 2 and "no Basler camera with serial or index no-such-serial" in problems[0]
    assert "0815-0000" in problems[0]                               # says which cameras exist
