"""The one preprocessing definition (``memseg_edge.preprocess``): how an image of any shape becomes the
model's square, and how a map at the square goes back over the image. Training, evaluation, calibration
and every runtime call it, so what it promises is asserted here once."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from memseg_edge.preprocess import FITS, content_box, from_square, prepare, square_mask


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 3)


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (64, 64), (500, 400), (40, 200)])
def test_stretch_is_what_it_always_was(shape):
    """Models trained before ``data.resize`` existed are stretched; their preprocessing must not move."""
    image = _smooth(*shape)
    h, w = shape
    interp = cv2.INTER_AREA if 96 < min(h, w) else cv2.INTER_LINEAR
    assert np.array_equal(prepare(image, 96), cv2.resize(image, (96, 96), interpolation=interp))
    assert np.array_equal(prepare(image, 96, "stretch"), prepare(image, 96))


def test_a_square_image_is_the_same_bit_for_bit_either_way():
    """bottle (320 x 320) cannot move when a product with tiles of every shape chooses ``pad``."""
    for size in (320, 256, 96):
        image = _smooth(320, 320)
        assert np.array_equal(prepare(image, size, "pad"), prepare(image, size, "stretch"))


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (260, 250), (400, 40)])
def test_pad_keeps_the_aspect_ratio_centres_the_image_and_mirrors_it_outwards(shape):
    h, w = shape
    image = _smooth(h, w)
    out = prepare(image, 96, "pad")
    top, left, ch, cw = content_box(h, w, 96, "pad")
    assert out.shape == (96, 96, 3)
    assert max(ch, cw) == 96 and abs(ch / cw - h / w) <= (h / w) * (1 / min(ch, cw) + 0.01)
    assert abs(top - (96 - ch - top)) <= 1 and abs(left - (96 - cw - left)) <= 1    # centred
    inner = out[top:top + ch, left:left + cw]
    interp = cv2.INTER_AREA if ch < h and cw < w else cv2.INTER_LINEAR
    assert np.array_equal(inner, cv2.resize(image, (cw, ch), interpolation=interp))
    # mirrored about the edges: the row/column just outside repeats the edge one, and so on outwards
    if left > 0:
        assert np.array_equal(out[:, left - 1], out[:, left])
        assert np.array_equal(out[:, left - 2], out[:, left + 1])
    if top > 0:
        assert np.array_equal(out[top - 1], out[top])
    # nothing constant was invented: every pixel value of the square occurs in the resized image
    assert set(map(tuple, out.reshape(-1, 3)[::7])) <= set(map(tuple, inner.reshape(-1, 3)))


@pytest.mark.parametrize("fit", FITS)
def test_a_mask_lands_where_its_defect_lands_and_a_map_goes_back_over_the_image(fit):
    h, w = 240, 100
    image = np.full((h, w, 3), 40, np.uint8)
    mask = np.zeros((h, w), bool)
    mask[100:140, 30:70] = True
    image[mask] = 230
    square = prepare(image, 96, fit)
    small = square_mask(mask, 96, fit)
    bright = square[..., 0] > 135
    assert (bright == small).mean() > 0.98                       # the mask follows the image, mirror included
    amap = square[..., 0].astype(np.float32) / 255
    back = from_square(amap, h, w, fit)
    assert back.shape == (h, w)
    assert back[mask].mean() > 0.8 and back[~mask].mean() < 0.25  # the defect comes back where it was
    if fit == "pad":   # the map's mirrored margins are not over the image
        top, left, ch, cw = content_box(h, w, 96, fit)
        assert left > 0 and np.allclose(from_square(np.pad(np.ones((ch, cw), np.float32),
                                                           [(top, 96 - ch - top), (left, 96 - cw - left)]),
                                                    h, w, fit), 1.0)


def test_an_unknown_fit_is_a_clear_error():
    with pytest.raises(ValueError, match="stretch, pad"):
        prepare(_smooth(10, 20), 32, "crop")


def test_an_overlay_gets_the_part_of_the_map_over_the_frame():
    """Overlays (predict, run's saved failures, the HMI previews) stretch this over the frame: with pad,
    the mirrored margins must not be, or a defect would be drawn beside where it is."""
    from memseg_edge.preprocess import over_image

    amap = np.arange(96 * 96, dtype=np.float32).reshape(96, 96)
    assert np.array_equal(over_image(amap, 300, 120, "stretch"), amap)
    top, left, ch, cw = content_box(300, 120, 96, "pad")
    part = over_image(amap, 300, 120, "pad")
    assert part.shape == (ch, cw) == (96, 38) and np.array_equal(part, amap[top:top + ch, left:left + cw])
    part[0, 0] = -1
    assert amap[top, left] != -1   # a copy: the runtime reuses its output buffers
    # a frame shrunk for the overlay (same aspect, fewer pixels) gets the same part
    assert over_image(amap, 150, 60, "pad").shape == part.shape
