"""``memseg-edge predict``: judge image files offline, as anomalib's ``predict`` does: per image a score, a
verdict and an overlay named after the source file, plus ``predictions.csv`` and ``predictions.json``.

The same code as the line: the model is loaded by :func:`memseg_edge.runtime.load_model` (a bundle folder
or one of its ONNX files with onnxruntime, no torch; or a TensorRT ``.engine``, its sidecar checked
first), images are read and sized by :mod:`memseg_edge.preprocess`, the score is the graph's top-k mean
(:mod:`memseg_edge.scoring`'s definition), the verdict is :func:`memseg_edge.scoring.verdict`, and the
overlay is :func:`memseg_edge.overlay.make_overlay`. A file that cannot be read, or a score that is not
a number, is an ``ERROR`` row, never a ``PASS``.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import cv2
import numpy as np

from .overlay import OVERLAY_SUFFIX, make_overlay
from .preprocess import IMAGE_SUFFIXES, load_rgb, over_image, prepare
from .scoring import verdict as decide

OVERLAY_MIN_SIDE = 512
"""Overlays of smaller images are enlarged to this short side, so the caption fits and can be read."""
DEFAULT_BATCH = 8


@dataclass
class Prediction:
    image: str                # the source file, as given or found
    score: float | None       # image score (mean of the top-k map pixels); None when not judged
    verdict: str              # PASS | FAIL | ERROR
    threshold: float
    overlay: str | None       # the overlay file, None for ERROR
    error: str = ""


def collect_images(inputs: Iterable[str | Path], exclude: str | Path | None = None) -> list[tuple[Path, Path]]:
    """Image files and folders (searched recursively, in name order, skipping the folder ``exclude``: the
    output of an earlier run) -> ``[(file, the folder it was found under or the file itself)]``; raises
    :class:`FileNotFoundError` / :class:`ValueError` with what was wrong."""
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not (skip is not None and skip in p.resolve().parents))
            if not files:
                raise ValueError(f"no images ({' '.join(IMAGE_SUFFIXES)}) in {path} or its sub-folders")
            found += [(p, path) for p in files]
        elif path.is_file():
            found.append((path, path))
        else:
            raise FileNotFoundError(f"{path} does not exist")
    if not found:
        raise ValueError("no images given: name image files or folders")
    return found


def overlay_names(found: list[tuple[Path, Path]]) -> list[str]:
    """One overlay file name per image: ``<stem>.jpg``; where stems repeat (``good/000.png`` and
    ``broken/000.png``), the path below the given folder, joined with ``__``."""
    stems = [p.stem for p, _ in found]
    names = []
    for (path, root), stem in zip(found, stems):
        if stems.count(stem) > 1:
            rel = path.relative_to(root) if path != root and root in path.parents else Path(path.parent.name) / path.name
            stem = "__".join(rel.with_suffix("").parts)
        names.append(stem + OVERLAY_SUFFIX)
    seen: dict[str, int] = {}
    unique = []
    for name in names:   # still equal (same file given twice): number them
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{Path(name).stem}__{seen[name]}{OVERLAY_SUFFIX}")
    return unique


def _readable(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    if min(h, w) >= OVERLAY_MIN_SIDE:
        return rgb
    f = OVERLAY_MIN_SIDE / min(h, w)
    return cv2.resize(rgb, (round(w * f), round(h * f)), interpolation=cv2.INTER_CUBIC)


def predict(model: str | Path, inputs: Iterable[str | Path], out_dir: str | Path, *, threshold: float | None = None,
            batch_size: int = DEFAULT_BATCH, threads: int | None = None,
            on_result: Callable[[Prediction], Any] | None = None, log: Callable[[str], Any] = print) -> dict:
    """Judge every image in ``inputs`` with ``model``; writes the overlays, ``predictions.csv`` and
    ``predictions.json`` into ``out_dir`` and returns what the JSON holds. ``threshold``: the decision
    threshold (default: the model's, from ``model.json``); ``on_result`` is called per image, in order."""
    from .runtime import load_model

    found = collect_images(inputs, exclude=out_dir)
    loaded = load_model(model, threads=threads, log=log)
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"the threshold must be a number, found {threshold}: pass --threshold T (score >= T is FAIL)")
    thr = loaded.threshold if threshold is None else float(threshold)
    if thr is None or not math.isfinite(thr):
        raise ValueError(f"{model} records no decision threshold: pass --threshold T (score >= T is FAIL)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = overlay_names(found)
    step = max(1, min(int(batch_size), loaded.max_batch or int(batch_size)))
    results: list[Prediction] = []
    t0 = time.perf_counter()
    for start in range(0, len(found), step):
        chunk = list(range(start, min(start + step, len(found))))
        frames: dict[int, np.ndarray] = {}
        rows: dict[int, Prediction] = {}
        for i in chunk:
            try:
                frames[i] = load_rgb(found[i][0])
            except ValueError as exc:
                rows[i] = Prediction(str(found[i][0]), None, "ERROR", thr, None, str(exc))
        if frames:
            order = sorted(frames)
            try:
                maps, scores = loaded.backend.infer(np.stack([prepare(frames[i], loaded.image_size, loaded.fit)
                                                              for i in order]))
            except Exception as exc:   # one bad batch is reported per image, the rest still runs
                for i in order:
                    rows[i] = Prediction(str(found[i][0]), None, "ERROR", thr, None, f"{type(exc).__name__}: {exc}")
            else:
                for k, i in enumerate(order):
                    amap = over_image(maps[k, 0], *frames[i].shape[:2], loaded.fit)
                    rows[i] = _judged(found[i][0], frames[i], amap, float(scores[k]), thr, out / names[i])
        for i in chunk:
            results.append(rows[i])
            if on_result is not None:
                on_result(rows[i])
    seconds = time.perf_counter() - t0
    counts = {v: sum(r.verdict == v for r in results) for v in ("PASS", "FAIL", "ERROR")}
    report = {"model": str(loaded.path), "kind": loaded.kind, "model_id": loaded.model_id[:12], "threshold": thr,
              "images": len(results), "counts": counts, "seconds": round(seconds, 3),
              "predictions": [asdict(r) for r in results]}
    (out / "predictions.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Prediction.__dataclass_fields__))
        writer.writeheader()
        for r in results:
            writer.writerow({**asdict(r), "score": "" if r.score is None else f"{r.score:.6f}"})
    return report


def _judged(path: Path, rgb: np.ndarray, amap: np.ndarray, score: float, thr: float, overlay: Path) -> Prediction:
    if not math.isfinite(score):
        return Prediction(str(path), None, "ERROR", thr, None, f"the model returned a non-finite score ({score})")
    verdict = decide(score, thr)
    image = make_overlay(_readable(rgb), amap, verdict, score, thr, caption=path.name)
    if not cv2.imwrite(str(overlay), image):
        return Prediction(str(path), score, verdict, thr, None, f"could not write {overlay}")
    return Prediction(str(path), score, verdict, thr, str(overlay))
