"""Shared fixtures: the real data beside the repo (``../shared``), skipped with a reason where absent,
and a tiny synthetic product dataset for end-to-end runs that must work anywhere."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from memseg_edge.threads import apply_threads

# Before any test module imports torch: with one thread per core, PyTorch and onnxruntime crawl as soon as
# another process shares the cores (docs/architecture.md, "CPU threads"); OMP_NUM_THREADS still wins.
apply_threads()

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MVTEC = SHARED / "data" / "mvtec_ad"
DTD = SHARED / "data" / "dtd" / "images"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2-imagenet-features.pth"


def wait_until(pred, timeout: float) -> None:
    """Poll ``pred()`` every 50 ms; AssertionError when it is not true within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


def wait_for_line(proc, marker: str, timeout: float) -> list[str]:
    """Stderr lines of a command (started with ``stderr=PIPE, text=True``) up to the first holding
    ``marker``; the rest is drained in the background. AssertionError, with what it printed, when it exits
    or takes longer."""
    lines: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {marker!r}:\n" + "".join(lines))
        lines.append(line)
        if marker in line:
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return lines
    raise AssertionError(f"no {marker!r} within {timeout} s:\n" + "".join(lines))


def require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} absent: expected at {path} (the project's shared/ folder beside the repo)")
    return path


@pytest.fixture
def mobilenet_weights() -> Path:
    return require(MOBILENET_WEIGHTS, "ImageNet MobileNetV2 weights")


@pytest.fixture
def bottle_root() -> Path:
    require(MVTEC / "bottle" / "train" / "good", "MVTec AD bottle")
    return MVTEC


def make_product_dataset(root: Path, size: int = 64, n_train: int = 24, n_test_good: int = 4,
                         n_test_bad: int = 4, seed: int = 0) -> Path:
    """A small MVTec-layout category ``widget``: a grey disc with a ring pattern on a dark background;
    defects are bright scratches. Returns the dataset root."""
    rng = np.random.default_rng(seed)
    base = root / "widget"

    def product() -> np.ndarray:
        img = np.full((size, size, 3), 20, np.uint8)
        c = size // 2 + rng.integers(-1, 2, size=2)
        cv2.circle(img, (int(c[0]), int(c[1])), size // 3, (150, 140, 130), -1)
        cv2.circle(img, (int(c[0]), int(c[1])), size // 5, (90, 90, 100), 2)
        noise = rng.normal(0, 4, img.shape)
        return np.clip(img + noise, 0, 255).astype(np.uint8)

    def write(path: Path, img: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), img)

    for i in range(n_train):
        write(base / "train" / "good" / f"{i:03d}.png", product())
    for i in range(n_test_good):
        write(base / "test" / "good" / f"{i:03d}.png", product())
    for i in range(n_test_bad):
        img = product()
        mask = np.zeros((size, size), np.uint8)
        x0, y0 = rng.integers(size // 4, size // 2, size=2)
        cv2.line(mask, (int(x0), int(y0)), (int(x0 + size // 5), int(y0 + size // 8)), 255, 3)
        img[mask > 0] = (250, 250, 250)
        write(base / "test" / "scratch" / f"{i:03d}.png", img)
        write(base / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root


@pytest.fixture
def product_root(tmp_path: Path) -> Path:
    return make_product_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def bottle_model(tmp_path_factory) -> dict:
    """A small MemSeg trained briefly on real bottle images (96x96, real ImageNet MobileNetV2 weights)
    and its exported bundle: ``{"checkpoint", "bundle", "root"}``. Accuracy is not the point (it is
    short); exactness of everything downstream is."""
    require(MVTEC / "bottle" / "train" / "good", "MVTec AD bottle")
    require(MOBILENET_WEIGHTS, "ImageNet MobileNetV2 weights")
    from memseg_edge.train.config import MemSegConfig, apply_overrides
    from memseg_edge.train.export import export_bundle
    from memseg_edge.train.trainer import train

    out = tmp_path_factory.mktemp("bottle_model")
    cfg = apply_overrides(MemSegConfig(), {
        "data.root": str(MVTEC), "data.category": "bottle", "data.image_size": 96,
        "model.backbone": "mobilenet_v2", "model.backbone_weights": str(MOBILENET_WEIGHTS),
        "model.memory_samples": 8, "synthesis.textures": str(DTD) if DTD.is_dir() else "none",
        "train.iterations": 100, "train.batch_size": 4, "train.num_workers": 0, "train.warmup_iterations": 5,
        "train.checkpoint_every": 0})
    ckpt = train(cfg, out / "run", progress=False, log=lambda *a: None)
    bundle = export_bundle(ckpt, out / "bundle", log=lambda *a: None)
    return {"checkpoint": ckpt, "bundle": bundle, "root": MVTEC}
