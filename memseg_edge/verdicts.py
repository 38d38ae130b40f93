"""Verdicts out (docs/architecture.md, "Verdicts out"): the one definition of the messages a PLC gateway reads.

Pattern: pub-sub with sequence numbers and heartbeats (the ZeroMQ guide's "Clone"/heartbeat
patterns). Each message is ``[topic, body]``; topic ``verdict.<camera>`` or ``heartbeat``; body UTF-8
JSON.

* verdict: ``v``, ``type`` ("verdict"), ``seq`` (1, 2, 3, ... gap-free per runtime, one counter for
  all cameras), ``camera``, ``frame_id``, ``verdict`` (``PASS`` | ``FAIL`` | ``ERROR``), ``score``
  (``null`` for ``ERROR``), ``threshold``, ``latency_ms`` (frame received to verdict sent), ``model``
  (sha256 prefix of the model file that judged), and ``error`` when ``ERROR``.
* heartbeat: ``v``, ``type`` ("heartbeat"), ``seq`` of the last verdict (0 before the first), ``ts``,
  ``counters``, ``oldest_wait_s`` (seconds the oldest frame received and not yet answered has waited;
  0.0 when none waits) and ``last_verdict_ts`` (``ts`` of the last verdict sent, ``null`` before the
  first). A heartbeat thus proves that frames are being judged, not only that the process is alive.

A line controller treats silence (no heartbeat), a stalled pipeline (``oldest_wait_s`` growing) and
``ERROR`` as reject: a defective part must never pass because a message was lost. A score that is not a
finite number is ``ERROR``, never a verdict on the score. An ``error`` text is at most
:data:`MAX_ERROR_CHARS` characters. The reply endpoint answers with the same verdict body; a trigger that
saw no frame in time is answered with an ``ERROR`` body whose ``seq`` and ``frame_id`` are ``null``.
"""
from __future__ import annotations

import json
import math
from typing import Any

from .scoring import verdict

VERDICT_VERSION = 1
HEARTBEAT_TOPIC = b"heartbeat"
VERDICT_TOPIC_PREFIX = b"verdict."
PASS, FAIL, ERROR = "PASS", "FAIL", "ERROR"
MODEL_ID_LEN = 12
DROPPED = "dropped: runtime overloaded"
MAX_ERROR_CHARS = 300


def verdict_topic(camera: str) -> bytes:
    return VERDICT_TOPIC_PREFIX + camera.encode()


def decide(score: float, threshold: float) -> str:
    """``FAIL`` when the score reaches the threshold: the one rule, :func:`memseg_edge.scoring.verdict`;
    ``ERROR`` when the score is not a finite number (NaN compares false with everything, so it would pass)."""
    if not math.isfinite(score):
        return ERROR
    return verdict(score, threshold)


def _num(x: float | None, digits: int | None = None) -> float | None:
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else x


def verdict_body(*, seq: int | None, camera: str, frame_id: Any, verdict: str, score: float | None,
                 threshold: float, latency_ms: float | None, model: str, error: str | None = None) -> dict:
    body = {"v": VERDICT_VERSION, "type": "verdict", "seq": seq, "camera": camera, "frame_id": frame_id,
            "verdict": verdict, "score": _num(score) if verdict != ERROR else None, "threshold": float(threshold),
            "latency_ms": _num(latency_ms, 3), "model": model[:MODEL_ID_LEN]}
    if verdict == ERROR:
        error = error or "unknown error"
        body["error"] = error if len(error) <= MAX_ERROR_CHARS else error[:MAX_ERROR_CHARS - 3] + "..."
    return body


def heartbeat_body(*, seq: int, ts: float, counters: dict[str, Any], oldest_wait_s: float = 0.0,
                   last_verdict_ts: float | None = None) -> dict:
    return {"v": VERDICT_VERSION, "type": "heartbeat", "seq": seq, "ts": ts, "counters": counters,
            "oldest_wait_s": round(float(oldest_wait_s), 3), "last_verdict_ts": last_verdict_ts}


def dumps(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def parse(parts: list) -> dict:
    """A received ``[topic, body]`` -> the body as a dict with ``type``; ``ValueError`` when malformed."""
    if len(parts) != 2:
        raise ValueError(f"expected [topic, body], found {len(parts)} parts")
    topic = bytes(parts[0])
    try:
        body = json.loads(bytes(parts[1]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"body is not UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("type") not in ("verdict", "heartbeat"):
        raise ValueError("body is not a verdict or heartbeat")
    if body["type"] == "heartbeat" and topic != HEARTBEAT_TOPIC:
        raise ValueError(f"heartbeat on topic {topic!r}")
    if body["type"] == "verdict" and (not isinstance(body.get("camera"), str)
                                      or topic != verdict_topic(body["camera"])):
        # subscriptions match topics by prefix ("verdict.cam1" takes "verdict.cam10"): the body names the camera
        raise ValueError(f"verdict on topic {topic[:80]!r} does not name its camera {str(body.get('camera'))[:80]!r}")
    return body
