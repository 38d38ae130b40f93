"""FP16 conversion: a bundle's ``model.onnx`` -> ``model.fp16.onnx``.

TensorRT's strongly typed networks (TensorRT 11, TensorRT-RTX) run each tensor in the type the ONNX
file gives it, so FP16 is a property of the file (docs/architecture.md, "Engines"). Weights and activations
become float16; the parts that need float32 keep it, with a Cast wherever an FP32 island meets FP16:

* the same kept groups as INT8 (``calibration.int8.kept_fp32_nodes``): the input normalisation, the
  memory-bank step (squared distances summed over ~10^5 elements overflow float16's 65504 and lose the
  argmin to rounding; its bank initializers stay float32), what follows it up to the next
  convolutions (spatial-attention products of three levels span 0.01 to 10^4 and more at a defect),
  the softmax, map slice and top-k score, ill-conditioned layers with everything upstream of them
  (MobileNetV2's stem and first blocks: one channel amplifies its input ~80x, and float16 rounding
  of that input was the largest single source of map error, 5x the rest together, on good images of
  the bottle model), and any node-name prefixes the user gives;
* per op, inputs whose type the ONNX schema does not tie to the op's output type keep their original
  type (Resize's ``scales`` is float32 by definition; ``roi``, Pow's exponent stay float32);
* ReduceMean over the coordinate-attention rows and columns (at most the image size, of ReLU outputs)
  stays float16: sums of a few hundred values well inside float16's range, and TensorRT accumulates
  reductions in float32.

Casts from FP32 into FP16 saturate (a Clip to +-65504 first), so a value beyond float16's range reaches
the next layer as the largest float16 rather than as inf (which a convolution would turn into NaN).
The graph input stays uint8 ``[N, H, W, 3]`` and the outputs float32, with the same names and shapes as
``model.onnx``, so every runtime treats the variants alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from memseg_edge.bundle import load_bundle

from .int8 import (_name_nodes, check_interface, describe_kept, fix_ir_version, kept_fp32_nodes,
                   kept_fp32_summary, memory_prefix, previous_sha256, report_replaced, save_model)
from .threshold import choose_variant_threshold

FP16_MAX = 65504.0


def _type_following_inputs(schema, n_inputs: int) -> list[bool]:
    """Per input slot: does its type parameter also type an output (so it must match the node's
    precision)? Slots with a fixed type or a type parameter of their own keep their type."""
    params = {t.type_param_str for t in schema.type_constraints}
    out_types = {p.type_str for p in schema.outputs} & params
    formal = list(schema.inputs)
    flags = []
    for i in range(n_inputs):
        if i < len(formal):
            p = formal[i]
        elif formal and formal[-1].option == type(formal[-1].option).Variadic:
            p = formal[-1]
        else:
            flags.append(False)
            continue
        flags.append(p.type_str in out_types)
    return flags


def _output_type_params(schema, n_outputs: int) -> list[str | None]:
    formal = list(schema.outputs)
    out = []
    for j in range(n_outputs):
        p = formal[j] if j < len(formal) else (formal[-1] if formal else None)
        out.append(p.type_str if p is not None else None)
    return out


def to_fp16(model, kept: set[str], float_tensors: set[str] = frozenset()):
    """A new ModelProto: nodes not named in ``kept`` (and not Constant) compute in float16, the kept
    ones in float32, with Casts between. Graph outputs and ``float_tensors`` (boundary names others rely
    on) keep their names as float32 tensors: an FP16 producer writes ``<name>_fp16`` and a Cast makes
    ``<name>``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dtype: dict[str, int] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dtype[v.name] = v.type.tensor_type.elem_type
    inits = {t.name: t for t in graph.initializer}
    for t in graph.initializer:
        dtype[t.name] = t.data_type
    consts: dict[str, onnx.TensorProto] = dict(inits)
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
                    dtype[n.output[0]] = a.t.data_type
    original = dict(dtype)

    new_nodes: list = []
    new_inits: list = []
    half_of: dict[str, str] = {}
    float_of: dict[str, str] = {}
    sat = {"done": False}
    fixed = set(float_tensors) | {o.name for o in graph.output}

    def saturation_bounds() -> tuple[str, str]:
        if not sat["done"]:
            new_inits.append(numpy_helper.from_array(np.array(-FP16_MAX, np.float32), "fp16/saturate_min"))
            new_inits.append(numpy_helper.from_array(np.array(FP16_MAX, np.float32), "fp16/saturate_max"))
            sat["done"] = True
        return "fp16/saturate_min", "fp16/saturate_max"

    def to_half(t: str) -> str:
        if t in half_of:
            return half_of[t]
        name = f"{t}_fp16"
        if t in consts:
            arr = numpy_helper.to_array(consts[t]).astype(np.float32)
            new_inits.append(numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), name))
        else:
            lo, hi = saturation_bounds()
            clipped = f"{t}_saturated"
            new_nodes.append(helper.make_node("Clip", [t, lo, hi], [clipped], name=f"/fp16/saturate/{t}"))
            new_nodes.append(helper.make_node("Cast", [clipped], [name], name=f"/fp16/to_fp16/{t}", to=HALF))
        dtype[name] = HALF
        half_of[t] = name
        return name

    def to_float(t: str) -> str:
        if t not in float_of:
            name = f"{t}_fp32"
            new_nodes.append(helper.make_node("Cast", [t], [name], name=f"/fp16/to_fp32/{t}", to=FLOAT))
            dtype[name] = FLOAT
            float_of[t] = name
        return float_of[t]

    for node in graph.node:
        n = onnx.NodeProto()
        n.CopyFrom(node)
        if n.op_type == "Constant":
            new_nodes.append(n)
            continue
        if n.name in kept:
            for i, t in enumerate(n.input):
                if t and dtype.get(t) == HALF and original.get(t) == FLOAT:
                    n.input[i] = to_float(t)
            new_nodes.append(n)
            continue
        try:
            schema = onnx.defs.get_schema(n.op_type, opset, n.domain or "")
        except onnx.defs.SchemaError:  # an op unknown to onnx (a plugin): leave it in float32
            for i, t in enumerate(n.input):
                if t and dtype.get(t) == HALF and original.get(t) == FLOAT:
                    n.input[i] = to_float(t)
            new_nodes.append(n)
            continue
        follow = _type_following_inputs(schema, len(n.input))
        half_params = set()
        formal_in = list(schema.inputs)
        for i, t in enumerate(n.input):
            if not t or not follow[i]:
                continue
            if dtype.get(t) == FLOAT:
                n.input[i] = to_half(t)
            if dtype.get(n.input[i]) == HALF:
                half_params.add(formal_in[min(i, len(formal_in) - 1)].type_str)
        out_params = _output_type_params(schema, len(n.output))
        if n.op_type == "Cast":
            to = next(a for a in n.attribute if a.name == "to")
            if to.i == FLOAT:
                to.i = HALF
                dtype[n.output[0]] = HALF
        else:
            for j, o in enumerate(n.output):
                if o and original.get(o) == FLOAT and out_params[j] in half_params:
                    dtype[o] = HALF
        new_nodes.append(n)
        for j, o in enumerate(n.output):
            if o in fixed and dtype.get(o) == HALF:
                n.output[j] = half_of[o] = f"{o}_fp16"
                dtype[half_of[o]], dtype[o] = HALF, FLOAT
                new_nodes.append(helper.make_node("Cast", [half_of[o]], [o], name=f"/fp16/to_fp32/{o}", to=FLOAT))

    # Drop what nothing reads any more (float32 originals of converted constants).
    used = {t for n in new_nodes for t in n.input} | {o.name for o in graph.output}
    new_nodes = [n for n in new_nodes if n.op_type != "Constant" or n.output[0] in used]
    kept_inits = [t for t in graph.initializer if t.name in used] + [t for t in new_inits if t.name in used]

    out_graph = helper.make_graph(new_nodes, graph.name, list(graph.input), list(graph.output),
                                  initializer=kept_inits)
    result = helper.make_model(out_graph, opset_imports=list(model.opset_import),
                               producer_name=model.producer_name, producer_version=model.producer_version,
                               doc_string=model.doc_string)
    result.ir_version = model.ir_version
    for p in model.metadata_props:
        result.metadata_props.add().CopyFrom(p)
    return result


def convert_fp16(bundle_dir: str | Path, keep_fp32: list[str] | None = None, log: Callable = print,
                 images: str | Path | None = None) -> Path:
    """Write ``bundle_dir/model.fp16.onnx`` (float16 weights and activations, the sensitive parts in
    float32) and record it in ``model.json``; returns its path. ``keep_fp32``: node-name prefixes to keep
    in float32 in addition to the fixed groups. ``images``: the product's good training images; the
    variant then gets its own threshold from the held-out ones (``choose_variant_threshold``), else it
    judges with the one chosen at training."""
    import onnx

    bundle, _ = load_bundle(bundle_dir)
    fp32_path = bundle.verify("fp32")
    prefix = memory_prefix(bundle.meta)
    model = onnx.load(str(fp32_path))
    _name_nodes(model.graph)
    groups = kept_fp32_nodes(model, prefix, keep_fp32)
    kept = {n for g in groups.values() for n in g}
    half = to_fp16(model, kept, set(bundle.meta["memory_subgraph"].get("inputs", [])))
    fix_ir_version(half)
    check_interface(half, model, bundle.meta)
    bank = set(bundle.meta["memory_subgraph"].get("bank_initializers", []))
    types = {t.name: t.data_type for t in half.graph.initializer}
    wrong = [b for b in bank if types.get(b) != onnx.TensorProto.FLOAT]
    if wrong:
        raise RuntimeError(f"memory bank initializers {wrong} are not float32 after conversion")
    out = bundle.root / "model.fp16.onnx"
    old_sha256 = previous_sha256(out)
    save_model(half, out)
    summary = kept_fp32_summary(groups, prefix, keep_fp32)
    bundle.add_file(out, "fp16", kept_fp32=summary)
    n_half = sum(1 for t in half.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {n_half} float16 initializers; kept in float32: "
        f"{describe_kept(groups, model)})")
    report_replaced(bundle, out, old_sha256, log)
    if images is not None:
        choose_variant_threshold(bundle.root, out.name, images, log=log)
    elif bundle.meta.get("threshold"):
        log(f"{out.name} judges with the threshold chosen at training ({bundle.threshold:.4f}); give --images "
            "(the product's train/good) to choose its own from the held-out good images")
    return out
