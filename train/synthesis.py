"""MemSeg anomaly simulation (paper section 3.1): Perlin mask x foreground mask, texture or structure
noise image, blended with a random transparency.

    M   = M_P * M_I                                   (Perlin mask times foreground mask)
    I_A = (1 - M) * I + delta * M * I_n + (1 - delta) * M * I      (Eq. 1-2)

``I_n`` comes from a DTD texture (textural anomalies) or from the input image itself, mirrored, rotated,
colour-jittered and shuffled on a rows x cols grid (structural anomalies).

numpy and OpenCV only (no torch): the synthesiser runs inside data-loading workers and in the
``synth-preview`` command on machines without PyTorch. Every random choice is drawn from the
``np.random.Generator`` passed in, so a seed reproduces a sample exactly. Images are RGB ``uint8``
``[H, W, 3]``; masks are ``float32`` ``[H, W]`` holding 0.0 or 1.0.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .config import ForegroundConfig, SynthesisConfig

__all__ = [
    "FOREGROUND_METHODS",
    "TEXTURE_SUFFIXES",
    "CATEGORY_FOREGROUND",
    "AnomalySynthesizer",
    "adjust_hsv",
    "blend",
    "foreground_for",
    "foreground_mask",
    "grid_edges",
    "list_textures",
    "perlin_mask",
    "perlin_noise",
    "preview_grid",
    "shuffle_grid",
    "structure_source",
    "texture_source",
]

FOREGROUND_METHODS: tuple[str, ...] = ("none", "threshold", "otsu")
TEXTURE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")

# Photometric jitter ranges shared by both noise sources. The paper names the operations (brightness,
# saturation, hue) but not their strength; these are strong enough that a shuffled cell reads as a
# foreign patch, yet keep colours plausible for an industrial part.
_BRIGHTNESS_RANGE = (0.7, 1.3)  # factor on HSV value
_SATURATION_RANGE = (0.6, 1.4)  # factor on HSV saturation
_HUE_SHIFT_MAX = 20  # OpenCV hue units (0..179, i.e. 2 degrees each): +-40 degrees
_SMALL_ROTATION_MAX_DEG = 15.0  # non-square images only, see structure_source


# --------------------------------------------------------------------------------------------------
# Perlin noise and mask
# --------------------------------------------------------------------------------------------------


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3: zero first and second derivative at 0 and 1, so the
    noise has no visible creases at cell borders."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise.

    Args:
        shape: ``(H, W)`` of the output, any positive sizes.
        res: ``(rows, cols)``: number of noise periods (lattice cells) along each axis, >= 1.
        rng: source of the random gradient directions.

    Returns:
        ``float32 [H, W]``, scaled by sqrt(2) so that the theoretical range is [-1, 1] (unit gradients
        give at most sqrt(2)/2 in 2-D); ``perlin_threshold`` refers to this range.

    The noise is computed on a padded size that is a whole number of pixels per cell (``ceil(H/rows)``
    per cell) and cropped to ``shape``, so sizes not divisible by ``res`` work; the crop shortens the last
    period by less than one cell.
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = int(res[0]), int(res[1])
    if h < 1 or w < 1:
        raise ValueError(f"perlin_noise: shape must be positive, got {shape}")
    if ry < 1 or rx < 1:
        raise ValueError(f"perlin_noise: res must be >= 1 per axis, got {res}")
    cell_h = -(-h // ry)
    cell_w = -(-w // rx)

    angles = rng.uniform(0.0, 2.0 * math.pi, size=(ry + 1, rx + 1))
    grad_y = np.sin(angles)
    grad_x = np.cos(angles)

    rows = np.arange(cell_h * ry)
    cols = np.arange(cell_w * rx)
    iy = (rows // cell_h)[:, None]  # [Hp, 1] lattice row of each pixel
    ix = (cols // cell_w)[None, :]  # [1, Wp]
    fy = ((rows % cell_h) / cell_h)[:, None]  # [Hp, 1] position inside the cell, in [0, 1)
    fx = ((cols % cell_w) / cell_w)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        # Dot product of the corner's gradient with the offset from that corner to the pixel.
        gy = grad_y[iy + dy, ix + dx]
        gx = grad_x[iy + dy, ix + dx]
        return gy * (fy - dy) + gx * (fx - dx)

    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    u = _fade(fx)
    v = _fade(fy)
    top = n00 + u * (n01 - n00)
    bottom = n10 + u * (n11 - n10)
    noise = math.sqrt(2.0) * (top + v * (bottom - top))
    return np.ascontiguousarray(noise[:h, :w], dtype=np.float32)


def _check_scales(cfg: SynthesisConfig) -> None:
    if not 0 <= cfg.perlin_min_scale < cfg.perlin_max_scale:
        raise ValueError(
            "synthesis.perlin_min_scale/perlin_max_scale: need 0 <= min < max (k is drawn from [min, max)),"
            f" got min={cfg.perlin_min_scale}, max={cfg.perlin_max_scale}"
        )


def _rotated_perlin(shape: tuple[int, int], cfg: SynthesisConfig, rng: np.random.Generator) -> np.ndarray:
    """Perlin noise at random scales 2**k per axis, rotated by a random angle: ``float32 [H, W]``."""
    _check_scales(cfg)
    h, w = int(shape[0]), int(shape[1])
    ky = int(rng.integers(cfg.perlin_min_scale, cfg.perlin_max_scale))
    kx = int(rng.integers(cfg.perlin_min_scale, cfg.perlin_max_scale))
    noise = perlin_noise((h, w), (2**ky, 2**kx), rng)
    angle = float(rng.uniform(-90.0, 90.0))
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
    # Reflect rather than a constant border: a constant would cut straight edges into the blobs.
    return cv2.warpAffine(noise, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def perlin_mask(shape: tuple[int, int], cfg: SynthesisConfig, rng: np.random.Generator) -> np.ndarray:
    """Binary Perlin mask M_P.

    Scales ``2**k`` per axis with ``k`` drawn independently per axis from
    ``[cfg.perlin_min_scale, cfg.perlin_max_scale)``, noise rotated by U[-90, 90] degrees, then
    ``noise > cfg.perlin_threshold``.

    Returns:
        ``float32 [H, W]`` with values in {0, 1}. It can be empty; the synthesiser retries.
    """
    noise = _rotated_perlin(shape, cfg, rng)
    return (noise > cfg.perlin_threshold).astype(np.float32)


LINE_HALF_WIDTH = (0.5, 2.0)
"""Half-width (pixels) of a thin synthetic anomaly, drawn uniformly: lines 1 to 4 px wide."""
LINE_MIN_TRANSPARENCY = 0.5
"""Lowest transparency for a thin anomaly: a line a few pixels wide is visible only by its contrast."""


def perlin_line_mask(shape: tuple[int, int], cfg: SynthesisConfig, rng: np.random.Generator,
                     half_width: float) -> np.ndarray:
    """Thin curves: the pixels of a rotated Perlin field ``n`` (``cfg``'s scales) within ``half_width``
    pixels of its zero set, by the first-order distance ``|n| / |grad n|``, kept only inside an ordinary
    Perlin blob mask (``perlin_mask``), so that a sample holds a few curved segments in one region rather
    than a net over the whole image. Returns ``float32 [H, W]`` in {0, 1}; it can be empty."""
    field = _rotated_perlin(shape, cfg, rng)
    gy, gx = np.gradient(field.astype(np.float64))
    distance = np.abs(field) / np.maximum(np.hypot(gy, gx), 1e-9)
    region = perlin_mask(shape, cfg, rng)
    return ((distance < half_width) & (region > 0)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Foreground mask
# --------------------------------------------------------------------------------------------------


def _check_rgb(image: np.ndarray, name: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name}: expected an RGB uint8 array [H, W, 3], got {got}")


def _check_foreground(cfg: ForegroundConfig) -> str:
    method = str(cfg.method).strip().lower()
    if method not in FOREGROUND_METHODS:
        raise ValueError(
            f"foreground method {cfg.method!r} is unknown; valid methods: {', '.join(FOREGROUND_METHODS)}"
        )
    for name in ("open_kernel", "close_kernel"):
        if int(getattr(cfg, name)) < 0:
            raise ValueError(f"foreground.{name} must be >= 0 (0 = off), got {getattr(cfg, name)}")
    return method


def foreground_mask(image: np.ndarray, cfg: ForegroundConfig) -> np.ndarray:
    """Foreground mask M_I of an image (the product, as opposed to its background).

    Args:
        image: RGB ``uint8 [H, W, 3]``.
        cfg: ``method`` ``none`` (all ones; ``invert`` is ignored since an all-zero foreground would
            forbid every anomaly), ``threshold`` (grey > ``threshold``) or ``otsu`` (grey > Otsu's level);
            ``invert`` flips the result (a dark product on a bright background); then an opening with
            an ``open_kernel`` square (removes specks of false foreground) and a closing with a
            ``close_kernel`` square (fills highlights and holes inside the product). Opening comes
            first so that neighbouring specks are not merged by the closing into blobs that survive.

    Returns:
        ``float32 [H, W]`` in {0, 1}.

    Raises:
        ValueError: unknown method (the message lists the valid ones) or a malformed image.
    """
    method = _check_foreground(cfg)
    _check_rgb(image)
    h, w = image.shape[:2]
    if method == "none":
        return np.ones((h, w), np.float32)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if method == "threshold":
        mask = (grey > int(cfg.threshold)).astype(np.uint8)
    else:
        _, mask = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    if cfg.invert:
        mask = 1 - mask
    if int(cfg.open_kernel) > 1:
        k = int(cfg.open_kernel)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((k, k), np.uint8))
    if int(cfg.close_kernel) > 1:
        k = int(cfg.close_kernel)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    return mask.astype(np.float32)


# Per-category starting points for MVTec AD. Semantics here: ``threshold`` keeps grey > threshold and
# ``invert`` flips, so a dark product on a bright background is ``invert=True``. (The widely used
# unofficial MemSeg calls the opposite polarity ``bg_reverse``: its bg_reverse=False is our invert=True.)
# Kernel sizes are in pixels of the image handed to the synthesiser (data.image_size, 256 by default).
NO_TEXTURES = "none"
"""``synthesis.textures`` value that turns the texture source off on purpose (``--no-textures``)."""

_TEXTURE = ForegroundConfig(method="none")
CATEGORY_FOREGROUND: dict[str, ForegroundConfig] = {
    # Textures fill the frame: an anomaly may appear anywhere.
    "carpet": _TEXTURE,
    "grid": _TEXTURE,
    "leather": _TEXTURE,
    "tile": _TEXTURE,
    "wood": _TEXTURE,
    # bottle: checked on the 209 train/good images (320x320): the bottle, seen from above, is dark
    # (5th/50th percentile grey 35/87, ring mean 65-98 up to radius 136 px) on a saturated white
    # background (every pixel beyond radius 148 px is exactly 255). grey <= 250 keeps 99.98 % of the disc
    # within radius 130 px and nothing beyond 155 px; the few pixels it misses inside are specular
    # highlights (up to 89 per image), which a 7x7 closing fills in every image (5x5 already did at
    # 320 px; 7 leaves margin). Otsu (158) would cut away the lighter rim rings, so a fixed level is used.
    "bottle": ForegroundConfig(method="threshold", threshold=250, invert=True, open_kernel=3, close_kernel=7),
    # The objects below were NOT checked on images here (only bottle is available): they are starting
    # points from what the MVTec AD images are known to look like and from the public per-category levels;
    # check each with `memseg-edge synth-preview` before training on it.
    # cable: the cross-section fills most of the frame and defects hit the sheath and all three cores,
    # whose colours span the whole grey range: no single level separates it, so no mask.
    "cable": ForegroundConfig(method="none"),
    # capsule: black/orange capsule on a light background; the black half rules out a dark background.
    "capsule": ForegroundConfig(method="threshold", threshold=120, invert=True, open_kernel=3, close_kernel=7),
    # hazelnut: brown nut on a black background.
    "hazelnut": ForegroundConfig(method="threshold", threshold=50, open_kernel=3, close_kernel=7),
    # metal_nut: metal nut on a black background.
    "metal_nut": ForegroundConfig(method="threshold", threshold=40, open_kernel=3, close_kernel=7),
    # pill: white speckled pill on a dark background.
    "pill": ForegroundConfig(method="threshold", threshold=100, open_kernel=3, close_kernel=7),
    # screw: metal screw on a light background; small part, so the mask matters most here.
    "screw": ForegroundConfig(method="threshold", threshold=110, invert=True, open_kernel=3, close_kernel=5),
    # toothbrush: brush head on a near-black background.
    "toothbrush": ForegroundConfig(method="threshold", threshold=30, open_kernel=3, close_kernel=7),
    # transistor: dark package on a lighter board; the bright leads fall outside (a known compromise).
    "transistor": ForegroundConfig(method="threshold", threshold=90, invert=True, open_kernel=3, close_kernel=7),
    # zipper: dark zipper and tape down the middle, light background at the sides.
    "zipper": ForegroundConfig(method="threshold", threshold=100, invert=True, open_kernel=3, close_kernel=7),
}


def foreground_for(category: str) -> ForegroundConfig:
    """The foreground preset of an MVTec AD category (case-insensitive), or ``method="none"`` for any
    other name (a user's own product: set ``synthesis.foreground`` in the config instead).

    Returns a copy, so a caller may modify it without changing the preset.
    """
    preset = CATEGORY_FOREGROUND.get(str(category).strip().lower(), ForegroundConfig(method="none"))
    return dataclasses.replace(preset)


# --------------------------------------------------------------------------------------------------
# Noise sources
# --------------------------------------------------------------------------------------------------


def adjust_hsv(image: np.ndarray, value_factor: float, saturation_factor: float, hue_shift: int) -> np.ndarray:
    """Brightness (factor on HSV value), saturation (factor) and hue (shift in OpenCV 8-bit hue units,
    0..179 = 2 degrees each, wrapping around 180 since hue is an angle; clipping would turn every
    shifted red into the same end of the range). RGB ``uint8 [H, W, 3]`` in and out."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = np.mod(hsv[..., 0] + int(hue_shift), 180.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation_factor, 0.0, 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] * value_factor, 0.0, 255.0)
    return cv2.cvtColor(np.rint(hsv).astype(np.uint8), cv2.COLOR_HSV2RGB)


def _jitter_hsv(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """:func:`adjust_hsv` with random brightness, saturation and hue. RGB ``uint8 [H, W, 3]``."""
    value_f = rng.uniform(*_BRIGHTNESS_RANGE)
    sat_f = rng.uniform(*_SATURATION_RANGE)
    hue_shift = int(rng.integers(-_HUE_SHIFT_MAX, _HUE_SHIFT_MAX + 1))
    return adjust_hsv(image, value_f, sat_f, hue_shift)


def grid_edges(length: int, parts: int) -> np.ndarray:
    """Integer cut positions splitting ``length`` pixels into ``parts`` cells that cover it exactly:
    ``int64 [parts + 1]``, from 0 to ``length``; cell sizes are ``floor(length/parts)`` or one more."""
    if parts < 1 or length < parts:
        raise ValueError(f"cannot cut {length} pixels into {parts} non-empty cells")
    return (np.arange(parts + 1, dtype=np.int64) * length) // parts


def shuffle_grid(image: np.ndarray, grid: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Cut ``image`` (``[H, W, C]``, any dtype) into a rows x cols grid and shuffle the cells.

    When H or W is not divisible by the grid, cells differ by one pixel (see :func:`grid_edges`). A cell
    then only moves to a position of the same size: the output is an exact permutation of the input's
    cells, with no resampling. Resizing cells instead would blur them and leave interpolation seams, a
    cue the model could learn instead of the anomaly. With divisible sizes all cells are one class and
    the shuffle is a uniform permutation of all of them.
    """
    rows, cols = int(grid[0]), int(grid[1])
    h, w = image.shape[:2]
    y_edges = grid_edges(h, rows)
    x_edges = grid_edges(w, cols)
    heights = np.diff(y_edges)
    widths = np.diff(x_edges)
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in range(rows):
        for j in range(cols):
            groups.setdefault((int(heights[i]), int(widths[j])), []).append((i, j))
    out = np.empty_like(image)
    # Sorted keys: the order the permutations are drawn in must not depend on dict insertion details.
    for key in sorted(groups):
        cells = groups[key]
        order = rng.permutation(len(cells))
        for (di, dj), src in zip(cells, order):
            si, sj = cells[int(src)]
            out[y_edges[di] : y_edges[di + 1], x_edges[dj] : x_edges[dj + 1]] = image[
                y_edges[si] : y_edges[si + 1], x_edges[sj] : x_edges[sj + 1]
            ]
    return out


def structure_source(
    image: np.ndarray,
    rng: np.random.Generator,
    grid: Sequence[int] = (4, 8),
    *,
    flip: bool = True,
    rotate: bool = True,
    photometric: bool = True,
) -> np.ndarray:
    """Noise image I_n for a structural anomaly, made from the input image itself.

    Random horizontal and vertical mirror (each with odds 1/2), a random rotation, random brightness,
    saturation and hue, then the image cut into a ``grid`` (rows x cols; the paper: 4x8) whose cells are
    shuffled (:func:`shuffle_grid`). ``flip``/``rotate``/``photometric`` switch those steps off (tests).

    Rotation: a multiple of 90 degrees when the image is square. A 90-degree turn of a non-square image
    swaps H and W, so it could only be pasted back after a resize that distorts the aspect ratio; such
    images get a small-angle rotation (up to 15 degrees) instead, with a reflected border so that no
    black corners appear, which would be a trivial cue unrelated to real defects.

    Args:
        image: RGB ``uint8 [H, W, 3]`` with H >= rows and W >= cols.
        rng: randomness.
        grid: ``(rows, cols)``.

    Returns:
        RGB ``uint8 [H, W, 3]``.
    """
    _check_rgb(image)
    if len(grid) != 2 or int(grid[0]) < 1 or int(grid[1]) < 1:
        raise ValueError(f"structure grid must be two positive integers (rows, cols), got {list(grid)}")
    h, w = image.shape[:2]
    out = image
    if flip:
        if rng.random() < 0.5:
            out = out[:, ::-1]
        if rng.random() < 0.5:
            out = out[::-1]
    if rotate:
        if h == w:
            out = np.rot90(out, int(rng.integers(0, 4)))
        else:
            angle = float(rng.uniform(-_SMALL_ROTATION_MAX_DEG, _SMALL_ROTATION_MAX_DEG))
            matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
            out = cv2.warpAffine(
                np.ascontiguousarray(out), matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
            )
    out = np.ascontiguousarray(out)
    if photometric:
        out = _jitter_hsv(out, rng)
    return shuffle_grid(out, grid, rng)


def list_textures(folder: str | Path) -> list[Path]:
    """All ``.jpg``/``.jpeg``/``.png`` files under ``folder`` (recursive, any case of suffix), sorted by
    path so a seed always picks the same texture.

    Raises:
        FileNotFoundError: the folder does not exist or holds no such image.
    """
    root = Path(folder).expanduser()
    expected = (
        "expected texture images (.jpg/.jpeg/.png), either in the DTD layout images/<class>/*.jpg "
        "or directly in the folder"
    )
    if not root.is_dir():
        raise FileNotFoundError(f"texture folder {str(root)!r} does not exist or is not a folder; {expected}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in TEXTURE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no texture images found under {str(root)!r}; {expected}")
    return paths


def _load_rgb(texture: str | Path | np.ndarray) -> np.ndarray:
    if isinstance(texture, np.ndarray):
        if texture.dtype != np.uint8:
            raise ValueError(f"texture array must be uint8, got {texture.dtype}")
        if texture.ndim == 2:
            return np.repeat(texture[:, :, None], 3, axis=2)
        _check_rgb(texture, "texture")
        return texture
    bgr = cv2.imread(str(texture), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read texture image {str(texture)!r} (missing or not an image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def texture_source(
    texture: str | Path | np.ndarray,
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    photometric: bool = True,
) -> np.ndarray:
    """Noise image I_n for a textural anomaly.

    A random crop with the target's aspect ratio, covering 50-100 % of the largest such crop (so the
    texture's scale varies), resized to ``shape``, then random brightness/saturation/hue.

    Args:
        texture: path of an image file (read with OpenCV, BGR converted to RGB) or an RGB ``uint8
            [h, w, 3]`` (or grey ``[h, w]``) array.
        shape: ``(H, W)`` of the result.
        rng: randomness.

    Returns:
        RGB ``uint8 [H, W, 3]``.
    """
    src = _load_rgb(texture)
    th, tw = src.shape[:2]
    h, w = int(shape[0]), int(shape[1])
    aspect = w / h
    max_h = min(float(th), tw / aspect)
    crop_h = int(np.clip(round(max_h * rng.uniform(0.5, 1.0)), 1, th))
    crop_w = int(np.clip(round(crop_h * aspect), 1, tw))
    top = int(rng.integers(0, th - crop_h + 1))
    left = int(rng.integers(0, tw - crop_w + 1))
    crop = src[top : top + crop_h, left : left + crop_w]
    shrinking = crop_h > h or crop_w > w
    out = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    if photometric:
        out = _jitter_hsv(out, rng)
    return out


# --------------------------------------------------------------------------------------------------
# Blending and the synthesiser
# --------------------------------------------------------------------------------------------------


def blend(image: np.ndarray, source: np.ndarray, mask: np.ndarray, delta: float) -> np.ndarray:
    """Paper Eq. 1-2: ``I_A = (1 - M) * I + delta * M * I_n + (1 - delta) * M * I``.

    Args:
        image: I, RGB ``uint8 [H, W, 3]``.
        source: I_n, RGB ``uint8 [H, W, 3]``.
        mask: M, ``float [H, W]`` in [0, 1] (binary in MemSeg).
        delta: transparency in [0, 1]; 1 pastes the source as is.

    Returns:
        I_A, RGB ``uint8 [H, W, 3]``, computed in float32 and rounded to nearest; pixels where M == 0
        are exactly those of ``image``.
    """
    _check_rgb(image)
    _check_rgb(source, "source")
    if source.shape != image.shape or mask.shape != image.shape[:2]:
        raise ValueError(
            f"blend: image {image.shape}, source {source.shape} and mask {mask.shape} must share H and W"
        )
    if not 0.0 <= float(delta) <= 1.0:
        raise ValueError(f"blend: delta must be in [0, 1], got {delta}")
    d = np.float32(delta)
    m = mask.astype(np.float32)[:, :, None]
    img = image.astype(np.float32)
    out = (1.0 - m) * img + d * m * source.astype(np.float32) + (1.0 - d) * m * img
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class AnomalySynthesizer:
    """Turns a good image into a synthetic anomalous one with its segmentation target.

    Attributes:
        cfg: the configuration.
        textures: texture files, listed once at construction (empty: no texture source).
        texture_probability: the odds actually used for the texture source (0 without textures).
        sources: one human-readable line saying which noise sources are in use and why, for the trainer
            to print (e.g. that the texture source is off because no folder was configured).
        last_source: ``"texture"`` or ``"structure"``: the source of the latest sample (None before).
        last_delta: the transparency of the latest sample (None before).
        last_shape: ``"blob"`` or ``"line"``: the target's shape in the latest sample (None before).
        line_probability: the odds of a thin (line) target instead of a blob.
    """

    def __init__(self, cfg: SynthesisConfig, *, min_pixels: int = 16, max_attempts: int = 10) -> None:
        """
        Args:
            cfg: synthesis settings.
            min_pixels: smallest target area (pixels) accepted as an anomaly; below it the Perlin mask is
                drawn again (a handful of pixels is not a learnable defect).
            max_attempts: Perlin draws before the guaranteed fallback (see ``__call__``).
        """
        _check_scales(cfg)
        _check_foreground(cfg.foreground)
        if not 0.0 <= cfg.transparency_min <= cfg.transparency_max <= 1.0:
            raise ValueError(
                "synthesis.transparency_min/max: need 0 <= min <= max <= 1, "
                f"got {cfg.transparency_min}, {cfg.transparency_max}"
            )
        if not 0.0 <= cfg.line_probability <= 1.0:
            raise ValueError(f"synthesis.line_probability must be in [0, 1], got {cfg.line_probability}")
        if not 0.0 <= cfg.texture_probability <= 1.0:
            raise ValueError(f"synthesis.texture_probability must be in [0, 1], got {cfg.texture_probability}")
        grid = list(cfg.structure_grid)
        if len(grid) != 2 or min(int(g) for g in grid) < 1:
            raise ValueError(f"synthesis.structure_grid must be [rows, cols] of positive integers, got {grid}")
        if min_pixels < 1 or max_attempts < 1:
            raise ValueError("min_pixels and max_attempts must be >= 1")
        self.cfg = cfg
        self.grid: tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.min_pixels = int(min_pixels)
        self.max_attempts = int(max_attempts)
        self.textures: list[Path] = (list_textures(cfg.textures) if cfg.textures and cfg.textures != NO_TEXTURES
                                     else [])
        p = float(cfg.texture_probability)
        grid_text = f"structure ({self.grid[0]}x{self.grid[1]} grid)"
        if self.textures and p > 0.0:
            self.texture_probability = p
            texture_text = f"texture ({len(self.textures)} images under {cfg.textures}, p={p:.2f})"
            self.sources = texture_text if p >= 1.0 else f"{texture_text} + {grid_text}"
        elif p > 0.0:
            self.texture_probability = 0.0
            self.sources = (
                f"{grid_text} only: texture_probability={p:g} but synthesis.textures is "
                f"{cfg.textures or 'empty'!r}, so the texture source is off"
            )
        else:
            self.texture_probability = 0.0
            self.sources = f"{grid_text} only (texture_probability=0)"
        self.line_probability = float(cfg.line_probability)
        if self.line_probability > 0.0:
            self.sources += f"; thin line targets p={self.line_probability:.2f}"
        self.last_source: str | None = None
        self.last_delta: float | None = None
        self.last_shape: str | None = None

    def _foreground(self, image: np.ndarray, need: int) -> np.ndarray:
        h, w = image.shape[:2]
        fg = foreground_mask(image, self.cfg.foreground)
        if fg.sum() < need:
            # A foreground this small is a failed binarisation, not a product: anomalies anywhere beat
            # none at all.
            fg = np.ones((h, w), np.float32)
        return fg

    def _line_target(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
        """A thin target (``perlin_line_mask`` inside the foreground) with at least ``min_pixels`` ones,
        or None when ``max_attempts`` draws gave none (the caller makes a blob instead)."""
        h, w = image.shape[:2]
        need = min(self.min_pixels, h * w)
        fg = self._foreground(image, need)
        for _ in range(self.max_attempts):
            mask = perlin_line_mask((h, w), self.cfg, rng, float(rng.uniform(*LINE_HALF_WIDTH))) * fg
            if mask.sum() >= need:
                return mask
        return None

    def _target(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The segmentation target M = M_P * M_I, never with fewer than ``min_pixels`` ones."""
        h, w = image.shape[:2]
        need = min(self.min_pixels, h * w)
        fg = self._foreground(image, need)
        field = None
        for _ in range(self.max_attempts):
            field = _rotated_perlin((h, w), self.cfg, rng)
            mask = (field > self.cfg.perlin_threshold).astype(np.float32) * fg
            if mask.sum() >= need:
                return mask
        # Every draw missed the foreground: keep the strongest noise peaks inside it instead (5 % of the
        # foreground, at least `need` pixels), which are still contiguous Perlin blobs.
        assert field is not None
        inside = field[fg > 0]
        k = int(min(inside.size, max(need, round(0.05 * inside.size))))
        level = np.partition(inside, inside.size - k)[inside.size - k]
        return ((field >= level) & (fg > 0)).astype(np.float32)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Synthesise one anomalous sample.

        Args:
            image: a good image, RGB ``uint8 [H, W, 3]``.
            rng: randomness; the same generator state gives the same sample.

        Returns:
            ``(I_A, M)``: the anomalous image, RGB ``uint8 [H, W, 3]``, and its target mask, ``float32
            [H, W]`` in {0, 1}, never all zero. ``I_A`` equals ``image`` wherever ``M == 0``.
        """
        _check_rgb(image)
        mask = None
        # no draw at all when lines are off, so that a blob-only configuration keeps its random stream
        if self.line_probability > 0.0 and rng.random() < self.line_probability:
            mask = self._line_target(image, rng)
        self.last_shape = "blob" if mask is None else "line"
        if mask is None:
            mask = self._target(image, rng)
        h, w = image.shape[:2]
        if self.texture_probability > 0.0 and rng.random() < self.texture_probability:
            path = self.textures[int(rng.integers(0, len(self.textures)))]
            source = texture_source(path, (h, w), rng)
            self.last_source = "texture"
        else:
            source = structure_source(image, rng, self.grid)
            self.last_source = "structure"
        low = self.cfg.transparency_min
        if self.last_shape == "line":
            low = min(max(LINE_MIN_TRANSPARENCY, low), self.cfg.transparency_max)
        delta = float(rng.uniform(low, self.cfg.transparency_max))
        self.last_delta = delta
        return blend(image, source, mask, delta), mask


# --------------------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------------------


def _label(tile: np.ndarray, text: str) -> None:
    """Write ``text`` at the top-left of ``tile`` in place, on a black box so it reads on any image."""
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1
    (tw, th), baseline = cv2.getTextSize(text, font, scale, thickness)
    cv2.rectangle(tile, (0, 0), (tw + 6, th + baseline + 6), (0, 0, 0), thickness=-1)
    cv2.putText(tile, text, (3, th + 3), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def preview_grid(
    images: Sequence[np.ndarray],
    synthesizer: AnomalySynthesizer,
    rng: np.random.Generator,
    columns: int = 4,
) -> np.ndarray:
    """A contact sheet of synthetic samples for checking the settings by eye.

    Each tile is the synthetic image (mask outline drawn in red) beside its mask (white on black),
    labelled with the noise source and delta. Tiles are laid out ``columns`` per row.

    Args:
        images: good images, RGB ``uint8 [H, W, 3]``; any of another size is resized to the first's.
        synthesizer: the synthesiser to preview.
        rng: randomness.
        columns: tiles per row (fewer if there are fewer images).

    Returns:
        RGB ``uint8 [rows * H, cols * 2W, 3]`` with ``cols = min(columns, n)`` and
        ``rows = ceil(n / cols)``; unused tiles are black. Convert to BGR before ``cv2.imwrite``.
    """
    if len(images) == 0:
        raise ValueError("preview_grid: no images given")
    if columns < 1:
        raise ValueError(f"preview_grid: columns must be >= 1, got {columns}")
    h, w = images[0].shape[:2]
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    sheet = np.zeros((rows * h, cols * 2 * w, 3), np.uint8)
    for n, image in enumerate(images):
        _check_rgb(image, f"images[{n}]")
        if image.shape[:2] != (h, w):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        synthetic, mask = synthesizer(image, rng)
        shown = synthetic.copy()
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(shown, contours, -1, (255, 0, 0), 1)
        mask_rgb = np.repeat((mask > 0)[:, :, None].astype(np.uint8) * 255, 3, axis=2)
        tile = np.concatenate([shown, mask_rgb], axis=1)
        _label(tile, f"{synthesizer.last_source} {synthesizer.last_shape} d={synthesizer.last_delta:.2f}")
        r, c = divmod(n, cols)
        sheet[r * h : (r + 1) * h, c * 2 * w : (c + 1) * 2 * w] = tile
    return sheet
