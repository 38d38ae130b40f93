"""The one preprocessing definition, shared by training, evaluation, export and the runtime.

On the host an image only becomes RGB uint8 at the model's square size; normalisation and the layout
change happen inside the model (and inside the exported graph), so no second copy of them can drift.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# ImageNet statistics of the torchvision encoders, applied inside the model to RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 ``[H, W, 3]`` (grey and RGBA are converted)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot read image {path}: not found or not a PNG/JPEG/BMP/TIFF file")
    return to_rgb(image, "bgr" if image.ndim == 3 else "mono")


def to_rgb(image: np.ndarray, order: str = "rgb") -> np.ndarray:
    """Any uint8 image (``[H, W]`` mono, ``[H, W, 3]`` in ``order`` rgb|bgr, ``[H, W, 4]``) to RGB uint8."""
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
        else:
            raise ValueError(f"expected an 8-bit image, found dtype {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        code = cv2.COLOR_BGRA2RGB if order == "bgr" else cv2.COLOR_RGBA2RGB
        return cv2.cvtColor(image, code)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if order == "bgr" else np.ascontiguousarray(image)
    raise ValueError(f"expected an image [H, W], [H, W, 3] or [H, W, 4], found shape {image.shape}")


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` -> ``[size, size, 3]``. Area interpolation when shrinking (no aliasing),
    bilinear when enlarging; the whole image is kept (no crop), so border defects stay visible."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(image)
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def prepare(image: np.ndarray, size: int) -> np.ndarray:
    """The host-side step before the model: RGB uint8 of any size -> ``[size, size, 3]`` uint8."""
    return resize_rgb(to_rgb(image), size)


def load_mask(path: str | Path | None, size: int) -> np.ndarray:
    """Ground-truth mask file -> bool ``[size, size]`` (nearest neighbour); ``None`` -> all False."""
    if path is None:
        return np.zeros((size, size), dtype=bool)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"cannot read mask {path}")
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST) > 127


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
