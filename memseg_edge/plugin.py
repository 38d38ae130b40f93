"""TensorRT plugin ``memseg::MemoryArgminL2`` version 1: the fused memory-bank kernel as an IPluginV3,
written with TensorRT's class-based Python plugin API (TensorRT >= 10.0, TensorRT 11, TensorRT-RTX;
the decorator API ``tensorrt.plugin`` is 10.6+ and absent from TensorRT-RTX, see docs/architecture.md).

Build half (runs on a CPU-only machine with TensorRT-RTX): output shapes (diffs like the features,
index ``[N]`` or ``[N, L]``), types (float32 or float16 in and out, all alike; index int32), linear
formats, workspace (the partial sums), and the fields to serialise into the engine. Runtime half:
``enqueue`` launches the kernel's three launches on TensorRT's stream through cuda-python's driver API
(``memseg_edge.kernels.DriverLauncher``); the PTX for the device's architecture is compiled (or read
from the cache) on the first enqueue in a process.

Use: ``build_engine(..., register_plugins=register_plugin)``; a runtime calls
:func:`register_plugin` with its TensorRT module before it deserialises an engine whose sidecar lists
``memseg::MemoryArgminL2``. ``CALL_LOG`` records the build-time calls (tests read it).
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .kernels import MemoryStep, plan_launches

PLUGIN_NAME = "MemoryArgminL2"
PLUGIN_NAMESPACE = "memseg"
PLUGIN_VERSION = "1"
QUALIFIED_NAME = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
INT_FIELDS = ("levels", "channels", "heights", "widths", "samples")
STRING_FIELDS = ("selection",)

CALL_LOG: list[tuple[str, dict[str, Any]]] = []
_registered: dict[int, Any] = {}        # id(trt module) -> creator (the registry keeps a raw pointer only)
_launchers: dict[Any, Any] = {}         # CUDA context -> DriverLauncher
_lock = threading.Lock()


def _record(call: str, **info: Any) -> None:
    CALL_LOG.append((call, info))


def _field_value(field) -> Any:
    data = field.data
    if field.name in STRING_FIELDS:
        if isinstance(data, (str, bytes)):
            raw = data.encode() if isinstance(data, str) else data
        else:
            raw = np.asarray(data).astype(np.uint8).tobytes()
        return raw.split(b"\0", 1)[0].decode()
    return [int(v) for v in np.asarray(data).reshape(-1)]


def step_from_fields(fields: dict[str, Any]) -> MemoryStep:
    """The plugin's fields (ONNX node attributes, or what the engine serialised) -> :class:`MemoryStep`."""
    missing = [f for f in INT_FIELDS + STRING_FIELDS if f not in fields]
    if missing:
        raise ValueError(f"{QUALIFIED_NAME}: fields {missing} missing (rewrite the model with "
                         "memseg_edge.plugin_rewrite)")
    n = int(fields["levels"][0])
    channels, heights, widths = fields["channels"], fields["heights"], fields["widths"]
    if not len(channels) == len(heights) == len(widths) == n:
        raise ValueError(f"{QUALIFIED_NAME}: levels={n} but channels/heights/widths have "
                         f"{len(channels)}/{len(heights)}/{len(widths)} entries")
    return MemoryStep(tuple((int(c), int(h), int(w)) for c, h, w in zip(channels, heights, widths)),
                      int(fields["samples"][0]), str(fields["selection"]))


def _launcher():
    from cuda.bindings import driver

    from .kernels import DriverLauncher

    err, ctx = driver.cuCtxGetCurrent()
    key = int(ctx) if int(err) == 0 else None
    with _lock:
        if key not in _launchers:
            _launchers[key] = DriverLauncher.for_current_device()
        return _launchers[key]


def plugin_classes(trt) -> tuple[type, type]:
    """``(MemoryArgminL2Plugin, MemoryArgminL2Creator)`` for the TensorRT module ``trt``."""

    class MemoryArgminL2Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, fields: dict[str, Any] | None = None, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.timing_cache_id = ""
            self.phase = phase
            self.fields = dict(fields or {})
            self.step = step_from_fields(self.fields) if fields else None
            self.num_outputs = len(self.step.levels) + 1 if self.step else 4

        # ---------------------------------------------------------------- core
        def get_capability_interface(self, type):
            return self

        def clone(self):
            twin = MemoryArgminL2Plugin()
            twin.__dict__.update(self.__dict__)
            return twin

        # ---------------------------------------------------------------- build
        def get_output_data_types(self, input_types):
            n = len(self.step.levels)
            types = [input_types[i] for i in range(n)] + [trt.DataType.INT32]
            _record("get_output_data_types", inputs=[str(t) for t in input_types], outputs=[str(t) for t in types])
            return types

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            n = len(self.step.levels)
            if len(inputs) != 2 * n:
                raise ValueError(f"{QUALIFIED_NAME}: expected {2 * n} inputs (features, banks), got {len(inputs)}")
            outs = [trt.DimsExprs(inputs[i]) for i in range(n)]
            index = trt.DimsExprs(2 if self.step.per_level else 1)
            index[0] = inputs[0][0]
            if self.step.per_level:
                index[1] = expr_builder.constant(n)
            outs.append(index)
            banks = []
            for i in range(n, 2 * n):
                dims = [inputs[i][k].get_constant_value() if inputs[i][k].is_constant() else -1
                        for k in range(len(inputs[i]))]
                banks.append(dims)
            _record("get_output_shapes", inputs=len(inputs), ranks=[len(x) for x in inputs], banks=banks)
            return outs

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            n = len(self.step.levels)
            if desc.format != trt.TensorFormat.LINEAR:
                ok = False
            elif pos == 3 * n:  # the index
                ok = desc.type == trt.DataType.INT32
            elif pos == 0:
                ok = desc.type in (trt.DataType.FLOAT, trt.DataType.HALF)
            else:
                ok = desc.type == in_out[0].desc.type
            _record("supports_format_combination", pos=int(pos), type=str(desc.type), format=str(desc.format),
                    num_inputs=int(num_inputs), ok=bool(ok))
            return ok

        def configure_plugin(self, inp, out):
            info = {"inputs": [(str(d.desc.type), list(d.desc.dims)) for d in inp],
                    "outputs": [(str(d.desc.type), list(d.desc.dims)) for d in out],
                    "max_batch": int(inp[0].max[0])}
            for i, (c, h, w) in enumerate(self.step.levels):
                got = list(inp[i].desc.dims)[1:]
                if got != [c, h, w]:
                    raise ValueError(f"{QUALIFIED_NAME}: level {i} features are {got}, fields say {[c, h, w]}")
            _record("configure_plugin", **info)

        def get_workspace_size(self, inp, out):
            size = self.step.workspace_bytes(int(inp[0].max[0]))
            _record("get_workspace_size", bytes=size)
            return size

        def get_valid_tactics(self):
            return []

        # ---------------------------------------------------------------- runtime
        def get_fields_to_serialize(self):
            fields = [trt.PluginField(name, np.asarray(self.fields[name], np.int32), trt.PluginFieldType.INT32)
                      for name in INT_FIELDS]
            sel = np.frombuffer(str(self.fields["selection"]).encode() + b"\0", np.int8)
            fields.append(trt.PluginField("selection", sel, trt.PluginFieldType.CHAR))
            _record("get_fields_to_serialize", **{k: self.fields[k] for k in INT_FIELDS + STRING_FIELDS})
            return trt.PluginFieldCollection(fields)

        def on_shape_change(self, inp, out):
            self.batch = int(inp[0].dims[0])

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            n = len(self.step.levels)
            batch = int(input_desc[0].dims[0])
            half = input_desc[0].type == trt.DataType.HALF
            launches = plan_launches(self.step, batch, half, [int(p) for p in inputs[:n]],
                                     [int(p) for p in inputs[n:2 * n]], [int(p) for p in outputs[:n]],
                                     int(outputs[n]), int(workspace))
            _launcher().run(launches, int(stream))

    class MemoryArgminL2Creator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            fields = [trt.PluginField(name, np.array([], np.int32), trt.PluginFieldType.INT32) for name in INT_FIELDS]
            fields += [trt.PluginField(name, np.array([], np.int8), trt.PluginFieldType.CHAR) for name in STRING_FIELDS]
            self.field_names = trt.PluginFieldCollection(fields)

        def create_plugin(self, name, fc, phase):
            fields = {f.name: _field_value(f) for f in fc if f.name in INT_FIELDS + STRING_FIELDS}
            _record("create_plugin", name=name, phase=str(phase), fields=dict(fields))
            return MemoryArgminL2Plugin(fields, phase)

    return MemoryArgminL2Plugin, MemoryArgminL2Creator


def register_plugin(trt) -> list[str]:
    """Register the creator with ``trt``'s plugin registry (idempotent); returns ``["memseg::MemoryArgminL2"]``
    (what ``build_engine`` records in the sidecar). Pass as ``build_engine(register_plugins=register_plugin)``."""
    with _lock:
        if id(trt) not in _registered:
            _, creator_cls = plugin_classes(trt)
            creator = creator_cls()
            if not trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE):
                raise RuntimeError(f"TensorRT refused to register the {QUALIFIED_NAME} plugin creator")
            _registered[id(trt)] = creator
    return [QUALIFIED_NAME]
