"""Pictures of verdicts: the anomaly map over the frame, saved for FAIL verdicts within a disk budget,
or shown live.

Disk budget rule: when the overlays would exceed ``budget_mb``, the *oldest* overlays are deleted, so
the folder always holds the most recent failures (what an engineer looks at after a shift). Only files
this saver wrote are counted or deleted: each is recorded in the folder's manifest
(:data:`MANIFEST`, one relative path a line), and a file is deleted only when the manifest lists it,
its name has the saver's pattern, and it lies inside the folder; anything else in the folder is left
alone. Overlays go to ``folder/<camera>/``, where the camera name is a valid one (frames.CAMERA_NAME:
it cannot be ``..`` or hidden). Saving runs in its own thread behind a small queue; when the disk is
slower than the failures come, overlays are skipped and counted, never the verdicts delayed; at
shutdown the queue is written out within a timeout, and what is left is counted and logged.
"""
from __future__ import annotations

import queue
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

OVERLAY_SUFFIX = ".jpg"
MANIFEST = ".memseg-overlays"
OVERLAY_NAME = re.compile(r"^\d{8}-\d{6}_[A-Za-z0-9_.-]+_-?\d+\.\d{4}(_pass)?\.jpg$")


def make_overlay(rgb: np.ndarray, amap: np.ndarray | None, verdict: str, score: float | None,
                 threshold: float, caption: str = "") -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` frame and anomaly map ``[h, w]`` in [0, 1] -> BGR uint8 ``[H, W, 3]``: the map as a
    heat map blended over the frame, with the verdict, score and caption written on top."""
    image = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    h, w = image.shape[:2]
    if amap is not None:
        heat = np.clip(np.asarray(amap, np.float32), 0.0, 1.0)
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
        colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
        alpha = (0.25 + 0.5 * heat)[..., None]   # the map shows where it is high, the part stays visible elsewhere
        image = (image * (1 - alpha) + colour * alpha).astype(np.uint8)
    colours = {"PASS": (0, 200, 0), "FAIL": (0, 0, 255), "ERROR": (0, 165, 255)}
    text = f"{verdict} {score:.4f} (thr {threshold:.4f})" if score is not None else verdict
    scale = max(0.4, min(w, h) / 600)
    thick = max(1, int(round(scale * 2)))
    y = int(24 * scale) + 4
    for line in (text, caption):
        if line:
            cv2.putText(image, line, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
            cv2.putText(image, line, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colours.get(verdict, (255, 255, 255)),
                        thick, cv2.LINE_AA)
            y += int(28 * scale) + 4
    return image


def _slug(text: str) -> str:
    """A file-name-safe form of ``text`` that never starts with a dot (so never '.' or '..')."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", str(text))[:80] or "_"
    return "_" + slug if slug.startswith(".") else slug


class FailureSaver:
    """Writes overlays of FAIL verdicts to ``folder/<camera>/`` in a thread, keeping the folder under
    ``budget_mb`` by deleting the oldest overlays."""

    def __init__(self, folder: str | Path, budget_mb: float, on_event: Callable[[str], None],
                 log: Callable[[str], None] = print, queue_size: int = 16):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.budget = int(budget_mb * (1 << 20))
        self._event = on_event
        self._log = log
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._files: deque[tuple[Path, int]] = deque()
        self._used = 0
        self._warned = False
        self._lock = threading.Lock()
        self._writing = False
        self._closed = False
        self._root = self.folder.resolve()
        self._manifest = self.folder / MANIFEST
        for p in self._earlier_overlays():   # earlier runs count against the budget too
            size = p.stat().st_size
            self._files.append((p, size))
            self._used += size
        self._write_manifest()
        self._thread = threading.Thread(target=self._run, name="memseg-overlays", daemon=True)
        self._thread.start()

    def _ours(self, path: Path) -> bool:
        """A file this saver may count and delete: its naming, one folder below the root, inside the root."""
        try:
            inside = path.resolve().parent.parent == self._root
        except OSError:
            return False
        return inside and OVERLAY_NAME.match(path.name) is not None and path.is_file() and not path.is_symlink()

    def _earlier_overlays(self) -> list[Path]:
        """The overlays earlier runs wrote (the manifest's entries that still exist), oldest first."""
        try:
            lines = self._manifest.read_text().splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return []
        paths = {self.folder / line for line in lines if line and not line.startswith("/")}
        return sorted((p for p in paths if self._ours(p)), key=lambda p: p.stat().st_mtime)

    def offer(self, rgb: np.ndarray, amap: np.ndarray | None, camera: str, frame_id, score: float,
              threshold: float, verdict: str = "FAIL") -> None:
        """Queue one overlay; skipped (and counted) when the writer is behind."""
        try:
            self._queue.put_nowait((rgb, amap, camera, frame_id, score, threshold, verdict))
        except queue.Full:
            self._event("overlays skipped (disk too slow)")

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued within ``timeout`` seconds; what is left is counted and logged, not lost silently."""
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closed = True          # the writer stops; an overlay it is writing now counts as not written
            left = int(self._writing)
            while True:
                try:
                    left += self._queue.get_nowait() is not None
                except queue.Empty:
                    break
        for _ in range(left):
            self._event("overlays not written (shutdown)")
        if left:
            self._log(f"warning: {left} overlays were still queued when the runtime stopped ({timeout:g} s to write "
                      "them were not enough); they are not written")

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            with self._lock:
                if item is None:
                    return
                if self._closed:     # taken just as close() counted what was left
                    self._event("overlays not written (shutdown)")
                    return
                self._writing = True
            rgb, amap, camera, frame_id, score, threshold, verdict = item
            try:
                outcome = self._write(rgb, amap, camera, frame_id, score, threshold, verdict)
            except Exception as exc:  # a full or read-only disk must not stop the runtime
                outcome = "overlay write errors"
                if not self._warned:
                    self._warned = True
                    self._log(f"warning: overlay not written ({type(exc).__name__}: {exc}); further write errors "
                              "are counted, not logged")
            with self._lock:
                self._writing = False
                if self._closed:
                    return
            self._event(outcome)

    def _write(self, rgb, amap, camera, frame_id, score, threshold, verdict) -> str:
        """Encode and write one overlay within the budget; returns the counter for what happened."""
        image = make_overlay(rgb, amap, verdict, score, threshold, caption=f"{camera} frame {frame_id}")
        ok, data = cv2.imencode(OVERLAY_SUFFIX, image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise ValueError("OpenCV could not encode the overlay")
        size = int(data.nbytes)
        if size > self.budget:
            return "overlays skipped (larger than the budget)"
        while self._files and self._used + size > self.budget:
            old, old_size = self._files.popleft()
            if self._ours(old):     # replaced by something else since it was written: not ours to delete
                old.unlink()
                self._event("overlays deleted (budget)")
            self._used -= old_size
        stamp = time.strftime("%Y%m%d-%H%M%S")
        tag = "" if verdict == "FAIL" else f"_{verdict.lower()}"
        path = self.folder / _slug(camera) / f"{stamp}_{_slug(frame_id)}_{score:.4f}{tag}{OVERLAY_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_bytes(data.tobytes())
        tmp.replace(path)
        self._files.append((path, size))
        self._used += size
        self._manifest_lines += 1
        if self._manifest_lines > 2 * len(self._files) + 1000:   # deleted ones pile up in an append-only list
            self._write_manifest()
        else:
            with open(self._manifest, "a") as manifest:
                manifest.write(f"{path.relative_to(self.folder)}\n")
        return "overlays saved"

    def _write_manifest(self) -> None:
        tmp = self._manifest.with_name(MANIFEST + ".tmp")
        tmp.write_text("".join(f"{p.relative_to(self.folder)}\n" for p, _ in self._files))
        tmp.replace(self._manifest)
        self._manifest_lines = len(self._files)


class Display:
    """A live window (OpenCV HighGUI) showing the latest verdict; ``q`` or Esc in the window stops the runtime.
    Created in the main thread; fails with :class:`RuntimeError` saying what to install when OpenCV has no GUI."""

    WINDOW = "memseg-edge"

    def __init__(self):
        import os
        import sys

        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise RuntimeError("--display needs a desktop session: no DISPLAY or WAYLAND_DISPLAY is set (on a remote "
                               "machine use ssh -X, or run without --display and use --save-failures DIR)")
        build = cv2.getBuildInformation()
        gui = re.search(r"GUI:\s*(\S+)", build)
        if gui is not None and gui.group(1).upper() == "NONE":
            raise RuntimeError(self._no_gui())
        try:
            cv2.namedWindow(self.WINDOW, cv2.WINDOW_NORMAL)
        except cv2.error as exc:
            raise RuntimeError(self._no_gui() + f" (OpenCV: {str(exc).strip().splitlines()[-1]})") from None

    @staticmethod
    def _no_gui() -> str:
        return ("--display needs OpenCV with a GUI, and this OpenCV has none (opencv-python-headless): "
                "pip uninstall opencv-python-headless && pip install opencv-python; or run without --display "
                "and look at the overlays of --save-failures DIR")

    def show(self, image_bgr: np.ndarray) -> bool:
        """Show one image; False when the user asked to quit."""
        cv2.imshow(self.WINDOW, image_bgr)
        return self.poll()

    def poll(self) -> bool:
        """Let the window handle its events; False when the user pressed q or Esc."""
        return (cv2.waitKey(1) & 0xFF) not in (ord("q"), 27)

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.WINDOW)
        except cv2.error:
            pass
