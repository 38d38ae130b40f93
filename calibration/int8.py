"""INT8 calibration: a bundle's ``model.onnx`` -> ``model.int8.onnx`` with explicit Q/DQ nodes.

TensorRT 10/11 take INT8 only from QuantizeLinear/DequantizeLinear pairs in the ONNX file (docs/architecture.md,
"Engines"), so precision is decided here, once, and every runtime (onnxruntime on a CPU included) runs
the same graph. onnxruntime's ``quantize_static`` inserts the pairs: QDQ format, int8 activations and
weights, symmetric (zero points 0, which TensorRT requires), weights per output channel, biases left in
float (TensorRT dequantizes only int8). Ranges come from good images of the product, fed one at a time.

Q/DQ go on the inputs and weights of weighted ops (Conv, Gemm, MatMul) only, TensorRT's recommended
placement: one rounding per convolution, which TensorRT fuses with the producer's activation. (Also
quantizing every output, Add, Concat and Sigmoid, onnxruntime's default, rounds each tensor two or
three times; on good bottle images it made the decoder's score error 5x and the fusion's 3x larger.)

Some parts of the graph stay in float (``kept_fp32_nodes``; the same plan serves the FP16 conversion):

* ``input``: the normalisation at the start (uint8 -> float, /255, - mean, / std): everything the
  graph input reaches before the first convolution.
* ``memory``: the memory-bank step (nodes named with ``model.json["memory_subgraph"]["node_prefix"]``):
  squared distances summed over ~10^5 elements and an argmin; INT8 there would pick the wrong sample.
* ``memory_derived``: what follows the memory step up to the next convolutions (difference / scale,
  spatial-attention maps, their products and the concatenations and multiplications that feed the
  fusion and decoder convolutions). Calibration images are good parts only, so no calibrated range
  covers what a defect produces there; kept in float, these signals are quantized only where a
  convolution reads them.
* ``output``: everything after the decoder's last convolution (softmax, channel slice, top-k mean
  score): the probabilities the verdict is made from. The last convolution itself is INT8 on its input
  and weights; its logits leave it in float.
* ``encoder`` (INT8 only, not FP16): everything computed without the memory step, i.e. every node that
  is not downstream of it: the frozen encoder levels the memory step reads, and the trainable bottleneck
  beside them. The memory step measures each feature against a bank filled with float features, and a
  feature close to its nearest bank vector has a difference as small as INT8's rounding of it: with the
  encoder in INT8 the differences of good parts moved 32-36 % (magnetic_tile). The encoder is ~15 % of
  the model's convolution work (MobileNetV2, 256 px).
  Chosen on the defect probe of both products (BENCHMARKS.md, "INT8 choice").
* ``fusion`` (INT8 only): the multi-scale feature fusion (``FUSION_PREFIX``), whose first convolutions
  read the features concatenated with the memory step's differences and whose outputs are weighted by
  its spatial attention. Its ranges are calibrated on good parts, where a defect's differences never
  appear; in INT8 it cost the bottle default model 0.0045 probe AUPRO, in float 0.0017, for 13 % of the
  multiply-adds (INT8 keeps 68 % of them). Chosen on the defect probe of both products against keeping
  only those first convolutions, or the decoder's full-resolution end, in float (BENCHMARKS.md, "INT8
  choice: which part of the network stays in float").
* ``ill_conditioned``: weighted ops with an output channel whose weights are far larger than the
  layer's others (``ill_conditioned_ops``), and everything upstream of them. ImageNet MobileNetV2 has
  one in its first stage (a channel ~80x its neighbours after batch-norm folding); with it in INT8 the
  bottle model's image AUROC fell to 0.56 and its maps were noise. Kept: the stem and first blocks.
* ``user``: nodes whose names start with a prefix given in ``keep_fp32``.

Nodes kept in float read the float tensors their producers computed, never a Q/DQ round trip (the
pairs onnxruntime puts on a tensor that also feeds a quantized node are bypassed for them), so the
memory subgraph still reads ``memory/features_<l>`` and writes ``memory/diff_<l>``, and
``build-engine`` can swap it for the fused kernel.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import deque
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from memseg_edge.bundle import INPUT_NAME, load_bundle, sha256_file

from memseg_edge.preprocess import IMAGE_SUFFIXES, list_images, load_rgb, prepare

from .threshold import choose_variant_threshold

METHODS = ("entropy", "percentile", "minmax")
DEFAULT_METHOD = "entropy"
DEFAULT_NUM_IMAGES = 64
PERCENTILE = 99.999
"""Percentile of |activation| used by ``method="percentile"`` (onnxruntime's default)."""
MAX_IR_VERSION = 10
"""onnxruntime 1.31 refuses IR versions above 10 (onnx 1.23 helpers write 14)."""
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
"""Ops that carry learned weights: the boundaries of the kept-in-float regions."""
FUSION_PREFIX = "/model/fusion/"
"""Node-name prefix of the multi-scale feature fusion (``MultiScaleFusion``, module ``fusion`` of every
exported MemSeg, whatever its backbone): kept in float by the INT8 plan (the ``fusion`` group)."""
GAIN_RATIO = 32.0
"""``ill_conditioned_ops``: a channel 32x above the layer's median keeps about 3 of the input's 8 bits."""
_CHUNK = 8  # calibration images whose activations are held in memory at once


# --------------------------------------------------------------------------------------------------
# Which nodes stay in float (shared with calibration.fp16)


def memory_prefix(meta: dict) -> str:
    """The memory subgraph's node-name prefix from ``model.json``."""
    sub = meta.get("memory_subgraph") or {}
    prefix = sub.get("node_prefix")
    if not prefix:
        raise ValueError("model.json has no memory_subgraph.node_prefix: re-export the bundle with "
                         "`memseg-edge export`")
    return prefix


def _name_nodes(graph) -> None:
    """Give unnamed nodes unique names (exclusion lists and the kept-FP32 record need them)."""
    used = {n.name for n in graph.node if n.name}
    for i, n in enumerate(graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


def _channel_scale(node, consumers: dict, inits: dict, channels: int) -> np.ndarray | None:
    """|per-channel scale| of a constant ``Mul`` that alone reads ``node``'s output (a batch norm exported
    unfolded, e.g. a frozen one: Conv -> Mul -> Add), or ``None``."""
    from onnx import numpy_helper

    readers = consumers.get(node.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Mul":
        return None
    consts = [numpy_helper.to_array(inits[i]) for i in readers[0].input if i in inits]
    if len(consts) != 1 or consts[0].size != channels:
        return None
    return np.abs(consts[0].reshape(channels).astype(np.float64))


def ill_conditioned_ops(model, gain_ratio: float = GAIN_RATIO) -> list[str]:
    """Weighted ops (constant weights) where one output channel's largest |weight| exceeds the layer's
    median channel by more than ``gain_ratio``: after batch-norm folding, a channel with a tiny running
    variance amplifies small differences of its input, and the rounding of a per-tensor INT8 input
    with it (MobileNetV2's first stage has such a channel, about 80x its neighbours). A batch norm
    exported unfolded (a per-channel ``Mul`` right after the op) counts as folded."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    found = []
    for n in model.graph.node:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if w.ndim < 2:
            continue
        if n.op_type in ("MatMul", "Gemm"):  # output channels are columns (Gemm transB aside)
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            w = w if trans_b else w.T
        elif n.op_type == "ConvTranspose":
            w = np.swapaxes(w, 0, 1)
        peak = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        scale = _channel_scale(n, consumers, inits, w.shape[0]) if n.op_type.startswith("Conv") else None
        if scale is not None:
            peak = peak * scale
        median = float(np.median(peak))
        if median > 0 and float(peak.max()) > gain_ratio * median:
            found.append(n.name)
    return found


def kept_fp32_nodes(model, prefix: str, keep_fp32: Iterable[str] | None = None,
                    gain_ratio: float | None = GAIN_RATIO, encoder: bool = False,
                    fusion: bool = False) -> dict[str, list[str]]:
    """Names of the nodes that stay in float, by group (see the module docstring). Constant nodes are
    left out (they compute nothing). Every node must have a name (``_name_nodes``).

    Selection is structural: the graph input's reach up to the first weighted op, the memory prefix,
    the memory outputs' reach up to the next weighted ops, the graph outputs' ancestors back to the last
    weighted op, with ``encoder`` every node that is not downstream of the memory step, with ``fusion``
    the nodes named ``FUSION_PREFIX*``, and the user's prefixes. Raises ``ValueError`` when the memory subgraph is absent or a
    user prefix matches no node."""
    graph = model.graph
    nodes = list(graph.node)
    consumers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t:
                consumers.setdefault(t, []).append(i)
        for t in n.output:
            if t:
                producer[t] = i

    def forward(start: Iterable[str], skip: set[int], through_weighted: bool = False) -> set[int]:
        seen: set[int] = set()
        todo = deque(start)
        while todo:
            for i in consumers.get(todo.popleft(), []):
                if i in seen or i in skip or (nodes[i].op_type in WEIGHTED_OPS and not through_weighted):
                    continue
                seen.add(i)
                todo.extend(o for o in nodes[i].output if o)
        return seen

    memory = {i for i, n in enumerate(nodes) if n.name.startswith(prefix)}
    if not memory:
        raise ValueError(f"no nodes named {prefix}* in the model: not a memseg-edge bundle graph, or the "
                         "memory subgraph was renamed")
    initializers = {t.name for t in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in initializers]
    inputs = forward(graph_inputs, memory)
    memory_outputs = [o for i in memory for o in nodes[i].output
                      if o and any(c not in memory for c in consumers.get(o, []))]
    derived = forward(memory_outputs, memory | inputs)

    outputs: set[int] = set()
    todo = deque(o.name for o in graph.output)
    while todo:
        i = producer.get(todo.popleft())
        if i is None or i in outputs or nodes[i].op_type in WEIGHTED_OPS:
            continue
        outputs.add(i)
        todo.extend(t for t in nodes[i].input if t)

    def upstream(todo: deque) -> set[int]:
        seen: set[int] = set()
        while todo:
            i = todo.popleft()
            if i in seen:
                continue
            seen.add(i)
            todo.extend(producer[t] for t in nodes[i].input if t in producer)
        return seen

    encoder_side: set[int] = set()
    if encoder:  # every node the memory step's results never reach
        after = forward(memory_outputs, memory, through_weighted=True)
        encoder_side = set(range(len(nodes))) - after - memory

    ill: set[int] = set()
    if gain_ratio is not None:
        index = {n.name: i for i, n in enumerate(nodes)}
        # the op and everything upstream of it: its input must not be rounded either
        ill = upstream(deque(index[name] for name in ill_conditioned_ops(model, gain_ratio)))

    fused: set[int] = set()
    if fusion:
        fused = {i for i, n in enumerate(nodes) if n.name.startswith(FUSION_PREFIX)}

    user: set[int] = set()
    for p in keep_fp32 or []:
        hit = {i for i, n in enumerate(nodes) if n.name.startswith(p)}
        if not hit:
            raise ValueError(f"keep_fp32 prefix {p!r} matches no node of the model (node names look like "
                             f"{nodes[len(nodes) // 2].name!r})")
        user |= hit

    groups = {"input": inputs, "memory": memory, "memory_derived": derived - memory,
              "encoder": encoder_side - inputs - ill, "fusion": fused - memory - derived,
              "output": outputs - memory - derived,
              "ill_conditioned": ill - inputs - memory, "user": user}
    return {k: [nodes[i].name for i in sorted(v) if nodes[i].op_type != "Constant"] for k, v in groups.items()}


def describe_kept(groups: dict[str, list[str]], model) -> str:
    """One line for the log: node counts per group, and the ill-conditioned ops by name."""
    text = ", ".join(f"{k} {len(v)}" for k, v in groups.items() if v) + " nodes"
    ill = [n for n in ill_conditioned_ops(model) if n in set(groups["ill_conditioned"])]
    return text + (f" (ill-conditioned: {', '.join(ill)})" if ill else "")


def kept_fp32_summary(groups: dict[str, list[str]], prefix: str, keep_fp32: Iterable[str] | None) -> list[str]:
    """The list written to ``model.json``: the memory subgraph and user prefixes as ``prefix*``, the
    other kept nodes by name."""
    summary = [f"{prefix}*"] + ([f"{FUSION_PREFIX}*"] if groups.get("fusion") else []) + [f"{p}*" for p in keep_fp32 or []]
    summary = list(dict.fromkeys(summary))  # a user prefix may repeat a group's
    named = sorted({n for g in ("input", "memory_derived", "encoder", "output", "ill_conditioned")
                    for n in groups[g]})
    return summary + [n for n in named if not any(n.startswith(s[:-1]) for s in summary)]


def weighted_op_macs(model) -> dict[str, int]:
    """Multiply-adds per image of each weighted op (Conv, ConvTranspose, Gemm, MatMul), by node name,
    from the shapes ONNX shape inference gives (a symbolic batch dimension counts as 1). Ops whose
    shapes cannot be inferred are left out. What the INT8 plan leaves in float is weighed with this."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes: dict[str, list[int]] = {}
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims:
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    macs: dict[str, int] = {}
    for n in graph.node:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2:
            continue
        a, w = shapes.get(n.input[0]), shapes.get(n.input[1])
        y = shapes.get(n.output[0])
        if a is None or w is None or y is None:
            continue
        if n.op_type == "Conv":
            macs[n.name] = int(np.prod(y, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
        elif n.op_type == "ConvTranspose":  # every input element meets C_out/group x kernel weights
            macs[n.name] = int(np.prod(a, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
        else:  # Gemm / MatMul: every output element is a dot product over the inner dimension
            inner = a[-1] if n.op_type == "MatMul" or not any(
                at.name == "transA" and at.i for at in n.attribute) else a[0]
            macs[n.name] = int(np.prod(y, dtype=np.int64) * inner)
    return macs


def int8_share(model, kept: Iterable[str]) -> tuple[float, int]:
    """(share of the weighted ops' multiply-adds that run in INT8, total multiply-adds per image) when
    the nodes named in ``kept`` stay in float: how much of the model INT8 can speed up."""
    macs = weighted_op_macs(model)
    total = sum(macs.values())
    kept = set(kept)
    int8 = sum(m for name, m in macs.items() if name not in kept)
    return (int8 / total if total else 0.0), total


# --------------------------------------------------------------------------------------------------
# Calibration data


def hash_images(paths: Iterable[Path]) -> str:
    """sha256 over the names and contents of a set of images (order-independent), the definition the
    trainer uses for its training list."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode())
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()


def select_images(images: str | Path, num: int, seed: int = 0, log: Callable = print,
                  exclude: Iterable[str] = ()) -> list[Path]:
    """A seeded random subset of ``num`` images of a folder (all of them, with a warning, if fewer),
    leaving out the file names in ``exclude`` (the held-out good images the threshold is chosen on)."""
    if num < 1:
        raise ValueError(f"the number of calibration images must be at least 1, found {num}")
    folder = Path(images)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration image folder {folder} does not exist")
    excluded = set(exclude)
    paths = [p for p in list_images(folder) if p.name not in excluded]
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in calibration folder {folder}"
                         f"{' but the held-out ones' if excluded else ''}: give a folder of good images of the product")
    if len(paths) < num:
        besides = f" besides the {len(excluded)} held out at training" if excluded else ""
        log(f"warning: {folder} has {len(paths)} images{besides}, fewer than the {num} asked for; calibrating with "
            f"all {len(paths)}")
        return paths
    pick = np.random.default_rng(seed).choice(len(paths), size=num, replace=False)
    return [paths[i] for i in sorted(pick)]


def _reader(paths: list[Path], size: int, progress: bool, fit: str = "stretch"):
    from onnxruntime.quantization import CalibrationDataReader
    from tqdm import tqdm

    class ImageReader(CalibrationDataReader):
        """Feeds ``{"image": uint8 [1, size, size, 3]}``, one image per call, in ranges of images."""

        def __init__(self):
            self.start, self.end = 0, len(paths)
            self.bar = tqdm(total=len(paths), desc="calibrating", unit="img", disable=not progress,
                            leave=False)

        def __len__(self) -> int:
            return len(paths)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.end = start_index, min(end_index, len(paths))

        def get_next(self):
            if self.start >= self.end:
                return None
            image = prepare(load_rgb(paths[self.start]), size, fit)[None]
            self.start += 1
            self.bar.update(1)
            return {INPUT_NAME: image}

    return ImageReader()


@contextmanager
def _quiet_onnxruntime_quantization():
    """onnxruntime's quantizer logs advice through the root logger (pre-processing, etc.; the model
    here needs none: static shapes but the batch, standard ops) and prints histogram statistics on
    stdout; hide both meanwhile (stdout is ours: the CLI's progress and results)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


# --------------------------------------------------------------------------------------------------
# Post-processing and checks


def _bypass_qdq_for(model, kept: set[str]) -> int:
    """Kept nodes read the float tensor, not its Q/DQ round trip; then drop pairs nothing reads.
    Returns the number of node inputs rewired."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    rewired = 0
    for n in graph.node:
        if n.name not in kept:
            continue
        for k, t in enumerate(n.input):
            dq = producer.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[k] = q.input[0]
                rewired += 1
    _drop_dead_nodes(model, ("QuantizeLinear", "DequantizeLinear"))
    return rewired


def _drop_dead_nodes(model, op_types: tuple[str, ...]) -> None:
    graph = model.graph
    while True:
        used = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in op_types and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)


def check_zero_points(model) -> int:
    """Every QuantizeLinear/DequantizeLinear has an explicit int8 zero point equal to 0 (symmetric,
    as TensorRT requires). Returns the number of Q/DQ nodes; raises ``RuntimeError`` otherwise."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        count += 1
        zp = n.input[2] if len(n.input) > 2 else ""
        if not zp or zp not in inits:
            raise RuntimeError(f"{n.op_type} {n.name} has no constant zero point (it would be uint8): "
                               "TensorRT needs symmetric int8 Q/DQ")
        arr = numpy_helper.to_array(inits[zp])
        if inits[zp].data_type != onnx.TensorProto.INT8 or np.any(arr != 0):
            raise RuntimeError(f"{n.op_type} {n.name}: zero point {zp} is {arr.dtype} {arr.ravel()[:4]}; "
                               "TensorRT needs int8 zero points equal to 0")
    return count


def _io_signature(model) -> list[tuple[str, int]]:
    return [(v.name, v.type.tensor_type.elem_type) for v in list(model.graph.input) + list(model.graph.output)]


def check_interface(model, reference, meta: dict) -> None:
    """Same graph inputs/outputs (names, element types) as ``model.onnx``, and the memory subgraph
    still reads ``memory/features_<l>`` and writes ``memory/diff_<l>``."""
    ref_inits = {t.name for t in reference.graph.initializer}
    want = [s for s in _io_signature(reference) if s[0] not in ref_inits]
    inits = {t.name for t in model.graph.initializer}
    have = [s for s in _io_signature(model) if s[0] not in inits]
    if have != want:
        raise RuntimeError(f"converted model changed the graph interface: {have} != {want}")
    sub = meta["memory_subgraph"]
    prefix = sub["node_prefix"]
    reads = {t for n in model.graph.node if n.name.startswith(prefix) for t in n.input}
    writes = {t for n in model.graph.node if n.name.startswith(prefix) for t in n.output}
    missing = [t for t in sub.get("inputs", []) if t not in reads] + \
              [t for t in sub.get("outputs", []) if t not in writes]
    if missing:
        raise RuntimeError(f"memory subgraph boundary tensors {missing} are no longer read/written by the "
                           f"{prefix}* nodes")


def fix_ir_version(model) -> None:
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION


def save_model(model, path: Path) -> None:
    """Check (full) and write atomically."""
    import onnx

    onnx.checker.check_model(model, full_check=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def previous_sha256(path: Path) -> str | None:
    """The sha256 of a variant about to be rewritten (``None`` when there is none), for :func:`report_replaced`."""
    return sha256_file(path) if path.is_file() else None


def report_replaced(bundle, out: Path, old_sha256: str | None, log: Callable = print) -> None:
    """Say what rewriting ``out`` (a precision variant of ``bundle``) replaced, and remove what was made from the
    old file: plugin variants (``model.json`` ``source``) are deleted, as ``build-engine --plugin`` rewrites them
    from the new file; engines built from the old file (found in the bundle folder by their sidecars) are named.
    Engines anywhere else are refused by ``run`` and ``eval`` until rebuilt: their sidecar's ``onnx_sha256`` no
    longer matches ``model.json``."""
    if old_sha256 is None:
        return
    new_sha256 = sha256_file(out)
    if new_sha256 == old_sha256:
        log(f"note: {out.name} was rewritten with identical content")
        return
    log(f"replaced the previous {out.name} (sha256 {old_sha256[:12]}... -> {new_sha256[:12]}...) and its entry in "
        f"{bundle.root / 'model.json'}")
    stale_files = {out.name}
    files = bundle.meta.get("files", {})
    for name, entry in list(files.items()):
        if entry.get("source") == out.name:
            (bundle.root / name).unlink(missing_ok=True)
            del files[name]
            stale_files.add(name)
            log(f"removed {name}, made from the previous {out.name} (build-engine --plugin makes it again)")
    (bundle.root / "model.json").write_text(json.dumps(bundle.meta, indent=2))
    engines = []
    for side in sorted(bundle.root.glob("*.engine.json")):
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("onnx_file") in stale_files and meta.get("onnx_sha256") != files.get(meta["onnx_file"], {}).get(
                "sha256"):
            engines.append(side.name[:-len(".json")])
    precision = files.get(out.name, {}).get("precision", "fp32")
    log(f"engines built from the previous {out.name} are stale: memseg-edge run and eval refuse them until rebuilt "
        f"({', '.join(engines) + ' here; ' if engines else ''}memseg-edge build-engine {bundle.root} --precision "
        f"{precision})")


# --------------------------------------------------------------------------------------------------


def quantize_int8(bundle_dir: str | Path, images: str | Path, num: int = DEFAULT_NUM_IMAGES,
                  method: str = DEFAULT_METHOD, keep_fp32: list[str] | None = None, seed: int = 0,
                  progress: bool = True, log: Callable = print) -> Path:
    """Write ``bundle_dir/model.int8.onnx`` (Q/DQ INT8, calibrated on ``num`` good images drawn with
    ``seed`` from the folder ``images``) and record it in ``model.json``; returns its path.

    ``method``: how an activation's range is chosen from its calibration histogram: ``entropy`` (the
    threshold minimising the KL divergence to the int8 histogram, TensorRT's classic choice),
    ``percentile`` (the 99.999th percentile of |x|) or ``minmax`` (the largest |x| seen).
    ``keep_fp32``: node-name prefixes to keep in float in addition to the fixed groups."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}: use one of {', '.join(METHODS)}")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    bundle, _ = load_bundle(bundle_dir)
    fp32_path = bundle.verify("fp32")
    prefix = memory_prefix(bundle.meta)
    held_out = bundle.meta.get("holdout_images") or []
    paths = select_images(images, num, seed, log, exclude=held_out)

    model = onnx.load(str(fp32_path))
    _name_nodes(model.graph)
    groups = kept_fp32_nodes(model, prefix, keep_fp32, encoder=True, fusion=True)
    kept = {n for g in groups.values() for n in g}
    # Constant nodes of kept groups are excluded too (harmless: onnxruntime never quantizes them).
    exclude = sorted(kept | {n.name for n in model.graph.node if n.name.startswith(prefix)})

    out = bundle.root / "model.int8.onnx"
    tmp = bundle.root / "model.int8.onnx.partial"
    calib = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
             "minmax": CalibrationMethod.MinMax}[method]
    chunk = max(d for d in range(1, min(_CHUNK, len(paths)) + 1) if len(paths) % d == 0)
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "CalibTensorRangeSymmetric": True,
        "QuantizeBias": False,  # TensorRT dequantizes int8 only; biases stay float
        "CalibStridedMinMax": chunk,  # bounds the activations held at once (any method)
        # Q/DQ on the inputs (and weights) of weighted ops only, TensorRT's recommended placement: one
        # rounding per convolution; the next Q requantizes, and TensorRT fuses conv + activation + Q.
        "OpTypesToExcludeOutputQuantization": sorted(WEIGHTED_OPS),
    }
    if method == "percentile":
        extra["CalibPercentile"] = PERCENTILE
    log(f"calibrating INT8 ({method}) on {len(paths)} images from {images}"
        f"{f' (not the {len(held_out)} held out at training: they choose its threshold)' if held_out else ''}; kept in float: "
        f"{describe_kept(groups, model)}")
    reader = _reader(paths, bundle.image_size, progress, bundle.fit)
    try:
        with _quiet_onnxruntime_quantization():
            quantize_static(
                model, str(tmp), reader, quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude, calibrate_method=calib, extra_options=extra,
                op_types_to_quantize=sorted(WEIGHTED_OPS))
        qmodel = onnx.load(str(tmp))
    finally:
        reader.bar.close()
        tmp.unlink(missing_ok=True)

    share, total = int8_share(model, exclude)
    _bypass_qdq_for(qmodel, set(exclude))
    fix_ir_version(qmodel)
    n_qdq = check_zero_points(qmodel)
    if n_qdq == 0:
        raise RuntimeError("quantization inserted no Q/DQ nodes")
    check_interface(qmodel, model, bundle.meta)
    qmodel.doc_string = (model.doc_string + f" | INT8 Q/DQ, {method} calibration on {len(paths)} images").strip(" |")
    old_sha256 = previous_sha256(out)
    save_model(qmodel, out)
    summary = kept_fp32_summary(groups, prefix, keep_fp32)
    extra_meta = {"percentile": PERCENTILE} if method == "percentile" else {}
    bundle.add_file(out, "int8", method=method, num_images=len(paths), images_sha256=hash_images(paths),
                    seed=seed, kept_fp32=summary, int8_share=round(share, 4), **extra_meta)
    n_conv = sum(1 for n in qmodel.graph.node if n.op_type in WEIGHTED_OPS and n.name not in kept)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {n_qdq} Q/DQ nodes, {n_conv} INT8 weighted ops "
        f"carrying {share:.0%} of the model's {total / 1e9:.2f} G multiply-adds per image)")
    report_replaced(bundle, out, old_sha256, log)
    choose_variant_threshold(bundle.root, out.name, images, log=log)
    return out
