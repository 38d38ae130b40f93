"""Checkpoint -> model bundle (docs/architecture.md): ``model.onnx`` + ``model.json``.

The graph takes RGB uint8 ``image [N, H, W, 3]`` (resized on the host by ``memseg_edge.preprocess``),
converts and normalises inside (so the GPU does it on a device, and nothing can drift from training),
and returns ``anomaly_map [N, 1, H, W]`` and ``score [N]`` (top-k mean, ``memseg_edge.scoring``'s
definition). Batch is dynamic; the memory bank is a constant. The memory-bank step is one named
subgraph of standard ops: its nodes carry the ``/model/memory/`` prefix and its boundary tensors are
renamed ``memory/features_<l>`` (in) and ``memory/diff_<l>`` (out), listed in ``model.json``, so a
runtime can find it and ``build-engine`` can swap it for the fused kernel.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from memseg_edge import __version__
from memseg_edge.bundle import BUNDLE_FORMAT_VERSION, INPUT_NAME, MAP_NAME, SCORE_NAME, map_gain, sha256_file

from .checkpoint import load_model, read_checkpoint
from .torch_model import MemSeg

MEMORY_PREFIX = "/model/memory/"
DEFAULT_OPSET = 17


class ExportModel(nn.Module):
    """uint8 ``[N, H, W, 3]`` -> (``anomaly_map [N, 1, H, W]``, ``score [N]``)."""

    def __init__(self, model: MemSeg, top_k: int):
        super().__init__()
        self.model = model.eval()
        self.top_k = min(top_k, model.image_size * model.image_size)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Cast before the layout change: TensorRT transposes float tensors, not uint8 ones.
        x = image.float().permute(0, 3, 1, 2) / 255.0
        amap = self.model(x)
        score = torch.topk(amap.flatten(1), self.top_k, dim=1).values.mean(dim=1)
        return amap, score


def _name_memory_subgraph(model: onnx.ModelProto) -> dict[str, Any]:
    """Give the memory step's boundary tensors stable names; return its description for model.json."""
    graph = model.graph
    nodes = [n for n in graph.node if n.name.startswith(MEMORY_PREFIX)]
    if not nodes:
        raise RuntimeError("export: no memory-bank nodes found (was the model built with use_memory?)")
    inside = {o for n in nodes for o in n.output}
    consts = {i.name for i in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    ins = []
    for n in nodes:
        for i in n.input:
            if i and i not in inside and i not in consts and i not in ins:
                ins.append(i)
    outside_users = {i for n in graph.node if not n.name.startswith(MEMORY_PREFIX) for i in n.input}
    outside_users |= {o.name for o in graph.output}
    outs = [o for n in nodes for o in n.output if o in outside_users]
    bank = sorted({i for n in nodes for i in n.input if i in {t.name for t in graph.initializer}})
    if len(ins) != 3 or len(outs) != 3:
        raise RuntimeError(f"export: memory subgraph has inputs {ins} and outputs {outs}; expected 3 and 3")
    # Level order = finest first: the order in which the exporter met them is the model's level order.
    rename = {old: f"memory/features_{i}" for i, old in enumerate(ins)}
    rename.update({old: f"memory/diff_{i}" for i, old in enumerate(outs)})
    for n in graph.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
    return {
        "node_prefix": MEMORY_PREFIX,
        "nodes": len(nodes),
        "inputs": [rename[i] for i in ins],
        "outputs": [rename[o] for o in outs],
        "bank_initializers": bank,
    }


def write_onnx(model: MemSeg, top_k: int, path: str | Path, opset: int = DEFAULT_OPSET) -> None:
    """The bundle's graph of ``model`` (uint8 image -> map and score, dynamic batch) written to ``path``,
    without the bundle's naming, checks or model.json: what ``export_bundle`` and timing tools share."""
    size = model.image_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            ExportModel(model, top_k).eval(), (example,), str(path), input_names=[INPUT_NAME],
            output_names=[MAP_NAME, SCORE_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, MAP_NAME: {0: "batch"}, SCORE_NAME: {0: "batch"}},
            opset_version=opset, do_constant_folding=True, dynamo=False)


def export_bundle(checkpoint: str | Path, out_dir: str | Path, opset: int = DEFAULT_OPSET,
                  verify: bool = True, log=print) -> Path:
    """Write ``out_dir/model.onnx`` and ``out_dir/model.json``; returns ``out_dir``.

    ``verify``: run the exported graph with onnxruntime on a few images and compare with PyTorch.
    """
    if opset < 17:
        raise ValueError(f"opset {opset} is too old: the bundle needs opset >= 17")
    ckpt = read_checkpoint(checkpoint)
    model, _ = load_model(ckpt)
    if model.memory is None:
        raise ValueError("this checkpoint was trained without the memory module; the bundle format needs it")
    size = int(ckpt["image_size"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    t0 = time.perf_counter()
    write_onnx(model, int(ckpt["top_k"]), onnx_path, opset)
    proto = onnx.load(str(onnx_path))
    memory = _name_memory_subgraph(proto)
    proto.doc_string = "MemSeg anomaly segmentation (memseg-edge)"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(onnx_path))
    cfg = ckpt["config"]
    meta = {
        "format": "memseg-edge-bundle",
        "format_version": BUNDLE_FORMAT_VERSION,
        "created_by": f"memseg-edge {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "image_size": size,
        # how an image becomes the square (memseg_edge.preprocess.FITS): every runtime prepares frames so
        "resize": cfg["data"].get("resize", "stretch"),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                  "shape": ["batch", size, size, 3]},
        "outputs": {MAP_NAME: ["batch", 1, size, size], SCORE_NAME: ["batch"]},
        "normalisation": ckpt["normalisation"],
        "top_k": int(ckpt["top_k"]),
        "backbone": cfg["model"]["backbone"],
        "backbone_weights": ckpt["backbone_weights"],
        "memory_samples": int(cfg["model"]["memory_samples"]),
        "memory_selection": cfg["model"]["memory_selection"],
        **({"memory_patches": [int(b.shape[0]) for b in model.memory.banks()]}
           if cfg["model"]["memory_selection"] == "patch" else {}),
        # the map is the decoder's probability fused with the memory distance (ModelConfig.distance_fusion)
        # q_p, q_D with ModelConfig.distance_weight folded in (the graph's constants); the weight for a reader
        "distance_fusion": ({**dict(zip(("q_p", "q_D", "c"), map(float, model.fusion_norm))),
                             "distance_weight": float(model.cfg.distance_weight),
                             # ModelConfig.position_normalisers: q_p, q_D above are the frame-wide floors of
                             # per-position maps held in the graph
                             "position_normalisers": hasattr(model, "fusion_position")} if model.fuses else None),
        "memory_subgraph": memory,
        "threshold": ckpt["threshold"],
        "training_list_sha256": ckpt["data"]["training_list_sha256"],
        # the good training images the threshold was chosen on: `calibrate` scores them again with each
        # precision variant and gives the variant its own threshold by the same rule
        "holdout_images": list(ckpt["data"].get("holdout_images", [])),
        "category": ckpt["data"].get("category", ""),
        "opset": opset,
        "precision": "fp32",
        "checkpoint_iteration": int(ckpt["iteration"]),
        "files": {"model.onnx": {"sha256": sha256_file(onnx_path), "precision": "fp32"}},
    }
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2))
    log(f"exported {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB, opset {opset}, "
        f"{len(proto.graph.node)} nodes, memory subgraph {memory['nodes']} nodes) in {time.perf_counter() - t0:.1f} s")
    if verify:
        diff, over = verify_bundle(model, out_dir, int(ckpt["top_k"]))
        log(f"verified against PyTorch on 4 images: max |anomaly_map difference| {diff:.2e} "
            f"(limit {parity_tolerance(model):.1e}" + (f"; {100 * over:.4f} % of the pixels beyond it, near ties of the "
                                                       "memory step)" if over else ")"))
    return out_dir


def parity_tolerance(model: MemSeg) -> float:
    """The export check's limit on |anomaly_map difference|: 1e-4 on what the network computes, times the
    map's gain (``memseg_edge.bundle.map_gain``: the distance fusion magnifies the decoder's probability)."""
    if not model.fuses:
        return 1e-4
    q_p, q_d, c = (float(v) for v in model.fusion_norm)
    return 1e-4 * map_gain({"distance_fusion": {"q_p": q_p, "q_D": q_d, "c": c}})


NEAR_TIE_SHARE = 1e-3
"""Share of map pixels the export check lets exceed its limit: where two memory-bank vectors are almost equally
near a position, rounding (onnxruntime's MatMul against PyTorch's blocked addmm) can pick the other one, which
moves the map around that position only; measured on magnetic_tile's default model with standardised images,
9 pixels of 262,144 (0.003 %). A real export error (a wrong constant, a layer or a preprocessing step that
differs) moves whole regions, and the image scores with them."""
NEAR_TIE_MAX = 100.0
"""Even there, no pixel may move by more than this many times the limit (0.01 of the decoder's probability)."""


def parity_failure(diff: np.ndarray, score_diff: np.ndarray, limit: float) -> str | None:
    """Why an exported graph's maps and scores (their absolute differences from PyTorch's) are not what
    PyTorch computes, or ``None``: every score within ``limit``, at most ``NEAR_TIE_SHARE`` of the pixels beyond
    it (the memory step's near ties), none beyond ``NEAR_TIE_MAX`` times it."""
    over = float((diff > limit).mean())
    if float(score_diff.max()) > limit:
        return f"image scores differ by up to {float(score_diff.max()):.3e} > {limit:.1e}"
    if over > NEAR_TIE_SHARE:
        return (f"{100 * over:.3f} % of the map's pixels differ by more than {limit:.1e} (at most "
                f"{100 * NEAR_TIE_SHARE:g} % may, where the memory step meets a near tie); max {float(diff.max()):.3e}")
    if float(diff.max()) > NEAR_TIE_MAX * limit:
        return f"max |difference| {float(diff.max()):.3e} > {NEAR_TIE_MAX:g} x {limit:.1e}"
    return None


def verify_bundle(model: MemSeg, bundle_dir: Path, top_k: int, seed: int = 0) -> tuple[float, float]:
    """Compare ``anomaly_map`` and ``score`` between onnxruntime and PyTorch on smooth random images (no data
    needed); raises if they differ as :func:`parity_failure` says. -> (max absolute map difference, share of
    pixels beyond :func:`parity_tolerance`)."""
    from memseg_edge.backends import OnnxRuntimeBackend
    from memseg_edge.scoring import image_scores

    from .trainer import predict_maps

    size = model.image_size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, size // 16, size // 16, 3)).astype(np.uint8)
    images = np.stack([np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(b).permute(2, 0, 1)[None].float(), size=(size, size), mode="bilinear",
        align_corners=False)[0].permute(1, 2, 0).round().clamp(0, 255).byte()) for b in base])
    ref = predict_maps(model, images, "cpu")
    amap, score = OnnxRuntimeBackend(bundle_dir).infer(images)
    diff = np.abs(amap[:, 0] - ref)
    limit = parity_tolerance(model)
    failure = parity_failure(diff, np.abs(score - image_scores(ref, top_k)), limit)
    if failure:
        raise RuntimeError(f"exported graph disagrees with PyTorch: {failure}")
    return float(diff.max()), float((diff > limit).mean())
