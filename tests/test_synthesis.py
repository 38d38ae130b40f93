"""Anomaly synthesis (paper section 3.1): Perlin and foreground masks, noise sources, blending, the
synthesiser on real MVTec AD bottle images with DTD textures, and the preview sheet."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from memseg_edge.train import synthesis
from memseg_edge.train.config import ForegroundConfig, SynthesisConfig

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BOTTLE_GOOD = DATA / "mvtec_ad" / "bottle" / "train" / "good"
DTD = DATA / "dtd" / "images"


def _bottle_images(n: int) -> list[np.ndarray]:
    paths = sorted(BOTTLE_GOOD.glob("*.png"))[:n] if BOTTLE_GOOD.is_dir() else []
    if len(paths) < n:
        pytest.skip(f"real data absent: need {n} PNGs in {BOTTLE_GOOD} (shared/data beside the repo)")
    return [cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for p in paths]


def _require_dtd() -> None:
    if not DTD.is_dir():
        pytest.skip(f"real data absent: DTD textures expected in {DTD}")


def _square_scene(size: int = 64, lo: int = 16, hi: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A bright square on a dark, slightly noisy background, and its true mask."""
    rng = np.random.default_rng(7)
    image = rng.integers(10, 40, size=(size, size, 3)).astype(np.uint8)
    image[lo:hi, lo:hi] = rng.integers(200, 240, size=(hi - lo, hi - lo, 3)).astype(np.uint8)
    truth = np.zeros((size, size), bool)
    truth[lo:hi, lo:hi] = True
    return image, truth


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


def _cells(image: np.ndarray, grid: tuple[int, int]) -> Counter:
    ys = synthesis.grid_edges(image.shape[0], grid[0])
    xs = synthesis.grid_edges(image.shape[1], grid[1])
    return Counter(
        (image[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].shape, image[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].tobytes())
        for i in range(grid[0])
        for j in range(grid[1])
    )


# ---------------------------------------------------------------------------------------------- Perlin


def test_perlin_noise_handles_sizes_not_divisible_by_res():
    noise = synthesis.perlin_noise((250, 333), (8, 32), np.random.default_rng(0))
    assert noise.shape == (250, 333) and noise.dtype == np.float32
    assert np.isfinite(noise).all() and np.abs(noise).max() <= 1.0 + 1e-5
    assert noise.std() > 0.05  # real noise, not a constant


def test_perlin_noise_is_zero_on_the_lattice_smooth_and_varies_along_both_axes():
    noise = synthesis.perlin_noise((64, 96), (4, 6), np.random.default_rng(0))  # 16-pixel cells
    np.testing.assert_allclose(noise[::16, ::16], 0.0, atol=1e-6)  # gradient noise vanishes at corners
    assert np.abs(np.diff(noise, axis=0)).max() < 0.2  # continuous across cell borders
    assert np.abs(np.diff(noise, axis=1)).max() < 0.2
    assert noise.std(axis=0).mean() > 0.05 and noise.std(axis=1).mean() > 0.05
    # The quintic fade leaves no crease at cell borders (a linear fade gives second differences ~0.15).
    assert np.abs(np.diff(noise.astype(np.float64), 2, axis=0)).max() < 0.06
    assert np.abs(np.diff(noise.astype(np.float64), 2, axis=1)).max() < 0.06


def test_perlin_fade_is_the_quintic_6t5_minus_15t4_plus_10t3():
    t = np.array([0.0, 0.25, 0.5, 0.8, 1.0])
    np.testing.assert_allclose(synthesis._fade(t), 6 * t**5 - 15 * t**4 + 10 * t**3, atol=1e-12)


def test_perlin_mask_is_binary_with_the_requested_shape():
    mask = synthesis.perlin_mask((96, 128), SynthesisConfig(), np.random.default_rng(1))
    assert mask.shape == (96, 128) and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}


def test_perlin_mask_is_reproducible_for_a_seed_and_differs_for_another():
    cfg = SynthesisConfig()
    a = synthesis.perlin_mask((128, 128), cfg, np.random.default_rng(123))
    b = synthesis.perlin_mask((128, 128), cfg, np.random.default_rng(123))
    np.testing.assert_array_equal(a, b)
    others = [synthesis.perlin_mask((128, 128), cfg, np.random.default_rng(s)) for s in range(124, 130)]
    assert any(not np.array_equal(a, o) for o in others)


def test_perlin_mask_coverage_over_many_draws_is_neither_empty_nor_full():
    cfg = SynthesisConfig()
    rng = np.random.default_rng(5)
    fractions = np.array([synthesis.perlin_mask((128, 128), cfg, rng).mean() for _ in range(60)])
    assert 0.005 < fractions.mean() < 0.5
    assert fractions.max() < 0.95


# ------------------------------------------------------------------------------------------ foreground


@pytest.mark.parametrize(
    "cfg",
    [
        ForegroundConfig(method="threshold", threshold=128),
        ForegroundConfig(method="otsu"),
    ],
    ids=["threshold", "otsu"],
)
def test_foreground_mask_recovers_a_bright_square(cfg):
    image, truth = _square_scene()
    mask = synthesis.foreground_mask(image, cfg)
    assert mask.dtype == np.float32 and mask.shape == truth.shape
    assert _iou(mask, truth) > 0.95


def test_foreground_invert_recovers_a_dark_square_on_a_bright_background():
    image, truth = _square_scene()
    mask = synthesis.foreground_mask(255 - image, ForegroundConfig(method="otsu", invert=True))
    assert _iou(mask, truth) > 0.95
    mask = synthesis.foreground_mask(255 - image, ForegroundConfig(method="threshold", threshold=128, invert=True))
    assert _iou(mask, truth) > 0.95


def test_foreground_none_is_all_ones():
    image, _ = _square_scene()
    assert synthesis.foreground_mask(image, ForegroundConfig(method="none")).min() == 1.0


def test_foreground_opening_removes_isolated_pixels():
    image, truth = _square_scene()
    specks = [(3, 3), (5, 60), (60, 8), (58, 57)]
    for y, x in specks:
        image[y, x] = 255
    raw = synthesis.foreground_mask(image, ForegroundConfig(method="threshold", threshold=128))
    assert all(raw[y, x] == 1.0 for y, x in specks)  # the specks are foreground before the opening
    opened = synthesis.foreground_mask(image, ForegroundConfig(method="threshold", threshold=128, open_kernel=3))
    assert all(opened[y, x] == 0.0 for y, x in specks)
    assert _iou(opened, truth) > 0.95


def test_foreground_closing_fills_small_holes():
    image, truth = _square_scene()
    image[30:32, 30:32] = 0
    cfg = ForegroundConfig(method="threshold", threshold=128, close_kernel=5)
    assert synthesis.foreground_mask(image, cfg)[30:32, 30:32].min() == 1.0


def test_foreground_unknown_method_names_the_valid_ones():
    image, _ = _square_scene()
    with pytest.raises(ValueError, match="none.*threshold.*otsu"):
        synthesis.foreground_mask(image, ForegroundConfig(method="kmeans"))


def test_foreground_presets_cover_all_mvtec_categories():
    categories = {
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
        "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
    }  # fmt: skip
    assert set(synthesis.CATEGORY_FOREGROUND) == categories
    for texture in ("carpet", "grid", "leather", "tile", "wood"):
        assert synthesis.foreground_for(texture).method == "none"
    assert synthesis.foreground_for("my_own_part").method == "none"
    preset = synthesis.foreground_for("bottle")
    preset.threshold = 1  # a copy: the preset itself must not change
    assert synthesis.CATEGORY_FOREGROUND["bottle"].threshold != 1


def test_bottle_preset_keeps_the_bottle_and_drops_the_white_background():
    image = _bottle_images(1)[0]
    mask = synthesis.foreground_mask(image, synthesis.foreground_for("bottle"))
    h, w = mask.shape
    yy, xx = np.mgrid[:h, :w]
    radius = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    assert mask[radius < 0.40 * w].min() == 1.0  # the whole bottle disc, highlights filled
    assert mask[radius > 0.48 * w].max() == 0.0  # none of the white surround


# --------------------------------------------------------------------------------------------- blend


def test_blend_leaves_pixels_outside_the_mask_unchanged_and_pastes_the_source_at_delta_1():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    source = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), np.float32)
    mask[10:30, 5:20] = 1.0
    out = synthesis.blend(image, source, mask, 1.0)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[mask == 0], image[mask == 0])
    np.testing.assert_array_equal(out[mask == 1], source[mask == 1])
    half = synthesis.blend(image, source, mask, 0.5)
    np.testing.assert_array_equal(half[mask == 0], image[mask == 0])
    mean = (image[mask == 1].astype(np.float64) + source[mask == 1]) / 2
    assert np.abs(half[mask == 1] - mean).max() <= 0.5
    np.testing.assert_array_equal(synthesis.blend(image, source, mask, 0.0), image)


# ----------------------------------------------------------------------------------- structure source


@pytest.mark.parametrize("shape", [(64, 128), (250, 250), (101, 77)])
def test_structure_source_without_jitter_permutes_grid_cells(shape):
    image = np.random.default_rng(3).integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = synthesis.structure_source(
        image, np.random.default_rng(4), (4, 8), flip=False, rotate=False, photometric=False
    )
    assert out.shape == image.shape and out.dtype == np.uint8
    assert _cells(out, (4, 8)) == _cells(image, (4, 8))  # same multiset of cells
    assert not np.array_equal(out, image)  # and actually shuffled


def test_structure_source_with_all_changes_keeps_shape_and_is_reproducible():
    for shape in [(250, 250), (120, 200)]:
        image = np.random.default_rng(3).integers(0, 256, (*shape, 3), dtype=np.uint8)
        a = synthesis.structure_source(image, np.random.default_rng(9), (4, 8))
        b = synthesis.structure_source(image, np.random.default_rng(9), (4, 8))
        assert a.shape == image.shape and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)


def test_adjust_hsv_wraps_hue_around_180_and_scales_brightness():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 200  # hue 0
    back = synthesis.adjust_hsv(red, 1.0, 1.0, -10)  # hue 170: red with some blue, not clipped to 0
    assert back[0, 0, 2] > 0 and back[0, 0, 1] == 0 and back[0, 0, 0] == 200
    fwd = synthesis.adjust_hsv(red, 1.0, 1.0, 10)  # hue 10: red with some green
    assert fwd[0, 0, 1] > 0 and fwd[0, 0, 2] == 0
    np.testing.assert_array_equal(synthesis.adjust_hsv(red, 1.0, 1.0, 180), red)
    assert synthesis.adjust_hsv(red, 0.5, 1.0, 0)[0, 0, 0] == 100


# ------------------------------------------------------------------------------------ texture source


def test_texture_source_crops_to_the_target_shape():
    texture = np.random.default_rng(0).integers(0, 256, (90, 200, 3), dtype=np.uint8)
    out = synthesis.texture_source(texture, (120, 160), np.random.default_rng(1))
    assert out.shape == (120, 160, 3) and out.dtype == np.uint8


def test_list_textures_finds_dtd_images_and_explains_an_empty_folder(tmp_path):
    _require_dtd()
    paths = synthesis.list_textures(DTD)
    assert len(paths) > 0 and paths == sorted(paths)
    assert all(p.suffix.lower() in {".jpg", ".jpeg", ".png"} for p in paths)
    out = synthesis.texture_source(paths[0], (100, 140), np.random.default_rng(0))
    assert out.shape == (100, 140, 3)
    with pytest.raises(FileNotFoundError, match="images/<class>"):
        synthesis.list_textures(tmp_path)


# -------------------------------------------------------------------------------------- synthesiser


def test_synthesizer_on_a_real_bottle_changes_only_the_masked_pixels_and_uses_both_sources():
    _require_dtd()
    image = _bottle_images(1)[0]
    cfg = SynthesisConfig(textures=str(DTD), texture_probability=0.5, foreground=synthesis.foreground_for("bottle"))
    synth = synthesis.AnomalySynthesizer(cfg)
    fg = synthesis.foreground_mask(image, cfg.foreground)
    rng = np.random.default_rng(11)
    sources = Counter()
    shares = []
    for _ in range(40):
        out, mask = synth(image, rng)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert mask.sum() >= synth.min_pixels
        assert mask[fg == 0].max() == 0.0  # anomalies stay on the bottle
        shares.append(mask.sum() / fg.sum())
        np.testing.assert_array_equal(out[mask == 0], image[mask == 0])
        sources[synth.last_source] += 1
    assert sources["texture"] > 0 and sources["structure"] > 0
    assert np.mean(shares) < 0.3  # Perlin blobs on the bottle, not the whole bottle

    a = synth(image, np.random.default_rng(99))
    b = synth(image, np.random.default_rng(99))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_synthesizer_without_textures_reports_structure_only():
    synth = synthesis.AnomalySynthesizer(SynthesisConfig(textures="", texture_probability=0.5))
    assert "structure" in synth.sources and "textures is 'empty'" in synth.sources
    off = synthesis.AnomalySynthesizer(SynthesisConfig(textures=synthesis.NO_TEXTURES, texture_probability=0.5))
    assert off.textures == [] and "'none'" in off.sources
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    for _ in range(5):
        synth(image, rng)
        assert synth.last_source == "structure"


def test_synthesizer_never_returns_an_empty_target():
    # Foreground of a uniform black image is empty under this threshold: falls back to the Perlin mask.
    # A Perlin threshold above the noise range can never fire: falls back to the strongest noise peaks.
    black = np.zeros((48, 48, 3), np.uint8)
    cases = [
        SynthesisConfig(foreground=ForegroundConfig(method="threshold", threshold=100)),
        SynthesisConfig(perlin_threshold=2.0),
        SynthesisConfig(perlin_threshold=2.0, foreground=ForegroundConfig(method="threshold", threshold=100)),
    ]
    for cfg in cases:
        synth = synthesis.AnomalySynthesizer(cfg)
        rng = np.random.default_rng(3)
        for _ in range(5):
            _, mask = synth(black, rng)
            assert mask.sum() >= synth.min_pixels


def test_synthesizer_keeps_the_target_inside_a_small_foreground():
    image, truth = _square_scene(size=96, lo=40, hi=56)  # a 16x16 product in a 96x96 frame
    cfg = SynthesisConfig(foreground=ForegroundConfig(method="otsu"))
    synth = synthesis.AnomalySynthesizer(cfg)
    rng = np.random.default_rng(8)
    for _ in range(10):
        _, mask = synth(image, rng)
        assert mask.sum() >= synth.min_pixels
        assert mask[~truth].max() == 0.0


def _width_profile(mask: np.ndarray) -> tuple[float, float]:
    """(share of the mask left after removing everything under 5 px wide, share after under 3 px)."""
    m = (mask > 0).astype(np.uint8)
    open5 = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    open3 = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    return open5.sum() / m.sum(), open3.sum() / m.sum()


def test_line_targets_are_thin_curves_at_contrast_and_change_nothing_else():
    """synthesis.line_probability = 1: every target is a few segments at most 4 px wide (a 5x5 opening,
    which keeps anything wider, keeps almost none of it; blobs survive it), drawn at a transparency of at
    least 0.5, and the image changes only under the target."""
    image = np.random.default_rng(0).integers(60, 200, (128, 128, 3), dtype=np.uint8)
    rng = np.random.default_rng(5)
    lines = synthesis.AnomalySynthesizer(SynthesisConfig(line_probability=1.0))
    blobs = synthesis.AnomalySynthesizer(SynthesisConfig(line_probability=0.0))
    assert "thin line targets p=1.00" in lines.sources and "line" not in blobs.sources
    kept_lines, kept_blobs, n_line = [], [], 0
    for _ in range(30):
        out, mask = lines(image, rng)
        assert mask.sum() >= lines.min_pixels and set(np.unique(mask)) <= {0.0, 1.0}
        assert np.array_equal(out[mask == 0], image[mask == 0])
        if lines.last_shape == "line":
            n_line += 1
            assert lines.last_delta >= synthesis.LINE_MIN_TRANSPARENCY
            kept_lines.append(_width_profile(mask)[0])
            assert mask.mean() < 0.2  # segments in one region, not a net over the image
        _, bmask = blobs(image, rng)
        assert blobs.last_shape == "blob"
        kept_blobs.append(_width_profile(bmask)[0])
    assert n_line >= 27  # a line draw falls back to a blob only when max_attempts draws all miss
    assert np.median(kept_lines) < 0.05 and np.median(kept_blobs) > 0.7


def test_line_probability_sets_the_share_of_thin_targets_and_zero_draws_nothing_extra():
    image = np.random.default_rng(1).integers(60, 200, (64, 64, 3), dtype=np.uint8)
    synth = synthesis.AnomalySynthesizer(SynthesisConfig(line_probability=0.3))
    rng = np.random.default_rng(2)
    shapes = []
    for _ in range(200):
        synth(image, rng)
        shapes.append(synth.last_shape)
    assert 0.2 <= shapes.count("line") / 200 <= 0.4
    # With lines off, the random stream is the blob-only one: the same samples as a synthesiser that never
    # heard of lines (what every model trained before line_probability existed was made with).
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    off = synthesis.AnomalySynthesizer(SynthesisConfig(line_probability=0.0))
    for _ in range(5):
        out, mask = off(image, a)
        ref_mask = off._target(image, b)
        ref = synthesis.blend(image, synthesis.structure_source(image, b, off.grid), ref_mask,
                              float(b.uniform(off.cfg.transparency_min, off.cfg.transparency_max)))
        assert np.array_equal(mask, ref_mask) and np.array_equal(out, ref)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_a_line_probability_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match="line_probability"):
        synthesis.AnomalySynthesizer(SynthesisConfig(line_probability=p))


def test_line_targets_stay_inside_a_small_foreground_and_are_never_empty():
    image, truth = _square_scene(size=96, lo=40, hi=56)
    synth = synthesis.AnomalySynthesizer(SynthesisConfig(line_probability=1.0,
                                                         foreground=ForegroundConfig(method="otsu")))
    rng = np.random.default_rng(4)
    for _ in range(10):
        _, mask = synth(image, rng)
        assert mask.sum() >= synth.min_pixels
        assert mask[~truth].max() == 0.0
    black = np.zeros((48, 48, 3), np.uint8)
    never = synthesis.AnomalySynthesizer(SynthesisConfig(line_probability=1.0, perlin_threshold=2.0))
    for _ in range(3):
        _, mask = never(black, rng)  # no line can be drawn: the blob fallback, never an empty target
        assert mask.sum() >= never.min_pixels and never.last_shape == "blob"


# ------------------------------------------------------------------------------------------- preview


def test_preview_grid_lays_out_image_and_mask_tiles():
    images = [np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8) for i in range(5)]
    synth = synthesis.AnomalySynthesizer(SynthesisConfig())
    sheet = synthesis.preview_grid(images, synth, np.random.default_rng(0), columns=3)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3
    assert sheet.shape == (2 * 48, 3 * 2 * 40, 3)  # 2 rows of 3 tiles, each image + mask
    assert sheet[48:, 2 * 80 :].max() == 0  # the sixth tile is unused
    # Below the label box, each tile's right half is the mask: pure black and white.
    for r in range(2):
        for c in range(3 if r == 0 else 2):
            mask_half = sheet[r * 48 + 24 : (r + 1) * 48, c * 80 + 40 : (c + 1) * 80]
            assert set(np.unique(mask_half)) <= {0, 255}
    assert synth.last_source == "structure"
