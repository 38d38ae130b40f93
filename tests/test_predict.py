"""memseg-edge predict: per-image score, verdict and overlay, CSV and JSON, with the runtime's own
preprocessing, score and verdict rule, on a bundle without torch."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from memseg_edge.backends import OnnxRuntimeBackend
from memseg_edge.cli import main
from memseg_edge.preprocess import load_rgb, prepare
from memseg_edge.scoring import image_scores

pytest.importorskip("onnx", reason="onnx is needed to make the test bundle (pip install 'memseg-edge[onnx]')")
from test_engine import TOP_K, make_bundle  # noqa: E402


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "bundle", kinds=("fp32",))


@pytest.fixture
def images(tmp_path) -> Path:
    """Two folders with a repeated file name (good/000.png, scratch/000.png) and one more image, of odd sizes."""
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    for rel, shape in (("good/000.png", (40, 30, 3)), ("scratch/000.png", (24, 24, 3)), ("scratch/001.jpg", (33, 50, 3))):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        img[: shape[0] // 2] = 255 if "scratch" in rel else 0   # different images, different scores
        cv2.imwrite(str(path), img)
    return root


def _run(args):
    return CliRunner().invoke(main, ["predict", *map(str, args)])


def test_predict_writes_score_verdict_and_overlay_per_image_with_the_runtimes_numbers(bundle, images, tmp_path):
    files = sorted(p for p in images.rglob("*") if p.is_file())
    backend = OnnxRuntimeBackend(bundle)
    maps, graph_scores = backend.infer(np.stack([prepare(load_rgb(p), backend.image_size) for p in files]))
    np.testing.assert_allclose(graph_scores, image_scores(maps, TOP_K), rtol=0, atol=1e-5)   # one score definition
    threshold = float(np.median(graph_scores))
    out = tmp_path / "out"
    result = _run([bundle, images, "--out", out, "--threshold", threshold])
    assert result.exit_code == 0, result.output

    report = json.loads((out / "predictions.json").read_text())
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [Path(p["image"]) for p in report["predictions"]] == files == [Path(r["image"]) for r in rows]
    for pred, row, expected in zip(report["predictions"], rows, graph_scores):
        assert pred["score"] == pytest.approx(float(expected), abs=1e-6)
        assert float(row["score"]) == pytest.approx(float(expected), abs=1e-5)
        assert pred["verdict"] == row["verdict"] == ("FAIL" if expected >= threshold else "PASS")
        assert pred["verdict"] in result.output
    assert report["counts"]["FAIL"] >= 1 and report["counts"]["PASS"] >= 1
    # overlays named after the source; the repeated name 000 is told apart by its folder
    names = sorted(Path(p["overlay"]).name for p in report["predictions"])
    assert names == ["001.jpg", "good__000.jpg", "scratch__000.jpg"]
    for pred in report["predictions"]:
        overlay = cv2.imread(pred["overlay"])
        assert overlay is not None and min(overlay.shape[:2]) >= 512   # small images enlarged: the caption fits
    assert "3 images" in result.output and "1 ERROR" not in result.output


def test_an_unreadable_image_is_an_error_row_never_a_pass_and_the_exit_is_1(bundle, images, tmp_path):
    (images / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)   # truncated PNG
    out = tmp_path / "out"
    result = _run([bundle, images, "--out", out])
    assert result.exit_code == 1
    report = json.loads((out / "predictions.json").read_text())
    bad = [p for p in report["predictions"] if p["image"].endswith("broken.png")]
    assert len(bad) == 1 and bad[0]["verdict"] == "ERROR" and bad[0]["overlay"] is None
    assert "cannot read image" in bad[0]["error"]
    assert report["counts"]["ERROR"] == 1 and report["images"] == 4   # the others were still judged
    assert "could not be judged" in result.output and "predictions.csv" in result.output


def test_overlays_of_an_earlier_run_inside_the_image_folder_are_not_judged(bundle, images):
    from memseg_edge.predict import predict

    first = predict(bundle, [images], images / "predictions", log=lambda m: None)
    second = predict(bundle, [images], images / "predictions", log=lambda m: None)
    assert first["images"] == second["images"] == 3


def test_a_nan_score_is_an_error_not_a_pass(bundle, images, tmp_path, monkeypatch):
    def nan_infer(self, batch):
        return np.zeros((len(batch), 1, 16, 16), np.float32), np.full(len(batch), np.nan, np.float32)

    monkeypatch.setattr(OnnxRuntimeBackend, "infer", nan_infer)
    from memseg_edge.predict import predict

    report = predict(bundle, [images], tmp_path / "out", log=lambda m: None)
    assert report["counts"] == {"PASS": 0, "FAIL": 0, "ERROR": 3}


def test_predict_refuses_a_checkpoint_and_names_export(tmp_path, images):
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not really")
    result = _run([ckpt.parent, images, "--out", tmp_path / "out"])
    assert result.exit_code != 0 and "memseg-edge export" in result.output


def test_predict_with_a_bundle_never_imports_torch(bundle, images, tmp_path):
    args = ["predict", str(bundle), str(images), "--out", str(tmp_path / "o"), "--quiet"]
    code = ("import sys\nfrom memseg_edge.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "o" / "predictions.csv").is_file()


def test_a_threshold_that_is_not_a_number_is_refused(bundle, images, tmp_path):
    result = _run([bundle, images, "--out", tmp_path / "out", "--threshold", "nan"])
    assert result.exit_code == 1 and "the threshold must be a number" in result.output
    assert not (tmp_path / "out" / "predictions.csv").exists()
