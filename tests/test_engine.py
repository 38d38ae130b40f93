"""Engine building and checking (memseg_edge.engine, memseg_edge.cuda_env).

Real engines are built with TensorRT-RTX on the CPU (its builder needs no GPU) from tiny bundles made
here with onnx.helper: FP32, FP16 (fp16 graph) and INT8 (Q/DQ). Full TensorRT is not installable on
these machines; its paths are exercised with a stand-in module where the behaviour under test happens
before any TensorRT object exists.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from memseg_edge import cuda_env, engine as eng
from memseg_edge.bundle import sha256_file

onnx = pytest.importorskip("onnx", reason="onnx is needed to make the test models (pip install 'memseg-edge[onnx]')")
from onnx import TensorProto as TP, helper as h, numpy_helper as nh  # noqa: E402

SIZE = 16
TOP_K = 10


def _have_rtx() -> bool:
    import importlib.util
    return importlib.util.find_spec("tensorrt_rtx") is not None


needs_rtx = pytest.mark.skipif(not _have_rtx(), reason="tensorrt_rtx not installed (pip install 'memseg-edge[rtx]')")


def tiny_model(kind: str = "fp32", extra_node: str | None = None, transpose_first: bool = False) -> onnx.ModelProto:
    """image uint8 [N,S,S,3] -> /255 -> NCHW -> Conv(3->4) -> Relu -> [extra] -> Conv(4->1) -> Sigmoid = anomaly_map
    [N,1,S,S]; score [N] = mean of the top-k map pixels. ``kind``: fp32, fp16 (graph in float16), int8 (Q/DQ on the
    first conv: per-tensor activation, per-channel weights, zero points 0). ``extra_node``: an op type inserted after
    the Relu in domain ``memseg`` (node name ``mystery_node``)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((4, 3, 3, 3)) * 0.2).astype(np.float32)
    b1 = (rng.standard_normal(4) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((1, 4, 3, 3)) * 0.2).astype(np.float32)
    b2 = np.zeros(1, np.float32)
    ft, npf = (TP.FLOAT16, np.float16) if kind == "fp16" else (TP.FLOAT, np.float32)
    inits = [nh.from_array(np.array(1 / 255, npf), "scale"), nh.from_array(b1.astype(npf), "b1"),
             nh.from_array(w2.astype(npf), "w2"), nh.from_array(b2.astype(npf), "b2"),
             nh.from_array(np.array([TOP_K], np.int64), "k"), nh.from_array(np.array([0, -1], np.int64), "flat")]
    if transpose_first:  # the layout change on the uint8 tensor (what TensorRT refuses)
        nodes = [h.make_node("Transpose", ["image"], ["image_t"], perm=[0, 3, 1, 2], name="to_nchw"),
                 h.make_node("Cast", ["image_t"], ["f"], to=ft, name="cast_in"),
                 h.make_node("Mul", ["f", "scale"], ["x"], name="scale")]
    else:
        nodes = [h.make_node("Cast", ["image"], ["f"], to=ft, name="cast_in"),
                 h.make_node("Mul", ["f", "scale"], ["fs"], name="scale"),
                 h.make_node("Transpose", ["fs"], ["x"], perm=[0, 3, 1, 2], name="to_nchw")]
    x, w = "x", "w1"
    if kind == "int8":
        ws = (np.abs(w1).reshape(4, -1).max(1) / 127).astype(np.float32)
        wq = np.clip(np.round(w1 / ws[:, None, None, None]), -127, 127).astype(np.int8)
        inits += [nh.from_array(np.array(1 / 127, np.float32), "xs"), nh.from_array(np.array(0, np.int8), "xz"),
                  nh.from_array(wq, "w1q"), nh.from_array(ws, "w1s"), nh.from_array(np.zeros(4, np.int8), "w1z")]
        nodes += [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
                  h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xdq"], name="dq_x"),
                  h.make_node("DequantizeLinear", ["w1q", "w1s", "w1z"], ["w1dq"], axis=0, name="dq_w1")]
        x, w = "xdq", "w1dq"
    else:
        inits.append(nh.from_array(w1.astype(npf), "w1"))
    nodes += [h.make_node("Conv", [x, w, "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
              h.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    feat = "r1"
    if extra_node:
        nodes.append(h.make_node(extra_node, ["r1"], ["e1"], name="mystery_node", domain="memseg",
                                 plugin_version="1", plugin_namespace="", alpha=2.5))
        feat = "e1"
    nodes += [h.make_node("Conv", [feat, "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
              h.make_node("Sigmoid", ["c2"], ["sig"], name="sigmoid")]
    if kind == "fp16":
        nodes.append(h.make_node("Cast", ["sig"], ["anomaly_map"], to=TP.FLOAT, name="cast_out"))
    else:
        nodes.append(h.make_node("Identity", ["sig"], ["anomaly_map"], name="map_out"))
    nodes += [h.make_node("Reshape", ["anomaly_map", "flat"], ["pix"], name="flatten"),
              h.make_node("TopK", ["pix", "k"], ["top", "top_idx"], axis=1, name="topk"),
              h.make_node("ReduceMean", ["top"], ["score"], axes=[1], keepdims=0, name="score")]
    graph = h.make_graph(nodes, f"tiny_{kind}", [h.make_tensor_value_info("image", TP.UINT8, ["N", SIZE, SIZE, 3])],
                         [h.make_tensor_value_info("anomaly_map", TP.FLOAT, ["N", 1, SIZE, SIZE]),
                          h.make_tensor_value_info("score", TP.FLOAT, ["N"])], inits)
    opsets = [h.make_opsetid("", 17)] + ([h.make_opsetid("memseg", 1)] if extra_node else [])
    model = h.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def make_bundle(root: Path, kinds=("fp32", "fp16", "int8"), extra_node: str | None = None,
                transpose_first: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind in kinds:
        name = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}[kind]
        onnx.save(tiny_model(kind, extra_node, transpose_first), root / name)
        files[name] = {"sha256": sha256_file(root / name), "precision": kind}
    meta = {"format": "memseg-edge-bundle", "format_version": 1, "image_size": SIZE, "top_k": TOP_K,
            "threshold": {"threshold": 0.5, "rule": "test"}, "opset": 17, "files": files}
    (root / "model.json").write_text(json.dumps(meta, indent=2))
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


@pytest.fixture(scope="module")
def rtx_engines(bundle, tmp_path_factory) -> dict:
    """One real TensorRT-RTX engine per precision, built on the CPU; {precision: (engine path, log lines)}."""
    if not _have_rtx():
        pytest.skip("tensorrt_rtx not installed (pip install 'memseg-edge[rtx]')")
    out = tmp_path_factory.mktemp("engines")
    built = {}
    for precision in ("fp32", "fp16", "int8"):
        lines: list[str] = []
        path = eng.build_engine(bundle, out / f"model.{precision}.engine", precision=precision,
                                backend="tensorrt-rtx", max_batch=4, opt_batch=2, workspace_mb=256, log=lines.append)
        built[precision] = (path, lines)
    return built


def _rtx():
    return eng.import_flavour("tensorrt-rtx")


# ------------------------------------------------------------------ building


@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_rtx_builds_real_engine_with_sidecar(rtx_engines, bundle, precision):
    path, lines = rtx_engines[precision]
    assert path.is_file() and path.stat().st_size > 10_000
    meta = json.loads(eng.sidecar_path(path).read_text())
    onnx_file = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}[precision]
    assert eng.sidecar_path(path).name == f"model.{precision}.engine.json"
    assert meta["format"] == "memseg-edge-engine" and meta["format_version"] == 1
    assert meta["flavour"] == "tensorrt-rtx"
    assert meta["trt_version"] == _rtx().version and meta["trt_version"][0].isdigit()
    assert meta["precision"] == precision
    assert (meta["max_batch"], meta["opt_batch"], meta["min_batch"]) == (4, 2, 1)
    assert meta["onnx_file"] == onnx_file
    assert meta["onnx_sha256"] == sha256_file(bundle / onnx_file)
    assert meta["model_json_sha256"] == sha256_file(bundle / "model.json")
    assert meta["engine_sha256"] == sha256_file(path) and meta["engine_bytes"] == path.stat().st_size
    assert meta["image_size"] == SIZE and meta["top_k"] == TOP_K and meta["threshold"] == 0.5
    assert meta["plugins"] == [] and meta["strongly_typed"] is True
    assert meta["input"]["shape"] == ["batch", SIZE, SIZE, 3]
    gpu = meta["gpu"]
    if gpu["built_on"] == "cpu":
        assert gpu["compute_capabilities"] == list(eng.RTX_DEFAULT_TARGETS) and gpu["targets"] == "default"
    assert meta["build_seconds"] > 0 and meta["built"].endswith("Z")
    assert any("wrote" in line for line in lines)
    # no temporary files left behind by the atomic writes
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


@needs_rtx
def test_rtx_engine_passes_its_own_check(rtx_engines):
    path, _ = rtx_engines["fp16"]
    version = _rtx().version
    meta = eng.check_engine(path, "tensorrt-rtx", version, "NVIDIA GeForce RTX 3080", "8.6")
    assert meta["precision"] == "fp16"
    assert eng.check_engine(path, "tensorrt_rtx", version, "NVIDIA GeForce RTX 5090", (12, 0))["precision"] == "fp16"
    # "12.0 and later" (NVIDIA's default targets)
    eng.check_engine(path, "tensorrt-rtx", version, "NVIDIA DGX Spark", "12.1")
    eng.check_engine(path, "tensorrt-rtx", version, None, None)  # everything but the GPU


@needs_rtx
def test_check_refuses_other_flavour_version_gpu(rtx_engines):
    path, _ = rtx_engines["fp32"]
    version = _rtx().version
    with pytest.raises(eng.EngineCheckError, match=r"built with tensorrt-rtx.*rebuild it on this device with "
                                                   r"`memseg-edge build-engine .* --backend tensorrt"):
        eng.check_engine(path, "tensorrt", "10.3.0", "Orin", "8.7")
    with pytest.raises(eng.EngineCheckError, match=r"1\.0\.0.*rebuild it on this device"):
        eng.check_engine(path, "tensorrt-rtx", "1.0.0", "NVIDIA GeForce RTX 3080", "8.6")
    with pytest.raises(eng.EngineCheckError, match=r"compute 7\.5.*--compute-capability 7\.5"):
        eng.check_engine(path, "tensorrt-rtx", version, "NVIDIA GeForce RTX 2080", "7.5")
    with pytest.raises(eng.EngineCheckError, match=r"compute 9\.0"):
        eng.check_engine(path, "tensorrt-rtx", version, "NVIDIA H100", "9.0")


@needs_rtx
def test_check_refuses_tampered_engine_and_missing_sidecar(rtx_engines, tmp_path):
    src, _ = rtx_engines["int8"]
    version = _rtx().version
    engine = tmp_path / src.name
    engine.write_bytes(src.read_bytes())
    side = eng.sidecar_path(engine)
    side.write_text(eng.sidecar_path(src).read_text())
    eng.check_engine(engine, "tensorrt-rtx", version, "RTX", "8.9")
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(eng.EngineCheckError, match="sha256"):
        eng.check_engine(engine, "tensorrt-rtx", version, "RTX", "8.9")
    side.unlink()
    with pytest.raises(eng.EngineCheckError, match=r"engine\.json not found.*memseg-edge build-engine"):
        eng.check_engine(engine, "tensorrt-rtx", version, "RTX", "8.9")
    with pytest.raises(eng.EngineCheckError, match="not found: build it"):
        eng.check_engine(tmp_path / "nope.engine", "tensorrt-rtx", version, "RTX", "8.9")


def test_check_full_tensorrt_engine_needs_same_gpu(tmp_path):
    """A full-TensorRT sidecar (written by hand: full TensorRT cannot run here) pins GPU model and CC."""
    engine = tmp_path / "model.orin.fp16.engine"
    engine.write_bytes(b"not really an engine")
    meta = {"format": "memseg-edge-engine", "format_version": 1, "flavour": "tensorrt", "trt_version": "10.3.0",
            "gpu": {"name": "Orin", "compute_capability": "8.7"}, "precision": "fp16", "bundle": "/models/bottle",
            "engine_sha256": sha256_file(engine)}
    eng.sidecar_path(engine).write_text(json.dumps(meta))
    assert eng.check_engine(engine, "tensorrt", "10.3.0", "Orin", (8, 7))["gpu"]["name"] == "Orin"
    with pytest.raises(eng.EngineCheckError, match=r"built for Orin .*this device is NVIDIA A100.*"
                                                   r"memseg-edge build-engine /models/bottle --precision fp16"):
        eng.check_engine(engine, "tensorrt", "10.3.0", "NVIDIA A100", "8.0")
    with pytest.raises(eng.EngineCheckError, match="built for Orin"):
        eng.check_engine(engine, "tensorrt", "10.3.0", "Orin", "8.6")
    with pytest.raises(eng.EngineCheckError, match="10.3.0, this device has 10.3.1"):
        eng.check_engine(engine, "tensorrt", "10.3.1", "Orin", "8.7")
    meta["format_version"] = 99
    eng.sidecar_path(engine).write_text(json.dumps(meta))
    with pytest.raises(eng.EngineCheckError, match="upgrade memseg-edge"):
        eng.check_engine(engine, "tensorrt", "10.3.0", "Orin", "8.7")


@needs_rtx
def test_rtx_explicit_targets_and_default_name(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_env, "cuda_device", lambda index=0: None)
    monkeypatch.setattr(eng, "_timing_cache_note_logged", False)
    out = tmp_path / "engines"
    out.mkdir()
    lines: list[str] = []
    path = eng.build_engine(bundle, out, precision="fp32", backend="rtx", max_batch=2,
                            compute_capabilities=["8.6", "sm_75"], timing_cache=tmp_path / "tc.bin",
                            log=lines.append)
    assert path == out / "model.rtx.fp32.engine"
    meta = json.loads(eng.sidecar_path(path).read_text())
    assert meta["gpu"] == {"built_on": "cpu", "compute_capabilities": ["7.5", "8.6"], "targets": "explicit"}
    assert (meta["max_batch"], meta["opt_batch"]) == (2, 2)
    version = _rtx().version
    eng.check_engine(path, "tensorrt-rtx", version, "NVIDIA GeForce RTX 2080", "7.5")
    with pytest.raises(eng.EngineCheckError, match="compute 8.9"):
        eng.check_engine(path, "tensorrt-rtx", version, "NVIDIA GeForce RTX 4090", "8.9")
    # the timing cache is a no-op in TensorRT-RTX: skipped, said so, nothing written
    assert not (tmp_path / "tc.bin").exists()
    assert sum("ignores timing caches" in line for line in lines) == 1
    with pytest.raises(eng.EngineBuildError, match="cannot target compute capability 9.0"):
        eng.build_engine(bundle, out, backend="tensorrt-rtx", compute_capabilities=["9.0"], log=lines.append)


@needs_rtx
def test_auto_backend_without_gpu_is_rtx(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_env, "cuda_device", lambda index=0: None)
    path = eng.build_engine(bundle, tmp_path / "auto.engine", max_batch=1, log=lambda m: None)
    assert json.loads(eng.sidecar_path(path).read_text())["flavour"] == "tensorrt-rtx"


def test_missing_variant_names_the_command(tmp_path):
    root = make_bundle(tmp_path / "b", kinds=("fp32",))
    with pytest.raises(eng.EngineBuildError, match=r"model\.int8\.onnx not found.*memseg-edge calibrate"):
        eng.build_engine(root, tmp_path / "x.engine", precision="int8", backend="tensorrt-rtx", log=lambda m: None)
    with pytest.raises(eng.EngineBuildError, match=r"model\.fp16\.onnx not found.*memseg-edge calibrate"):
        eng.build_engine(root, tmp_path / "x.engine", precision="fp16", backend="tensorrt-rtx", log=lambda m: None)
    with pytest.raises(eng.EngineBuildError, match="precision must be one of"):
        eng.build_engine(root, tmp_path / "x.engine", precision="int4", log=lambda m: None)
    with pytest.raises(eng.EngineBuildError, match="opt_batch"):
        eng.build_engine(root, tmp_path / "x.engine", max_batch=2, opt_batch=3, log=lambda m: None)
    (root / "model.onnx").write_bytes((root / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(eng.EngineBuildError, match="sha256"):
        eng.build_engine(root, tmp_path / "x.engine", backend="tensorrt-rtx", log=lambda m: None)


def memory_bundle(root: Path) -> Path:
    """A tiny FP32-only bundle whose Relu is named as an exported bundle's memory step, so the FP16
    conversion (which keeps that step in float32) accepts it."""
    root = make_bundle(root, kinds=("fp32",))
    model = onnx.load(str(root / "model.onnx"))
    for node in model.graph.node:
        if node.name == "relu1":
            node.name = "memory/relu1"
    onnx.save(model, str(root / "model.onnx"))
    meta = json.loads((root / "model.json").read_text())
    meta["memory_subgraph"] = {"node_prefix": "memory/", "inputs": ["c1"], "outputs": ["r1"], "bank_initializers": []}
    meta["files"]["model.onnx"]["sha256"] = sha256_file(root / "model.onnx")
    (root / "model.json").write_text(json.dumps(meta, indent=2))
    return root


@needs_rtx
def test_fp16_engine_after_an_int8_only_calibration_makes_the_fp16_variant(tmp_path):
    """README's flow (calibrate --images, then build-engine --precision fp16) used to end in 'model.fp16.onnx
    not found' and a sha256 complaint about a file that did not exist."""
    root = memory_bundle(tmp_path / "b")
    lines: list[str] = []
    path = eng.build_engine(root, tmp_path / "x.engine", precision="fp16", backend="tensorrt-rtx", max_batch=1,
                            log=lines.append)
    assert any("model.fp16.onnx does not exist yet: making it" in line for line in lines)
    entry = json.loads((root / "model.json").read_text())["files"]["model.fp16.onnx"]
    assert entry["precision"] == "fp16" and entry["sha256"] == sha256_file(root / "model.fp16.onnx")
    meta = json.loads(eng.sidecar_path(path).read_text())
    assert meta["onnx_file"] == "model.fp16.onnx" and meta["onnx_sha256"] == entry["sha256"]


@needs_rtx
def test_sidecar_records_that_the_engine_was_not_compared_and_why(rtx_engines):
    from memseg_edge.cuda_env import cuda_device

    if cuda_device() is not None:
        pytest.skip("a CUDA GPU is here: the engine may be compared")
    for path, lines in rtx_engines.values():
        comparison = json.loads(eng.sidecar_path(path).read_text())["comparison"]
        assert comparison["compared"] is False
        assert "no CUDA GPU" in comparison["reason"] and "memseg-edge eval" in comparison["reason"]
        assert any(line.startswith("not compared with") for line in lines)


def test_comparison_runs_engine_and_onnx_on_the_same_images(bundle, tmp_path, monkeypatch):
    """Where the engine runs, both run on the same images and the differences land in the sidecar. The engine is
    a stand-in here (onnxruntime plus a known offset): the arithmetic and the record are under test."""
    import cv2

    from memseg_edge import trt_backend
    from memseg_edge.backends import OnnxRuntimeBackend

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"stand-in")
    side = {"format": eng.ENGINE_FORMAT, "format_version": 1, "precision": "fp32", "bundle": str(bundle),
            "onnx_file": "model.onnx", "threshold": 0.5, "plugins": []}
    eng.sidecar_path(engine).write_text(json.dumps(side))
    seen = []

    class StandIn:
        image_size = SIZE

        def __init__(self, path, log=print):
            self._ort = OnnxRuntimeBackend(bundle / "model.onnx")

        def infer(self, images):
            seen.append(images.copy())
            amap, score = self._ort.infer(images)
            return amap + 1e-3, score + 2e-3

        def close(self):
            pass

    monkeypatch.setattr(trt_backend, "TensorRTBackend", StandIn)
    monkeypatch.setattr(cuda_env, "cuda_device", lambda index=0: {"name": "Stand-in GPU", "compute_capability": "8.6"})
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"{i}.png"), np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    record = eng.compare_with_onnx(engine, folder, n=4, log=lambda m: None)
    assert record["compared"] is True and record["gpu"] == "Stand-in GPU"
    assert record["images"].startswith("4 images from") and len(seen[0]) == 4
    assert record["max_abs_map_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert record["max_abs_score_diff"] == pytest.approx(2e-3, rel=1e-3)
    assert record["verdicts_agree"].endswith("/4")


@needs_rtx
def test_unknown_op_names_node_and_op(tmp_path):
    root = make_bundle(tmp_path / "b", kinds=("fp32",), extra_node="NoSuchOp")
    with pytest.raises(eng.EngineBuildError) as err:
        eng.build_engine(root, tmp_path / "x.engine", backend="tensorrt-rtx", log=lambda m: None)
    msg = str(err.value)
    assert "mystery_node" in msg and "NoSuchOp" in msg and "cannot parse" in msg
    assert "no plugin is registered" in msg
    assert not (tmp_path / "x.engine").exists()


@needs_rtx
def test_uint8_transpose_before_cast_is_named(tmp_path):
    """The first real export did Transpose on the uint8 image, then Cast: TensorRT refuses uint8 there."""
    root = make_bundle(tmp_path / "b", kinds=("fp32",), transpose_first=True)
    with pytest.raises(eng.EngineBuildError, match=r"(?s)node 'to_nchw' \(op Transpose\).*UInt8.*cast the image to float"):
        eng.build_engine(root, tmp_path / "x.engine", backend="tensorrt-rtx", log=lambda m: None)


def test_full_tensorrt_missing_gives_install_message(tmp_path, monkeypatch):
    root = make_bundle(tmp_path / "b", kinds=("fp32",))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(eng.EngineBuildError) as err:
        eng.build_engine(root, tmp_path / "x.engine", backend="tensorrt", log=lambda m: None)
    msg = str(err.value)
    assert msg.startswith("TensorRT is not installed")
    assert "pip install 'memseg-edge[trt]'" in msg and "JetPack" in msg
    assert "--backend tensorrt-rtx" in msg and "memseg-edge run --model BUNDLE" in msg
    assert "--backend onnxruntime" not in msg   # run has no such option


def test_full_tensorrt_without_gpu_fails_before_any_tensorrt_object(tmp_path, monkeypatch):
    """Stand-in `tensorrt` module whose objects explode if created: no GPU must be caught first."""
    created = []

    class Boom:
        def __init__(self, *a, **k):
            created.append(type(self).__name__)
            raise AssertionError("a TensorRT object was created without a GPU")

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0"
    fake.Builder = fake.OnnxParser = fake.Logger = fake.Runtime = Boom
    fake.ILogger = Boom
    fake.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    fake.IBuilderConfig = types.SimpleNamespace(set_timing_cache=None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(cuda_env, "cuda_device", lambda index=0: None)
    root = make_bundle(tmp_path / "b", kinds=("fp32",))
    flavour = eng.import_flavour("tensorrt")
    assert flavour.needs_gpu_to_build and flavour.timing_cache and flavour.strongly_typed_flag
    with pytest.raises(eng.EngineBuildError, match="no CUDA GPU is usable here.*--backend tensorrt-rtx"):
        eng.build_engine(root, tmp_path / "x.engine", backend="tensorrt", log=lambda m: None)
    assert created == []


def test_backend_names():
    assert eng.normalize_backend("TensorRT_RTX") == "tensorrt-rtx"
    with pytest.raises(eng.EngineBuildError, match="no engine to build"):
        eng.normalize_backend("onnxruntime")
    with pytest.raises(eng.EngineBuildError, match="unknown TensorRT backend"):
        eng.normalize_backend("tflite")


# ------------------------------------------------------------------ CUDA device detection


def test_cuda_device_here_is_none_or_well_formed():
    dev = cuda_env.cuda_device()
    if dev is not None:  # a machine with a GPU
        assert dev["name"] and dev["compute_capability"].count(".") == 1
    assert cuda_env.cuda_device(index=999) is None


def test_cuda_device_without_cuda_python_uses_libcuda(monkeypatch):
    monkeypatch.setattr(cuda_env, "_driver_module", lambda: None)
    dev = cuda_env.cuda_device()
    if dev is None:  # no libcuda.so.1 (no NVIDIA driver) here
        with pytest.raises(OSError):
            import ctypes
            ctypes.CDLL("libcuda.so.1")
    else:
        assert dev["source"] == "libcuda" and dev["compute_capability"].count(".") == 1


def test_cuda_device_reads_the_driver(monkeypatch):
    """The cuda-python path, against a stand-in driver module with cuda-python's calling convention."""
    ok = 0

    class Attr:
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76

    fake = types.SimpleNamespace(
        CUresult=types.SimpleNamespace(CUDA_SUCCESS=ok), CUdevice_attribute=Attr,
        cuInit=lambda flags: (ok,), cuDeviceGetCount=lambda: (ok, 1), cuDeviceGet=lambda i: (ok, 7),
        cuDeviceGetName=lambda n, d: (ok, b"NVIDIA GeForce RTX 3080\0\0\0"),
        cuDeviceGetAttribute=lambda a, d: (ok, 8 if a == 75 else 6),
        cuDeviceTotalMem=lambda d: (ok, 10 << 30), cuDriverGetVersion=lambda: (ok, 12040))
    monkeypatch.setattr(cuda_env, "_driver_module", lambda: fake)
    dev = cuda_env.cuda_device()
    assert dev["name"] == "NVIDIA GeForce RTX 3080" and dev["compute_capability"] == "8.6"
    assert dev["total_memory_mb"] == 10240 and dev["driver_cuda_version"] == "12.4"
    assert cuda_env.cuda_device(1) is None
    fake.cuInit = lambda flags: (100,)  # CUDA_ERROR_NO_DEVICE
    assert cuda_env.cuda_device() is None

    def no_lib(flags):
        raise RuntimeError('"cuda" is an NVIDIA driver library and can only be found via system search')
    fake.cuInit = no_lib
    assert cuda_env.cuda_device() is None


# ------------------------------------------------------------------ tensorrt-rtx packaging fix


def test_prepare_tensorrt_rtx_safe_without_the_wheel(monkeypatch):
    monkeypatch.setattr(eng, "_find_spec", lambda name: None)
    monkeypatch.setattr(eng, "_rtx_prepared", {})
    assert eng.prepare_tensorrt_rtx() is None


PLUGIN_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    from memseg_edge import engine as eng

    def register(trt):
        class IdentityPlug(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
            def __init__(self, fc=None, phase=None):
                trt.IPluginV3.__init__(self)
                trt.IPluginV3OneCore.__init__(self)
                trt.IPluginV3OneBuild.__init__(self)
                trt.IPluginV3OneRuntime.__init__(self)
                self.num_outputs = 1
                self.plugin_namespace = ""
                self.plugin_name = "IdentityPlug"
                self.plugin_version = "1"
                self.timing_cache_id = ""
                self.alpha = 1.0
                for f in (fc or []):
                    if f.name == "alpha":
                        self.alpha = float(f.data[0])
            def get_capability_interface(self, type):
                return self
            def get_output_data_types(self, input_types):
                return [input_types[0]]
            def get_output_shapes(self, inputs, shape_inputs, expr_builder):
                return [trt.DimsExprs(inputs[0])]
            def get_fields_to_serialize(self):
                return trt.PluginFieldCollection([trt.PluginField(
                    "alpha", np.array([self.alpha], np.float32), trt.PluginFieldType.FLOAT32)])
            def configure_plugin(self, inp, out):
                pass
            def on_shape_change(self, inp, out):
                pass
            def supports_format_combination(self, pos, in_out, num_inputs):
                d = in_out[pos].desc
                if d.format != trt.TensorFormat.LINEAR:
                    return False
                if pos == 0:
                    return d.type in (trt.DataType.FLOAT, trt.DataType.HALF)
                return d.type == in_out[0].desc.type
            def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
                raise RuntimeError("not run on a CPU build")
            def attach_to_context(self, context):
                return self.clone()
            def set_tactic(self, tactic):
                pass
            def get_valid_tactics(self):
                return []
            def clone(self):
                c = IdentityPlug()
                c.__dict__.update(self.__dict__)
                return c

        class IdentityPlugCreator(trt.IPluginCreatorV3One):
            def __init__(self):
                trt.IPluginCreatorV3One.__init__(self)
                self.name = "IdentityPlug"
                self.plugin_namespace = ""
                self.plugin_version = "1"
                self.field_names = trt.PluginFieldCollection(
                    [trt.PluginField("alpha", np.array([]), trt.PluginFieldType.FLOAT32)])
            def create_plugin(self, name, fc, phase):
                return IdentityPlug(fc, phase)

        global CREATOR  # the registry holds a pointer only: keep the Python object alive
        CREATOR = IdentityPlugCreator()
        assert trt.get_plugin_registry().register_creator(CREATOR, "")
        return ["IdentityPlug/1"]

    bundle, out = sys.argv[1], sys.argv[2]
    path = eng.build_engine(bundle, out, backend="tensorrt-rtx", max_batch=2, register_plugins=register,
                            log=lambda m: print(m, flush=True))
    meta = json.loads(eng.sidecar_path(path).read_text())
    print("PLUGINS", meta["plugins"], "BYTES", meta["engine_bytes"], flush=True)
''')


@needs_rtx
def test_rtx_plugin_layer_parses_and_builds_in_a_fresh_process(tmp_path):
    """Without prepare_tensorrt_rtx() the wheel's parser aborts the process (SIGABRT) as soon as it adds a plugin
    layer; build_engine applies the fix, so a class-based IPluginV3 node must parse and build."""
    root = make_bundle(tmp_path / "b", kinds=("fp32",), extra_node="IdentityPlug")
    script = tmp_path / "plug.py"
    script.write_text(PLUGIN_SCRIPT)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(script), str(root), str(tmp_path / "plug.engine")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "PLUGINS ['IdentityPlug/1']" in proc.stdout
    links = list((tmp_path / "cache" / "memseg-edge" / "trt-rtx-libs").glob("*/libtensorrt_rtx.so"))
    assert links and links[0].resolve().name.startswith("libtensorrt_rtx.so.")


@needs_rtx
def test_prepare_tensorrt_rtx_idempotent_and_repairs_stale_links(tmp_path):
    code = textwrap.dedent('''
        import os, sys
        from pathlib import Path
        from memseg_edge import engine as eng
        d = eng.prepare_tensorrt_rtx(print)
        assert d is not None and d == eng.prepare_tensorrt_rtx(print)
        import tensorrt_rtx
        link = Path(d) / "libtensorrt_rtx.so"
        assert link.resolve().is_file(), link
        print("DIR", d)
    ''')
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    folder = Path(first.stdout.split("DIR ", 1)[1].strip())
    link = folder / "libtensorrt_rtx.so"
    link.unlink()
    link.symlink_to(tmp_path / "elsewhere" / "libtensorrt_rtx.so.1")  # e.g. a deleted venv
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert link.resolve().is_file()


def test_eval_of_an_engine_without_its_gpu_is_a_clear_refusal(rtx_engines, tmp_path):
    """`memseg-edge eval FILE.engine` checks the sidecar against this machine before TensorRT loads anything:
    here (no GPU) it must refuse with what to do, not crash the process."""
    from memseg_edge.cuda_env import cuda_device

    if cuda_device() is not None:
        pytest.skip("a CUDA GPU is here: the refusal is for machines without one")
    engine = rtx_engines["fp32"][0]
    exe = Path(sys.executable).with_name("memseg-edge")
    data = tmp_path / "data" / "x" / "test" / "good"
    data.mkdir(parents=True)
    proc = subprocess.run([str(exe), "eval", str(engine), "--data", str(tmp_path / "data"), "--category", "x"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "no CUDA GPU" in proc.stderr and "onnxruntime" in proc.stderr
