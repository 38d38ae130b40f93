"""The defect probe (train/probe.py) and tools/probe_validation.py: blob defects stay inside the
foreground and touch nothing else, the set is reproducible, smoothing is the documented Gaussian, and
the metrics are wired to the right masks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memseg_edge.train.config import ForegroundConfig
from memseg_edge.train.probe import (LINE_KINDS, PROBE_KINDS, blob_mask, line_mask, make_probe_set, probe_anomaly,
                                     run_probe, smooth_maps)

from conftest import DTD, MVTEC

ROOT = Path(__file__).resolve().parents[1]


def _product(seed: int = 0, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 10, np.uint8)
    img[12:52, 12:52] = rng.integers(120, 160, size=(40, 40, 3), dtype=np.uint8)
    return img


def _foreground(img: np.ndarray) -> np.ndarray:
    return img.max(axis=2) > 50


def test_blob_mask_inside_foreground_and_large_enough():
    img = _product()
    fg = _foreground(img)
    for seed in range(20):
        m = blob_mask(fg, np.random.default_rng(seed), radius=(4, 10), min_pixels=40)
        assert m.dtype == np.bool_ and m.shape == fg.shape
        assert m.sum() >= 40
        assert not (m & ~fg).any()
    a = blob_mask(fg, np.random.default_rng(3))
    b = blob_mask(fg, np.random.default_rng(3))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kind", LINE_KINDS)
def test_line_defects_are_thin_long_and_inside_the_foreground(kind):
    """Scratches and cracks are a few pixels wide (almost no pixel farther than 2 px from the mask's edge: only where two lines cross) and
    long (their extent far exceeds their width), so the probe does not favour compact masks."""
    import cv2

    fg = np.zeros((128, 128), bool)
    fg[8:120, 8:120] = True
    for seed in range(15):
        m = line_mask(fg, np.random.default_rng(seed), kind)
        assert m.sum() >= 30 and not (m & ~fg).any()
        inner = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 3)
        thick = float(np.mean(inner[m] > 2.0))
        assert thick <= 0.1, f"{kind} {seed}: {100 * thick:.0f} % of it over 2 px from the edge: not thin"
        ys, xs = np.nonzero(m)
        assert max(np.ptp(ys), np.ptp(xs)) >= 15, f"{kind} {seed}: not elongated"


@pytest.mark.parametrize("kind", [k for k in PROBE_KINDS if k != "texture"])
def test_probe_anomaly_changes_only_the_masked_pixels(kind):
    img = _product()
    out, mask = probe_anomaly(img, kind, _foreground(img), np.random.default_rng(1))
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(out[~mask], img[~mask])
    diff = np.abs(out.astype(int) - img.astype(int))[mask]
    assert diff.mean() > 3, f"{kind}: a probe defect must be visible, mean change {diff.mean():.2f}"


def test_uneven_defects_are_large_faint_edgeless_brightness_changes_inside_the_foreground():
    """``uneven``: one brightness gain (one sign, ``UNEVEN_GAIN`` at its peak) over a broad part of the surface, fading smoothly
    to nothing at the mask's edge (no step a plain edge detector would find), pixels outside unchanged."""
    from memseg_edge.train.probe import UNEVEN_GAIN, uneven_field

    img = np.full((128, 128, 3), 120, np.uint8)
    fg = np.zeros((128, 128), bool)
    fg[4:124, 4:124] = True
    shares = []
    for seed in range(12):
        out, mask = probe_anomaly(img, "uneven", fg, np.random.default_rng(seed))
        assert np.array_equal(out[~mask], img[~mask]) and not (mask & ~fg).any()
        change = out.astype(int)[..., 0] - 120
        assert (change[mask] >= 0).all() or (change[mask] <= 0).all()     # one direction
        assert 120 * UNEVEN_GAIN[0] - 1 <= np.abs(change).max() <= 120 * UNEVEN_GAIN[1] + 1   # the peak's change
        # no edge of its own: where the mask ends inside the part, the change is at most a few grey levels
        # (at the part's own edge it may stop short, as an uneven coating does)
        def shifted(a):
            p = np.pad(a, 1)
            return [p[2:, 1:-1], p[:-2, 1:-1], p[1:-1, 2:], p[1:-1, :-2]]
        inner = np.logical_and.reduce(shifted(fg))
        border = mask & inner & np.logical_or.reduce([~m for m in shifted(mask)])
        assert border.any() and np.abs(change[border]).max() <= 3
        shares.append(mask.sum() / fg.sum())
        w = uneven_field(fg, np.random.default_rng(seed))
        assert w.dtype == np.float32 and 0.0 <= w.min() and w.max() == pytest.approx(1.0, abs=1e-3)
    assert 0.05 <= np.median(shares) <= 0.5 and min(shares) > 0.02, shares


def test_extra_kinds_leave_the_default_probe_as_it_was():
    """The default probe (every figure a recipe was chosen on) draws no uneven defect, and asking for the
    six kinds explicitly gives the same set bit for bit."""
    from memseg_edge.train.probe import EXTRA_KINDS

    good = np.stack([_product(s) for s in range(3)])
    fg = ForegroundConfig(method="threshold", threshold=50, invert=False, open_kernel=0, close_kernel=0)
    assert "uneven" in EXTRA_KINDS and "uneven" not in PROBE_KINDS
    a = make_probe_set(good, fg, kinds=tuple(k for k in PROBE_KINDS if k != "texture"), seed=2)
    b = make_probe_set(good, fg, kinds=tuple(k for k in PROBE_KINDS if k != "texture") + ("uneven",), seed=2)
    n = len(a.kinds)
    assert np.array_equal(a.images, b.images[:n]) and np.array_equal(a.masks, b.masks[:n])
    assert b.kinds[n:] == ["probe-uneven"] * 3


def test_texture_kind_needs_textures_and_uses_them(tmp_path):
    import cv2

    img = _product()
    with pytest.raises(ValueError, match="texture folder"):
        probe_anomaly(img, "texture", _foreground(img), np.random.default_rng(0))
    tex = tmp_path / "t.png"
    cv2.imwrite(str(tex), np.full((80, 80, 3), 250, np.uint8))
    out, mask = probe_anomaly(img, "texture", _foreground(img), np.random.default_rng(0), [tex])
    assert np.array_equal(out[~mask], img[~mask])
    assert (out[mask].astype(int) > img[mask].astype(int)).all()   # blended towards the white texture


def test_make_probe_set_layout_and_reproducible():
    good = np.stack([_product(s) for s in range(3)])
    fg = ForegroundConfig(method="threshold", threshold=50, invert=False, open_kernel=0, close_kernel=0)
    kinds = ("stain", "shade")
    a = make_probe_set(good, fg, kinds=kinds, seed=5)
    b = make_probe_set(good, fg, kinds=kinds, seed=5)
    c = make_probe_set(good, fg, kinds=kinds, seed=6)
    assert a.kinds == ["good"] * 3 + ["probe-stain"] * 3 + ["probe-shade"] * 3
    assert np.array_equal(a.labels, [False] * 3 + [True] * 6)
    assert np.array_equal(a.images[:3], good) and not a.masks[:3].any()
    assert all(m.any() for m in a.masks[3:])
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.masks, c.masks)
    with pytest.raises(ValueError, match="at least one"):
        make_probe_set(good[:0], fg)


def test_smooth_maps_is_a_border_normalised_gaussian():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 40, 40)).astype(np.float32)
    assert smooth_maps(maps, 0) is maps
    const = np.full((1, 40, 40), 0.7, np.float32)
    np.testing.assert_allclose(smooth_maps(const, 3.0), const, rtol=1e-5)
    # brute force: sum over every pixel inside the image with Gaussian weights, renormalised
    sigma, r = 2.0, 8
    ys, xs = np.mgrid[0:40, 0:40]
    got = smooth_maps(maps, sigma)
    for (y, x) in [(0, 0), (5, 33), (20, 20), (39, 12)]:
        w = np.exp(-((ys - y) ** 2 + (xs - x) ** 2) / (2 * sigma ** 2)) * ((abs(ys - y) <= r) & (abs(xs - x) <= r))
        for n in range(2):
            assert got[n, y, x] == pytest.approx(float((w * maps[n]).sum() / w.sum()), rel=1e-4)


def test_run_probe_metrics_follow_the_masks():
    good = np.stack([_product(s) for s in range(4)])
    fg = ForegroundConfig(method="threshold", threshold=50, invert=False, open_kernel=0, close_kernel=0)
    probe = make_probe_set(good, fg, kinds=("stain", "shade"), seed=0)
    lookup = {im.tobytes(): m.astype(np.float32) for im, m in zip(probe.images, probe.masks)}
    oracle = lambda x: np.stack([lookup[im.tobytes()] for im in x])      # noqa: E731
    blind = lambda x: np.full(x.shape[:3], 0.5, np.float32)              # noqa: E731
    res = run_probe(oracle, probe, top_k=10, sigmas=(0.0,), batch_size=3)["sigma=0"]
    assert res["pixel_auroc"] == 1.0 and res["image_auroc"] == 1.0 and res["aupro"] == pytest.approx(1.0)
    assert set(res["per_defect"]) == {"probe-stain", "probe-shade"}
    res = run_probe(blind, probe, top_k=10)["sigma=0"]
    assert res["pixel_auroc"] == 0.5 and res["image_auroc"] == 0.5


def test_probe_tool_on_a_trained_model(bottle_model, tmp_path):
    """The comparison tool end to end on a real (short) bottle model: numbers for every sigma, JSON and a
    preview strip written; a run whose held-out split differs is refused (its probe would differ)."""
    import torch

    run = Path(bottle_model["checkpoint"])
    other = tmp_path / "other.pt"
    ckpt = torch.load(run, map_location="cpu", weights_only=True)
    ckpt["config"]["train"]["seed"] = 1
    torch.save(ckpt, other)
    out = tmp_path / "probe.json"
    cmd = [sys.executable, str(ROOT / "tools" / "probe_validation.py"), str(run), "--data", str(MVTEC),
           "--category", "bottle", "--sigmas", "0,2", "--json", str(out), "--preview", str(tmp_path / "p.png")]
    if DTD.is_dir():
        cmd += ["--textures", str(DTD)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "test images are not read" in proc.stdout
    (only,) = json.loads(out.read_text()).values()
    assert set(only) == {"sigma=0", "sigma=2"}
    n_kinds = 6 if DTD.is_dir() else 5
    for r in only.values():
        assert r["n_images"] == 21 * (1 + n_kinds)          # 209 good: 8 memory, 21 held out
        assert 0.5 < r["image_auroc"] <= 1.0 and 0.5 < r["pixel_auroc"] <= 1.0
    assert (tmp_path / "p.png").stat().st_size > 1000
    proc = subprocess.run(cmd[:3] + [str(other)] + cmd[3:], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "held-out images differ" in proc.stderr


def test_probe_fusion_scores_a_run_with_and_without_the_fused_map(bottle_model, tmp_path):
    """tools/probe_fusion.py, the record of the fusion's choice: on a run it reports the decoder's map,
    the distance map and F on the same probe, with normalisers from training-pool images only."""
    out = tmp_path / "fusion.json"
    cmd = [sys.executable, str(ROOT / "tools" / "probe_fusion.py"), str(Path(bottle_model["checkpoint"])),
           "--data", str(MVTEC), "--category", "bottle", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (only,) = json.loads(out.read_text()).values()
    assert set(only) >= {"model", "distance", "F"} and only["q_p"] > 0 and only["q_D"] > 0
    for name in ("model", "distance", "F"):
        assert only[name]["n_images"] == 21 * 6 and 0.5 < only[name]["pixel_auroc"] <= 1.0   # 5 kinds, no DTD


def test_probe_precision_compares_a_bundles_variants_on_the_probe(bottle_model, tmp_path):
    """tools/probe_precision.py, how INT8 plans are chosen without test images: every precision file of
    the bundle and every --variant run on the same probe; a variant identical to FP32 changes nothing,
    and 'worst' is the most negative change of the three measures."""
    import shutil

    from memseg_edge.calibration.fp16 import convert_fp16

    run = Path(bottle_model["checkpoint"]).parent
    bundle = tmp_path / "bundle"
    shutil.copytree(bottle_model["bundle"], bundle)
    convert_fp16(bundle, log=lambda *a: None)
    out = tmp_path / "precision.json"
    cmd = [sys.executable, str(ROOT / "tools" / "probe_precision.py"), str(run), "--bundle", str(bundle),
           "--variant", f"same={bundle / 'model.onnx'}", "--data", str(MVTEC), "--category", "bottle",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "test images are not read" in proc.stdout
    res = json.loads(out.read_text())
    assert set(res) == {"fp32", "fp16", "same"}
    for r in res.values():
        assert r["n_images"] == 21 * 6 and 0.5 < r["pixel_auroc"] <= 1.0     # 21 held out, 5 kinds (no DTD)
    assert res["same"]["change_vs_fp32"] == {"image_auroc": 0.0, "pixel_auroc": 0.0, "aupro": 0.0, "worst": 0.0}
    c = res["fp16"]["change_vs_fp32"]
    assert c["worst"] == min(c["image_auroc"], c["pixel_auroc"], c["aupro"]) and abs(c["worst"]) < 0.01
    bad = subprocess.run(cmd[:5] + ["--variant", "fp16=" + str(bundle / "model.onnx")] + cmd[5:],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "already a variant" in bad.stderr
    for args in ([str(tmp_path)], [str(run), "--bundle", str(tmp_path)], [str(run), "--bundle", str(bundle),
                                                                          "--variant", "noequals"]):
        bad = subprocess.run(cmd[:2] + args + ["--data", str(MVTEC), "--category", "bottle"],
                             capture_output=True, text=True, timeout=600)
        assert bad.returncode != 0 and "Error:" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_the_brightness_term_ignores_exposure_and_finds_a_broad_bright_patch():
    """tools/probe_brightness.py's L: the same scene at another exposure gives the same R (it is relative
    to the image's mean), and a broad brightness change lights L up where it is and not elsewhere."""
    sys.path.insert(0, str(ROOT / "tools"))
    from probe_brightness import brightness_deviation, relative_brightness

    rng = np.random.default_rng(0)
    base = np.clip(100 + rng.normal(0, 8, (6, 128, 128, 3)), 0, 255)
    np.testing.assert_allclose(relative_brightness((base * 1.5).astype(np.uint8)),
                               relative_brightness(base.astype(np.uint8)), rtol=0.02)
    memory = base[:5].astype(np.uint8)
    r = relative_brightness(memory)
    mu, spread = r.mean(0), r.std(0)
    test = base[5:].copy()
    test[0, 20:60, 20:60] *= 1.3
    lmap = brightness_deviation(test.astype(np.uint8), mu, spread)[0]
    assert lmap[30:50, 30:50].mean() > 5 * lmap[90:, 90:].mean()


def test_probe_brightness_reproduces_the_models_own_map_beside_the_candidate(bottle_model, tmp_path):
    """tools/probe_brightness.py, the record of candidate U: its F (today's map) scores exactly what
    tools/probe_validation.py scores for the model itself, and F+L is a different map on the same probe."""
    run = str(Path(bottle_model["checkpoint"]))
    out, ref = tmp_path / "bright.json", tmp_path / "ref.json"
    for tool, extra in (("probe_brightness.py", ["--json", str(out)]),
                        ("probe_validation.py", ["--sigmas", "0", "--json", str(ref)])):
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / tool), run, "--data", str(MVTEC), "--category",
                               "bottle", *extra], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
    (mine,) = json.loads(out.read_text()).values()
    (theirs,) = json.loads(ref.read_text()).values()
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert mine["F"][key] == pytest.approx(theirs["sigma=0"][key], abs=2e-4), key
    assert mine["q_L"] > 0 and mine["F+L"]["pixel_auroc"] != mine["F"]["pixel_auroc"]


def test_the_kinds_option_names_its_choices_and_defaults_to_the_six():
    from memseg_edge.train.probe import parse_kinds

    assert parse_kinds(None, "dtd") == PROBE_KINDS and "texture" not in parse_kinds(None, None)
    assert parse_kinds(" uneven, crack ", None) == ("uneven", "crack")
    for bad, message in (("uneven,dent", "dent"), (",", "none given"), ("texture", "texture folder")):
        with pytest.raises(ValueError, match=message):
            parse_kinds(bad, None)


def test_probe_rule_applies_the_written_rule_to_both_products(tmp_path):
    """tools/probe_rule.py, what decides recipe candidates: two-seed arm means per product (today's runs first),
    the two-product change of the three-figure mean against the rule's bar, and any one figure of one product
    falling past the limit rejects whatever the mean does."""
    def probe(base, cand):
        runs = {}
        for i, (img, pix, pro) in enumerate(base + cand):
            runs[f"run{i}"] = {"sigma=0": {"image_auroc": img, "pixel_auroc": pix, "aupro": pro}}
        return runs

    a = tmp_path / "probe-bottle.json"
    b = tmp_path / "probe-magnetic_tile.json"
    a.write_text(json.dumps(probe([(0.98, 0.98, 0.93), (0.98, 0.98, 0.95)], [(0.99, 0.99, 0.95), (0.99, 0.99, 0.95)])))
    b.write_text(json.dumps(probe([(0.92, 0.97, 0.90), (0.92, 0.97, 0.90)], [(0.92, 0.97, 0.90), (0.92, 0.97, 0.90)])))
    tool = [sys.executable, str(ROOT / "tools" / "probe_rule.py"), str(a), str(b), "--per-arm", "2"]
    out = tmp_path / "decision.json"
    proc = subprocess.run(tool + ["--min-change", "0.003", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    # bottle's arm means rise by 0.01 each (AUPRO: 0.94 -> 0.95), magnetic_tile's not at all: +0.005 over both
    assert res["change"] == pytest.approx(0.005, abs=1e-9) and res["passes"] and "PASSES" in proc.stdout
    proc = subprocess.run(tool + ["--min-change", "0.006", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert not json.loads(out.read_text())["passes"] and "does not pass" in proc.stdout
    # one figure of one product down by 0.02: rejected, even for a non-inferiority bar the mean meets
    b.write_text(json.dumps(probe([(0.92, 0.97, 0.90), (0.92, 0.97, 0.90)], [(0.90, 0.99, 0.92), (0.90, 0.99, 0.92)])))
    subprocess.run(tool + ["--min-change", "-0.003", "--json", str(out)], capture_output=True, text=True, timeout=120)
    res = json.loads(out.read_text())
    assert not res["passes"] and res["losses_over_limit"] == ["magnetic_tile image_auroc -0.0200"]
    # a probe with the wrong number of runs is refused, not averaged
    a.write_text(json.dumps(probe([(0.98, 0.98, 0.93)], [(0.99, 0.99, 0.95)])))
    proc = subprocess.run(tool + ["--min-change", "0.003"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "expected 4" in proc.stderr
