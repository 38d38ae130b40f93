"""Frames in (docs/architecture.md, "Frames in"): the one definition of the frame message, its checks and decoding.

A frame is a two-part ZeroMQ message ``[header, payload]``. Header: UTF-8 JSON object with ``v`` (1),
``camera``, ``frame_id``, ``ts`` (seconds since the epoch, float), ``width``, ``height``, ``encoding``
(``bgr8``, ``rgb8``, ``mono8``, ``jpeg``, ``png``); other keys are ignored. Payload: the pixels (raw,
row major, no padding) or the encoded file.

Checks run in two steps so that the socket thread stays fast: :func:`parse_frame` does a bounded amount
of work per message whatever its size (the header, at most :data:`MAX_HEADER_BYTES`; for raw frames the
payload size; for JPEG/PNG the signature, the end marker and, when it lies within the first
:data:`JPEG_SCAN_MARKERS` markers, the size the file declares) and :func:`decode` (the pixels, in the
decode thread, which checks everything the first step could not). Every failure is a :class:`BadFrame`
with a ``kind`` (the counter it goes to) and the ``frame_id`` when the header named one, so the runtime
can answer it with an ``ERROR`` verdict. Values a sender wrote are quoted in messages at most
:data:`QUOTE_CHARS` characters long, so an error text never grows with the input.
"""
from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .preprocess import to_rgb

FRAME_VERSION = 1
RAW_CHANNELS = {"bgr8": 3, "rgb8": 3, "mono8": 1}
ENCODINGS = ("bgr8", "rgb8", "mono8", "jpeg", "png")
MAX_SIDE = 16384
MAX_PIXELS = 64_000_000    # a PNG/JPEG of a few kB may declare a huge size: refuse before decoding (8K is 33 MP)
MAX_CAMERA_LEN = 64
MAX_FRAME_ID_LEN = 128
MAX_HEADER_BYTES = 64 * 1024       # a header is a few hundred bytes; refuse larger ones before parsing
JPEG_SCAN_MARKERS = 64             # markers the socket thread reads looking for the JPEG's size
JPEG_MAX_PADDING = 1024            # zero bytes some encoders append after the end marker
QUOTE_CHARS = 40
# A camera name is a topic suffix and a folder name (overlays): it starts with a letter, digit or '_',
# so '.', '..' and hidden names cannot occur.
CAMERA_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,63}$")
CAMERA_RULE = "camera must be 1-64 characters of letters, digits, '_', '.', ':', '-', starting with a letter, digit or '_'"

# Counter names: one per kind of bad input, as the runtime reports them.
MALFORMED = "malformed message"      # not two parts
BAD_HEADER = "bad header"            # not JSON, not an object, missing or mistyped field, other version
UNKNOWN_ENCODING = "unknown encoding"
WRONG_SIZE = "wrong size"            # payload length or declared image size disagrees with the header
BAD_IMAGE = "bad image data"         # not a JPEG/PNG, truncated, undecodable


class BadFrame(ValueError):
    """A message that cannot be judged. ``frame_id``/``camera`` are set when the header named them."""

    def __init__(self, kind: str, message: str, frame_id: Any = None, camera: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.frame_id = frame_id
        self.camera = camera


@dataclass(frozen=True)
class FrameHeader:
    camera: str
    frame_id: int | str
    ts: float
    width: int
    height: int
    encoding: str

    def to_bytes(self) -> bytes:
        return json.dumps({"v": FRAME_VERSION, "camera": self.camera, "frame_id": self.frame_id, "ts": self.ts,
                           "width": self.width, "height": self.height, "encoding": self.encoding},
                          separators=(",", ":")).encode()


def valid_camera_name(name: str) -> bool:
    return isinstance(name, str) and CAMERA_NAME.match(name) is not None


def safe_camera_name(name: Any, default: str = "unknown") -> str:
    """A valid camera name made from whatever a header (or a file name) held: for ERROR verdicts of bad
    headers and for local sources."""
    if not isinstance(name, str) or not name:
        return default
    name = re.sub(r"[^A-Za-z0-9_.:\-]", "_", name[:MAX_CAMERA_LEN])
    return name if CAMERA_NAME.match(name) else ("_" + name)[:MAX_CAMERA_LEN]


def quote(value: Any) -> str:
    """``repr(value)``, cut to :data:`QUOTE_CHARS` characters: what error texts show of a sender's values."""
    if isinstance(value, (str, bytes)):   # never copy the whole of a huge value to show its start
        value = value[:QUOTE_CHARS + 1]
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


def load_json(raw) -> Any:
    """A header's JSON, refused (:class:`BadFrame` ``BAD_HEADER``) when larger than :data:`MAX_HEADER_BYTES`,
    not UTF-8 JSON, or nested too deeply to parse."""
    n = len(raw)
    if n > MAX_HEADER_BYTES:
        raise BadFrame(BAD_HEADER, f"header is {n} bytes, at most {MAX_HEADER_BYTES} bytes are read")
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadFrame(BAD_HEADER, "header is not UTF-8 JSON") from None
    except RecursionError:
        raise BadFrame(BAD_HEADER, "header JSON is nested too deeply") from None


def _frame_id(value: Any) -> int | str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and 0 < len(value) <= MAX_FRAME_ID_LEN and value.isprintable():
        return value
    return None


def _int_field(obj: dict, key: str) -> int | None:
    v = obj.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def parse_header(raw: bytes) -> FrameHeader:
    """Header bytes -> :class:`FrameHeader`; :class:`BadFrame` otherwise."""
    obj = load_json(raw)
    if not isinstance(obj, dict):
        raise BadFrame(BAD_HEADER, f"header is JSON {type(obj).__name__}, expected an object")
    fid = _frame_id(obj.get("frame_id"))
    cam_raw = obj.get("camera")
    camera = cam_raw if valid_camera_name(cam_raw) else safe_camera_name(cam_raw)

    def bad(kind: str, message: str) -> BadFrame:
        return BadFrame(kind, message, fid, camera)

    version = obj.get("v")
    if type(version) is not int or version != FRAME_VERSION:    # True == 1 in Python; not here
        raise bad(BAD_HEADER, f"header version {quote(version)}, this runtime reads v={FRAME_VERSION}")
    if not valid_camera_name(cam_raw):
        raise bad(BAD_HEADER, CAMERA_RULE)
    if fid is None:
        raise bad(BAD_HEADER, f"frame_id must be an integer or a printable string of at most {MAX_FRAME_ID_LEN} "
                              "characters")
    ts = obj.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not np.isfinite(ts):
        raise bad(BAD_HEADER, "ts must be a number (seconds since the epoch)")
    width, height = _int_field(obj, "width"), _int_field(obj, "height")
    if width is None or height is None or not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise bad(WRONG_SIZE, f"width and height must be integers in 1..{MAX_SIDE}, found "
                              f"{quote(obj.get('width'))} x {quote(obj.get('height'))}")
    if width * height > MAX_PIXELS:
        raise bad(WRONG_SIZE, f"{width}x{height} is more than {MAX_PIXELS // 1_000_000} megapixels: send frames "
                              "at most the camera's resolution (the model sees them resized anyway)")
    encoding = obj.get("encoding")
    if encoding not in ENCODINGS:
        raise bad(UNKNOWN_ENCODING, f"encoding {quote(encoding)} is not one of {', '.join(ENCODINGS)}")
    return FrameHeader(camera, fid, float(ts), width, height, encoding)


def parse_frame(parts: list) -> FrameHeader:
    """The cheap checks of a received message (run in the socket thread): header, payload size for raw
    frames, signature, end marker and declared size for JPEG/PNG. Returns the header."""
    if len(parts) != 2:
        frame_id = camera = None
        if parts:
            frame_id, camera = named(parts[0])
        raise BadFrame(MALFORMED, f"expected 2 message parts [header, payload], found {len(parts)}", frame_id, camera)
    header = parse_header(parts[0])
    check_payload(header, memoryview(parts[1]))
    return header


def named(raw) -> tuple[Any, str | None]:
    """(frame_id, camera) of a header that may be bad in other ways, for its ERROR verdict; (None, None)
    when it names no frame_id."""
    try:
        obj = load_json(raw)
    except BadFrame:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    return _frame_id(obj.get("frame_id")), safe_camera_name(obj.get("camera"))


def check_payload(header: FrameHeader, payload: memoryview) -> None:
    n = payload.nbytes

    def bad(kind: str, message: str) -> BadFrame:
        return BadFrame(kind, message, header.frame_id, header.camera)

    channels = RAW_CHANNELS.get(header.encoding)
    if channels is not None:
        expected = header.width * header.height * channels
        if n != expected:
            raise bad(WRONG_SIZE, f"{header.encoding} {header.width}x{header.height} needs {expected} payload bytes, "
                                  f"found {n}")
        return
    try:
        size = _jpeg_size(payload) if header.encoding == "jpeg" else _png_size(payload)
    except BadFrame as exc:
        raise bad(exc.kind, str(exc)) from None
    if size is not None and size != (header.width, header.height):
        raise bad(WRONG_SIZE, f"the {header.encoding} file is {size[0]}x{size[1]}, the header says "
                              f"{header.width}x{header.height}")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png_size(data: memoryview) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature and the IEND end marker."""
    head = bytes(data[:24])
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise BadFrame(BAD_IMAGE, "payload is not a PNG file (bad signature)")
    if bytes(data[-8:]) != _PNG_END:
        raise BadFrame(BAD_IMAGE, "PNG file is truncated (no IEND chunk at the end)")
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _jpeg_size(data: memoryview) -> tuple[int, int] | None:
    """(width, height) from the start-of-frame marker after checking the SOI and EOI markers; ``None`` when
    the frame header is not among the first :data:`JPEG_SCAN_MARKERS` markers (decoding checks the size
    then). Bounded work whatever the payload's size: a socket thread must never walk a file."""
    n = data.nbytes
    if n < 4 or bytes(data[:3]) != b"\xff\xd8\xff":
        raise BadFrame(BAD_IMAGE, "payload is not a JPEG file (no start-of-image marker)")
    tail = bytes(data[max(2, n - JPEG_MAX_PADDING - 2):]).rstrip(b"\x00")   # some encoders pad after the end
    if not tail.endswith(b"\xff\xd9"):
        raise BadFrame(BAD_IMAGE, "JPEG file is truncated (no end-of-image marker)")
    i = 2
    for _ in range(JPEG_SCAN_MARKERS):
        if i + 4 > n:
            break
        if data[i] != 0xFF:
            raise BadFrame(BAD_IMAGE, "JPEG file is corrupt (marker expected)")
        marker = data[i + 1]
        if marker == 0xFF:          # fill bytes: skip a run of them at once
            run = bytes(data[i + 1:i + 1 + 4096])
            skip = len(run) - len(run.lstrip(b"\xff"))
            i += skip
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _JPEG_SOF:
            if i + 9 > n:
                break
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            return width, height
        if marker in (0xDA, 0xD9) or length < 2:   # scan data or the end before any frame header
            raise BadFrame(BAD_IMAGE, "JPEG file is corrupt (no frame header before the image data)")
        i += 2 + length
    return None


def decode(header: FrameHeader, payload) -> np.ndarray:
    """The frame's pixels as RGB uint8 ``[height, width, 3]``; :class:`BadFrame` when they cannot be read."""
    buf = np.frombuffer(payload, dtype=np.uint8)
    channels = RAW_CHANNELS.get(header.encoding)
    if channels is not None:
        if buf.size != header.width * header.height * channels:
            raise BadFrame(WRONG_SIZE, "payload size does not match the header", header.frame_id, header.camera)
        if channels == 1:
            return to_rgb(buf.reshape(header.height, header.width))
        image = buf.reshape(header.height, header.width, 3)
        return to_rgb(image, "bgr" if header.encoding == "bgr8" else "rgb")
    if header.encoding == "jpeg":
        image, complaints = _imdecode_jpeg(buf)
        if complaints:
            raise BadFrame(BAD_IMAGE, f"JPEG file is truncated or corrupt (libjpeg: {quote(complaints[0])})",
                           header.frame_id, header.camera)
    else:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise BadFrame(BAD_IMAGE, f"{header.encoding} data cannot be decoded", header.frame_id, header.camera)
    if image.shape[:2] != (header.height, header.width):
        raise BadFrame(WRONG_SIZE, f"decoded image is {image.shape[1]}x{image.shape[0]}, the header says "
                                   f"{header.width}x{header.height}", header.frame_id, header.camera)
    try:
        return to_rgb(image, "bgr")
    except ValueError as exc:
        raise BadFrame(BAD_IMAGE, str(exc), header.frame_id, header.camera) from None


_LIBJPEG_COMPLAINTS = ("Corrupt JPEG data", "Premature end of JPEG file")
_stderr_lock = threading.Lock()
_stderr_sink = None


def _imdecode_jpeg(buf: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
    """``cv2.imdecode`` of a JPEG and the warnings libjpeg wrote meanwhile. libjpeg decodes a truncated file
    with an end marker appended (filling the missing part with grey) and only says so on stderr
    ("Corrupt JPEG data: premature end of data segment"), which OpenCV does not report back: so stderr
    (fd 2) is pointed at a scratch file for the call, and whatever else was written there meanwhile is
    passed on."""
    global _stderr_sink
    with _stderr_lock:
        if _stderr_sink is None:
            _stderr_sink = tempfile.TemporaryFile()
        sink = _stderr_sink.fileno()
        saved = os.dup(2)
        try:
            os.dup2(sink, 2)
            image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        size = os.lseek(sink, 0, os.SEEK_END)
        text = b""
        if size:
            os.lseek(sink, 0, os.SEEK_SET)
            text = os.read(sink, min(size, 1 << 16))
            os.ftruncate(sink, 0)
            os.lseek(sink, 0, os.SEEK_SET)
    lines = text.decode("utf-8", "replace").splitlines()
    complaints = [line for line in lines if line.startswith(_LIBJPEG_COMPLAINTS)]
    others = [line for line in lines if line not in complaints]
    if others:
        os.write(2, ("\n".join(others) + "\n").encode())
    return image, complaints


def encode(image_bgr: np.ndarray, encoding: str, camera: str, frame_id: int | str, ts: float | None = None,
           jpeg_quality: int = 95) -> list[bytes]:
    """A captured image (BGR uint8 ``[H, W, 3]`` or mono ``[H, W]``, as OpenCV reads it) -> ``[header, payload]``."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, found {encoding!r}")
    if image_bgr.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, found dtype {image_bgr.dtype}")
    if image_bgr.ndim == 3 and image_bgr.shape[2] == 4:
        image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_BGRA2BGR)
    mono = image_bgr.ndim == 2
    if encoding == "bgr8":
        pixels = cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR) if mono else image_bgr
        payload = np.ascontiguousarray(pixels).tobytes()
    elif encoding == "rgb8":
        payload = cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2RGB if mono else cv2.COLOR_BGR2RGB).tobytes()
    elif encoding == "mono8":
        payload = np.ascontiguousarray(image_bgr if mono else cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)).tobytes()
    else:
        ext, params = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]) if encoding == "jpeg" else \
            (".png", [cv2.IMWRITE_PNG_COMPRESSION, 1])
        ok, data = cv2.imencode(ext, image_bgr, params)
        if not ok:
            raise ValueError(f"OpenCV could not encode a {image_bgr.shape} image as {encoding}")
        payload = data.tobytes()
    height, width = image_bgr.shape[:2]
    header = FrameHeader(camera, frame_id, time.time() if ts is None else float(ts), width, height, encoding)
    return [header.to_bytes(), payload]
