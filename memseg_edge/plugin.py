"""TensorRT plugin ``memseg::MemoryArgminL2`` version 1: the fused memory-bank kernel as an IPluginV3,
written with TensorRT's class-based Python plugin API (TensorRT >= 10.0, TensorRT 11, TensorRT-RTX;
the decorator API ``tensorrt.plugin`` is 10.6+ and absent from TensorRT-RTX, see docs/architecture.md).

Build half (runs on a CPU-only machine with TensorRT-RTX): output shapes (diffs like the features,
index ``[N]`` or ``[N, L]``), types (float32 or float16 in and out, all alike; index int32), linear
formats, workspace (the partial sums), and the fields to serialise into the engine. Runtime half:
``attach_to_context`` (TensorRT calls it when it creates an execution context, with that context's CUDA
context current) compiles or reads the kernel from the cache and loads it into the CUDA context
(``memseg_edge.kernels.DriverLauncher``, one per CUDA context), so a missing compiler or a driver too
old for the PTX fails there, with the reason, and not inside the first inference. ``enqueue`` launches
the kernel's two launches on TensorRT's stream; their packed parameters are cached per (batch, type,
pointers), so a steady stream of calls does no launch planning and no ctypes packing.

A failure in ``attach_to_context`` or ``enqueue`` is logged with its traceback (logger
``memseg_edge.plugin`` and stderr), kept in :func:`last_error`, and raised again: TensorRT turns it into
a failed context creation or ``execute_async_v3`` returning False, and the log says why.

Use: ``build_engine(..., register_plugins=register_plugin)``; a runtime calls :func:`register_plugin`
with its TensorRT module before it deserialises an engine whose sidecar lists ``memseg::MemoryArgminL2``.
``CALL_LOG`` records the build-time calls (tests read it). :func:`stand_in_trt` is a small stand-in for
the TensorRT types the plugin touches, so its whole lifecycle can be driven without TensorRT (CI, and
the GPU check on a machine without TensorRT).
"""
from __future__ import annotations

import enum
import logging
import sys
import threading
import traceback
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import numpy as np

from .kernels import MemoryStep, plan_launches

PLUGIN_NAME = "MemoryArgminL2"
PLUGIN_NAMESPACE = "memseg"
PLUGIN_VERSION = "1"
QUALIFIED_NAME = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
INT_FIELDS = ("levels", "channels", "heights", "widths", "samples")
STRING_FIELDS = ("selection",)
PREPARED_CACHE = 16          # packed launches kept per plugin instance (one per (batch, pointers) seen)

CALL_LOG: list[tuple[str, dict[str, Any]]] = []
_registered: dict[int, Any] = {}        # id(trt module) -> creator (the registry keeps a raw pointer only)
_launchers: dict[Any, Any] = {}         # CUDA context handle -> DriverLauncher
_lock = threading.Lock()
_last_error: list[str] = []
log = logging.getLogger(__name__)


def _record(call: str, **info: Any) -> None:
    CALL_LOG.append((call, info))


def last_error() -> str | None:
    """The traceback of the last failure in ``attach_to_context`` or ``enqueue`` in this process, or None."""
    return _last_error[-1] if _last_error else None


def _report(where: str, exc: BaseException) -> None:
    text = f"{QUALIFIED_NAME} {where} failed: {exc}\n" + "".join(traceback.format_exception(exc))
    _last_error[:] = [text]
    log.error("%s", text)
    print(text, file=sys.stderr, flush=True)


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


def fields_of(step: MemoryStep) -> dict[str, Any]:
    """:func:`step_from_fields`'s inverse: the fields a creator receives for ``step``."""
    return {"levels": [len(step.levels)], "channels": [c for c, _, _ in step.levels],
            "heights": [h for _, h, _ in step.levels], "widths": [w for _, _, w in step.levels],
            "samples": [step.samples], "selection": step.selection}


def _current_context() -> int:
    """The current CUDA context's handle; the primary context is made current where none is (TensorRT's
    runtime API uses the device's primary context)."""
    from cuda.bindings import driver

    err, ctx = driver.cuCtxGetCurrent()
    if int(err) == 0 and int(ctx):
        return int(ctx)
    from cuda.bindings import runtime

    runtime.cudaFree(0)   # initialises the runtime on its current device: its primary context becomes current
    err, ctx = driver.cuCtxGetCurrent()
    if int(err) != 0 or not int(ctx):
        raise RuntimeError(f"{QUALIFIED_NAME}: no current CUDA context ({err}); is there a CUDA GPU?")
    return int(ctx)


def _launcher():
    """The kernel loaded into the current CUDA context (once per context and process)."""
    from .kernels import DriverLauncher

    key = _current_context()
    with _lock:
        if key not in _launchers:
            _launchers[key] = DriverLauncher.for_current_device()
        return _launchers[key]


def plugin_classes(trt) -> tuple[type, type]:
    """``(MemoryArgminL2Plugin, MemoryArgminL2Creator)`` for the TensorRT module ``trt`` (or :func:`stand_in_trt`)."""

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
            # num_outputs lives on TensorRT's C++ side (not in __dict__): set it in every constructor.
            self.num_outputs = len(self.step.levels) + 1 if self.step else 4
            self.batch = None
            self._launcher = None
            self._prepared: OrderedDict = OrderedDict()

        # ---------------------------------------------------------------- core
        def get_capability_interface(self, type):
            return self

        def clone(self):
            # A fresh object from the fields (so num_outputs and the step are right for 1-3 levels), sharing
            # the loaded module (per CUDA context, immutable) but not the packed launches (pointers differ).
            twin = MemoryArgminL2Plugin(self.fields, self.phase)
            twin.timing_cache_id = self.timing_cache_id
            twin.batch = self.batch
            twin._launcher = self._launcher
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
            try:
                twin = self.clone()
                twin._launcher = _launcher()   # compile or read the cache, load the module: here, not in enqueue
                return twin
            except Exception as exc:
                _report("attach_to_context", exc)
                raise

        def launches_for(self, input_desc, inputs, outputs, workspace):
            """The packed launches for these descriptors and pointers (cached; planned on a miss)."""
            n = len(self.step.levels)
            batch = int(input_desc[0].dims[0])
            half = input_desc[0].type == trt.DataType.HALF
            key = (batch, half, tuple(map(int, inputs[:2 * n])), tuple(map(int, outputs[:n + 1])), int(workspace))
            prepared = self._prepared.get(key)
            if prepared is None:
                if self._launcher is None:
                    raise RuntimeError(f"{QUALIFIED_NAME}: enqueue before attach_to_context (no kernel loaded)")
                launches = plan_launches(self.step, batch, half, key[2][:n], key[2][n:], key[3][:n], key[3][n],
                                         key[4], sm_count=self._launcher.sm_count)
                prepared = self._launcher.prepare(launches)
                self._prepared[key] = prepared
                if len(self._prepared) > PREPARED_CACHE:
                    self._prepared.popitem(last=False)
            return prepared

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            try:
                prepared = self.launches_for(input_desc, inputs, outputs, workspace)
                self._launcher.run(prepared, int(stream))
            except Exception as exc:
                _report("enqueue", exc)
                raise

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


# ------------------------------------------------------------------------------------ stand-in for TensorRT


def stand_in_trt():
    """A module-like stand-in for the TensorRT types the plugin touches (no TensorRT, no GPU needed): the
    plugin base classes, ``DataType``, ``TensorFormat``, ``PluginField(Collection)``, ``DimsExprs``, a plugin
    registry, and ``desc`` / ``dynamic_desc`` to make the descriptors TensorRT would pass. Like TensorRT's
    own binding, ``num_outputs`` is held outside the Python object's ``__dict__`` (on the "C++ side")."""

    class DataType(enum.Enum):
        FLOAT = 0
        HALF = 1
        INT8 = 2
        INT32 = 3

        def __str__(self):
            return f"DataType.{self.name}"

    class TensorFormat(enum.Enum):
        LINEAR = 0
        CHW32 = 1

        def __str__(self):
            return f"TensorFormat.{self.name}"

    class PluginFieldType(enum.Enum):
        INT32 = 0
        CHAR = 1

    class TensorRTPhase(enum.Enum):
        BUILD = 0
        RUNTIME = 1

    native: dict[int, int] = {}   # id(plugin) -> num_outputs: not in __dict__, so a __dict__ copy misses it

    class IPluginV3:
        def __init__(self):
            pass

    class IPluginV3OneCore:
        def __init__(self):
            pass

    class IPluginV3OneBuild:
        def __init__(self):
            pass

        @property
        def num_outputs(self):
            return native.get(id(self), 0)

        @num_outputs.setter
        def num_outputs(self, value):
            native[id(self)] = int(value)

    class IPluginV3OneRuntime:
        def __init__(self):
            pass

    class IPluginCreatorV3One:
        def __init__(self):
            pass

    class PluginField:
        def __init__(self, name, data=None, type=None):
            self.name, self.data, self.type = name, data, type

    class PluginFieldCollection(list):
        pass

    class Expr:
        def __init__(self, value=None):
            self.value = value

        def is_constant(self):
            return self.value is not None

        def get_constant_value(self):
            return self.value

    class DimsExprs(list):
        def __init__(self, arg=0):
            super().__init__(list(arg) if not isinstance(arg, int) else [Expr() for _ in range(arg)])

    class ExprBuilder:
        def constant(self, value):
            return Expr(int(value))

    class Registry:
        def __init__(self):
            self.creators = []

        def register_creator(self, creator, namespace):
            self.creators.append((namespace, creator))
            return True

    registry = Registry()

    def desc(dims, dtype, fmt=None):
        return SimpleNamespace(dims=list(dims), type=dtype, format=fmt or TensorFormat.LINEAR)

    def dynamic_desc(dims, dtype, min_dims=None, max_dims=None):
        return SimpleNamespace(desc=desc(dims, dtype), min=list(min_dims or dims), max=list(max_dims or dims),
                               opt=list(max_dims or dims))

    return SimpleNamespace(
        DataType=DataType, TensorFormat=TensorFormat, PluginFieldType=PluginFieldType, TensorRTPhase=TensorRTPhase,
        IPluginV3=IPluginV3, IPluginV3OneCore=IPluginV3OneCore, IPluginV3OneBuild=IPluginV3OneBuild,
        IPluginV3OneRuntime=IPluginV3OneRuntime, IPluginCreatorV3One=IPluginCreatorV3One, PluginField=PluginField,
        PluginFieldCollection=PluginFieldCollection, DimsExprs=DimsExprs, Expr=Expr, ExprBuilder=ExprBuilder,
        get_plugin_registry=lambda: registry, desc=desc, dynamic_desc=dynamic_desc, __name__="stand_in_trt")
