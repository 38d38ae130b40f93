"""Errors a new user meets (issue 12): each is one clear message that says what to do, with commands and
options that exist, and no traceback."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from memseg_edge.cli import main

pytest.importorskip("onnx", reason="onnx is needed to make the test bundle (pip install 'memseg-edge[onnx]')")
from test_engine import make_bundle  # noqa: E402
from test_runtime_trt import _fake_engine, _rtx_version  # noqa: E402

# Advice that names options which do not exist (run has no --backend; eval takes MODEL, not --model).
NONEXISTENT_ADVICE = ("--backend onnxruntime", "eval --model")


def _invoke(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception   # no traceback
    return result


def _assert_real_advice(text: str) -> None:
    for bad in NONEXISTENT_ADVICE:
        assert bad not in text, f"advises {bad!r}, which does not exist:\n{text}"


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "bundle", kinds=("fp32",))


def test_build_engine_without_tensorrt_says_what_to_install_or_run_instead(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # `import tensorrt` raises ImportError
    result = _invoke(["build-engine", bundle, "--backend", "tensorrt"])
    assert result.exit_code == 1
    assert "TensorRT is not installed" in result.output and "pip install 'memseg-edge[trt]'" in result.output
    assert "--backend tensorrt-rtx" in result.output and "memseg-edge run --model BUNDLE" in result.output
    _assert_real_advice(result.output)


@pytest.mark.parametrize("command", ["run", "eval"])
def test_an_engine_without_a_gpu_names_the_onnx_file_to_run_instead(bundle, tmp_path, command):
    from memseg_edge.cuda_env import cuda_device

    if cuda_device() is not None:
        pytest.skip("a CUDA GPU is here: this is the refusal on machines without one")
    if _rtx_version() in (None, "0"):
        pytest.skip("tensorrt_rtx not installed (pip install 'memseg-edge[rtx]')")
    engine = _fake_engine(tmp_path, bundle)
    data = tmp_path / "data" / "x" / "test" / "good"
    data.mkdir(parents=True)
    args = (["run", "--model", engine, "--results", f"ipc://{tmp_path}/r", "--images", data] if command == "run"
            else ["eval", engine, "--data", tmp_path / "data", "--category", "x"])
    result = _invoke(args)
    assert result.exit_code == 1, result.output
    assert "no CUDA GPU is usable here" in result.output
    assert f"memseg-edge run --model {bundle}" in result.output
    assert f"memseg-edge eval {bundle / 'model.onnx'}" in result.output
    _assert_real_advice(result.output)


def test_synth_preview_over_a_corrupt_png_names_the_file(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(good / f"{i:03d}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    png = cv2.imencode(".png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[1].tobytes()
    (good / "003.png").write_bytes(png[: len(png) // 3])   # truncated mid-file
    result = _invoke(["synth-preview", "--data", good, "--layout", "folder", "--foreground", "none", "--count", "4",
                      "--image-size", "64", "--out", tmp_path / "p.png"])
    assert result.exit_code == 1
    assert "003.png" in result.output and "remove or replace that file" in result.output
    assert not (tmp_path / "p.png").exists()


def test_export_of_an_onnx_file_says_it_is_already_exported_and_never_suggests_unsafe_loading(bundle):
    pytest.importorskip("torch")
    for given in (bundle / "model.onnx", bundle):
        result = _invoke(["export", given, "--out", bundle.parent / "again"])
        assert result.exit_code == 1
        assert "not a checkpoint" in result.output and "checkpoint.pt" in result.output
        assert "weights_only" not in result.output


def test_eval_device_cuda_without_a_gpu_is_refused_before_loading(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"never read: the device is checked first")
    result = _invoke(["eval", ckpt, "--data", tmp_path, "--category", "x", "--device", "cuda"])
    assert result.exit_code == 1
    assert "PyTorch sees no CUDA GPU" in result.output and "--device" in result.output


def test_eval_plots_without_matplotlib_names_the_extra_before_any_work(bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as on an edge-only install
    result = _invoke(["eval", bundle, "--data", tmp_path, "--category", "missing", "--plots", tmp_path / "plots"])
    assert result.exit_code == 1
    # the matplotlib message, not the missing category's: nothing was loaded or computed first
    assert "--plots needs matplotlib" in result.output and "pip install 'memseg-edge[train]'" in result.output
    assert not (tmp_path / "plots").exists()
