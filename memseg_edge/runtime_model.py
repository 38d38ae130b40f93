"""The model that judges: a bundle (onnxruntime) or a TensorRT engine behind one interface."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .bundle import variant_threshold
from .runtime_config import ConfigError


@dataclass
class LoadedModel:
    backend: Any                 # .infer(images uint8 [N, S, S, 3]) -> (maps [N, 1, S, S], scores [N])
    kind: str                    # onnxruntime | tensorrt | tensorrt-rtx
    path: Path
    image_size: int
    threshold: float | None
    model_id: str                # sha256 of the file that judges (prefix goes into every verdict)
    max_batch: int | None        # None: any batch
    precision: str = "fp32"      # fp32 | fp16 | int8 (the variant that judges)
    fit: str = "stretch"         # how a frame becomes the model's square (memseg_edge.preprocess.FITS)
    threshold_rule: str = ""     # how the threshold was chosen (model.json), for the log

    def describe(self) -> str:
        return f"{self.path} ({self.kind}, {self.image_size}x{self.image_size}, model {self.model_id[:12]})"


def load_model(path: str | Path, *, threads: int | None = None, log: Callable[[str], Any] = print) -> LoadedModel:
    """A bundle folder or ``.onnx`` file (onnxruntime) or a ``.engine`` file (TensorRT, needs a GPU)."""
    path = Path(path)
    if path.suffix == ".engine":
        from .trt_backend import TensorRTBackend

        backend = TensorRTBackend(path, log=log)
        info = backend.info
        rule = (variant_threshold(info.bundle_meta, backend.meta.get("onnx_file")) or {}).get("rule", "")
        return LoadedModel(backend, backend.name, path, info.image_size, info.threshold, info.engine_sha256,
                           backend.max_batch, str(backend.meta.get("precision", "fp32")), info.fit, rule)
    if path.is_dir() or path.suffix == ".onnx":
        from .backends import OnnxRuntimeBackend
        from .bundle import sha256_file

        backend = OnnxRuntimeBackend(path, threads=threads)
        entry = backend.bundle.meta.get("files", {}).get(backend.onnx_path.name, {})
        sha = entry.get("sha256") or sha256_file(backend.onnx_path)
        record = variant_threshold(backend.bundle.meta, backend.onnx_path.name)   # validated by the bundle
        return LoadedModel(backend, "onnxruntime", backend.onnx_path, backend.image_size,
                           float(record["threshold"]) if record else None,
                           sha, None, str(entry.get("precision", "fp32")), backend.bundle.fit,
                           record.get("rule", "") if record else "")
    raise ConfigError(f"--model {path}: expected a bundle folder (model.json + model.onnx), one of its .onnx files, "
                      "or a TensorRT .engine file built by `memseg-edge build-engine`")
