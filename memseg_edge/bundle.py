"""The model bundle (docs/architecture.md): a folder with ``model.onnx`` (and precision variants
``model.fp16.onnx``, ``model.int8.onnx``) plus ``model.json``. Reading it never needs torch."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .preprocess import FITS

BUNDLE_FORMAT_VERSION = 1
INPUT_NAME = "image"
MAP_NAME = "anomaly_map"
SCORE_NAME = "score"
PRECISION_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def map_gain(meta: dict) -> float:
    """How far the bundle's anomaly map can move per unit move of what the network computes (the decoder's
    probability, the normalised memory distance): 1 for the decoder's map; with the distance fusion
    (``model.json`` ``distance_fusion``: q_p, q_D, c), the steepest slope of ``F / (F + c)``,
    ``max(0.5 / (q_p c), 0.5 / (q_D c))``. Numeric tolerances (export parity, FP16) scale with it."""
    fusion = meta.get("distance_fusion")
    if not fusion:
        return 1.0
    return max(1.0, 0.5 / (fusion["q_p"] * fusion["c"]), 0.5 / (fusion["q_D"] * fusion["c"]))


@dataclass
class Bundle:
    root: Path
    meta: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def fit(self) -> str:
        """How images become the model's square (``memseg_edge.preprocess.FITS``; bundles made before it
        was recorded were stretched)."""
        return str(self.meta.get("resize", "stretch"))

    @property
    def threshold(self) -> float | None:
        """The threshold chosen at training (PyTorch, FP32): what ``model.onnx`` judges with."""
        t = self.meta.get("threshold")
        return float(t["threshold"]) if t else None

    def threshold_for(self, file_name: str) -> float | None:
        """The threshold that judges with the ONNX file ``file_name`` (:func:`variant_threshold`)."""
        t = variant_threshold(self.meta, file_name)
        return float(t["threshold"]) if t else None

    def problems(self) -> list[str]:
        """What in ``model.json`` cannot work, one sentence each (empty when it is sound)."""
        meta, found = self.meta, []
        size = meta.get("image_size")
        if not _positive_int(size):
            found.append(f"image_size is {_show(size)}, expected a positive integer (pixels)")
        if meta.get("resize", "stretch") not in FITS:
            found.append(f"resize is {_show(meta.get('resize'))}, expected one of {', '.join(FITS)} (how images become "
                         "the model's square): export the bundle again with this version")
        if "top_k" in meta and not _positive_int(meta["top_k"]):
            found.append(f"top_k is {_show(meta['top_k'])}, expected a positive integer")
        thr = meta.get("threshold")
        if thr is not None:
            value = thr.get("threshold") if isinstance(thr, dict) else thr
            if not isinstance(thr, dict):
                found.append(f"threshold is {_show(thr)}, expected null or an object {{\"threshold\": T, ...}}: "
                             "re-export the bundle, or pass --threshold T")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                found.append(f"threshold.threshold is {_show(value)}, expected a finite number: re-export the "
                             "bundle, or pass --threshold T")
        if not isinstance(meta.get("files", {}), dict):
            found.append(f"files is {_show(meta.get('files'))}, expected an object of file name -> sha256")
        else:
            for name, entry in meta.get("files", {}).items():
                own = entry.get("threshold") if isinstance(entry, dict) else None
                value = own.get("threshold") if isinstance(own, dict) else own
                if own is not None and (not isinstance(own, dict) or isinstance(value, bool)
                                        or not isinstance(value, (int, float)) or not math.isfinite(value)):
                    found.append(f"files.{name}.threshold is {_show(own)}, expected an object with a finite "
                                 f"\"threshold\": calibrate the variant again, or pass --threshold T")
        return found

    def onnx_path(self, precision: str = "fp32") -> Path:
        if precision not in PRECISION_FILES:
            raise ValueError(f"precision must be one of {sorted(PRECISION_FILES)}, found {precision!r}")
        path = self.root / PRECISION_FILES[precision]
        if not path.is_file():
            how = {"fp16": "memseg-edge calibrate BUNDLE --fp16", "int8": "memseg-edge calibrate BUNDLE --images DIR"}
            raise FileNotFoundError(f"{path} not found: make it first with `{how.get(precision, 'memseg-edge export')}`")
        return path

    def verify(self, precision: str = "fp32") -> Path:
        """Check the ONNX file's sha256 against ``model.json``; returns its path."""
        path = self.onnx_path(precision)
        entry = self.meta.get("files", {}).get(path.name)
        if entry is None:
            raise ValueError(f"{path.name} is not listed in {self.root / 'model.json'}: re-export or re-calibrate")
        if sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{path} does not match the sha256 in model.json: the file was changed or copied "
                             "incompletely; export it again")
        return path

    def precision_of(self, onnx_file: Path) -> str:
        entry = self.meta.get("files", {}).get(onnx_file.name, {})
        return entry.get("precision", "fp32")

    def add_file(self, path: Path, precision: str, **extra: Any) -> None:
        """Record a new ONNX variant in ``model.json``."""
        self.meta.setdefault("files", {})[path.name] = {"sha256": sha256_file(path), "precision": precision, **extra}
        (self.root / "model.json").write_text(json.dumps(self.meta, indent=2))


def variant_threshold(meta: dict, file_name: str | None) -> dict | None:
    """The threshold record (``{"threshold": T, "rule": ..., ...}``) that judges with the ONNX file
    ``file_name`` of a bundle described by ``meta``: the variant's own (``files[name]["threshold"]``, chosen
    by ``calibrate`` from the held-out good images scored with that variant), else that of the variant it
    was made from (``source``: the plugin variants), else the bundle's (chosen at training, FP32)."""
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    seen: set[str] = set()
    name = file_name
    while name and name not in seen:
        seen.add(name)
        entry = files.get(name)
        if not isinstance(entry, dict):
            break
        if isinstance(entry.get("threshold"), dict):
            return entry["threshold"]
        name = entry.get("source")
    return meta.get("threshold")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:40] + "..."


def raise_problems(meta_path: Path, problems: list[str]) -> None:
    """One ``ValueError`` naming every problem of a bundle, one sentence a line."""
    if problems:
        raise ValueError(f"{meta_path} cannot be used:\n  - " + "\n  - ".join(problems))


def load_bundle(path: str | Path, *, validate: bool = True) -> tuple[Bundle, Path]:
    """A bundle folder or one of its ONNX files -> (bundle, the ONNX file to run). ``validate``: refuse a
    ``model.json`` with :meth:`Bundle.problems` (a caller that adds its own checks passes False and calls
    :func:`raise_problems` with all of them)."""
    path = Path(path)
    root, onnx_file = (path, None) if path.is_dir() else (path.parent, path)
    meta_path = root / "model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: a model bundle is a folder made by `memseg-edge export`")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{meta_path} is not valid JSON ({exc}): export the bundle again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds a JSON {type(meta).__name__}, expected an object (the bundle "
                         "description `memseg-edge export` writes)")
    if meta.get("format") != "memseg-edge-bundle":
        raise ValueError(f"{meta_path} is not a memseg-edge bundle description")
    if not isinstance(meta.get("format_version", 0), int) or meta.get("format_version", 0) > BUNDLE_FORMAT_VERSION:
        raise ValueError(f"{meta_path} has bundle format {meta['format_version']}; this memseg-edge reads up to "
                         f"{BUNDLE_FORMAT_VERSION}: upgrade memseg-edge")
    bundle = Bundle(root, meta)
    if validate:
        raise_problems(meta_path, bundle.problems())
    if onnx_file is None:
        onnx_file = bundle.onnx_path("fp32")
    elif not onnx_file.is_file():
        raise FileNotFoundError(f"{onnx_file} not found")
    return bundle, onnx_file
