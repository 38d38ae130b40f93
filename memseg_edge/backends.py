"""Inference backends with one interface: ``infer(images uint8 [N, H, W, 3]) -> (anomaly_map [N, 1, H, W],
score [N])``. onnxruntime (CPU, works everywhere) here; TensorRT engines come with the runtime."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .bundle import INPUT_NAME, MAP_NAME, SCORE_NAME, load_bundle


class OnnxRuntimeBackend:
    """Runs a bundle's ONNX file (any precision variant) with onnxruntime."""

    name = "onnxruntime"

    def __init__(self, model: str | Path, providers: list[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeError("onnxruntime is not installed: pip install 'memseg-edge[onnx]'") from exc
        self.bundle, self.onnx_path = load_bundle(model)
        self.bundle.verify(self.bundle.precision_of(self.onnx_path)) if self.onnx_path.name in \
            self.bundle.meta.get("files", {}) else None
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.onnx_path), sess_options=opts,
                                            providers=providers or ["CPUExecutionProvider"])
        self.image_size = self.bundle.image_size

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected uint8 images [N, {self.image_size}, {self.image_size}, 3], found {images.shape}")
        amap, score = self.session.run([MAP_NAME, SCORE_NAME], {INPUT_NAME: images})
        return amap.astype(np.float32, copy=False), score.astype(np.float32, copy=False)
