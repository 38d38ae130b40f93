"""Plugin variants of a bundle's ONNX files: the named memory-bank subgraph (nodes ``/model/memory/...``,
boundary ``memory/features_<l>`` -> ``memory/diff_<l>``, see ``train/export.py``) replaced by one
``MemoryArgminL2`` node (domain and ``plugin_namespace`` ``memseg``, ``plugin_version`` ``1``) that
TensorRT maps to the fused kernel's plugin (``memseg_edge.plugin``).

The node's inputs are the three feature tensors and the three bank constants; its outputs the three
diff tensors (same names as before, so the rest of the graph is untouched) and ``memory/index``
(int32, unused by the graph). Its attributes are the plugin's fields: ``levels``, ``channels``,
``heights``, ``widths``, ``samples``, ``selection``. ``io_dtype="fp16"`` runs the node in float16
(Casts around it, float16 bank); the default keeps the subgraph's own type, which is float32 in
``model.fp16.onnx`` too (calibration keeps the memory step in FP32; the kernel accumulates in FP32
whatever its I/O type, so FP16 I/O only rounds its inputs and outputs).

onnxruntime cannot run these files (it has no such op); TensorRT with the plugin registered can.
Needs ``onnx`` (the ``onnx`` extra).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import PRECISION_FILES, load_bundle, sha256_file
from .kernels import MemoryStep

PLUGIN_OP = "MemoryArgminL2"
PLUGIN_DOMAIN = "memseg"
PLUGIN_VERSION = "1"
INDEX_NAME = "memory/index"
PLUGIN_FILES = {"fp32": "model.plugin.onnx", "fp16": "model.fp16.plugin.onnx"}


def _onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("the plugin rewrite needs onnx: pip install 'memseg-edge[onnx]'") from exc
    return onnx


def memory_step_of(model, memory: dict[str, Any], selection: str) -> MemoryStep:
    """The step's shapes from the bank initializers named in model.json ``memory_subgraph``."""
    inits = {t.name: t for t in model.graph.initializer}
    levels = []
    samples = None
    for name in memory["bank_initializers"]:
        if name not in inits:
            raise ValueError(f"bank initializer {name!r} (model.json memory_subgraph) is not in the graph")
        dims = list(inits[name].dims)
        if len(dims) != 4:
            raise ValueError(f"bank {name!r} has shape {dims}; expected [M, C, H, W]")
        if samples is not None and dims[0] != samples:
            raise ValueError(f"banks disagree on the number of memory samples: {samples} and {dims[0]}")
        samples = dims[0]
        levels.append(tuple(int(d) for d in dims[1:]))
    return MemoryStep(tuple(levels), int(samples), selection)


def rewrite_model(model, memory: dict[str, Any], selection: str = "sum", io_dtype: str | None = None):
    """A copy of ``model`` with the memory subgraph replaced by one plugin node. ``memory``: model.json's
    ``memory_subgraph``; ``io_dtype``: ``None`` (the subgraph's own type), ``"fp32"`` or ``"fp16"``."""
    if selection == "patch":
        raise ValueError("this bundle's memory bank uses memory_selection 'patch' (nearest feature vector per "
                         "position); the fused plugin implements only 'sum' and 'per_level'. Build the engine "
                         "without --plugin: the memory step then runs as standard TensorRT layers")
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    prefix = memory["node_prefix"]
    feats, diffs, banks = list(memory["inputs"]), list(memory["outputs"]), list(memory["bank_initializers"])
    if not (len(feats) == len(diffs) == len(banks)):
        raise ValueError(f"memory_subgraph lists {len(feats)} inputs, {len(diffs)} outputs, {len(banks)} banks")
    old = [n for n in graph.node if n.name.startswith(prefix)]
    if not old:
        raise ValueError(f"no nodes named {prefix}* in the graph: not an exported memseg-edge model, "
                         "or already rewritten")
    produced = {o for n in old for o in n.output}
    missing = [d for d in diffs if d not in produced]
    if missing:
        raise ValueError(f"the memory subgraph does not produce {missing}")
    step = memory_step_of(out, memory, selection)

    kept = [n for n in graph.node if not n.name.startswith(prefix)]
    inits = {t.name: t for t in graph.initializer}
    bank_type = inits[banks[0]].data_type
    want = {None: bank_type, "fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}[io_dtype]

    extra_before, extra_after = [], []
    plug_in, plug_out = [], []
    for i, (f, d, b) in enumerate(zip(feats, diffs, banks)):
        if want == bank_type:
            plug_in.append(f)
            plug_out.append(d)
            continue
        fc, dc = f"{f}/plugin_cast", f"{d}/plugin_typed"
        extra_before.append(helper.make_node("Cast", [f], [fc], to=want, name=f"/memory_plugin/cast_in_{i}"))
        extra_after.append(helper.make_node("Cast", [dc], [d], to=bank_type, name=f"/memory_plugin/cast_out_{i}"))
        plug_in.append(fc)
        plug_out.append(dc)
    bank_inputs = []
    for b in banks:
        if want == bank_type:
            bank_inputs.append(b)
            continue
        arr = numpy_helper.to_array(inits[b])
        typed = arr.astype(np.float16 if want == TensorProto.FLOAT16 else np.float32)
        name = f"{b}.{'fp16' if want == TensorProto.FLOAT16 else 'fp32'}"
        graph.initializer.append(numpy_helper.from_array(typed, name))
        bank_inputs.append(name)
    node = helper.make_node(
        PLUGIN_OP, plug_in + bank_inputs, plug_out + [INDEX_NAME], name="/memory_plugin/MemoryArgminL2",
        domain=PLUGIN_DOMAIN, plugin_namespace=PLUGIN_DOMAIN, plugin_version=PLUGIN_VERSION,
        levels=len(step.levels), channels=[c for c, _, _ in step.levels], heights=[h for _, h, _ in step.levels],
        widths=[w for _, _, w in step.levels], samples=step.samples, selection=selection)

    # Topological position: right after the last producer of a feature tensor (every consumer of a diff
    # came after the whole subgraph, hence after that producer too).
    last = -1
    for i, n in enumerate(kept):
        if any(o in feats for o in n.output):
            last = i
    new_nodes = kept[:last + 1] + extra_before + [node] + extra_after + kept[last + 1:]
    del graph.node[:]
    graph.node.extend(new_nodes)

    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    drop_vi = produced - set(diffs)
    keep_vi = [v for v in graph.value_info if v.name not in drop_vi]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    if not any(o.domain == PLUGIN_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    out.ir_version = min(out.ir_version, 10)  # onnxruntime 1.31 refuses IR 14 (docs/architecture.md, Pitfalls)
    onnx.checker.check_model(out)
    return out


def rewrite_file(src: str | Path, dst: str | Path, memory: dict[str, Any], selection: str = "sum",
                 io_dtype: str | None = None) -> Path:
    onnx = _onnx()
    model = rewrite_model(onnx.load(str(src)), memory, selection, io_dtype)
    onnx.save(model, str(dst))
    return Path(dst)


def write_plugin_variants(bundle_dir: str | Path, precisions=("fp32", "fp16"), fp16_io: str | None = None,
                          log=print) -> dict[str, Path]:
    """Write ``model.plugin.onnx`` (and ``model.fp16.plugin.onnx`` where ``model.fp16.onnx`` exists) into
    the bundle and record them in model.json (``files``, with ``"plugin": "memseg::MemoryArgminL2"``).
    ``fp16_io``: the plugin's I/O type in the FP16 variant (``None``: float32, as calibration keeps it)."""
    bundle, _ = load_bundle(bundle_dir)
    memory = bundle.meta.get("memory_subgraph")
    if not memory:
        raise ValueError(f"{bundle.root / 'model.json'} has no memory_subgraph: re-export the bundle")
    selection = bundle.meta.get("memory_selection", "sum")
    written = {}
    for precision in precisions:
        src = bundle.root / PRECISION_FILES[precision]
        if not src.is_file():
            if precision == "fp32":
                raise FileNotFoundError(f"{src} not found")
            log(f"note: {src.name} not found; no {precision} plugin variant "
                "(make it with memseg-edge calibrate --fp16)")
            continue
        bundle.verify(precision)
        dst = rewrite_file(src, bundle.root / PLUGIN_FILES[precision], memory, selection,
                           fp16_io if precision == "fp16" else None)
        bundle.add_file(dst, precision, plugin=f"{PLUGIN_DOMAIN}::{PLUGIN_OP}", source=src.name)
        log(f"wrote {dst} (memory subgraph -> {PLUGIN_DOMAIN}::{PLUGIN_OP})")
        written[precision] = dst
    return written


def plugin_bundle(bundle_dir: str | Path, out_dir: str | Path, precisions=("fp32", "fp16"),
                  fp16_io: str | None = None, log=print) -> Path:
    """A bundle folder whose ``model.onnx`` / ``model.fp16.onnx`` are the plugin variants of ``bundle_dir``'s,
    so :func:`memseg_edge.engine.build_engine` builds them as they are. model.json gains
    ``"memory_plugin": "memseg::MemoryArgminL2"``."""
    bundle, _ = load_bundle(bundle_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    memory = bundle.meta["memory_subgraph"]
    selection = bundle.meta.get("memory_selection", "sum")
    meta = json.loads(json.dumps(bundle.meta))
    meta["files"] = {}
    for precision in precisions:
        src = bundle.root / PRECISION_FILES[precision]
        if not src.is_file():
            log(f"note: {src.name} not found; skipped")
            continue
        bundle.verify(precision)
        dst = rewrite_file(src, out / PRECISION_FILES[precision], memory, selection,
                           fp16_io if precision == "fp16" else None)
        meta["files"][dst.name] = {"sha256": sha256_file(dst), "precision": precision,
                                   "plugin": f"{PLUGIN_DOMAIN}::{PLUGIN_OP}", "source": src.name}
    meta["memory_plugin"] = f"{PLUGIN_DOMAIN}::{PLUGIN_OP}"
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    for extra in ("README.md",):
        if (bundle.root / extra).is_file():
            shutil.copy2(bundle.root / extra, out / extra)
    return out
