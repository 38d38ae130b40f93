"""What ``memseg-edge run`` takes (:class:`RuntimeConfig`) and the error for settings that cannot work."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A runtime setting that cannot work; the message says what to change."""


@dataclass
class RuntimeConfig:
    """Everything ``memseg-edge run`` takes; endpoints already normalised (:func:`memseg_edge.transport.endpoint`)."""
    results: str
    zmq: list[str] = field(default_factory=list)
    reply: str | None = None
    cameras: list[int] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    threshold: float | None = None
    max_batch: int | None = None
    max_wait_ms: float = 5.0
    queue_frames: int = 32
    queue_mb: float = 256.0
    max_message_mb: float = 64.0
    save_failures: str | None = None
    save_passes: bool = False            # with save_failures: PASS overlays too (to review what the line passes)
    save_budget_mb: float = 500.0
    camera_timeout_s: float = 10.0       # a camera that never delivers a frame within this stops the runtime; 0: never
    display: bool = False
    max_frames: int | None = None
    stats_every: float = 10.0
    heartbeat_s: float = 1.0
    trigger_timeout_s: float = 5.0
    curve_keys: str | None = None
    pylon: list[str] = field(default_factory=list)          # Basler cameras by serial or index (pypylon)
    camera_settings: Any = None                              # cameras.CameraSettings for every --pylon camera
    metrics_port: int | None = None                          # Prometheus endpoint (0: a free port)
    metrics_host: str = "127.0.0.1"
    previews: str | None = None                              # preview endpoint for the operator screen (PUB)
    preview_fps: float = 2.0                                 # previews per camera per second (plus as many rejects)
