"""TensorRT engines as a runtime backend, with the interface of :mod:`memseg_edge.backends`:
``infer(images uint8 [N, S, S, 3]) -> (anomaly_map float32 [N, 1, S, S], score float32 [N])``.

Both flavours (``tensorrt`` 10.x/11.x and ``tensorrt_rtx``) through one code path and the name-based
tensor API (``num_io_tensors``, ``get_tensor_name``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``). Host and device memory through cuda-python's runtime API
(``cuda.bindings.runtime``): pinned host buffers and device buffers sized for the engine's largest
batch, allocated once; one CUDA stream; copies in and out are asynchronous on that stream and the
stream is synchronised once per batch.

Order of loading, for safety: the sidecar is read and checked against this device
(:func:`memseg_edge.engine.check_engine_here`: flavour, exact TensorRT version, GPU, engine sha256)
before any TensorRT object exists, because without a GPU the lean runtime returns an object whose first
use crashes the process. An engine that contains the fused memory-bank plugin gets it registered before
it is deserialised.
"""
from __future__ import annotations

import ctypes
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .bundle import INPUT_NAME, MAP_NAME, SCORE_NAME, sha256_file, variant_threshold
from .engine import EngineCheckError, check_engine_here, import_flavour, load_engine_meta


@dataclass(frozen=True)
class EngineModelInfo:
    """What the runtime needs about an engine's model, from its bundle's ``model.json`` (when the bundle is
    still where the sidecar says and matches) or from the fields the sidecar recorded at build time."""
    image_size: int
    threshold: float | None
    top_k: int | None
    max_batch: int
    flavour: str
    engine_sha256: str
    source: str
    bundle_meta: dict = field(default_factory=dict, compare=False)   # model.json, {} when the bundle is gone
    fit: str = "stretch"                                              # memseg_edge.preprocess.FITS


def engine_model_info(engine_path: str | Path, meta: dict | None = None) -> EngineModelInfo:
    """Read without TensorRT. Refuses an engine whose bundle was re-exported after the build (its
    ``model.onnx`` no longer matches the sidecar's ``onnx_sha256``): the threshold would not be the
    engine's."""
    engine = Path(engine_path)
    meta = meta if meta is not None else load_engine_meta(engine)
    image_size, threshold, top_k = meta.get("image_size"), meta.get("threshold"), meta.get("top_k")
    fit = meta.get("resize", "stretch")
    source = f"{engine.name}.json"
    bmeta: dict = {}
    bundle_dir = meta.get("bundle")
    model_json = Path(bundle_dir) / "model.json" if bundle_dir else None
    if model_json is not None and model_json.is_file():
        try:
            bmeta = json.loads(model_json.read_text())
        except (OSError, ValueError) as exc:
            raise EngineCheckError(f"{model_json} (the engine's bundle) is unreadable: {exc}") from exc
        entry = (bmeta.get("files") or {}).get(meta.get("onnx_file") or "")
        if entry is None and meta.get("onnx_file") and meta.get("onnx_sha256"):
            raise EngineCheckError(
                f"{engine} was built from {meta['onnx_file']}, which the bundle at {bundle_dir} no longer lists (removed "
                "when the variant it was made from was re-calibrated): its threshold may not fit this engine. Rebuild "
                f"the engine: memseg-edge build-engine {bundle_dir} --precision {meta.get('precision', 'fp32')}"
                f"{' --plugin' if meta.get('plugins') else ''} --out {engine}")
        recorded = (entry or {}).get("sha256")
        if recorded and meta.get("onnx_sha256") and recorded != meta["onnx_sha256"]:
            raise EngineCheckError(
                f"{engine} was built from {meta.get('onnx_file')} with sha256 {meta['onnx_sha256'][:12]}..., but the "
                f"bundle at {bundle_dir} now holds sha256 {recorded[:12]}... (re-exported or re-calibrated since): its "
                "threshold may not fit this engine. Rebuild the engine: memseg-edge build-engine "
                f"{bundle_dir} --precision {meta.get('precision', 'fp32')}{' --plugin' if meta.get('plugins') else ''} "
                f"--out {engine}")
        thr = variant_threshold(bmeta, meta.get("onnx_file"))   # the variant's own, else the bundle's
        image_size = bmeta.get("image_size", image_size)
        threshold = float(thr["threshold"]) if isinstance(thr, dict) and "threshold" in thr else threshold
        top_k = bmeta.get("top_k", top_k)
        fit = bmeta.get("resize", fit)
        source = str(model_json)
    if image_size is None:
        raise EngineCheckError(f"neither {engine}'s sidecar nor its bundle records the image size: rebuild the engine "
                               "with `memseg-edge build-engine`")
    return EngineModelInfo(int(image_size), None if threshold is None else float(threshold),
                           None if top_k is None else int(top_k), int(meta.get("max_batch") or 1),
                           str(meta.get("flavour")), str(meta.get("engine_sha256") or sha256_file(engine)), source,
                           bmeta, _checked_fit(fit, source))


def _checked_fit(fit: Any, source: str) -> str:
    from .preprocess import FITS

    if fit not in FITS:
        raise EngineCheckError(f"{source} gives resize {fit!r}, not one of {', '.join(FITS)}: rebuild the engine with "
                               "this version")
    return str(fit)


def _needs_plugin(meta: dict) -> bool:
    from .plugin import QUALIFIED_NAME

    return QUALIFIED_NAME in (meta.get("plugins") or [])   # build_engine records what it registered


def _dims(dims: Any) -> list[int]:
    """A TensorRT ``Dims`` (indexable, not sliceable) as a list of ints."""
    return [int(dims[i]) for i in range(len(dims))]


class _Cuda:
    """The few cuda-python runtime calls used here, each checked."""

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart  # cuda-python < 12.6
            except ImportError as exc:
                raise EngineCheckError("cuda-python is not installed: pip install 'memseg-edge[trt]' (or [rtx]); "
                                       "it provides the CUDA memory and stream calls the TensorRT backend uses") from exc
        self.rt = cudart

    def check(self, result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != int(self.rt.cudaError_t.cudaSuccess):
            _, name = self.rt.cudaGetErrorName(err)
            raise RuntimeError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}")
        return values[0] if len(values) == 1 else values


class _Tensor:
    """One engine I/O tensor: a pinned host buffer (with a numpy view) and a device buffer, sized for the
    engine's largest batch."""

    def __init__(self, cuda: _Cuda, name: str, dtype: np.dtype, per_item: tuple[int, ...], max_batch: int,
                 is_input: bool):
        self.name, self.dtype, self.per_item, self.is_input = name, np.dtype(dtype), per_item, is_input
        self.item_bytes = int(np.prod(per_item, dtype=np.int64)) * self.dtype.itemsize
        self.nbytes = max(self.item_bytes * max_batch, 1)
        self.host_ptr = int(cuda.check(cuda.rt.cudaMallocHost(self.nbytes), f"pinned allocation for {name}"))
        self.device_ptr = int(cuda.check(cuda.rt.cudaMalloc(self.nbytes), f"device allocation for {name}"))
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.host_ptr)
        self.host = np.frombuffer(raw, dtype=np.uint8).view(self.dtype).reshape((max_batch, *per_item))

    def free(self, cuda: _Cuda) -> None:
        if self.device_ptr:
            cuda.rt.cudaFree(self.device_ptr)
            self.device_ptr = 0
        if self.host_ptr:
            self.host = None
            cuda.rt.cudaFreeHost(self.host_ptr)
            self.host_ptr = 0


class TensorRTBackend:
    """Runs a ``.engine`` file (with its ``.engine.json`` sidecar) on the GPU."""

    def __init__(self, engine_path: str | Path, log: Callable[[str], Any] = print, device: int = 0):
        self.engine_path = Path(engine_path)
        meta = load_engine_meta(self.engine_path)
        self.meta = meta
        self.info = engine_model_info(self.engine_path, meta)
        flavour_name = str(meta.get("flavour"))
        check_engine_here(self.engine_path, flavour_name)   # before any TensorRT object: see module docstring
        flavour = import_flavour(flavour_name, log)
        trt = flavour.trt
        self.name = flavour.name
        self.image_size = self.info.image_size
        self._cuda = _Cuda()
        self._device = int(device)
        self._cuda.check(self._cuda.rt.cudaSetDevice(self._device), "cudaSetDevice")
        self._thread = threading.get_ident()
        if _needs_plugin(meta):
            from .plugin import register_plugin

            register_plugin(trt)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise EngineCheckError(f"{flavour.name} {flavour.version} could not deserialize {self.engine_path} (see the "
                                   "TensorRT messages above): rebuild it on this device with memseg-edge build-engine")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"could not create an execution context for {self.engine_path} (out of GPU memory?)")
        self._tensors: dict[str, _Tensor] = {}
        self._stream = None
        try:
            self._allocate(trt)
        except Exception:
            self.close()
            raise

    def _allocate(self, trt) -> None:
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT_NAME] or not {MAP_NAME, SCORE_NAME} <= set(names):
            raise EngineCheckError(f"{self.engine_path} has tensors {names}; a memseg-edge engine has input "
                                   f"{INPUT_NAME!r} and outputs {MAP_NAME!r}, {SCORE_NAME!r}: rebuild it with "
                                   "memseg-edge build-engine")
        in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(INPUT_NAME)))
        if in_dtype != np.uint8:
            raise EngineCheckError(f"{self.engine_path}: input {INPUT_NAME!r} is {in_dtype}, expected uint8")
        max_shape = _dims(engine.get_tensor_profile_shape(INPUT_NAME, 0)[2])
        self.max_batch = max_shape[0]
        s = self.image_size
        if tuple(max_shape[1:]) != (s, s, 3):
            raise EngineCheckError(f"{self.engine_path}: input shape {max_shape} does not fit image size {s}")
        per_item = {INPUT_NAME: (s, s, 3), MAP_NAME: (1, s, s), SCORE_NAME: ()}
        self._stream = self._cuda.check(
            self._cuda.rt.cudaStreamCreateWithFlags(self._cuda.rt.cudaStreamNonBlocking), "cudaStreamCreate")
        for name in names:
            if name not in per_item:   # an extra output: give it room at the largest batch
                shape = _dims(engine.get_tensor_shape(name))
                per_item[name] = tuple(d if d >= 0 else 1 for d in shape[1:])
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            tensor = _Tensor(self._cuda, name, dtype, per_item[name], self.max_batch, name == INPUT_NAME)
            self._tensors[name] = tensor
            if not self._context.set_tensor_address(name, tensor.device_ptr):
                raise RuntimeError(f"TensorRT refused the buffer address of tensor {name!r}")

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 images [N, {s}, {s}, 3], found {images.shape}")
        if len(images) > self.max_batch:
            parts = [self.infer(images[i:i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if threading.get_ident() != self._thread:   # the runtime API binds the device per thread
            self._cuda.check(self._cuda.rt.cudaSetDevice(self._device), "cudaSetDevice")
            self._thread = threading.get_ident()
        rt, n = self._cuda.rt, len(images)
        src = self._tensors[INPUT_NAME]
        src.host[:n] = images
        self._cuda.check(rt.cudaMemcpyAsync(src.device_ptr, src.host_ptr, n * src.item_bytes,
                                            rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream), "copy to device")
        if not self._context.set_input_shape(INPUT_NAME, (n, s, s, 3)):
            raise RuntimeError(f"TensorRT refused batch {n} (the engine's profile allows 1..{self.max_batch})")
        if not self._context.execute_async_v3(int(self._stream)):   # TensorRT takes the raw cudaStream_t handle
            raise RuntimeError("TensorRT execution failed (see the TensorRT messages above)")
        outputs = [t for t in self._tensors.values() if not t.is_input]
        for t in outputs:
            self._cuda.check(rt.cudaMemcpyAsync(t.host_ptr, t.device_ptr, n * t.item_bytes,
                                                rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
                             f"copy of {t.name} to the host")
        self._cuda.check(rt.cudaStreamSynchronize(self._stream), "stream synchronisation")
        amap = self._tensors[MAP_NAME].host[:n].astype(np.float32, copy=True)
        score = self._tensors[SCORE_NAME].host[:n].astype(np.float32, copy=True).reshape(n)
        return amap, score

    def close(self) -> None:
        cuda = getattr(self, "_cuda", None)
        if cuda is None:
            return
        for t in getattr(self, "_tensors", {}).values():
            t.free(cuda)
        self._tensors = {}
        if getattr(self, "_stream", None) is not None:
            cuda.rt.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = None
        self._engine = None
        self._runtime = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
