"""The defect probe: a second validation set that never touches test images, for choosing between recipes.

The trainer's own validation (``validate_on_synthetic``) uses the training synthesiser on held-out good
images; a model that has learnt that synthesiser scores about 1.0 there, so it cannot tell two recipes
apart. The probe puts anomalies of a *different family* on the same held-out good images. Two shapes, so
that neither compact nor thin training masks are favoured by construction:

one to three compact, irregular blobs (not Perlin islands), filled in one of four ways a plant sees:

- ``stain``:   an opaque-ish foreign colour (paint, oil, dirt), with a little grain;
- ``shade``:   the part itself, much darker or brighter (a dent catching the light, a burn);
- ``smudge``:  the part blurred and tinted (a wipe, a film of grease);
- ``texture``: a foreign surface (a DTD texture) blended in;

and thin, linear defects a few pixels wide:

- ``scratch``: one or two straight or gently curved lines, 1-3 px wide, lighter or darker than the part;
- ``crack``:   a jagged random-walk line with a branch, 1-3 px wide, darker than the part.

and, on request only (``EXTRA_KINDS``, so the six kinds' figures above stay comparable):

- ``uneven``:  a large, smooth change of brightness (25-45 % at its peak) over roughly 5-40 % of the part,
  fading to nothing at its edge (uneven coating, grinding or lighting of a surface): no edge and no texture
  of its own. (At 12-25 % every model scored it at chance on both products, which ranks nothing.)

Opacities and contrasts are deliberately low (subtle defects): with strong ones every trained run
scores about 1.0 and the probe cannot rank recipes. The choice of family was made from what surface defects look like in general, not from any test image.
Held-out images are the ones the trainer held out (same seed, same split), so a probe never sees a
training or memory image. numpy and OpenCV only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from memseg_edge.scoring import image_scores

from . import metrics
from .config import ForegroundConfig
from .synthesis import foreground_mask, texture_source

BLOB_KINDS: tuple[str, ...] = ("stain", "shade", "smudge", "texture")
LINE_KINDS: tuple[str, ...] = ("scratch", "crack")
PROBE_KINDS: tuple[str, ...] = BLOB_KINDS + LINE_KINDS
"""The default probe: every figure a recipe choice in BENCHMARKS.md was decided on."""
EXTRA_KINDS: tuple[str, ...] = ("uneven",)
UNEVEN_GAIN: tuple[float, float] = (0.25, 0.45)
"""The ``uneven`` kind's brightness change at its peak (a factor 1 +- gain)."""
"""Kinds drawn only when asked for (``make_probe_set(kinds=...)``, ``probe_validation.py --kinds``)."""


def probe_kinds(textures) -> tuple[str, ...]:
    """The probe kinds a run can use: all of them with a texture folder, without 'texture' otherwise."""
    return PROBE_KINDS if textures else tuple(k for k in PROBE_KINDS if k != "texture")


def parse_kinds(text: str | None, textures) -> tuple[str, ...]:
    """A ``--kinds`` option (comma-separated; ``None``: the default six, less 'texture' without a texture
    folder) -> the kinds; ``ValueError`` naming the choices for an unknown one, or 'texture' without textures."""
    if text is None:
        return probe_kinds(textures)
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in PROBE_KINDS + EXTRA_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown probe kind(s) {', '.join(unknown) or '(none given)'}: choose from "
                         f"{', '.join(PROBE_KINDS + EXTRA_KINDS)}")
    if "texture" in kinds and not textures:
        raise ValueError("the 'texture' probe kind needs a texture folder (--textures)")
    return kinds


def _polyline_mask(shape: tuple[int, int], points: np.ndarray, width: int) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.polylines(mask, [np.round(points).astype(np.int32).reshape(-1, 1, 2)], False, 1, thickness=int(width),
                  lineType=cv2.LINE_8)
    return mask > 0


def line_mask(foreground: np.ndarray, rng: np.random.Generator, kind: str = "scratch",
              length: tuple[float, float] = (0.15, 0.45), min_pixels: int = 30, min_extent: int = 15) -> np.ndarray:
    """A thin defect inside ``foreground`` (bool ``[H, W]``) -> bool ``[H, W]``, 1-3 px wide.

    ``scratch``: one or two lines of ``length`` x the image side, straight or bowed (a quadratic curve whose
    middle is pushed sideways by up to 8 % of the length). ``crack``: a random walk of 4-8 px steps whose
    heading turns by up to 17 degrees a step, with one branch from a random point. Centred on a random
    foreground pixel; redrawn until at least ``min_pixels`` pixels, spanning at least ``min_extent`` px,
    fall inside the foreground (a line cut short by the foreground's edge is not a line)."""
    fg = np.asarray(foreground, bool)
    h, w = fg.shape
    ys, xs = np.nonzero(fg)
    if len(ys) < min_pixels:
        return fg.copy() if fg.any() else np.ones((h, w), bool)
    side = float(min(h, w))
    mask = np.zeros((h, w), bool)
    for _ in range(20):
        mask = np.zeros((h, w), bool)
        n_lines = int(rng.integers(1, 3)) if kind == "scratch" else 1
        for _ in range(n_lines):
            i = int(rng.integers(0, len(ys)))
            centre = np.array([xs[i], ys[i]], np.float64)
            ell = float(rng.uniform(*length)) * side
            heading = float(rng.uniform(0, np.pi))
            width = int(rng.integers(1, 3))  # OpenCV thickness 1 or 2: lines 1 or 3 px wide
            direction = np.array([np.cos(heading), np.sin(heading)])
            if kind == "scratch":
                normal = np.array([-direction[1], direction[0]])
                bow = float(rng.uniform(-0.08, 0.08)) * ell
                t = np.linspace(-0.5, 0.5, 24)[:, None]
                pts = centre + t * ell * direction + (1.0 - 4.0 * t ** 2) * bow * normal
                mask |= _polyline_mask((h, w), pts, width)
            elif kind == "crack":
                def walk(start, angle, steps):
                    pts = [start]
                    for _ in range(steps):
                        angle += float(rng.uniform(-0.3, 0.3))
                        step = float(rng.uniform(4.0, 8.0))
                        pts.append(pts[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
                    return np.array(pts)
                steps = max(4, int(ell / 6.0))
                trunk = walk(centre, heading, steps)
                mask |= _polyline_mask((h, w), trunk, width)
                j = int(rng.integers(1, len(trunk)))
                branch = walk(trunk[j], heading + float(rng.choice([-1.0, 1.0])) * float(rng.uniform(0.5, 1.2)),
                              max(2, steps // 3))
                mask |= _polyline_mask((h, w), branch, max(1, width - 1))
            else:
                raise ValueError(f"unknown line kind {kind!r}: one of {LINE_KINDS}")
        mask &= fg
        if mask.sum() >= min_pixels:
            ys_m, xs_m = np.nonzero(mask)
            if max(np.ptp(ys_m), np.ptp(xs_m)) >= min_extent:
                return mask
    return mask if mask.any() else fg.copy()


def blob_mask(foreground: np.ndarray, rng: np.random.Generator, radius: tuple[float, float] = (6.0, 26.0),
              max_blobs: int = 3, min_pixels: int = 40) -> np.ndarray:
    """One to ``max_blobs`` irregular blobs inside ``foreground`` (bool ``[H, W]``) -> bool ``[H, W]``.

    A blob is a disc whose radius wobbles with the angle, ``r(t) = r0 (1 + sum_k a_k cos(k t + p_k))`` for
    k = 2..4, ``a_k ~ U[0, 0.18]``, ``r0 ~ U[radius]`` (pixels), centred on a random foreground pixel.
    Never fewer than ``min_pixels`` pixels (redrawn; with a tiny foreground, the foreground itself)."""
    fg = np.asarray(foreground, bool)
    h, w = fg.shape
    ys, xs = np.nonzero(fg)
    if len(ys) < min_pixels:
        return fg.copy() if fg.any() else np.ones((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(20):
        mask = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, max_blobs + 1))):
            i = int(rng.integers(0, len(ys)))
            cy, cx = float(ys[i]), float(xs[i])
            r0 = float(rng.uniform(*radius))
            theta = np.arctan2(yy - cy, xx - cx)
            r = np.full_like(theta, r0)
            for k in (2, 3, 4):
                r += r0 * float(rng.uniform(0.0, 0.18)) * np.cos(k * theta + float(rng.uniform(0, 2 * np.pi)))
            mask |= np.hypot(yy - cy, xx - cx) <= r
        mask &= fg
        if mask.sum() >= min_pixels:
            return mask
    return mask if mask.any() else fg.copy()


def uneven_field(foreground: np.ndarray, rng: np.random.Generator, sigma: tuple[float, float] = (0.12, 0.25),
                 min_pixels: int = 40) -> np.ndarray:
    """The ``uneven`` kind's weight ``[H, W]`` float32 in [0, 1]: one to three broad Gaussian bumps (each
    ``sigma`` x the image side, a little elongated) centred on foreground pixels, rescaled so that the
    weight is 0 where their sum is below half its peak and rises smoothly to 1 at the peak; 0 outside the
    foreground. Its support (weight > 0) is the defect's mask."""
    fg = np.asarray(foreground, bool)
    h, w = fg.shape
    ys, xs = np.nonzero(fg)
    if len(ys) < min_pixels:
        return fg.astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    side = float(min(h, w))
    field = np.zeros((h, w), np.float32)
    for _ in range(20):
        field[:] = 0.0
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, len(ys)))
            s1, s2 = (float(rng.uniform(*sigma)) * side for _ in range(2))
            a = float(rng.uniform(0, np.pi))
            u = (xx - xs[i]) * np.cos(a) + (yy - ys[i]) * np.sin(a)
            v = -(xx - xs[i]) * np.sin(a) + (yy - ys[i]) * np.cos(a)
            field += np.exp(-0.5 * ((u / s1) ** 2 + (v / s2) ** 2)).astype(np.float32)
        weight = np.clip((field / field.max() - 0.5) / 0.5, 0.0, 1.0)
        weight = (weight * (3.0 - 2.0 * weight) * weight).astype(np.float32) * fg  # smoothstep: no edge
        if (weight > 0).sum() >= min_pixels:
            return weight
    return weight


def _fill(image: np.ndarray, kind: str, rng: np.random.Generator, textures: Sequence[Path]) -> tuple[np.ndarray, float]:
    """The foreign appearance for ``kind`` (float32 ``[H, W, 3]``) and its opacity."""
    img = image.astype(np.float32)
    h, w = image.shape[:2]
    if kind == "stain":
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        grain = rng.normal(0.0, 8.0, size=(h, w, 1)).astype(np.float32)
        return np.broadcast_to(colour, img.shape) + grain, float(rng.uniform(0.25, 0.6))
    if kind == "shade":
        factor = float(rng.uniform(0.6, 0.85)) if rng.random() < 0.5 else float(rng.uniform(1.15, 1.4))
        return img * factor, 1.0
    if kind == "smudge":
        blurred = cv2.GaussianBlur(img, (0, 0), sigmaX=5.0)
        return blurred + rng.uniform(-25, 25, size=3).astype(np.float32), float(rng.uniform(0.4, 0.8))
    if kind == "scratch":
        factor = float(rng.uniform(0.55, 0.8)) if rng.random() < 0.5 else float(rng.uniform(1.25, 1.6))
        return img * factor + float(rng.uniform(-10, 10)), float(rng.uniform(0.6, 0.9))
    if kind == "crack":
        return img * float(rng.uniform(0.3, 0.6)), float(rng.uniform(0.7, 1.0))
    if kind == "texture":
        if not textures:
            raise ValueError("probe kind 'texture' needs a texture folder")
        path = textures[int(rng.integers(0, len(textures)))]
        return texture_source(path, (h, w), rng).astype(np.float32), float(rng.uniform(0.3, 0.7))
    raise ValueError(f"unknown probe kind {kind!r}: one of {PROBE_KINDS + EXTRA_KINDS}")


def probe_anomaly(image: np.ndarray, kind: str, foreground: np.ndarray, rng: np.random.Generator,
                  textures: Sequence[Path] = ()) -> tuple[np.ndarray, np.ndarray]:
    """A good RGB ``uint8 [H, W, 3]`` image -> (the image with a ``kind`` defect, its bool mask).
    Pixels outside the mask are unchanged."""
    out = image.astype(np.float32)
    if kind == "uneven":
        weight = uneven_field(foreground, rng)
        gain = float(rng.uniform(*UNEVEN_GAIN)) * float(rng.choice([-1.0, 1.0]))
        out = out * (1.0 + gain * weight[..., None])
        # the mask is the whole region, faint fringe included, as an inspector outlines an uneven patch
        return np.clip(np.rint(out), 0, 255).astype(np.uint8), weight > 0
    mask = line_mask(foreground, rng, kind) if kind in LINE_KINDS else blob_mask(foreground, rng)
    appearance, alpha = _fill(image, kind, rng, textures)
    m = mask[..., None]
    out = np.where(m, (1.0 - alpha) * out + alpha * appearance, out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask


@dataclass
class ProbeSet:
    """Held-out good images followed by their probe anomalies."""
    images: np.ndarray       # uint8 [N, H, W, 3]
    masks: np.ndarray        # bool [N, H, W]
    kinds: list[str]         # "good" or "probe-<kind>"

    @property
    def labels(self) -> np.ndarray:
        return np.array([k != "good" for k in self.kinds])


def make_probe_set(good: np.ndarray, foreground: ForegroundConfig, textures: Sequence[Path] = (),
                   kinds: Sequence[str] = PROBE_KINDS, seed: int = 0) -> ProbeSet:
    """Every good image once as itself and once per kind with a probe defect (seeded)."""
    if len(good) == 0:
        raise ValueError("the probe needs at least one held-out good image")
    rng = np.random.default_rng([seed, 4242])
    images, masks, names = list(good), [np.zeros(good.shape[1:3], bool)] * len(good), ["good"] * len(good)
    foregrounds = [foreground_mask(img, foreground) > 0 for img in good]
    for kind in kinds:
        for img, fg in zip(good, foregrounds):
            bad, mask = probe_anomaly(img, kind, fg, rng, textures)
            images.append(bad)
            masks.append(mask)
            names.append(f"probe-{kind}")
    return ProbeSet(np.stack(images), np.stack(masks), names)


def smooth_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of anomaly maps ``[N, H, W]`` (kernel to 4 sigma), zero padding renormalised at
    the border so that a constant map stays constant. ``sigma <= 0``: unchanged."""
    if sigma <= 0:
        return maps
    radius = int(round(4.0 * sigma))
    k = cv2.getGaussianKernel(2 * radius + 1, sigma).astype(np.float32)
    ones = cv2.sepFilter2D(np.ones(maps.shape[1:], np.float32), -1, k, k, borderType=cv2.BORDER_CONSTANT)
    return np.stack([cv2.sepFilter2D(m.astype(np.float32), -1, k, k, borderType=cv2.BORDER_CONSTANT) / ones
                     for m in maps])


def run_probe(predict: Callable[[np.ndarray], np.ndarray], probe: ProbeSet, top_k: int,
              sigmas: Sequence[float] = (0.0,), batch_size: int = 16) -> dict[str, dict]:
    """Metrics (``metrics.evaluate_maps``, per probe kind) of ``predict`` on ``probe``, for each map
    smoothing ``sigma`` applied after the model (0 = the model as it is)."""
    maps = np.concatenate([predict(probe.images[i:i + batch_size]) for i in range(0, len(probe.images), batch_size)])
    out = {}
    for s in sigmas:
        m = smooth_maps(maps, s)
        out[f"sigma={s:g}"] = metrics.evaluate_maps(m, probe.masks, image_scores(m, top_k), probe.labels, probe.kinds)
    return out


def describe_probe(r: dict) -> str:
    """One result of :func:`run_probe` (``metrics.evaluate_maps``) as a line: overall, then per kind."""
    per = "  ".join(f"{k.removeprefix('probe-')} {v['pixel_auroc']:.4f}/{v['aupro']:.4f}"
                    for k, v in r["per_defect"].items())
    return (f"image AUROC {r['image_auroc']:.4f}  pixel AUROC {r['pixel_auroc']:.4f}  AUPRO {r['aupro']:.4f}  "
            f"mean {(r['image_auroc'] + r['pixel_auroc'] + r['aupro']) / 3:.4f}   per kind (pixel/AUPRO): {per}")
