"""The TensorRT backend without a GPU where possible, with one where it matters.

Here (no GPU): an engine is refused with a way forward and never crashes the process; a sidecar that does
not fit the bundle, the GPU or the file is refused before TensorRT loads anything; and the backend's own
data path (pinned buffers, copies, batch splitting, plugin registration before deserialisation, the
name-based tensor API) runs against a stand-in TensorRT module and CUDA runtime that keep "device" memory
on the host. On a GPU machine (``-m gpu``): a real engine against onnxruntime, and the runtime serving
verdicts with it.
"""
from __future__ import annotations

import ctypes
import json
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest

from memseg_edge.preprocess import load_rgb, prepare
from memseg_edge.runtime import Runtime, load_model

from test_runtime import CLI, bottle_subset, runtime_config


@pytest.fixture(scope="module")
def bundle(bottle_model) -> Path:
    return bottle_model["bundle"]


def _fake_engine(tmp_path: Path, bundle: Path, **over) -> Path:
    """An engine file with a well-formed sidecar (what build-engine writes); its bytes are no engine."""
    from memseg_edge.bundle import load_bundle, sha256_file

    engine = tmp_path / "model.rtx.fp32.engine"
    engine.write_bytes(b"not really an engine")
    b, onnx_path = load_bundle(bundle)
    meta = {"format": "memseg-edge-engine", "format_version": 1, "flavour": "tensorrt-rtx",
            "trt_version": _rtx_version(), "gpu": {"built_on": "cpu", "compute_capabilities": ["8.6"],
                                                    "targets": "explicit"},
            "precision": "fp32", "max_batch": 4, "bundle": str(bundle), "onnx_file": onnx_path.name,
            "onnx_sha256": sha256_file(onnx_path), "image_size": b.image_size, "threshold": b.threshold,
            "top_k": b.top_k, "plugins": [], "engine_sha256": sha256_file(engine)}
    meta.update(over)
    (tmp_path / (engine.name + ".json")).write_text(json.dumps(meta))
    return engine


def _rtx_version() -> str:
    import importlib.metadata

    for dist in ("tensorrt_rtx", "tensorrt-rtx", "tensorrt_rtx_cu13"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "0"


def test_engine_without_gpu_is_refused_with_a_way_forward_not_a_crash(bundle, tmp_path):
    from memseg_edge.cuda_env import cuda_device

    if cuda_device() is not None:
        pytest.skip("a CUDA GPU is present: this checks the refusal without one")
    if not _rtx_version() or _rtx_version() == "0":
        pytest.skip("tensorrt_rtx not installed")
    engine = _fake_engine(tmp_path, bundle)
    proc = subprocess.run([*CLI, "run", "--model", str(engine), "--zmq", f"ipc://{tmp_path}/f", "--results",
                           f"ipc://{tmp_path}/r"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr      # a ClickException, not a signal
    assert "no CUDA GPU is usable here" in proc.stderr and "pass the bundle folder" in proc.stderr


def test_engine_sidecar_mismatches_are_refused_before_tensorrt_loads(bundle, tmp_path, monkeypatch):
    from memseg_edge import engine as eng
    from memseg_edge import trt_backend
    from memseg_edge.engine import EngineCheckError

    created = []

    def no_tensorrt_here(*args, **kwargs):
        created.append(args)
        raise AssertionError("TensorRT was loaded although the engine must be refused")

    monkeypatch.setattr(trt_backend, "import_flavour", no_tensorrt_here)
    # the bundle was re-exported after the build: its threshold may not be the engine's
    engine = _fake_engine(tmp_path, bundle, onnx_sha256="0" * 64)
    with pytest.raises(EngineCheckError, match="re-exported or re-calibrated"):
        trt_backend.TensorRTBackend(engine)
    # a GPU that is there but not a target, and an engine file changed after the build
    monkeypatch.setattr(eng, "runtime_identity", lambda backend: {
        "flavour": "tensorrt-rtx", "trt_version": _rtx_version(), "gpu_name": "NVIDIA GeForce RTX 4090",
        "compute_capability": "8.9"})
    engine = _fake_engine(tmp_path, bundle)
    with pytest.raises(EngineCheckError, match="compute capabilities 8.6"):
        trt_backend.TensorRTBackend(engine)
    engine = _fake_engine(tmp_path, bundle, gpu={"compute_capabilities": ["8.9"], "targets": "explicit"})
    engine.write_bytes(b"tampered")
    with pytest.raises(EngineCheckError, match="changed or copied incompletely"):
        trt_backend.TensorRTBackend(engine)
    assert created == []
    # without its bundle the sidecar's own fields describe the model; the plugin list is honoured
    info = trt_backend.engine_model_info(engine, {**json.loads((tmp_path / (engine.name + ".json")).read_text()),
                                                  "bundle": str(tmp_path / "gone")})
    assert info.image_size == 96 and info.max_batch == 4
    assert trt_backend._needs_plugin({"plugins": ["memseg::MemoryArgminL2"]})
    assert not trt_backend._needs_plugin({"plugins": []}) and not trt_backend._needs_plugin({})


# ------------------------------------------------------------------------------------------------
# the data path, against stand-ins
# ------------------------------------------------------------------------------------------------

class _FakeCudart:
    """cuda-python's runtime API as the backend calls it; "device" buffers live in host memory."""

    cudaError_t = types.SimpleNamespace(cudaSuccess=0)
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaStreamNonBlocking = 1
    STREAM = 77

    def __init__(self):
        self.buffers: dict[int, ctypes.Array] = {}
        self.calls: list[tuple] = []

    def _alloc(self, n):
        buf = ctypes.create_string_buffer(n)
        self.buffers[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaMallocHost(self, n):
        self.calls.append(("pinned", n))
        return self._alloc(n)

    def cudaMalloc(self, n):
        self.calls.append(("device", n))
        return self._alloc(n)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        assert stream == self.STREAM
        ctypes.memmove(dst, src, count)
        self.calls.append(("copy", kind, count))
        return (0,)

    def cudaStreamCreateWithFlags(self, flags):
        return 0, self.STREAM

    def cudaStreamSynchronize(self, stream):
        self.calls.append(("sync",))
        return (0,)

    def cudaSetDevice(self, device):
        return (0,)

    def cudaFree(self, ptr):
        return (0,)

    cudaFreeHost = cudaFree

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake"


def _fake_tensorrt(size: int, max_batch: int, events: list):
    """The name-based tensor API of TensorRT 10/11 and TensorRT-RTX, computing a stand-in model in numpy:
    map = mean over channels / 255, score = max of the map."""
    trt = types.ModuleType("fake_tensorrt")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dtype: dtype
    shapes = {"image": (-1, size, size, 3), "anomaly_map": (-1, 1, size, size), "score": (-1,)}
    dtypes = {"image": np.uint8, "anomaly_map": np.float32, "score": np.float32}

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Context:
        def __init__(self):
            self.address, self.input_shape = {}, None

        def set_tensor_address(self, name, ptr):
            assert isinstance(ptr, int)
            self.address[name] = ptr
            return True

        def set_input_shape(self, name, shape):
            assert name == "image" and 1 <= shape[0] <= max_batch
            self.input_shape = tuple(shape)
            return True

        def execute_async_v3(self, stream):
            assert stream == _FakeCudart.STREAM and self.input_shape is not None
            n = self.input_shape[0]
            nbytes = int(np.prod(self.input_shape))
            image = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(self.address["image"]), np.uint8)
            amap = image.reshape(self.input_shape).mean(axis=3, dtype=np.float32)[:, None] / 255
            ctypes.memmove(self.address["anomaly_map"], amap.astype(np.float32).tobytes(), amap.nbytes)
            score = amap.reshape(n, -1).max(axis=1).astype(np.float32)
            ctypes.memmove(self.address["score"], score.tobytes(), score.nbytes)
            events.append(("execute", n))
            return True

    class Engine:
        num_io_tensors = 3

        def get_tensor_name(self, i):
            return ["image", "anomaly_map", "score"][i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "image" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return dtypes[name]

        def get_tensor_shape(self, name):
            return shapes[name]

        def get_tensor_profile_shape(self, name, profile):
            return [(1, size, size, 3), (max_batch, size, size, 3), (max_batch, size, size, 3)]

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            events.append(("runtime",))

        def deserialize_cuda_engine(self, data):
            events.append(("deserialize", bytes(data)))
            return Engine()

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


def test_backend_data_path_with_stand_ins(bundle, tmp_path, monkeypatch):
    from memseg_edge import plugin, trt_backend

    events: list = []
    cudart = _FakeCudart()
    fake = _fake_tensorrt(96, 4, events)
    engine = _fake_engine(tmp_path, bundle, plugins=["memseg::MemoryArgminL2"])
    monkeypatch.setattr(trt_backend, "check_engine_here", lambda path, flavour: events.append(("check", flavour)))
    monkeypatch.setattr(trt_backend, "import_flavour",
                        lambda name, log=None: types.SimpleNamespace(name=name, trt=fake, version="fake"))
    monkeypatch.setattr(trt_backend._Cuda, "__init__", lambda self: setattr(self, "rt", cudart))
    monkeypatch.setattr(plugin, "register_plugin", lambda trt: events.append(("plugin", trt is fake)) or [])

    model = load_model(engine)
    order = [e[0] for e in events]
    assert order[:4] == ["check", "plugin", "runtime", "deserialize"]      # checked, then plugin, then load
    assert events[3][1] == engine.read_bytes()
    assert model.kind == "tensorrt-rtx" and model.max_batch == 4 and model.image_size == 96
    assert [c for c in cudart.calls if c[0] == "pinned"] == [("pinned", 4 * 96 * 96 * 3), ("pinned", 4 * 96 * 96 * 4),
                                                             ("pinned", 4 * 4)]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 96, 96, 3), dtype=np.uint8)
    for n in (1, 3, 4, 6):      # 6 > the engine's largest batch: two runs
        events.clear()
        amap, score = model.backend.infer(images[:n])
        expected = images[:n].mean(axis=3, dtype=np.float32)[:, None] / 255
        np.testing.assert_allclose(amap, expected, rtol=1e-6)
        np.testing.assert_allclose(score, expected.reshape(n, -1).max(axis=1), rtol=1e-6)
        assert [e for e in events if e[0] == "execute"] == ([("execute", 4), ("execute", 2)] if n == 6
                                                            else [("execute", n)])
    # the runtime takes the engine's batch limit and serves verdicts through it
    images_dir, originals = bottle_subset(tmp_path / "images", per_defect=1, good=1)
    stats = Runtime(runtime_config(tmp_path, zmq=[], images=[str(images_dir)]), model, log=lambda m: None).run()
    assert stats["judged"] == len(originals) and stats["errors_total"] == 0
    model.backend.close()


# ------------------------------------------------------------------------------------------------
# on a GPU
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_engine_matches_onnxruntime_and_serves_verdicts(bundle, tmp_path):
    from memseg_edge.cuda_env import cuda_device
    from memseg_edge.engine import build_engine

    if cuda_device() is None:
        pytest.skip("needs an NVIDIA GPU")
    engine = build_engine(bundle, tmp_path / "model.fp32.engine", precision="fp32", max_batch=4, log=lambda m: None)
    trt_model = load_model(engine)
    ort_model = load_model(bundle)
    images = np.stack([prepare(load_rgb(p), trt_model.image_size) for p in bottle_subset(tmp_path / "i")[1][:4]])
    for n in (1, 3, 4, 6):     # 6 > max batch: split inside the backend
        batch = images[np.arange(n) % len(images)]
        amap_t, score_t = trt_model.backend.infer(batch)
        amap_o, score_o = ort_model.backend.infer(batch)
        np.testing.assert_allclose(score_t, score_o, atol=2e-3)
        np.testing.assert_allclose(amap_t, amap_o, atol=2e-2)
    runtime = Runtime(runtime_config(tmp_path, zmq=[], images=[str(tmp_path / "i")]), trt_model, log=print)
    stats = runtime.run()
    assert stats["judged"] == len(list((tmp_path / "i").iterdir())) and stats["errors_total"] == 0
    trt_model.backend.close()


