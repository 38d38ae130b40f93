"""tools/gpu_check.py, the one GPU verdict: its dry run (everything up to the first CUDA call, on the CPU)
produces the JSON schema with every section and case planned; without a GPU a real run says so and
exits 2; on a GPU (marked ``gpu``) the whole run passes."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memseg_edge import kernels
from memseg_edge.cuda_env import cuda_device

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(out.parent / "cache"))
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(out.parent))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    pytest.importorskip("torch", reason="the GPU check's dry run builds the model in PyTorch")
    pytest.importorskip("onnx", reason="the GPU check's dry run exports a bundle")
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    proc = _run(out, "--dry-run")
    return proc, json.loads((out / "gpu_check.json").read_text())


def test_script_is_executable_and_has_a_dry_run_flag():
    assert os.access(SCRIPT, os.X_OK) and SCRIPT.read_text().startswith("#!/usr/bin/env python3")
    assert "--dry-run" in SCRIPT.read_text()


def test_dry_run_exits_0_and_writes_the_schema(dry_run):
    proc, result = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gc = _module()
    assert gc.validate(result) == [] and result["schema_problems"] == []
    assert result["dry_run"] is True and result["status"] == "dry_run" and result["exit_code"] == 0
    assert result["failures"] == [] and result["errors"] == []
    assert {name: s["status"] for name, s in result["sections"].items()} == {name: "dry_run" for name in gc.SECTIONS}
    assert result["kernel"]["entry_points"] == list(kernels.ENTRY_POINTS)
    assert (Path(proc.args[proc.args.index("--out") + 1]) / "gpu_check.log").is_file()


def test_dry_run_plans_every_case_the_issue_asks_for(dry_run):
    _, result = dry_run
    cases = result["sections"]["numerics"]["cases"]
    assert {c["tile"] for c in cases} == set(kernels.TILES)
    assert {c["samples"] for c in cases} >= {1, 30, 129}
    assert {c["shape"] for c in cases} >= {"1level-odd", "2levels-odd", "3levels-tiny"}
    assert {c["data"] for c in cases} == {"random", "ties", "nan_image", "nan_bank"}
    assert {c["dtype"] for c in cases} == {"fp32", "fp16"} and {c["selection"] for c in cases} == {"sum", "per_level"}
    assert any(c["offset"] for c in cases) and {c["module"] for c in cases} == {"cubin", "ptx"}
    replayed = [c for c in cases if "plan_replayed" in c]
    assert len(replayed) > 100 and all(c["plan_replayed"] for c in replayed)
    rows = result["sections"]["timings"]["rows"]
    assert {(r["shape"], r["dtype"], r["batch"]) for r in rows} == {
        (s, d, b) for s in ("resnet18", "mobilenet_v2") for d in ("fp32", "fp16") for b in (1, 8, 32)}
    assert result["sections"]["timings"]["flush_bytes"] >= 256 << 20
    split = result["sections"]["bundle_split"]["reference_between_halves"]
    assert split["map_max_abs"] < 1e-5 and split["score_max_abs"] < 1e-5   # the cut is at the memory boundary
    assert result["sections"]["plugin"]["stages"] == ["create(build)", "configure", "serialise", "create(runtime)"]
    assert {(r["backbone"], r["memory"], r["batch"]) for r in result["sections"]["model"]["rows"]} == {
        (b, m, n) for b in ("resnet18", "mobilenet_v2") for m in ("standard_ops", "fused_kernel") for n in (1, 32)}


def test_validate_names_what_is_wrong(dry_run):
    gc = _module()
    _, result = dry_run
    broken = json.loads(json.dumps(result))
    del broken["sections"]["timings"]
    broken["sections"]["numerics"]["status"] = "maybe"
    broken["sections"]["plugin"] = {"status": "error", "elapsed_s": 1.0}
    problems = gc.validate(broken)
    assert any("sections" in p for p in problems) and any("numerics: status" in p for p in problems)
    assert any("plugin: error without a reason" in p for p in problems)
    gpu_run = json.loads(json.dumps(result))
    gpu_run["dry_run"] = False
    gpu_run["sections"]["preflight"]["status"] = "pass"
    assert any("preflight: missing gpu" in p for p in gc.validate(gpu_run))


@pytest.mark.skipif(cuda_device() is not None, reason="checks the answer on a machine without a CUDA GPU")
def test_without_a_gpu_a_real_run_says_so_and_exits_2(tmp_path):
    pytest.importorskip("torch")
    proc = _run(tmp_path / "out", "--sections", "preflight,numerics", timeout=300)
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert result["sections"]["preflight"]["status"] == "error"
    assert "no CUDA GPU" in result["sections"]["preflight"]["reason"]
    assert result["sections"]["numerics"]["reason"] == "no GPU (preflight failed)"
    assert _module().validate(result) == []


@pytest.mark.gpu
@pytest.mark.skipif(cuda_device() is None, reason="no CUDA GPU here: the GPU check runs the kernel")
def test_gpu_check_passes_on_a_gpu(tmp_path):
    pytest.importorskip("torch")
    proc = _run(tmp_path / "out", timeout=600)
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert proc.returncode == 0, (result["failures"], result["errors"])
