"""Where the images are: the MVTec AD folder layout (any category) or a user's own folders; how good
training images are split into memory samples, held-out images and training images; and the training
stream of normal and synthetic-anomaly images."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from memseg_edge.preprocess import IMAGE_SUFFIXES, list_images, load_mask, load_rgb, prepare, square_mask

from .config import DataConfig


@dataclass
class TestItem:
    path: Path
    defect: str
    """``good`` for defect-free images, else the defect type (the sub-folder name)."""
    mask: Path | None


@dataclass
class Dataset:
    train_good: list[Path]
    test: list[TestItem]

    @property
    def has_test(self) -> bool:
        return bool(self.test)


def discover(cfg: DataConfig) -> Dataset:
    """Find the training and test images named by ``cfg`` (see ``DataConfig.layout``)."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist")
    if cfg.layout == "mvtec":
        if not cfg.category:
            raise ValueError("--category is required with the MVTec AD layout (e.g. --category bottle)")
        base = root / cfg.category
        good = base / "train" / "good"
        if not good.is_dir():
            found = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
            raise FileNotFoundError(
                f"{good} not found: expected the MVTec AD layout ROOT/CATEGORY/train/good; "
                f"categories under {root}: {found or 'none'}")
        return Dataset(_images(good), _test_items(base / "test", base / "ground_truth"))
    if cfg.layout == "folder":
        test = _test_items(Path(cfg.test_dir), Path(cfg.mask_dir) if cfg.mask_dir else None) if cfg.test_dir else []
        return Dataset(_images(root), test)
    raise ValueError(f"unknown data layout {cfg.layout!r}: use 'mvtec' or 'folder'")


def _images(folder: Path) -> list[Path]:
    images = list_images(folder)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return images


def _test_items(test_dir: Path, mask_dir: Path | None) -> list[TestItem]:
    if not test_dir.is_dir():
        return []
    items = []
    for sub in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for path in list_images(sub):
            mask = None
            if sub.name != "good" and mask_dir is not None:
                for name in (f"{path.stem}_mask.png", f"{path.stem}.png"):
                    if (mask_dir / sub.name / name).is_file():
                        mask = mask_dir / sub.name / name
                        break
                if mask is None:
                    raise FileNotFoundError(
                        f"no ground-truth mask for {path}: expected {mask_dir / sub.name / (path.stem + '_mask.png')}")
            items.append(TestItem(path, sub.name, mask))
    return items


@dataclass
class Split:
    memory: list[Path]
    holdout: list[Path]
    train: list[Path]


def split_good(images: list[Path], memory_samples: int, holdout_fraction: float, seed: int) -> Split:
    """Randomly (seeded) pick the memory samples (paper: N random good images) and the held-out images;
    the rest trains. Memory samples are left out of training, as in the authors' release: an input equal
    to its memory sample would show the network an all-zero difference that never occurs at test time."""
    n = len(images)
    n_hold = max(1, int(round(holdout_fraction * n))) if holdout_fraction > 0 else 0
    if memory_samples + n_hold >= n:
        raise ValueError(
            f"{n} good images cannot provide {memory_samples} memory samples, {n_hold} held-out images "
            f"and at least one training image: lower --memory-samples or data.holdout_fraction")
    order = np.random.default_rng(seed).permutation(n)
    pick = [images[i] for i in order]
    return Split(sorted(pick[:memory_samples]), sorted(pick[memory_samples:memory_samples + n_hold]),
                 sorted(pick[memory_samples + n_hold:]))


def run_split(cfg, images: list[Path]) -> Split:
    """The split a training run of ``cfg`` (a ``MemSegConfig``) makes of the good images ``images``:
    ``split_good`` with the run's memory size (0 without the memory step), hold-out fraction and split seed
    (``data.split_seed``, or ``train.seed`` when it is -1).
    Tools that score a run's held-out images call this, so they pick the images training held out."""
    seed = cfg.train.seed if cfg.data.split_seed == -1 else cfg.data.split_seed
    return split_good(images, cfg.model.memory_samples if cfg.model.use_memory else 0,
                      cfg.data.holdout_fraction, seed)


def hash_image_list(paths: list[Path]) -> str:
    """sha256 over the names and contents of the training images (order-independent)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def load_images(paths: list[Path], size: int, fit: str = "stretch") -> np.ndarray:
    """Images -> RGB uint8 ``[N, size, size, 3]``, through the shared preprocessing."""
    if not paths:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([prepare(load_rgb(p), size, fit) for p in paths])


def load_test(items: list[TestItem], size: int, fit: str = "stretch") -> tuple[np.ndarray, np.ndarray]:
    """Test images ``[N, size, size, 3]`` uint8 and masks ``[N, size, size]`` bool."""
    images = load_images([it.path for it in items], size, fit)
    masks = np.stack([load_mask(it.mask, size, fit) for it in items]) if items else np.zeros((0, size, size), bool)
    return images, masks


def load_test_full(items: list[TestItem], size: int, fit: str = "stretch"
                   ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Test images ``[N, size, size, 3]`` uint8, masks at the model's size ``[N, size, size]`` bool
    (nearest neighbour, placed as the image is), and masks at their own resolution (``N`` bool
    ``[H_i, W_i]``; all False at the image's size for good images), which is where the field compares
    maps and masks."""
    images, small, native = [], [], []
    for it in items:
        rgb = load_rgb(it.path)
        images.append(prepare(rgb, size, fit))
        if it.mask is None:
            full = np.zeros(rgb.shape[:2], bool)
        else:
            full = load_mask_native(it.mask)
        native.append(full)
        small.append(square_mask(full, size, fit))
    if not items:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), bool), []
    return np.stack(images), np.stack(small), native


def load_mask_native(path: Path) -> np.ndarray:
    """A ground-truth mask file at its own resolution -> bool ``[H, W]``."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"cannot read mask {path}")
    return mask > 127


class TrainingStream:
    """Item ``i`` of the training stream: even -> a good image, odd -> a synthetic anomaly, with its
    target mask. Everything random is seeded by ``(seed, i)``, so a run is reproducible whatever the
    number of loader processes, and a resumed run continues the same sequence."""

    def __init__(self, images: np.ndarray, synthesizer, seed: int, length: int, offset: int = 0):
        self.images = images
        self.synthesizer = synthesizer
        self.seed = seed
        self.length = length
        self.offset = offset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        i = i + self.offset
        rng = np.random.default_rng([self.seed, i])
        image = self.images[rng.integers(len(self.images))]
        if i % 2 == 0:
            return image, np.zeros(image.shape[:2], np.float32)
        return self.synthesizer(image, rng)
