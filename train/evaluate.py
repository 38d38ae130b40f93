"""Evaluation as the field does it: image AUROC (image score = mean of the top-100 map pixels, the paper's
definition), pixel AUROC, AUPRO to FPR 0.3, F1-max, per defect type; plus what the checkpoint's own
decision threshold does on the test images. JSON with fractions in [0, 1]; PNG plots."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from memseg_edge.bundle import variant_threshold
from memseg_edge.preprocess import from_square
from memseg_edge.scoring import image_scores

from . import metrics
from .aupro import pro_curve
from .config import DataConfig
from .datasets import discover, load_test_full

TEST_MISS_WARNING = 0.1
"""Above this share of missed defective test images at the model's threshold, ``eval`` warns loudly. Real
defects, unlike the trainer's synthetic ones (``trainer.SYNTHETIC_MISS_WARNING``): a line that passes one defective part
in ten is already one a plant engineer must hear about (magnetic_tile's default model missed 49.5 %)."""


def upsample_maps(maps: np.ndarray, shapes: list[tuple[int, int]], fit: str = "stretch") -> list[np.ndarray]:
    """Maps ``[N, h, w]`` at the model's size -> ``N`` maps at each ``(H_i, W_i)``: the image's part of
    the square (all of it unless ``fit`` is ``pad``), resized bilinearly."""
    return [from_square(m, int(s[0]), int(s[1]), fit) for m, s in zip(maps, shapes)]


def load_predictor(model_path: str | Path, device: str = "cpu") -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """A model -> (``predict(images uint8 [N, H, W, 3]) -> maps [N, H, W]``, its metadata).

    ``model_path``: a checkpoint (``.pt``, or a run folder holding ``checkpoint.pt``; needs torch), or a
    bundle folder / one of its ONNX files (run with onnxruntime; no torch), or a TensorRT ``.engine`` (needs
    its GPU; the sidecar is checked first). Metadata: ``image_size``,
    ``top_k``, ``threshold`` (dict or None), ``backbone_weights``, ``kind``."""
    path = Path(model_path)
    if path.suffix == ".onnx" or (path.is_dir() and (path / "model.json").is_file()):
        from memseg_edge.backends import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(path)
        meta = {k: backend.bundle.meta.get(k) for k in ("image_size", "top_k", "backbone_weights")}
        meta["resize"] = backend.bundle.meta.get("resize", "stretch")
        meta["threshold"] = variant_threshold(backend.bundle.meta, backend.onnx_path.name)
        meta["kind"] = f"onnx ({backend.onnx_path.name}, onnxruntime)"
        return (lambda images: backend.infer(images)[0][:, 0]), meta
    if path.suffix == ".engine":
        from memseg_edge.trt_backend import TensorRTBackend

        backend = TensorRTBackend(path, log=lambda *a: None)   # checks the sidecar against this GPU first
        info = backend.info
        meta = {"image_size": info.image_size, "top_k": info.top_k, "threshold": variant_threshold(info.bundle_meta, backend.meta.get("onnx_file")) or (
                    None if info.threshold is None else {"threshold": info.threshold, "rule": f"from {info.source}"}),
                "backbone_weights": info.bundle_meta.get("backbone_weights"),
                "resize": info.bundle_meta.get("resize", "stretch"),
                "kind": f"engine ({path.name}, {backend.name})"}
        return (lambda images: backend.infer(images)[0][:, 0]), meta
    if path.suffix == ".pt" or (path.is_dir() and (path / "checkpoint.pt").is_file()):
        from .checkpoint import load_model
        from .trainer import predict_maps

        model, ckpt = load_model(path / "checkpoint.pt" if path.is_dir() else path, device)
        meta = {k: ckpt[k] for k in ("image_size", "top_k", "threshold", "backbone_weights")}
        meta["resize"] = ckpt["config"]["data"].get("resize", "stretch")
        meta["kind"] = "checkpoint"
        return (lambda images: predict_maps(model, images, device)), meta
    raise ValueError(f"{path}: expected a checkpoint (.pt), a run folder holding checkpoint.pt, a bundle folder "
                     "(model.json + model.onnx), a bundle's .onnx file or a TensorRT .engine (with its sidecar)")


def evaluate(model_path: str | Path, data: DataConfig, *, json_path: str | Path | None = None,
             plots_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 16,
             progress: bool = True, log=print) -> dict[str, Any]:
    """Run the model over the test images of ``data`` and return (and optionally write) the metrics."""
    from tqdm import tqdm

    predict, meta = load_predictor(model_path, device)
    if str(meta.get("backbone_weights", "")).startswith("none"):
        log("WARNING: this model's encoder was randomly initialised: its accuracy says nothing about MemSeg")
    size = int(meta["image_size"])
    ds = discover(data)
    if not ds.has_test:
        raise FileNotFoundError(f"no test images under {data.root}: expected test/<defect>/ folders")
    fit = meta.get("resize", "stretch")
    images, masks, native_masks = load_test_full(ds.test, size, fit)
    t0 = time.perf_counter()
    maps = np.concatenate([predict(images[i:i + batch_size]) for i in
                           tqdm(range(0, len(images), batch_size), desc="eval", unit="batch", disable=not progress)])
    seconds = time.perf_counter() - t0
    scores = image_scores(maps, meta["top_k"])
    defects = [it.defect for it in ds.test]
    labels = np.array([d != "good" for d in defects])
    # The field compares at the mask's resolution: each map upsampled (bilinear) to its mask's size. The
    # model-size figure (masks shrunk by nearest neighbour, as earlier versions reported) stays, labelled.
    full_maps = upsample_maps(maps, [m.shape for m in native_masks], fit)
    result = metrics.evaluate_maps(full_maps, native_masks, scores, labels, defects)
    result["pixel_resolution"] = "each mask's own resolution (anomaly map upsampled bilinearly)"
    at_size = metrics.evaluate_maps(maps, masks, scores, labels, defects)
    result["at_model_size"] = {"resolution": f"{size}x{size} (masks resized by nearest neighbour)",
                               "pixel_auroc": at_size["pixel_auroc"], "aupro": at_size["aupro"],
                               "per_defect": {k: {"pixel_auroc": v["pixel_auroc"], "aupro": v["aupro"]}
                                              for k, v in at_size["per_defect"].items()}}
    result["image_score"] = f"mean of the top-{meta['top_k']} pixels of the anomaly map"
    result["model"] = str(model_path)
    result["model_kind"] = meta["kind"]
    result["backbone_weights"] = meta.get("backbone_weights")
    result["category"] = data.category
    result["seconds_per_image"] = seconds / len(images)
    thr = meta.get("threshold")
    if thr:
        t = thr["threshold"]
        fail = scores >= t
        result["threshold"] = {
            "value": t, "rule": thr["rule"],
            "false_reject_rate": float(fail[~labels].mean()) if (~labels).any() else None,
            "miss_rate": float((~fail[labels]).mean()) if labels.any() else None,
            "n_false_rejects": int(fail[~labels].sum()), "n_missed": int((~fail[labels]).sum()),
            **{k: thr[k] for k in ("expected_frr", "frr_upper_95", "resolved", "images_needed", "n_good") if k in thr},
        }
    log(format_report(result))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, allow_nan=False))
    if plots_dir:
        write_plots(Path(plots_dir), images, maps, masks, scores, labels, defects, result)
    return result


def _pct(v) -> str:
    return "   n/a" if v is None else f"{100 * v:6.2f}"


def format_report(r: dict[str, Any]) -> str:
    lines = [f"{'':16s} {'image AUROC':>12s} {'pixel AUROC':>12s} {'AUPRO':>8s} {'n':>5s}"]
    for name, m in r["per_defect"].items():
        lines.append(f"{name:16s} {_pct(m['image_auroc']):>12s} {_pct(m['pixel_auroc']):>12s} "
                     f"{_pct(m['aupro']):>8s} {m['n_images']:5d}")
    lines.append(f"{'all':16s} {_pct(r['image_auroc']):>12s} {_pct(r['pixel_auroc']):>12s} "
                 f"{_pct(r['aupro']):>8s} {r['n_images']:5d}")
    lines.append(f"image F1-max {_pct(r['f1_max'])}   pixel F1-max {_pct(r['pixel_f1_max'])}   (percent; JSON holds fractions)")
    if "at_model_size" in r:
        a = r["at_model_size"]
        lines.append(f"pixel metrics at each mask's resolution; at {a['resolution']}: pixel AUROC "
                     f"{_pct(a['pixel_auroc'])}, AUPRO {_pct(a['aupro'])}")
    if "threshold" in r:
        t = r["threshold"]
        lines.append(f"at the model's threshold {t['value']:.4f} ({t['rule']}): false rejects "
                     f"{_pct(t['false_reject_rate'])} %, missed defects {_pct(t['miss_rate'])} %")
        if "expected_frr" in t:
            lines.append(f"  the threshold promised for new good parts: expected false-reject rate "
                         f"{_pct(t['expected_frr'])} %, at most {_pct(t['frr_upper_95'])} % with 95 % confidence")
        if t["miss_rate"] is not None and t["miss_rate"] > TEST_MISS_WARNING:
            lines.append(f"WARNING: at its own threshold this model misses {100 * t['miss_rate']:.0f} % of the defective "
                         "test images: on a line it would pass about as many defective parts, whatever its AUROC. Train "
                         "longer, or choose the threshold again (and check the false-reject rate that costs)")
    return "\n".join(lines)


def write_plots(out: Path, images, maps, masks, scores, labels, defects, result, n_overlays: int = 8) -> None:
    """ROC curves (image and pixel), the PRO curve, a score histogram and a few overlays."""
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    if labels.any() and (~labels).any():
        fpr, tpr, _ = metrics.roc_curve(scores, labels)
        curves["image"] = (fpr, tpr, result["image_auroc"])
    if masks.any():
        fpr, tpr, _ = metrics.roc_curve(maps.ravel(), masks.ravel())  # at the model's size (plots only)
        at_size = result.get("at_model_size", result)  # the curves below are drawn at the model's size
        curves["pixel"] = (fpr, tpr, at_size["pixel_auroc"])
        pf, pp = pro_curve(maps, masks)
        plots.plot_pro_curve(pf, pp, at_size["aupro"], 0.3, out / "pro_curve.png")
    if curves:
        plots.plot_roc_curves(curves, out / "roc.png", title=f"ROC ({result.get('category') or 'test set'})")
    thr = result.get("threshold", {}).get("value")
    plots.plot_score_histogram(scores[~labels], scores[labels], thr, out / "scores.png")
    # The most and least confident cases of each kind are what a person wants to look at.
    order = np.argsort(scores)
    good_idx = [i for i in order if not labels[i]]
    bad_idx = [i for i in order if labels[i]]
    picks = good_idx[-(n_overlays // 4):] + bad_idx[:n_overlays // 4] + bad_idx[-(n_overlays // 2):]
    for i in dict.fromkeys(picks):
        name = f"{defects[i]}_{i:03d}_score{scores[i]:.3f}.png"
        plots.save_overlay_panel(images[i], maps[i], masks[i] if labels[i] else None, out / "overlays" / name,
                                 title=f"{defects[i]}  score {scores[i]:.3f}")
