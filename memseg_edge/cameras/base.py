"""A GenICam camera as a frame source: what every vendor shares.

Trigger (``CameraSettings.trigger``):

* ``off``: free-run; the camera paces itself (``fps`` sets ``AcquisitionFrameRate`` when given).
* ``software``: :meth:`GenICamCamera.grabs` fires ``TriggerSoftware`` for each frame it wants, so the
  consumer paces the camera; :meth:`GenICamCamera.trigger` fires one from elsewhere (e.g. a PLC signal
  relayed in software) when ``auto_trigger`` is off.
* ``line1`` ... ``line4``: hardware trigger on that input line (a light barrier or the PLC); frames come
  when the line fires, and ``grabs`` waits for them.

Frame ids are the camera's own frame counter (GenICam ``BlockID``), so a dropped frame shows as a jump
in ``frame_id`` downstream. A camera that fails (unplugged, power loss, a driver error) is closed and
reopened with exponential back-off until ``stop`` is set; each kind of problem is reported once
through ``problem(kind, message)`` like the other sources.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..sources import Capture

TRIGGERS = ("off", "software", "line1", "line2", "line3", "line4")


@dataclass
class CameraSettings:
    trigger: str = "off"
    exposure_us: float | None = None        # ExposureTime, microseconds
    pixel_format: str | None = None         # GenICam name: Mono8, BGR8, RGB8, BayerRG8, ...
    fps: float | None = None                # free-run rate (AcquisitionFrameRate)
    timeout_ms: int = 1000                  # one retrieve; longer silence in free-run is a problem
    auto_trigger: bool = True               # software trigger: grabs() fires one per frame
    features: dict[str, str] = field(default_factory=dict)   # any other GenICam feature -> value

    def __post_init__(self):
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {', '.join(TRIGGERS)}, found {self.trigger!r}")


@dataclass(frozen=True)
class Grab:
    image: np.ndarray        # BGR uint8 [H, W, 3] or mono [H, W]
    frame_id: int            # the camera's frame counter
    ts: float                # host wall-clock seconds when the frame was retrieved


class CameraError(RuntimeError):
    """The camera failed: close, back off, reopen."""


class GenICamCamera(Capture):
    """The vendor-independent part. Subclasses implement the ``_`` methods and set ``vendor``.

    As a :class:`memseg_edge.sources.Capture`: ``endless`` (a camera never runs out of frames) and
    ``own_frame_ids`` (the frame id of the image ``frames`` just yielded is :attr:`last_frame_id`, the
    camera's counter). ``live``: frames come when the camera or a trigger line wants (free-run, hardware
    trigger), so a consumer that falls behind drops them; with a software trigger fired per frame the
    consumer paces the camera and nothing needs dropping."""

    vendor = "genicam"
    endless = True
    own_frame_ids = True

    def __init__(self, device: str, settings: CameraSettings | None = None, name: str | None = None,
                 problem: Callable[[str, str], None] | None = None, backoff: tuple[float, float] = (0.5, 10.0)):
        self.device = str(device)
        self.settings = settings or CameraSettings()
        self.name = name or f"{self.vendor}-{self.device}"
        self._problem = problem or (lambda kind, msg: None)
        self._backoff = backoff
        self._lock = threading.Lock()
        self._open_now = False
        self.reconnects = 0
        self.fps = float(self.settings.fps or 0.0)

    @property
    def live(self) -> bool:
        return not (self.settings.trigger == "software" and self.settings.auto_trigger)

    # -- vendor hooks -------------------------------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _set(self, feature: str, value) -> bool:
        """Set a GenICam feature; False when the camera has no such (writable) feature."""
        raise NotImplementedError

    def _start(self) -> None:
        raise NotImplementedError

    def _retrieve(self, timeout_ms: int) -> Grab | None:
        """The next frame, or None on timeout; raises :class:`CameraError` when the camera failed."""
        raise NotImplementedError

    def _execute(self, command: str) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------
    def _configure(self) -> None:
        s = self.settings
        for feature, value in s.features.items():
            self._require(feature, value)
        if s.pixel_format:
            self._require("PixelFormat", s.pixel_format)
        self._set("TriggerSelector", "FrameStart")
        if s.trigger == "off":
            self._set("TriggerMode", "Off")
            if s.fps:
                self._set("AcquisitionFrameRateEnable", True)
                self._set("AcquisitionFrameRate", float(s.fps)) or self._set("AcquisitionFrameRateAbs", float(s.fps))
        else:
            self._require("TriggerMode", "On")
            self._require("TriggerSource", "Software" if s.trigger == "software" else f"Line{s.trigger[-1]}")
        if s.exposure_us is not None:
            self._set("ExposureAuto", "Off")
            if not (self._set("ExposureTime", float(s.exposure_us)) or self._set("ExposureTimeAbs", float(s.exposure_us))):
                raise CameraError(f"camera {self.device} has no writable ExposureTime")

    def _require(self, feature: str, value) -> None:
        if not self._set(feature, value):
            raise CameraError(f"camera {self.device} refused {feature} = {value}")

    def open(self) -> None:
        with self._lock:
            self._open()
            try:
                self._configure()
                self._start()
            except Exception:
                self._close()
                raise
            self._open_now = True

    def close(self) -> None:
        with self._lock:
            if self._open_now:
                self._open_now = False
                self._close()

    def trigger(self) -> None:
        """Fire one software trigger (``trigger="software"``)."""
        with self._lock:
            if self._open_now:
                self._execute("TriggerSoftware")

    def grabs(self, stop: threading.Event) -> Iterator[Grab]:
        """Frames with the camera's frame ids until ``stop``; reopens with back-off when the camera fails."""
        delay = self._backoff[0]
        s = self.settings
        while not stop.is_set():
            if not self._open_now:
                try:
                    self.open()
                except Exception as exc:   # noqa: BLE001 - SDKs raise their own types; all mean "retry"
                    self._problem("camera unavailable", f"{self.vendor} camera {self.device} cannot be opened "
                                                        f"({exc}); retrying with back-off up to {self._backoff[1]:g} s")
                    stop.wait(delay)
                    delay = min(delay * 2, self._backoff[1])
                    continue
            try:
                if s.trigger == "software" and s.auto_trigger:
                    self.trigger()
                grab = self._retrieve(s.timeout_ms)
            except Exception as exc:   # noqa: BLE001
                self.reconnects += 1
                self._problem("camera disconnects", f"{self.vendor} camera {self.device} failed ({exc}); reconnecting")
                self.close()
                stop.wait(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            if grab is None:
                if s.trigger in ("off", "software"):
                    self._problem("camera timeouts", f"{self.vendor} camera {self.device}: no frame within "
                                                     f"{s.timeout_ms} ms")
                continue
            delay = self._backoff[0]
            yield grab
        self.close()

    def frames(self, stop: threading.Event) -> Iterator[np.ndarray]:
        """The :class:`memseg_edge.sources.Capture` protocol (images only; ``last_frame_id`` holds the id)."""
        for grab in self.grabs(stop):
            self.last_frame_id = grab.frame_id
            yield grab.image

    last_frame_id: int | None = None
