"""Inference backends with one interface: ``infer(images uint8 [N, H, W, 3]) -> (anomaly_map [N, 1, H, W],
score [N])``. onnxruntime (CPU, works everywhere) here; TensorRT engines come with the runtime."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .bundle import INPUT_NAME, MAP_NAME, SCORE_NAME, load_bundle, raise_problems


class OnnxRuntimeBackend:
    """Runs a bundle's ONNX file (any precision variant) with onnxruntime."""

    name = "onnxruntime"

    def __init__(self, model: str | Path, providers: list[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeError("onnxruntime is not installed: pip install 'memseg-edge[onnx]'") from exc
        self.bundle, self.onnx_path = load_bundle(model, validate=False)
        problems = self.bundle.problems()
        if not problems and self.onnx_path.name in self.bundle.meta.get("files", {}):
            self.bundle.verify(self.bundle.precision_of(self.onnx_path))
        from .threads import ort_session_options

        # threads: as given, else what --threads applied in this process (eval, export, calibrate), else the
        # project's default (half the physical cores): onnxruntime's own default takes every core and crawls
        # when another process shares them
        opts = ort_session_options(threads=threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.onnx_path), sess_options=opts,
                                            providers=providers or ["CPUExecutionProvider"])
        raise_problems(self.bundle.root / "model.json", problems + self._graph_problems())
        self.image_size = self.bundle.image_size

    def _graph_problems(self) -> list[str]:
        """Where model.json and the ONNX graph disagree (docs/architecture.md, "Model bundle"), one sentence each."""
        name = self.onnx_path.name
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        found = [f"{name} has no output {out!r}: export the bundle again" for out in (MAP_NAME, SCORE_NAME)
                 if out not in outputs]
        image = inputs.get(INPUT_NAME)
        if image is None:
            return found + [f"{name} has no input {INPUT_NAME!r} (it has {', '.join(inputs) or 'none'}): export the "
                            "bundle again"]
        if image.type != "tensor(uint8)":
            found.append(f"{name} takes {image.type} images, a bundle takes uint8: export the bundle again")
        shape = list(image.shape)
        size = self.bundle.meta.get("image_size")
        if len(shape) != 4 or shape[3] != 3:
            found.append(f"{name} takes images of shape {shape}, a bundle takes [N, H, W, 3]: export the bundle again")
        elif isinstance(size, int) and all(isinstance(d, int) for d in shape[1:3]) and shape[1:3] != [size, size]:
            found.append(f"image_size {size} in model.json, but {name} takes {shape[2]}x{shape[1]} images: "
                         "model.json belongs to another export; export the bundle again")
        return found

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected uint8 images [N, {self.image_size}, {self.image_size}, 3], found {images.shape}")
        amap, score = self.session.run([MAP_NAME, SCORE_NAME], {INPUT_NAME: images})
        return amap.astype(np.float32, copy=False), score.astype(np.float32, copy=False)
