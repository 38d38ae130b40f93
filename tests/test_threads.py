"""--threads: one option on every computing command, a default that leaves room for other processes, and
the count reaching PyTorch, onnxruntime, OpenCV and child processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from memseg_edge import threads as th
from memseg_edge.cli import main


@pytest.fixture
def restore_threads(monkeypatch):
    """apply_threads changes process-wide settings: put them back for the tests that follow."""
    import cv2

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    before_cv2 = cv2.getNumThreads()
    torch = sys.modules.get("torch")
    before_torch = torch.get_num_threads() if torch is not None else None
    yield
    cv2.setNumThreads(before_cv2)
    if torch is not None:
        torch.set_num_threads(before_torch)


@pytest.mark.parametrize("command", ["train", "eval", "calibrate", "predict", "demo", "run"])
def test_every_computing_command_takes_threads(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--threads" in result.output


def test_default_is_half_the_physical_cores_unless_omp_num_threads_is_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "physical_cores", lambda: 2)
    assert th.default_threads() == 1
    monkeypatch.setattr(th, "physical_cores", lambda: 16)
    assert th.default_threads() == 8
    monkeypatch.setattr(th, "physical_cores", lambda: 1)
    assert th.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert th.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")   # unparsable: ignored, not a crash
    assert th.default_threads() == 1


def test_physical_cores_never_exceed_usable_cpus():
    assert 1 <= th.physical_cores() <= th.usable_cpus()


def test_apply_sets_opencv_child_environment_and_onnxruntime_options(restore_threads):
    import cv2

    assert th.apply_threads(3) == 3
    assert cv2.getNumThreads() == 3
    assert os.environ["OMP_NUM_THREADS"] == "3" and th.configured() == 3
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "3"
    opts = th.ort_session_options()
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert th.ort_session_options(threads=2).intra_op_num_threads == 2


def test_torch_gets_the_count_whether_imported_before_or_after():
    code = ("import json, sys\n"
            "from memseg_edge.threads import apply_threads\n"
            "apply_threads(1)\n"          # before torch: through OMP_NUM_THREADS, read when torch starts
            "import torch\n"
            "after_import = torch.get_num_threads()\n"
            "apply_threads(2)\n"          # torch loaded: set directly
            "print(json.dumps([after_import, torch.get_num_threads()]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, 2]


def test_threads_option_applies_before_the_command_runs_and_passes_the_count(restore_threads):
    import click

    seen = {}

    @click.command()
    @th.threads_option
    def cmd(threads):
        seen["threads"], seen["env"] = threads, os.environ["OMP_NUM_THREADS"]

    result = CliRunner().invoke(cmd, ["--threads", "2"])
    assert result.exit_code == 0, result.output
    assert seen == {"threads": 2, "env": "2"}
    result = CliRunner().invoke(cmd, [], env={th.ENV_VAR: "1"})
    assert result.exit_code == 0 and seen["threads"] == 1
    result = CliRunner().invoke(cmd, ["--threads", "0"])
    assert result.exit_code != 0 and "--threads" in result.output


def test_importing_threads_never_imports_torch():
    code = "import sys, memseg_edge.threads as t; t.apply_threads(1); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_onnxruntime_session_takes_the_applied_count(restore_threads, tmp_path):
    """eval and export build OnnxRuntimeBackend without a count: the session must still use --threads,
    not onnxruntime's own default of every core."""
    from memseg_edge.backends import OnnxRuntimeBackend

    from test_runtime_hardening import tiny_bundle

    bundle = tiny_bundle(tmp_path / "bundle")
    th.apply_threads(2)
    assert OnnxRuntimeBackend(bundle).session.get_session_options().intra_op_num_threads == 2
    assert OnnxRuntimeBackend(bundle, threads=1).session.get_session_options().intra_op_num_threads == 1
