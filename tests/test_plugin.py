"""The MemoryArgminL2 plugin: the rewrite of a real exported bundle (memseg_edge.plugin_rewrite), and real
TensorRT-RTX engines built on the CPU from its plugin variants in FP32 and FP16 with the plugin's
build-time methods called by the builder (memseg_edge.plugin). Engines are built in a fresh process:
the tensorrt-rtx library fix must precede the first ``import tensorrt_rtx``, and a parser abort must not
take pytest with it. Running an engine needs a GPU (marked ``gpu``)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from memseg_edge import plugin
from memseg_edge.bundle import load_bundle, map_gain, sha256_file
from memseg_edge.cuda_env import cuda_device
from test_kernel import make_memory_bundle

onnx = pytest.importorskip("onnx", reason="the rewrite needs onnx (pip install 'memseg-edge[onnx]')")
from onnx import TensorProto, numpy_helper  # noqa: E402

from memseg_edge import plugin_rewrite as pr  # noqa: E402

needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="tensorrt_rtx not installed (pip install 'memseg-edge[rtx]')")
LEVELS = [(24, 16, 16), (32, 8, 8), (96, 4, 4)]   # MobileNetV2 at 64x64 (make_memory_bundle)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A copy of the session's tiny exported bundle with its FP16 variant (calibration's converter)."""
    from memseg_edge.calibration.fp16 import convert_fp16

    src = make_memory_bundle(tmp_path_factory)
    dst = tmp_path_factory.mktemp("plugin") / "bundle"
    shutil.copytree(src, dst)
    convert_fp16(dst, log=lambda *a: None)
    return dst


def _memory(bundle: Path) -> dict:
    return json.loads((bundle / "model.json").read_text())["memory_subgraph"]


def _plugin_nodes(model):
    return [n for n in model.graph.node if n.op_type == pr.PLUGIN_OP]


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# ------------------------------------------------------------------ the rewrite


def test_rewrite_replaces_the_named_subgraph_by_one_plugin_node(bundle):
    mem = _memory(bundle)
    src = onnx.load(str(bundle / "model.onnx"))
    out = pr.rewrite_model(src, mem, "sum")
    assert not [n for n in out.graph.node if n.name.startswith(mem["node_prefix"])]
    (node,) = _plugin_nodes(out)
    assert node.domain == "memseg"
    assert list(node.input) == mem["inputs"] + mem["bank_initializers"]
    assert list(node.output) == mem["outputs"] + [pr.INDEX_NAME]
    attrs = _attrs(node)
    assert attrs["plugin_namespace"] == b"memseg" and attrs["plugin_version"] == b"1"
    assert attrs["levels"] == 3 and attrs["samples"] == 4 and attrs["selection"] == b"sum"
    assert list(zip(attrs["channels"], attrs["heights"], attrs["widths"])) == LEVELS
    # everything outside the step is untouched, node for node
    outside = [(n.name, list(n.input), list(n.output)) for n in src.graph.node
               if not n.name.startswith(mem["node_prefix"])]
    assert [(n.name, list(n.input), list(n.output)) for n in out.graph.node if n.op_type != pr.PLUGIN_OP] == outside
    banks = {t.name: t for t in out.graph.initializer}
    assert all(banks[b].data_type == TensorProto.FLOAT for b in mem["bank_initializers"])
    assert [o.name for o in out.graph.output] == [o.name for o in src.graph.output]
    assert any(o.domain == "memseg" for o in out.opset_import) and out.ir_version <= 10
    onnx.checker.check_model(out, full_check=False)
    with pytest.raises(ValueError, match="already rewritten"):
        pr.rewrite_model(out, mem, "sum")


def test_fp16_variant_runs_the_plugin_in_float16_between_casts(bundle):
    mem = _memory(bundle)
    out = pr.rewrite_model(onnx.load(str(bundle / "model.fp16.onnx")), mem, "sum", io_dtype="fp16")
    (node,) = _plugin_nodes(out)
    casts = {n.output[0]: n for n in out.graph.node if n.op_type == "Cast"}
    for name in node.input[:3]:
        assert casts[name].input[0] in mem["inputs"] and _attrs(casts[name])["to"] == TensorProto.FLOAT16
    inits = {t.name: t for t in out.graph.initializer}
    for name in node.input[3:]:
        assert inits[name].data_type == TensorProto.FLOAT16
    orig = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(bundle / "model.onnx")).graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(inits[node.input[3]]),
                                  orig[mem["bank_initializers"][0]].astype(np.float16))
    back = [n for n in out.graph.node if n.op_type == "Cast" and n.output[0] in mem["outputs"]]
    assert len(back) == 3 and all(_attrs(n)["to"] == TensorProto.FLOAT for n in back)
    # the default keeps the subgraph's own type: float32, as calibration keeps the memory step
    (plain,) = _plugin_nodes(pr.rewrite_model(onnx.load(str(bundle / "model.fp16.onnx")), mem, "sum"))
    assert list(plain.input) == mem["inputs"] + mem["bank_initializers"]


def test_plugin_variants_are_recorded_in_the_bundle(bundle, tmp_path):
    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    written = pr.write_plugin_variants(work, log=lambda *a: None)
    assert {p.name for p in written.values()} == {"model.plugin.onnx", "model.fp16.plugin.onnx"}
    b, _ = load_bundle(work)
    for name, precision in (("model.plugin.onnx", "fp32"), ("model.fp16.plugin.onnx", "fp16")):
        entry = b.meta["files"][name]
        assert entry["sha256"] == sha256_file(work / name) and entry["precision"] == precision
        assert entry["plugin"] == "memseg::MemoryArgminL2"
    b.verify("fp32")  # the original files are untouched
    pb = pr.plugin_bundle(work, tmp_path / "pb", log=lambda *a: None)
    meta = json.loads((pb / "model.json").read_text())
    assert meta["memory_plugin"] == "memseg::MemoryArgminL2"
    assert set(meta["files"]) == {"model.onnx", "model.fp16.onnx"}
    assert len(_plugin_nodes(onnx.load(str(pb / "model.onnx")))) == 1


def test_plugin_fields_parse_as_the_parser_and_the_engine_pass_them():
    class Field:
        def __init__(self, name, data):
            self.name, self.data = name, data

    raw = {"levels": np.array([3], np.int32), "channels": np.array([24, 32, 96], np.int32),
           "heights": np.array([16, 8, 4], np.int32), "widths": np.array([16, 8, 4], np.int32),
           "samples": np.array([30], np.int32), "selection": np.frombuffer(b"per_level\0", np.int8)}
    step = plugin.step_from_fields({k: plugin._field_value(Field(k, v)) for k, v in raw.items()})
    assert step.levels == tuple(LEVELS) and step.samples == 30 and step.per_level
    with pytest.raises(ValueError, match="missing"):
        plugin.step_from_fields({"levels": [3]})
    bad = {k: plugin._field_value(Field(k, v)) for k, v in raw.items()}
    bad["levels"] = [2]
    with pytest.raises(ValueError, match="levels=2"):
        plugin.step_from_fields(bad)


# ------------------------------------------------------------------ lifecycle with stand-in TensorRT types

LEVEL_SETS = [LEVELS[:1], LEVELS[:2], LEVELS]


def _field_collection(trt, fields: dict):
    """What TensorRT's parser hands create_plugin for the node's attributes."""
    out = [trt.PluginField(k, np.asarray(fields[k], np.int32), trt.PluginFieldType.INT32) for k in plugin.INT_FIELDS]
    out.append(trt.PluginField("selection", np.frombuffer(fields["selection"].encode() + b"\0", np.int8),
                               trt.PluginFieldType.CHAR))
    return trt.PluginFieldCollection(out)


class FakeLauncher:
    """Stands in for the loaded kernel: records what would be launched."""
    sm_count = 100

    def __init__(self):
        self.prepared, self.runs = [], []

    def prepare(self, launches):
        self.prepared.append(launches)
        return list(launches)

    def run(self, prepared, stream):
        self.runs.append((prepared, stream))


def _buffers(n_levels: int, base: int) -> tuple[list[int], list[int]]:
    inputs = [base + 4096 * i for i in range(2 * n_levels)]
    outputs = [base + 65536 + 4096 * i for i in range(n_levels + 1)]
    return inputs, outputs


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=["1level", "2levels", "3levels"])
def test_clone_keeps_the_outputs_and_fields_for_1_to_3_levels(levels):
    trt = plugin.stand_in_trt()
    plugin_cls, creator_cls = plugin.plugin_classes(trt)
    step = plugin.MemoryStep(tuple(levels), 5, "per_level")
    made = creator_cls().create_plugin("m", _field_collection(trt, plugin.fields_of(step)), trt.TensorRTPhase.BUILD)
    assert made.num_outputs == len(levels) + 1 and made.step == step
    # The stand-in is faithful to TensorRT's binding: a __dict__ copy loses num_outputs (the old clone's bug).
    naive = plugin_cls()
    naive.__dict__.update(made.__dict__)
    assert naive.num_outputs == 4
    twin = made.clone()
    assert twin is not made and twin.num_outputs == len(levels) + 1 and twin.step == step
    assert twin.fields == made.fields and twin.fields is not made.fields
    types = twin.get_output_data_types([trt.DataType.HALF] * (2 * len(levels)))
    assert types == [trt.DataType.HALF] * len(levels) + [trt.DataType.INT32]
    shapes = twin.get_output_shapes([trt.DimsExprs([trt.Expr(), *map(trt.Expr, lv)]) for lv in levels] * 2, [],
                                    trt.ExprBuilder())
    assert len(shapes) == twin.num_outputs and shapes[-1][1].get_constant_value() == len(levels)
    assert [(f.name, np.asarray(f.data).tolist()) for f in twin.get_fields_to_serialize()] == \
        [(f.name, np.asarray(f.data).tolist()) for f in made.get_fields_to_serialize()]


@pytest.mark.parametrize("half", [False, True])
def test_plugin_lifecycle_with_stand_in_types_up_to_the_launch(monkeypatch, half):
    """create (build) -> build queries -> serialise -> re-create (runtime) -> attach -> shape change -> enqueue
    at two batch sizes, with the loaded kernel replaced by a recorder."""
    trt = plugin.stand_in_trt()
    _, creator_cls = plugin.plugin_classes(trt)
    plugin.register_plugin(trt)
    assert [ns for ns, _ in trt.get_plugin_registry().creators] == ["memseg"]
    step = plugin.MemoryStep(tuple(LEVELS), 4, "sum")
    dt = trt.DataType.HALF if half else trt.DataType.FLOAT
    built = creator_cls().create_plugin("m", _field_collection(trt, plugin.fields_of(step)), trt.TensorRTPhase.BUILD)
    assert built.get_output_data_types([dt] * 6) == [dt] * 3 + [trt.DataType.INT32]
    in_out = [trt.dynamic_desc([-1, *lv], dt, max_dims=[8, *lv]) for lv in LEVELS] + \
             [trt.dynamic_desc([4, *lv], dt) for lv in LEVELS] + \
             [trt.dynamic_desc([-1, *lv], dt, max_dims=[8, *lv]) for lv in LEVELS] + \
             [trt.dynamic_desc([-1], trt.DataType.INT32, max_dims=[8])]
    assert all(built.supports_format_combination(pos, in_out, 6) for pos in range(10))
    built.configure_plugin(in_out[:6], in_out[6:])
    assert built.get_workspace_size(in_out[:6], in_out[6:]) == step.workspace_bytes(8)
    with pytest.raises(ValueError, match="level 0 features"):
        built.configure_plugin([trt.dynamic_desc([-1, 1, 2, 3], dt)] + in_out[1:6], in_out[6:])

    serialised = built.get_fields_to_serialize()
    runtime = creator_cls().create_plugin("m", serialised, trt.TensorRTPhase.RUNTIME)
    assert runtime.step == step and runtime.num_outputs == 4

    fake = FakeLauncher()
    monkeypatch.setattr(plugin, "_launcher", lambda: fake)
    attached = runtime.attach_to_context(object())
    assert attached is not runtime and attached._launcher is fake and runtime._launcher is None
    for batch, base, stream in ((2, 1 << 20, 7), (5, 1 << 24, 9)):
        descs = [trt.desc([batch, *lv], dt) for lv in LEVELS] + [trt.desc([4, *lv], dt) for lv in LEVELS]
        outs = [trt.desc([batch, *lv], dt) for lv in LEVELS] + [trt.desc([batch], trt.DataType.INT32)]
        attached.on_shape_change(descs, outs)
        inputs, outputs = _buffers(3, base)
        for _ in range(3):   # the same pointers: planned and packed once
            attached.enqueue(descs, outs, inputs, outputs, base + (1 << 19), stream)
        want = plugin.plan_launches(step, batch, half, inputs[:3], inputs[3:], outputs[:3], outputs[3],
                                    base + (1 << 19), sm_count=fake.sm_count)
        assert fake.prepared[-1] == want and fake.runs[-1] == (want, stream)
        assert attached.batch == batch
    assert len(fake.prepared) == 2 and len(fake.runs) == 6


def test_enqueue_failures_are_loud(monkeypatch, capsys):
    trt = plugin.stand_in_trt()
    plugin_cls, _ = plugin.plugin_classes(trt)
    step = plugin.MemoryStep(tuple(LEVELS), 4)
    p = plugin_cls(plugin.fields_of(step))

    class Broken(FakeLauncher):
        def run(self, prepared, stream):
            raise RuntimeError("cuLaunchKernel(memseg_l2_f32_t2) failed: CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES")

    descs = [trt.desc([2, *lv], trt.DataType.FLOAT) for lv in LEVELS] * 2
    inputs, outputs = _buffers(3, 1 << 20)
    with pytest.raises(RuntimeError, match="before attach_to_context"):
        p.enqueue(descs, [], inputs, outputs, 0, 0)
    p._launcher = Broken()
    with pytest.raises(RuntimeError, match="OUT_OF_RESOURCES"):
        p.enqueue(descs, [], inputs, outputs, 0, 0)
    err = capsys.readouterr().err
    assert "memseg::MemoryArgminL2 enqueue failed" in err and "Traceback" in err
    assert "OUT_OF_RESOURCES" in plugin.last_error()


@pytest.mark.skipif(cuda_device() is not None, reason="checks the failure on a machine without a CUDA GPU")
def test_attach_without_a_gpu_fails_at_attach_with_the_reason(capsys):
    trt = plugin.stand_in_trt()
    plugin_cls, _ = plugin.plugin_classes(trt)
    p = plugin_cls(plugin.fields_of(plugin.MemoryStep(tuple(LEVELS), 4)))
    with pytest.raises(Exception):
        p.attach_to_context(object())
    assert "attach_to_context failed" in capsys.readouterr().err and plugin.last_error()


# ------------------------------------------------------------------ engines (TensorRT-RTX, CPU)

BUILD_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from memseg_edge import engine as eng, plugin
    from memseg_edge.plugin_rewrite import plugin_bundle

    src, work = Path(sys.argv[1]), Path(sys.argv[2])
    pb = plugin_bundle(src, work / "plugin_bundle", fp16_io="fp16", log=lambda m: None)
    result = {"engines": {}, "calls": {}, "networks": {}}
    for precision in ("fp32", "fp16"):
        plugin.CALL_LOG.clear()
        path = eng.build_engine(pb, work / f"plugin.{precision}.engine", precision=precision, backend="tensorrt-rtx",
                                max_batch=4, opt_batch=2, register_plugins=plugin.register_plugin,
                                log=lambda m: print(m, flush=True))
        result["engines"][precision] = json.loads(eng.sidecar_path(path).read_text())
        result["calls"][precision] = [[c, i] for c, i in plugin.CALL_LOG]
        eng.build_engine(src, work / f"plain.{precision}.engine", precision=precision, backend="tensorrt-rtx",
                         max_batch=4, opt_batch=2, log=lambda m: None)

    trt = eng.import_flavour("tensorrt-rtx").trt
    logger = trt.Logger(trt.Logger.ERROR)
    for tag, root in (("plain", src), ("plugin", pb)):
        for precision, name in (("fp32", "model.onnx"), ("fp16", "model.fp16.onnx")):
            builder = trt.Builder(logger)
            network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            parser = trt.OnnxParser(network, logger)
            assert parser.parse_from_file(str(root / name)), name
            outs = [network.get_output(i) for i in range(network.num_outputs)]
            layers = [network.get_layer(i) for i in range(network.num_layers)]
            result["networks"][f"{tag}.{precision}"] = {
                "outputs": [[t.name, list(t.shape), str(t.dtype)] for t in outs],
                "plugin_layers": sum(1 for l in layers if l.type == trt.LayerType.PLUGIN_V3)}
    print("RESULT " + json.dumps(result, default=str), flush=True)
''')


@pytest.fixture(scope="module")
def rtx_plugin_build(bundle, tmp_path_factory) -> dict:
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt_rtx not installed (pip install 'memseg-edge[rtx]')")
    work = tmp_path_factory.mktemp("rtx_plugin")
    script = work / "build.py"
    script.write_text(BUILD_SCRIPT)
    env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(bundle), str(work)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _calls(result: dict, precision: str, name: str) -> list[dict]:
    return [info for call, info in result["calls"][precision] if call == name]


@needs_rtx
@pytest.mark.parametrize("precision,trt_type", [("fp32", "DataType.FLOAT"), ("fp16", "DataType.HALF")])
def test_rtx_builds_plugin_engine_calling_the_build_methods(rtx_plugin_build, precision, trt_type):
    meta = rtx_plugin_build["engines"][precision]
    assert meta["plugins"] == ["memseg::MemoryArgminL2"] and meta["precision"] == precision
    assert meta["engine_bytes"] > 100_000 and meta["flavour"] == "tensorrt-rtx"

    created = _calls(rtx_plugin_build, precision, "create_plugin")
    assert created and created[0]["phase"].endswith("BUILD")
    assert created[0]["fields"] == {"levels": [3], "channels": [24, 32, 96], "heights": [16, 8, 4],
                                    "widths": [16, 8, 4], "samples": [4], "selection": "sum"}

    shapes = _calls(rtx_plugin_build, precision, "get_output_shapes")
    assert shapes and shapes[0]["inputs"] == 6 and shapes[0]["ranks"] == [4] * 6
    assert shapes[0]["banks"] == [[4, *lv] for lv in LEVELS]

    types = _calls(rtx_plugin_build, precision, "get_output_data_types")
    assert types and types[0]["inputs"] == [trt_type] * 6
    assert types[0]["outputs"] == [trt_type] * 3 + ["DataType.INT32"]

    formats = _calls(rtx_plugin_build, precision, "supports_format_combination")
    accepted = {(f["pos"], f["type"]) for f in formats if f["ok"]}
    assert {pos for pos, _ in accepted} == set(range(10))
    assert all(t == ("DataType.INT32" if pos == 9 else trt_type) for pos, t in accepted)
    assert all(f["format"] == "TensorFormat.LINEAR" for f in formats if f["ok"])
    assert all(f["num_inputs"] == 6 for f in formats)

    configured = _calls(rtx_plugin_build, precision, "configure_plugin")
    assert configured
    cfg = configured[-1]
    assert cfg["inputs"] == [[trt_type, [-1, *lv]] for lv in LEVELS] + [[trt_type, [4, *lv]] for lv in LEVELS]
    assert cfg["outputs"] == [[trt_type, [-1, *lv]] for lv in LEVELS] + [["DataType.INT32", [-1]]]
    assert cfg["max_batch"] == 4

    work = _calls(rtx_plugin_build, precision, "get_workspace_size")
    # batch 4 x 4 samples x (2 + 1 + 1) parts: what the first kernel's engines reserve, never more
    assert work and work[-1]["bytes"] == 4 * 4 * 4 * (2 + 1 + 1)

    serialized = _calls(rtx_plugin_build, precision, "get_fields_to_serialize")
    assert serialized and serialized[-1] == created[0]["fields"]


@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plugin_and_plugin_free_networks_have_the_same_outputs(rtx_plugin_build, precision):
    plain = rtx_plugin_build["networks"][f"plain.{precision}"]
    plug = rtx_plugin_build["networks"][f"plugin.{precision}"]
    assert plain["plugin_layers"] == 0 and plug["plugin_layers"] == 1
    assert plug["outputs"] == plain["outputs"]
    assert [o[0] for o in plain["outputs"]] == ["anomaly_map", "score"]
    assert plain["outputs"][0][1] == [-1, 1, 64, 64] and plain["outputs"][1][1] == [-1]


# ------------------------------------------------------------------ on a GPU

RUN_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    from pathlib import Path
    from cuda.bindings import driver, runtime
    from memseg_edge import engine as eng, plugin
    from memseg_edge.backends import OnnxRuntimeBackend

    src, work = Path(sys.argv[1]), Path(sys.argv[2])
    from memseg_edge.plugin_rewrite import plugin_bundle
    pb = plugin_bundle(src, work / "pb", precisions=("fp32",), log=lambda m: None)
    path = eng.build_engine(pb, work / "p.engine", backend="tensorrt-rtx", max_batch=4,
                            compute_capabilities=["current"], register_plugins=plugin.register_plugin)
    trt = eng.import_flavour("tensorrt-rtx").trt
    plugin.register_plugin(trt)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    ctx = engine.create_execution_context()
    size = json.loads((src / "model.json").read_text())["image_size"]
    images = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    ctx.set_input_shape("image", images.shape)
    host = {"image": images, "anomaly_map": np.full((3, 1, size, size), np.nan, np.float32),
            "score": np.full((3,), np.nan, np.float32)}
    dev = {}
    for name, arr in host.items():
        err, ptr = runtime.cudaMalloc(arr.nbytes)
        dev[name] = ptr
        runtime.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes, runtime.cudaMemcpyKind.cudaMemcpyHostToDevice)
        ctx.set_tensor_address(name, int(ptr))
    err, stream = runtime.cudaStreamCreate()
    assert ctx.execute_async_v3(int(stream))
    runtime.cudaStreamSynchronize(stream)
    for name in ("anomaly_map", "score"):
        runtime.cudaMemcpy(host[name].ctypes.data, dev[name], host[name].nbytes,
                           runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost)
    amap, score = OnnxRuntimeBackend(src).infer(images)
    print("RESULT", json.dumps({"map": float(np.abs(host["anomaly_map"] - amap).max()),
                                "score": float(np.abs(host["score"] - score).max())}), flush=True)
''')


@pytest.mark.gpu
@needs_rtx
@pytest.mark.skipif(cuda_device() is None, reason="no CUDA GPU here: the plugin's enqueue runs the kernel on a GPU")
def test_plugin_engine_matches_onnxruntime_on_the_gpu(bundle, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(script), str(bundle), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][len("RESULT "):])
    gain = map_gain(json.loads((bundle / "model.json").read_text()))   # the distance fusion's magnification
    assert result["map"] < 1e-4 * gain and result["score"] < 1e-4 * gain


@needs_rtx
def test_build_engine_plugin_option_writes_the_variant_and_records_the_plugin(bundle, tmp_path):
    """The user's path: `memseg-edge build-engine BUNDLE --plugin` rewrites the bundle's model on first use,
    registers the creator, builds, and the sidecar tells the runtime which plugin to register."""
    work = tmp_path / "bundle"
    shutil.copytree(bundle, work)
    for name in ("model.plugin.onnx", "model.fp16.plugin.onnx"):
        (work / name).unlink(missing_ok=True)
    exe = Path(sys.executable).with_name("memseg-edge")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = tmp_path / "m.engine"
    proc = subprocess.run([str(exe), "build-engine", str(work), "--plugin", "--precision", "fp16",
                           "--backend", "tensorrt-rtx", "--max-batch", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.loads((tmp_path / "m.engine.json").read_text())
    assert meta["plugins"] == [f"{pr.PLUGIN_DOMAIN}::{pr.PLUGIN_OP}"]
    assert meta["onnx_file"] == "model.fp16.plugin.onnx"
    assert meta["onnx_sha256"] == sha256_file(work / "model.fp16.plugin.onnx")
    assert len(_plugin_nodes(onnx.load(str(work / "model.fp16.plugin.onnx")))) == 1
    # INT8 keeps the memory step as FP32 standard ops: the plugin build refuses it with the reason. (The CLI
    # asks for calibration images first when the bundle has no model.int8.onnx, so ask the builder itself.)
    from memseg_edge import engine as eng
    with pytest.raises(eng.EngineBuildError, match="without --plugin"):
        eng.build_engine(work, tmp_path / "i.engine", precision="int8", backend="tensorrt-rtx", plugin=True,
                         log=lambda m: None)
