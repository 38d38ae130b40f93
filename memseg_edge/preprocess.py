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


FITS = ("stretch", "pad")
"""How an image becomes the model's square: ``stretch`` (each side resized to the square's, the aspect
ratio lost) or ``pad`` (resized keeping its aspect ratio until the longer side fits, then mirrored
outwards from its edges to a square, the image centred: every product is seen at one scale whatever
its shape). A square image is the same either way."""


def content_box(h: int, w: int, size: int, fit: str = "stretch") -> tuple[int, int, int, int]:
    """Where an ``h x w`` image lies in the model's ``size x size`` square: ``(top, left, height, width)``."""
    _check_fit(fit)
    if fit == "stretch" or h == w:
        return 0, 0, size, size
    scale = size / max(h, w)
    ch, cw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    return (size - ch) // 2, (size - cw) // 2, ch, cw


def _check_fit(fit: str) -> None:
    if fit not in FITS:
        raise ValueError(f"resize must be one of {', '.join(FITS)}, found {fit!r}")


def _resize(image: np.ndarray, height: int, width: int, interp_up: int, interp_down: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return np.ascontiguousarray(image)
    shrinking = height < h and width < w
    return cv2.resize(image, (width, height), interpolation=interp_down if shrinking else interp_up)


def _to_square(image: np.ndarray, size: int, fit: str, interp_up: int, interp_down: int) -> np.ndarray:
    top, left, ch, cw = content_box(*image.shape[:2], size, fit)
    inner = _resize(image, ch, cw, interp_up, interp_down)
    if (ch, cw) == (size, size):
        return inner
    widths = [(top, size - ch - top), (left, size - cw - left)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(inner, widths, mode="symmetric")   # mirrored about the edges; repeats if wider


def resize_rgb(image: np.ndarray, size: int, fit: str = "stretch") -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` -> ``[size, size, 3]`` (``fit``: :data:`FITS`). Area interpolation when
    shrinking (no aliasing), bilinear when enlarging; the whole image is kept (no crop), so border
    defects stay visible."""
    return _to_square(image, size, fit, cv2.INTER_LINEAR, cv2.INTER_AREA)


def prepare(image: np.ndarray, size: int, fit: str = "stretch") -> np.ndarray:
    """The host-side step before the model: RGB uint8 of any size -> ``[size, size, 3]`` uint8."""
    return resize_rgb(to_rgb(image), size, fit)


def square_mask(mask: np.ndarray, size: int, fit: str = "stretch") -> np.ndarray:
    """A bool mask at an image's own resolution -> bool ``[size, size]``, placed as :func:`prepare`
    places the image (nearest neighbour; with ``pad``, mirrored as the image is)."""
    return _to_square(mask.astype(np.uint8), size, fit, cv2.INTER_NEAREST, cv2.INTER_NEAREST) > 0


def from_square(amap: np.ndarray, h: int, w: int, fit: str = "stretch") -> np.ndarray:
    """A float map at the model's square ``[size, size]`` -> ``[h, w]`` over the original image: the
    image's part of the square (``content_box``), resized bilinearly."""
    inner = over_image(amap, h, w, fit)
    if inner.shape == (h, w):
        return inner
    return cv2.resize(inner.astype(np.float32, copy=False), (w, h), interpolation=cv2.INTER_LINEAR)


def over_image(amap: np.ndarray, h: int, w: int, fit: str = "stretch") -> np.ndarray:
    """The part of a map at the model's square that lies over an ``h x w`` image (a copy; the whole map
    unless ``fit`` is ``pad``): what an overlay stretches over the frame."""
    top, left, ch, cw = content_box(h, w, amap.shape[-1], fit)
    return np.array(amap[top:top + ch, left:left + cw], copy=True)


def load_mask(path: str | Path | None, size: int, fit: str = "stretch") -> np.ndarray:
    """Ground-truth mask file -> bool ``[size, size]`` (nearest neighbour); ``None`` -> all False."""
    if path is None:
        return np.zeros((size, size), dtype=bool)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"cannot read mask {path}")
    return square_mask(mask > 127, size, fit)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
