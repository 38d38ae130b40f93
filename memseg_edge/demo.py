"""``memseg-edge demo``: the whole line on one machine with no data, no GPU and no downloads.

1. makes a small synthetic product (a machined washer on a dark plate; defects: scratches and dents),
2. trains a small MemSeg on it (64x64, MobileNetV2 encoder with torchvision's ImageNet weights: its
   cache, else a download; offline, or with ``none``, a random encoder, and the output says so),
3. exports the bundle,
4. runs the runtime: a camera station thread PUSHes the test images (enlarged, as a camera's frames
   would be, so the overlays can be read) over ZeroMQ (TCP loopback) to the runtime, whose verdicts go
   out on PUB to a listener thread (the reference PLC gateway), with an overlay of every frame on disk.

Everything lands under one folder. With a random encoder the verdicts show the plumbing, not the
method's accuracy; the output says so. The trainer (torch) is imported inside :func:`run_demo` only.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

DEMO_CATEGORY = "washer"
FRAME_SIDE = 384
"""Side of the frames the demo's camera sends: the 64x64 test images enlarged, so an overlay's caption fits."""


def make_demo_dataset(root: str | Path, size: int = 64, n_train: int = 40, n_test_good: int = 6,
                      n_test_bad: int = 6, seed: int = 0) -> Path:
    """An MVTec-layout category ``washer`` under ``root``: a bright ring with a brushed texture on a
    dark plate, slightly shifted and rotated per image; defects are dark scratches and bright dents with
    ground-truth masks. Returns ``root``."""
    rng = np.random.default_rng(seed)
    base = Path(root) / DEMO_CATEGORY

    def washer() -> np.ndarray:
        img = np.full((size, size, 3), (35, 38, 42), np.float32)
        cx, cy = size / 2 + rng.uniform(-1.5, 1.5, size=2)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        r = np.hypot(xx - cx, yy - cy)
        ring = (r > size * 0.16) & (r < size * 0.40)
        angle = rng.uniform(0, np.pi)
        brushed = 12 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.9)
        shade = 165 + brushed - 40 * (r / size)
        for c, tint in enumerate((1.0, 0.97, 0.92)):
            img[..., c][ring] = shade[ring] * tint
        img += rng.normal(0, 3, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    def write(path: Path, img: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), img)

    for i in range(n_train):
        write(base / "train" / "good" / f"{i:03d}.png", washer())
    for i in range(n_test_good):
        write(base / "test" / "good" / f"{i:03d}.png", washer())
    for i in range(n_test_bad):
        img, mask = washer(), np.zeros((size, size), np.uint8)
        kind = "scratch" if i % 2 == 0 else "dent"
        if kind == "scratch":
            a = rng.uniform(0, 2 * np.pi)
            p0 = (size / 2 + size * 0.28 * np.cos(a), size / 2 + size * 0.28 * np.sin(a))
            p1 = (p0[0] + size * 0.18 * np.cos(a + 1.4), p0[1] + size * 0.18 * np.sin(a + 1.4))
            cv2.line(mask, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 255, 2)
            img[mask > 0] = (20, 20, 25)
        else:
            a = rng.uniform(0, 2 * np.pi)
            c = (int(size / 2 + size * 0.28 * np.cos(a)), int(size / 2 + size * 0.28 * np.sin(a)))
            cv2.circle(mask, c, max(2, size // 14), 255, -1)
            img[mask > 0] = (240, 240, 245)
        write(base / "test" / kind / f"{i:03d}.png", img)
        write(base / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return Path(root)


def run_demo(out: str | Path, *, backbone_weights: str | None = None, iterations: int = 150,
             threads: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the demo into folder ``out``; returns ``{"verdicts": [...], "bundle", "overlays", "seconds"}``.

    ``backbone_weights``: ``None`` or ``"imagenet"`` (torchvision's, random when unavailable), a local
    MobileNetV2 state_dict file, or ``"none"``. ``threads``: CPU threads (:mod:`memseg_edge.threads`)."""
    from .plc import VerdictListener, format_verdict
    from .runtime import Runtime, RuntimeConfig, load_model
    from .sources import ImageFolderCapture, publish_frames

    from .threads import apply_threads

    t0 = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from .train.config import MemSegConfig, apply_overrides
        from .train.export import export_bundle
        from .train.trainer import train
    except ImportError as exc:
        raise RuntimeError(f"the demo trains a model and needs the trainer ({exc.name} is not installed): "
                           "pip install 'memseg-edge[train,onnx]'") from exc
    threads = apply_threads(threads)   # torch is imported now
    weights = str(backbone_weights) if backbone_weights else "imagenet"
    if weights == "imagenet":
        from .train.encoders import imagenet_weights
        weights = imagenet_weights(log)
    if weights == "none":
        log("NOTE: this is a plumbing demo. The encoder is random (no ImageNet weights; with network access "
            "torchvision downloads them, offline pass --backbone-weights FILE, a local MobileNetV2 state_dict), so "
            "the verdicts show that camera -> runtime -> PLC works end to end, not how accurate MemSeg is.")
    data = make_demo_dataset(out / "data")
    log(f"1/4 synthetic product dataset: {data / DEMO_CATEGORY}")
    cfg = apply_overrides(MemSegConfig(), {
        "data.root": str(data), "data.category": DEMO_CATEGORY, "data.image_size": 64,
        "model.backbone": "mobilenet_v2", "model.backbone_weights": weights, "model.memory_samples": 8,
        "synthesis.textures": "none", "synthesis.foreground.method": "threshold", "synthesis.foreground.threshold": 80,
        "train.iterations": int(iterations), "train.batch_size": 4, "train.num_workers": 0,
        "train.warmup_iterations": min(10, int(iterations)), "train.checkpoint_every": 0, "train.log_every": 50})
    encoder = "random" if weights == "none" else "ImageNet" if weights == "imagenet" else weights
    log(f"2/4 training MemSeg (64x64, mobilenet_v2 encoder: {encoder}; {iterations} iterations on the CPU, "
        f"{threads} thread{'s' if threads > 1 else ''})")
    t_step = time.monotonic()
    ckpt = train(cfg, out / "run", progress=True, log=lambda *a: None)
    log(f"    trained in {time.monotonic() - t_step:.0f} s; exporting the bundle (ONNX, checked against PyTorch)")
    t_step = time.monotonic()
    bundle = export_bundle(ckpt, out / "bundle", log=lambda *a: None)
    log(f"3/4 exported the bundle in {time.monotonic() - t_step:.0f} s: {bundle}")

    test_dir = data / DEMO_CATEGORY / "test"
    stream = out / "camera-frames"
    stream.mkdir(exist_ok=True)
    truth = {}
    for i, path in enumerate(sorted(test_dir.glob("*/*.png"), key=lambda p: (p.name, p.parent.name))):
        target = stream / f"{i:03d}_{path.parent.name}.png"
        cv2.imwrite(str(target), cv2.resize(cv2.imread(str(path)), (FRAME_SIDE, FRAME_SIDE),
                                            interpolation=cv2.INTER_CUBIC))
        truth[i] = path.parent.name
    model = load_model(bundle, threads=threads, log=log)
    config = RuntimeConfig(results="tcp://127.0.0.1:*", zmq=["tcp://127.0.0.1:*"], max_batch=4, max_wait_ms=5,
                           save_failures=str(out / "overlays"), save_passes=True, stats_every=0, heartbeat_s=0.5)
    runtime = Runtime(config, model, log=lambda m: None)
    runtime.start()
    verdicts: list[dict] = []
    log(f"4/4 runtime: frames on {runtime.endpoints['frames'][0]}, verdicts on {runtime.endpoints['results']}; "
        f"camera station sends {len(truth)} test images")
    try:
        with VerdictListener(runtime.endpoints["results"], heartbeat_timeout=5.0) as listener:
            connected = threading.Event()
            listener.listen(timeout=5.0, on_event=lambda kind, msg, info: connected.set() if kind == "connected"
                            else None, stop=connected)
            camera = threading.Thread(target=publish_frames, daemon=True,
                                      args=(ImageFolderCapture(stream, name="demo-cam"), runtime.endpoints["frames"][0]),
                                      kwargs={"encoding": "png", "fps": 20.0, "log": lambda m: None})
            camera.start()

            def show(body: dict) -> None:
                verdicts.append(body)
                fid = body.get("frame_id")
                log("  " + format_verdict(body) + f"   [truth: {truth.get(fid, '?')}]")

            report = listener.listen(count=len(truth), timeout=60.0, on_verdict=show)
            camera.join(10)
    finally:
        runtime.stop()
    overlays = sorted((out / "overlays").rglob("*.jpg"))
    judged = [v for v in verdicts if v["verdict"] in ("PASS", "FAIL")]
    right = sum((v["verdict"] == "FAIL") == (truth.get(v["frame_id"]) != "good") for v in judged)
    log(f"done in {time.monotonic() - t0:.0f} s: {len(verdicts)} verdicts, {right}/{len(judged)} match the ground "
        f"truth{' (random encoder: not a measure of accuracy)' if weights == 'none' else ''}; listener: "
        f"{report.summary()}; {len(overlays)} overlays (every frame; PASS ones end in _pass.jpg) in {out / 'overlays'}")
    return {"verdicts": verdicts, "bundle": bundle, "overlays": overlays, "seconds": time.monotonic() - t0,
            "listener": report}
