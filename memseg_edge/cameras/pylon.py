"""Basler cameras through pypylon (``pip install 'memseg-edge[pylon]'``).

``device``: a serial number, or an index into the cameras pylon enumerates (``0`` = the first).
pylon's camera emulator (``PYLON_CAMEMU=N`` in the environment before the first use of pypylon) shows
N emulated cameras, serials ``0815-0000`` ...; with the features ``TestImageSelector=Off``,
``ImageFileMode=On`` and ``ImageFilename=DIR`` it streams the images of DIR (name order, looping),
which is how the tests run a line without hardware.
"""
from __future__ import annotations

import time

import numpy as np

from .base import CameraError, GenICamCamera, Grab

PYLON_EXTRA = "pip install 'memseg-edge[pylon]'"
_NATIVE = {"Mono8": None, "BGR8Packed": None, "BGR8": None, "RGB8Packed": "rgb", "RGB8": "rgb"}


def _pylon():
    try:
        from pypylon import genicam, pylon
    except ImportError as exc:
        raise RuntimeError(f"pypylon is not installed ({exc}): {PYLON_EXTRA}") from None
    return pylon, genicam


def require_pypylon() -> None:
    """Raise RuntimeError (saying which extra to install) when pypylon is missing."""
    _pylon()


def list_cameras() -> list[dict]:
    """The cameras pylon sees: ``[{"serial", "model", "name"}]``."""
    pylon, _ = _pylon()
    return [{"serial": d.GetSerialNumber(), "model": d.GetModelName(), "name": d.GetFullName()}
            for d in pylon.TlFactory.GetInstance().EnumerateDevices()]


class PylonCamera(GenICamCamera):
    vendor = "pylon"

    def __init__(self, device: str, *args, **kwargs):
        super().__init__(device, *args, **kwargs)
        self._cam = None
        self._converter = None
        self._rgb = False

    def _open(self) -> None:
        pylon, _ = _pylon()
        factory = pylon.TlFactory.GetInstance()
        devices = factory.EnumerateDevices()
        match = [d for d in devices if d.GetSerialNumber() == self.device]
        if not match and self.device.isdigit() and int(self.device) < len(devices):
            match = [devices[int(self.device)]]
        if not match:
            seen = ", ".join(d.GetSerialNumber() for d in devices) or "none"
            raise CameraError(f"no Basler camera with serial or index {self.device} (cameras found: {seen})")
        cam = pylon.InstantCamera(factory.CreateDevice(match[0]))
        cam.Open()
        self._cam = cam

    def _set(self, feature: str, value) -> bool:
        _, genicam = _pylon()
        node = self._cam.GetNodeMap().GetNode(feature)
        if node is None or not genicam.IsWritable(node):
            return False
        if isinstance(value, str):
            node.FromString(value)
        else:
            node.SetValue(value)
        return True

    def _start(self) -> None:
        pylon, _ = _pylon()
        fmt = self._cam.PixelFormat.Value
        self._rgb = _NATIVE.get(fmt) == "rgb"
        self._converter = None
        if fmt not in _NATIVE:
            self._converter = pylon.ImageFormatConverter()
            self._converter.OutputPixelFormat = pylon.PixelType_BGR8packed
        self._cam.StartGrabbing(pylon.GrabStrategy_OneByOne)

    def _execute(self, command: str) -> None:
        pylon, _ = _pylon()
        if command == "TriggerSoftware":
            self._cam.WaitForFrameTriggerReady(self.settings.timeout_ms, pylon.TimeoutHandling_ThrowException)
        self._cam.GetNodeMap().GetNode(command).Execute()

    def _retrieve(self, timeout_ms: int) -> Grab | None:
        pylon, genicam = _pylon()
        cam = self._cam
        if cam.IsCameraDeviceRemoved():
            raise CameraError("device removed")
        try:
            result = cam.RetrieveResult(int(timeout_ms), pylon.TimeoutHandling_Return)
        except genicam.GenericException as exc:
            raise CameraError(str(exc)) from None
        if result is None or not result.IsValid():
            if cam.IsCameraDeviceRemoved():
                raise CameraError("device removed")
            return None
        try:
            if not result.GrabSucceeded():
                self._problem("incomplete grabs", f"pylon camera {self.device}: grab failed "
                                                  f"({result.GetErrorDescription()}); frame skipped")
                return None
            frame_id = int(result.BlockID)
            if self._converter is not None:
                image = self._converter.Convert(result).GetArray()
            else:
                image = result.GetArray()
                if self._rgb:
                    image = image[..., ::-1]
            return Grab(np.ascontiguousarray(image), frame_id, time.time())
        finally:
            result.Release()

    def _close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                if cam.IsGrabbing():
                    cam.StopGrabbing()
                cam.Close()
            except Exception:   # noqa: BLE001 - a removed device may refuse even to close
                pass
            try:
                cam.DestroyDevice()
            except Exception:   # noqa: BLE001
                pass
