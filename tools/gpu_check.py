#!/usr/bin/env python3
"""The complete GPU verdict on the fused memory-bank kernel and the GPU path, in one run (issue 14).

Sections, in order (each records its status, its time and its figures in the JSON):
  preflight     GPU, SMs, L2, driver CUDA version, NVRTC version, the compile (cubin + PTX, PTX ISA), the
                image the driver takes, both images loaded (cubin and the PTX through the driver's JIT),
                registers / local memory per kernel.
  numerics      the kernel against memseg_edge/kernels/reference.py: odd shapes, 1-3 levels, M in {1, 30, 129},
                every tile (batch 1..33), both selections, FP32 and FP16; random data (tolerance), integer data
                with duplicate samples (exact ties, exact diffs), a NaN in an image and in a bank sample;
                guard bytes around every buffer, outputs and workspace poisoned first; misaligned pointers
                (the scalar path) and the PTX-JIT module once each.
  plugin        memseg_edge.plugin driven without TensorRT (memseg_edge.plugin.stand_in_trt): create,
                build queries, serialise, re-create, attach (loads the kernel), shape change, enqueue on a
                torch stream at two batch sizes, checked against the reference; host time per cached enqueue.
  bundle_split  a freshly exported bundle (MobileNetV2, random weights, real memory bank) cut at the memory
                boundary: first half in onnxruntime, the kernel on the GPU, second half in onnxruntime,
                against the whole bundle in onnxruntime (anomaly map and score).
  timings       ResNet18 and MobileNetV2 shapes at 256 x 256, M = 30, batch 1/8/32, FP32 and FP16: the kernel
                (both launches, and each alone) and the PyTorch standard-op subgraph (train.memory.MemoryBank),
                each as a CUDA graph, median and p90 of CUDA-event-timed replays with a 256 MB write before
                each replay (the 60 MB L2 holds no bank); GB/s = (bank once + features + outputs) / time,
                against the measured device-to-device copy bandwidth.
  model         the whole MemSeg in PyTorch FP16, channels-last, CUDA graphs (standard-op memory step and
                with the fused kernel swapped in): batch-1 latency and batch-32 throughput.

Writes ``gpu_check.json`` and ``gpu_check.log`` to ``--out`` (default ``$OUT``, else ``./gpu_check_out``) and
prints a summary table. Exit status: 0 all checks pass; 1 a numeric check failed; 2 no usable GPU/PyTorch;
3 the internal time budget (``--budget-s``, default 510 s, under 9 minutes) ran out (the JSON says how far
it got); 4 an unexpected error in a section. ``--dry-run`` runs everything up to the first CUDA call on the
CPU (imports, the case lists and their launch plans, the plans replayed in numpy for the small cases, the
bundle export and its first half with the numpy reference between the halves, the JSON schema) and exits 0
when the JSON validates.

    python tools/gpu_check.py --out $OUT            # on the GPU machine (device tool: timeout_s 600)
    python tools/gpu_check.py --dry-run --out /tmp/x
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEMA = "memseg-edge-gpu-check"
SCHEMA_VERSION = 1
SECTIONS = ("preflight", "numerics", "plugin", "bundle_split", "timings", "model")
STATUSES = ("pass", "fail", "error", "skipped", "dry_run")
EXIT_PASS, EXIT_NUMERIC, EXIT_NO_GPU, EXIT_TIMEOUT, EXIT_ERROR = 0, 1, 2, 3, 4
GUARD = 4096                      # bytes of guard pattern before and after every buffer
GUARD_BYTE = 0xA5
FLUSH_BYTES = 256 << 20           # written between timed replays: more than the H200's 60 MB L2
BOUND = {"fp32": 1e-5, "fp16": 1e-3}
FP16_FLOOR = 2.0 ** -14           # below float16's smallest normal its rounding is absolute, not relative
SHAPES = {                        # per level (C, H, W) of the memory step at 256 x 256
    "resnet18": ((64, 64, 64), (128, 32, 32), (256, 16, 16)),
    "mobilenet_v2": ((24, 64, 64), (32, 32, 32), (96, 16, 16)),
}
NUMERIC_LEVELS = {
    "1level-odd": ((3, 5, 7),),
    "2levels-odd": ((3, 5, 7), (8, 4, 4)),
    "3levels-mobilenet64": ((24, 16, 16), (32, 8, 8), (96, 4, 4)),
    "3levels-tiny": ((1, 1, 1), (2, 3, 1), (5, 1, 3)),
}
NUMERIC_SAMPLES = (1, 30, 129)
NUMERIC_BATCHES = (1, 2, 3, 5, 9, 17, 32, 33)   # tiles 1, 2, 4, 8, 16, 32 and two tiles of 32
TIMING_BATCHES = (1, 8, 32)
BLOCKS_PER_SM_SWEEP = (2, 3, 4, 6, 8, 12, 16)


# ------------------------------------------------------------------------------------------------ plumbing


class BudgetExceeded(Exception):
    pass


class Run:
    """The result being built, the log, and the time budget."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float):
        self.out = out
        self.dry_run = dry_run
        self.budget_s = budget_s
        self.t0 = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "gpu_check.log", "w", buffering=1)
        self.result: dict[str, Any] = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "dry_run": dry_run,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "elapsed_s": 0.0,
            "budget_s": budget_s, "status": "error", "exit_code": EXIT_ERROR, "environment": {}, "kernel": {},
            "sections": {name: {"status": "skipped", "elapsed_s": 0.0, "reason": "not reached"} for name in SECTIONS},
            "failures": [], "errors": []}

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f} s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def check_budget(self, need_s: float = 0.0) -> None:
        if self.left() < need_s:
            raise BudgetExceeded(f"{self.left():.0f} s of the {self.budget_s:.0f} s budget left, {need_s:.0f} s needed")

    def fail(self, what: str) -> None:
        self.result["failures"].append(what)
        self.log(f"FAIL {what}")

    def write(self) -> Path:
        self.result["elapsed_s"] = round(time.monotonic() - self.t0, 2)
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=_json_default))
        os.replace(tmp, path)
        return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def run_section(run: Run, name: str, fn: Callable[[], dict[str, Any]], need_s: float) -> None:
    t0 = time.monotonic()
    section = run.result["sections"][name]
    try:
        run.check_budget(need_s)
        run.log(f"== {name}")
        data = fn()
        failures = [f for f in run.result["failures"] if f.startswith(name + ":")]
        section.clear()
        section.update(data)
        section["status"] = "dry_run" if run.dry_run else ("fail" if failures else "pass")
    except BudgetExceeded as exc:
        section.update({"status": "skipped", "reason": f"time budget: {exc}"})
        run.log(f"{name}: skipped ({exc})")
    except Exception as exc:  # one broken section must not hide the others' results
        text = "".join(traceback.format_exception(exc))
        section.clear()
        section.update({"status": "error", "reason": f"{type(exc).__name__}: {exc}", "traceback": text})
        run.result["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
        run.log(f"{name}: ERROR\n{text}")
    section["elapsed_s"] = round(time.monotonic() - t0, 2)
    run.write()


def import_train_package():
    """``memseg_edge.train`` (setup.cfg maps it to train/); from the checkout where it is not installed."""
    try:
        return importlib.import_module("memseg_edge.train")
    except ImportError:
        spec = importlib.util.spec_from_file_location("memseg_edge.train", ROOT / "train" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "train")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["memseg_edge.train"] = module
        spec.loader.exec_module(module)
        return module


def versions() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__, "host": platform.node(),
                           "platform": platform.platform()}
    for name, module in (("torch", "torch"), ("cuda_bindings", "cuda.bindings"), ("onnxruntime", "onnxruntime"),
                         ("onnx", "onnx")):
        try:
            env[name] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception as exc:
            env[name] = f"missing ({type(exc).__name__}: {exc})"
    return env


# ------------------------------------------------------------------------------------------------ cases


def numeric_cases() -> list[dict[str, Any]]:
    """Every case of the numerics section (the same list in a dry run)."""
    cases = []
    for shape_id, levels in NUMERIC_LEVELS.items():
        for samples in NUMERIC_SAMPLES:
            big = shape_id == "3levels-mobilenet64" and samples == 129
            batches = (1, 9, 33) if big else NUMERIC_BATCHES
            for selection in ("sum", "per_level"):
                for dtype in ("fp32", "fp16"):
                    for batch in batches:
                        kind = ("ties" if (batch + samples) % 2 else "random")
                        cases.append({"shape": shape_id, "levels": levels, "samples": samples, "selection": selection,
                                      "dtype": dtype, "batch": batch, "data": kind, "offset": False, "module": "cubin"})
    # Both data kinds for every tile once, the NaN cases, the scalar path and the PTX module.
    for batch in NUMERIC_BATCHES:
        for dtype in ("fp32", "fp16"):
            for kind in ("random", "ties", "nan_image", "nan_bank"):
                cases.append({"shape": "2levels-odd", "levels": NUMERIC_LEVELS["2levels-odd"], "samples": 30,
                              "selection": "sum", "dtype": dtype, "batch": batch, "data": kind, "offset": False,
                              "module": "cubin"})
    for dtype in ("fp32", "fp16"):
        for selection in ("sum", "per_level"):
            cases.append({"shape": "3levels-mobilenet64", "levels": NUMERIC_LEVELS["3levels-mobilenet64"],
                          "samples": 30, "selection": selection, "dtype": dtype, "batch": 5, "data": "random",
                          "offset": True, "module": "cubin"})
            cases.append({"shape": "3levels-mobilenet64", "levels": NUMERIC_LEVELS["3levels-mobilenet64"],
                          "samples": 30, "selection": selection, "dtype": dtype, "batch": 3, "data": "ties",
                          "offset": False, "module": "ptx"})
    for i, c in enumerate(cases):
        c["id"] = (f"{i:03d}-{c['shape']}-m{c['samples']}-{c['selection']}-{c['dtype']}-b{c['batch']}-{c['data']}"
                   f"{'-offset' if c['offset'] else ''}-{c['module']}")
    return cases


def make_case_data(case: dict[str, Any], rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Features ``[N, C, H, W]`` and banks ``[M, C, H, W]`` per level for a case."""
    dt = np.float16 if case["dtype"] == "fp16" else np.float32
    levels, m, n = case["levels"], case["samples"], case["batch"]
    pick = rng.integers(0, m, n)
    if case["data"] == "random":
        banks = [rng.standard_normal((m, *lv)).astype(dt) for lv in levels]
        feats = [(b[pick].astype(np.float64) + rng.normal(0, 0.5, (n, *lv))).astype(dt) for b, lv in zip(banks, levels)]
    else:   # integer-valued: every distance exact in float32, duplicate samples tie exactly
        banks = [rng.integers(-3, 4, (m, *lv)).astype(dt) for lv in levels]
        if m > 2:
            for b in banks:
                b[m // 2] = b[1]
            pick[0] = m // 2          # image 0 ties between sample 1 and its copy: 1 must win
        feats = [(b[pick] + rng.integers(-1, 2, (n, *lv)) * (rng.random((n, *lv)) < 0.2)).astype(dt)
                 for b, lv in zip(banks, levels)]
        if case["data"] == "nan_image":
            feats[0][n // 2].flat[0] = np.nan
        if case["data"] == "nan_bank" and m > 1:
            banks[-1][m - 1].flat[-1] = np.nan
    return feats, banks


def timing_cases() -> list[dict[str, Any]]:
    return [{"shape": s, "levels": SHAPES[s], "samples": 30, "dtype": d, "batch": b}
            for s in SHAPES for d in ("fp32", "fp16") for b in TIMING_BATCHES]


# ------------------------------------------------------------------------------------------------ GPU helpers


class Gpu:
    """torch + the kernel loaded into torch's CUDA context (cubin and PTX modules)."""

    def __init__(self, run: Run):
        import torch
        from cuda.bindings import driver

        from memseg_edge import kernels

        self.torch, self.driver, self.kernels = torch, driver, kernels
        torch.zeros(1, device="cuda")   # the primary context, current on this thread
        self._ok(driver.cuInit(0))
        props = torch.cuda.get_device_properties(0)
        self.props = props
        self.arch = f"sm_{props.major}{props.minor}"
        version = int(self._ok(driver.cuDriverGetVersion()))
        self.driver_version = (version // 1000, version % 1000 // 10)
        t0 = time.monotonic()
        self.kernel = kernels.compile_kernel(self.arch, max_version=self.driver_version)
        self.compile_s = time.monotonic() - t0
        image, kind = kernels.choose_image(self.kernel, self.arch, self.driver_version)
        self.launcher = kernels.DriverLauncher(image, kind, props.multi_processor_count, self.kernel)
        self.ptx_launcher = kernels.DriverLauncher(self.kernel.ptx, "ptx", props.multi_processor_count, self.kernel)
        run.log(f"{props.name} ({self.arch}, {props.multi_processor_count} SMs), driver CUDA "
                f"{self.driver_version[0]}.{self.driver_version[1]}; kernel by {self.kernel.compiler} "
                f"(PTX ISA {self.kernel.ptx_isa}) in {self.compile_s:.1f} s, loaded as {kind}")

    def _ok(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA driver call failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    def function_attributes(self) -> dict[str, dict[str, int]]:
        attr = self.driver.CUfunction_attribute
        out = {}
        for name, fn in self.launcher._functions.items():
            out[name] = {"registers": int(self._ok(self.driver.cuFuncGetAttribute(attr.CU_FUNC_ATTRIBUTE_NUM_REGS, fn))),
                         "local_bytes": int(self._ok(self.driver.cuFuncGetAttribute(
                             attr.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, fn))),
                         "static_shared_bytes": int(self._ok(self.driver.cuFuncGetAttribute(
                             attr.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn)))}
        return out

    def stream(self) -> int:
        return self.torch.cuda.current_stream().cuda_stream


class Guarded:
    """A device buffer with GUARD bytes of a known pattern on each side (torch uint8 tensor)."""

    def __init__(self, torch, nbytes: int, offset: int = 0):
        self.torch, self.nbytes, self.start = torch, nbytes, GUARD + offset
        self.raw = torch.full((GUARD + offset + max(nbytes, 1) + GUARD,), GUARD_BYTE, dtype=torch.uint8, device="cuda")

    @property
    def ptr(self) -> int:
        return self.raw.data_ptr() + self.start

    def body(self):
        return self.raw[self.start:self.start + self.nbytes]

    def upload(self, arr: np.ndarray) -> "Guarded":
        src = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        self.body().copy_(self.torch.from_numpy(src if src.flags.writeable else src.copy()))
        return self

    def fill_bytes(self, pattern: bytes) -> "Guarded":
        reps = self.nbytes // len(pattern)
        self.upload(np.frombuffer(pattern * reps, np.uint8))
        return self

    def download(self, dtype, shape) -> np.ndarray:
        return self.body().cpu().numpy().view(dtype).reshape(shape)

    def guards_intact(self) -> bool:
        raw = self.raw
        return bool((raw[:self.start] == GUARD_BYTE).all().item() and
                    (raw[self.start + self.nbytes:] == GUARD_BYTE).all().item())


def run_kernel_case(gpu: Gpu, step, feats, banks, half: bool, offset: bool, launcher) -> dict[str, Any]:
    """Upload, poison, launch, download: outputs, index and whether every guard is intact."""
    torch = gpu.torch
    itemsize = 2 if half else 4
    off = itemsize if offset else 0
    n = len(feats[0])
    xs = [Guarded(torch, f.nbytes, off).upload(f) for f in feats]
    bs = [Guarded(torch, b.nbytes, off).upload(b) for b in banks]
    nan = np.array([np.nan], np.float16 if half else np.float32).tobytes()
    ys = [Guarded(torch, f.nbytes, off).fill_bytes(nan) for f in feats]
    idx_shape = step.index_shape(n)
    ix = Guarded(torch, 4 * int(np.prod(idx_shape))).fill_bytes(b"\xff\xff\xff\xff")
    ws = Guarded(torch, step.workspace_bytes(n)).fill_bytes(np.array([np.nan], np.float32).tobytes())
    launches = gpu.kernels.plan_launches(step, n, half, [x.ptr for x in xs], [b.ptr for b in bs], [y.ptr for y in ys],
                                         ix.ptr, ws.ptr, sm_count=launcher.sm_count)
    launcher.run(launches, gpu.stream())
    torch.cuda.synchronize()
    dt = np.float16 if half else np.float32
    outs = [y.download(dt, f.shape) for y, f in zip(ys, feats)]
    index = ix.download(np.int32, idx_shape)
    guards = all(g.guards_intact() for g in xs + bs + ys + [ix, ws])
    inputs_kept = all(np.array_equal(x.download(dt, f.shape), f, equal_nan=True) for x, f in zip(xs, feats)) and \
        all(np.array_equal(b.download(dt, a.shape), a, equal_nan=True) for b, a in zip(bs, banks))
    return {"diffs": outs, "index": index, "guards_intact": guards, "inputs_unchanged": inputs_kept,
            "kernel": launches[0].kernel, "vec_mask": int(launches[0].args[15][0])}


def diffs_for(feats, banks, index, per_level: bool) -> list[np.ndarray]:
    out = []
    for level, (f, b) in enumerate(zip(feats, banks)):
        pick = index[:, level] if per_level else index
        d = np.asarray(f, np.float64) - np.asarray(b, np.float64)[pick]
        out.append(d * d)
    return out


def compare(case, feats, banks, got: dict[str, Any]) -> dict[str, Any]:
    """Index exact (or, for random data, an equally close sample within float32 rounding); every diff element
    within the dtype's bound; NaN exactly where the reference has NaN."""
    from memseg_edge.kernels.reference import level_distances, memory_step

    per_level = case["selection"] == "per_level"
    ref_diffs, ref_index = memory_step(feats, banks, case["selection"], dtype=np.float64)
    index = got["index"]
    index_equal = bool(np.array_equal(index, ref_index))
    index_ok = index_equal
    if not index_equal and case["data"] == "random" and (index >= 0).all() and (index < case["samples"]).all():
        dists = [level_distances(f, b) for f, b in zip(feats, banks)]
        totals = np.sum(dists, axis=0) if not per_level else None
        ok = True
        for i in range(len(index)):
            pairs = [(totals[i], index[i], ref_index[i])] if not per_level else \
                [(dists[l][i], index[i, l], ref_index[i, l]) for l in range(len(dists))]
            for row, a, b in pairs:
                ok &= bool(abs(row[a] - row[b]) <= 1e-6 * max(abs(row[b]), 1e-30))
        index_ok = ok
        ref_diffs = diffs_for(feats, banks, index, per_level)
    floor = FP16_FLOOR if case["dtype"] == "fp16" else 1e-30
    worst, nan_match, written = 0.0, True, True
    for g, r in zip(got["diffs"], ref_diffs):
        g64 = g.astype(np.float64)
        nan_match &= bool(np.array_equal(np.isnan(g64), np.isnan(r)))
        written &= not bool(np.isnan(g64[~np.isnan(r)]).any())
        both = ~np.isnan(r) & ~np.isnan(g64)
        if both.any():
            worst = max(worst, float(np.max(np.abs(g64[both] - r[both]) / np.maximum(np.abs(r[both]), floor))))
    exact = case["data"] != "random"
    bound = 0.0 if exact and case["dtype"] == "fp32" else BOUND[case["dtype"]]
    ok = index_ok and nan_match and written and worst <= bound and got["guards_intact"] and got["inputs_unchanged"]
    return {"max_rel_err": worst, "bound": bound, "index_equal": index_equal, "index_ok": index_ok,
            "nan_where_reference": nan_match, "all_written": written, "guards_intact": got["guards_intact"],
            "inputs_unchanged": got["inputs_unchanged"], "kernel": got["kernel"], "vec_mask": got["vec_mask"],
            "pass": bool(ok)}


# ------------------------------------------------------------------------------------------------ sections


def section_preflight(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    from memseg_edge import kernels

    data: dict[str, Any] = {"entry_points": list(kernels.ENTRY_POINTS), "kernel_constants": {
        k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()}) for k, v in kernels.kernel_constants().items()}}
    try:
        from cuda.bindings import nvrtc
        _, major, minor = nvrtc.nvrtcVersion()
        data["nvrtc"] = f"{major}.{minor}"
    except Exception as exc:
        data["nvrtc"] = f"unavailable ({exc})"
    if run.dry_run:
        import torch  # noqa: F401  (the import is part of the check)
        return data
    import torch
    if not torch.cuda.is_available():
        state["no_gpu"] = True
        raise RuntimeError("no CUDA GPU visible to PyTorch")
    gpu = Gpu(run)
    state["gpu"] = gpu
    p = gpu.props
    data.update({
        "gpu": p.name, "arch": gpu.arch, "sm_count": p.multi_processor_count,
        "l2_bytes": int(getattr(p, "L2_cache_size", 0)), "memory_bytes": int(p.total_memory),
        "driver_cuda": f"{gpu.driver_version[0]}.{gpu.driver_version[1]}",
        "compiler": gpu.kernel.compiler, "compiler_version": list(gpu.kernel.version), "ptx_isa": gpu.kernel.ptx_isa,
        "cubin_bytes": len(gpu.kernel.cubin or b""), "ptx_bytes": len(gpu.kernel.ptx), "compile_s": round(gpu.compile_s, 2),
        "cached": gpu.kernel.cached, "loaded": gpu.launcher.kind, "ptx_jit_loaded": True,
        "functions": gpu.function_attributes()})
    return data


def section_numerics(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    from memseg_edge import kernels
    from memseg_edge.kernels.emulate import emulate
    from memseg_edge.kernels.reference import memory_step

    cases = numeric_cases()
    rows = []
    for case in cases:
        step = kernels.MemoryStep(case["levels"], case["samples"], case["selection"])
        half = case["dtype"] == "fp16"
        g = kernels.plan_geometry(step, case["batch"], half, state["gpu"].props.multi_processor_count
                                  if "gpu" in state else kernels.DEFAULT_SM_COUNT)
        row = {k: case[k] for k in ("id", "shape", "samples", "selection", "dtype", "batch", "data", "offset", "module")}
        row.update({"tile": g.tile, "tiles": g.tiles, "groups": g.groups, "parts": g.n_parts, "chunks": sum(g.chunks)})
        rng = np.random.default_rng(len(rows))
        feats, banks = make_case_data(case, rng)
        if run.dry_run:
            if sum(step.sizes) * case["samples"] * case["batch"] <= 2_000_000 and case["batch"] <= 9:
                diffs, index = emulate(step, feats, banks)
                ref_diffs, ref_index = memory_step(feats, banks, case["selection"], dtype=np.float64)
                row["plan_replayed"] = bool(np.array_equal(index, ref_index))
                if case["data"] != "random" and not row["plan_replayed"]:
                    run.fail(f"numerics: {case['id']}: the plan replayed in numpy disagrees with the reference")
            rows.append(row)
            continue
        run.check_budget(5)
        gpu = state["gpu"]
        launcher = gpu.launcher if case["module"] == "cubin" else gpu.ptx_launcher
        got = run_kernel_case(gpu, step, feats, banks, half, case["offset"], launcher)
        row.update(compare(case, feats, banks, got))
        if not row["pass"]:
            run.fail(f"numerics: {case['id']}: " + ", ".join(f"{k}={row[k]}" for k in (
                "max_rel_err", "bound", "index_ok", "nan_where_reference", "all_written", "guards_intact",
                "inputs_unchanged")))
        rows.append(row)
    tiles = sorted({r["tile"] for r in rows})
    summary = {"cases": len(rows), "tiles": tiles, "passed": sum(1 for r in rows if r.get("pass")),
               "worst_rel_err": {d: max([r.get("max_rel_err") or 0.0 for r in rows if r["dtype"] == d] or [0.0])
                                 for d in ("fp32", "fp16")}}
    run.log(f"numerics: {summary}")
    return {"cases": rows, "summary": summary}


def section_plugin(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    from memseg_edge import kernels, plugin
    from memseg_edge.kernels.reference import memory_step

    trt = plugin.stand_in_trt()
    _, creator_cls = plugin.plugin_classes(trt)
    levels = NUMERIC_LEVELS["3levels-mobilenet64"]
    step = kernels.MemoryStep(levels, 30, "sum")
    fields = plugin.fields_of(step)
    fc = trt.PluginFieldCollection(
        [trt.PluginField(k, np.asarray(fields[k], np.int32), trt.PluginFieldType.INT32) for k in plugin.INT_FIELDS]
        + [trt.PluginField("selection", np.frombuffer(b"sum\0", np.int8), trt.PluginFieldType.CHAR)])
    data: dict[str, Any] = {"batches": [3, 8], "levels": levels, "samples": 30, "stages": []}
    built = creator_cls().create_plugin("memory", fc, trt.TensorRTPhase.BUILD)
    data["stages"].append("create(build)")
    dyn = [trt.dynamic_desc([-1, *lv], trt.DataType.FLOAT, max_dims=[8, *lv]) for lv in levels]
    banks_d = [trt.dynamic_desc([30, *lv], trt.DataType.FLOAT) for lv in levels]
    outs_d = dyn + [trt.dynamic_desc([-1], trt.DataType.INT32, max_dims=[8])]
    built.configure_plugin(dyn + banks_d, outs_d)
    ws_bytes = built.get_workspace_size(dyn + banks_d, outs_d)
    runtime = creator_cls().create_plugin("memory", built.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    data["stages"] += ["configure", "serialise", "create(runtime)"]
    if runtime.num_outputs != 4 or runtime.step != step:
        run.fail("plugin: the re-created plugin differs from the built one")
    if run.dry_run:
        data["workspace_bytes"] = ws_bytes
        return data
    torch = state["gpu"].torch
    attached = runtime.attach_to_context(object())
    data["stages"].append("attach")
    data["loaded"] = attached._launcher.kind
    rng = np.random.default_rng(7)
    stream = torch.cuda.Stream()
    ws = torch.empty(ws_bytes // 4 + 1, dtype=torch.float32, device="cuda")
    for batch in data["batches"]:
        bank_np = [rng.standard_normal((30, *lv)).astype(np.float32) for lv in levels]
        pick = rng.integers(0, 30, batch)
        feat_np = [(b[pick] + rng.normal(0, 0.5, b[pick].shape)).astype(np.float32) for b in bank_np]
        feats = [torch.from_numpy(f).cuda() for f in feat_np]
        banks = [torch.from_numpy(b).cuda() for b in bank_np]
        diffs = [torch.full_like(f, float("nan")) for f in feats]
        index = torch.full((batch,), -1, dtype=torch.int32, device="cuda")
        descs = [trt.desc(list(f.shape), trt.DataType.FLOAT) for f in feats + banks]
        out_descs = [trt.desc(list(d.shape), trt.DataType.FLOAT) for d in diffs] + [trt.desc([batch], trt.DataType.INT32)]
        attached.on_shape_change(descs, out_descs)
        inputs = [t.data_ptr() for t in feats + banks]
        outputs = [t.data_ptr() for t in diffs] + [index.data_ptr()]
        torch.cuda.synchronize()
        attached.enqueue(descs, out_descs, inputs, outputs, ws.data_ptr(), stream.cuda_stream)
        stream.synchronize()
        ref, ref_index = memory_step(feat_np, bank_np, "sum", dtype=np.float64)
        got = [d.cpu().numpy().astype(np.float64) for d in diffs]
        rel = max(float(np.max(np.abs(g - r) / np.maximum(np.abs(r), 1e-30))) for g, r in zip(got, ref))
        same = bool(np.array_equal(index.cpu().numpy(), ref_index))
        data[f"batch{batch}"] = {"max_rel_err": rel, "index_equal": same}
        if rel > BOUND["fp32"] or not same:
            run.fail(f"plugin: enqueue at batch {batch} on a torch stream: max rel err {rel:.2e}, index equal {same}")
        # Host cost of a cached enqueue (planning and packing done once for these pointers).
        n_calls = 300
        t0 = time.perf_counter()
        for _ in range(n_calls):
            attached.enqueue(descs, out_descs, inputs, outputs, ws.data_ptr(), stream.cuda_stream)
        host_us = (time.perf_counter() - t0) / n_calls * 1e6
        stream.synchronize()
        data[f"batch{batch}"]["host_us_per_enqueue"] = round(host_us, 2)
    data["stages"] += ["shape change", "enqueue x2 batches"]
    run.log(f"plugin: {data}")
    return data


def make_split_bundle(work: Path, run: Run) -> Path:
    """A bundle of a random-weight MobileNetV2 MemSeg at 64 x 64 whose memory bank holds real features."""
    import torch

    import_train_package()
    from memseg_edge.train.checkpoint import save_checkpoint
    from memseg_edge.train.config import MemSegConfig, apply_overrides
    from memseg_edge.train.export import export_bundle
    from memseg_edge.train.torch_model import MemSeg

    torch.manual_seed(0)
    cfg = apply_overrides(MemSegConfig(), {"data.image_size": 64, "model.backbone": "mobilenet_v2",
                                           "model.backbone_weights": "none", "model.memory_samples": 8,
                                           "model.memory_selection": "sum",
                                           "model.standardise_images": False})  # the fused kernel's step
    model = MemSeg(cfg.model, 64, weights=None).eval()
    images = torch.rand(8, 3, 64, 64)
    model.memory.fill(model.memory_features(images))
    ckpt = save_checkpoint(work / "checkpoint.pt", model, cfg, iteration=0, threshold=None,
                           data={"training_list_sha256": "0" * 64, "category": "gpu-check"}, backbone_weights="none")
    return export_bundle(ckpt, work / "bundle", verify=False, log=run.log)


def section_bundle_split(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from memseg_edge import kernels
    from memseg_edge.kernels.reference import memory_step

    work = Path(tempfile.mkdtemp(prefix="gpu_check_bundle-"))
    bundle = make_split_bundle(work, run)
    meta = json.loads((bundle / "model.json").read_text())
    mem = meta["memory_subgraph"]
    model = onnx.load(str(bundle / "model.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    first = onnx.utils.Extractor(inferred).extract_model(["image"], mem["inputs"])
    second = onnx.utils.Extractor(inferred).extract_model(["image"] + mem["outputs"], ["anomaly_map", "score"])
    if any(n.name.startswith(mem["node_prefix"]) for n in second.graph.node):
        raise RuntimeError("the second half still holds memory-step nodes: the boundary is not where model.json says")
    for half_model in (first, second):
        half_model.ir_version = min(half_model.ir_version, 10)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    banks = [inits[b] for b in mem["bank_initializers"]]
    providers = ["CPUExecutionProvider"]
    whole = ort.InferenceSession(str(bundle / "model.onnx"), providers=providers)
    s1 = ort.InferenceSession(first.SerializeToString(), providers=providers)
    s2 = ort.InferenceSession(second.SerializeToString(), providers=providers)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    amap, score = whole.run(["anomaly_map", "score"], {"image": images})
    feats = s1.run(mem["inputs"], {"image": images})
    step = kernels.MemoryStep(tuple(tuple(int(v) for v in b.shape[1:]) for b in banks), len(banks[0]),
                              meta.get("memory_selection", "sum"))
    data: dict[str, Any] = {"bundle": str(bundle), "levels": step.levels, "samples": step.samples, "batch": 3,
                            "first_half_nodes": len(first.graph.node), "second_half_nodes": len(second.graph.node)}
    if run.dry_run:
        ref, _ = memory_step(feats, banks, step.selection)
        amap2, score2 = s2.run(["anomaly_map", "score"], {"image": images, **dict(zip(mem["outputs"], ref))})
        data["reference_between_halves"] = {"map_max_abs": float(np.abs(amap2 - amap).max()),
                                            "score_max_abs": float(np.abs(score2 - score).max())}
        return data
    gpu = state["gpu"]
    got = run_kernel_case(gpu, step, feats, banks, False, False, gpu.launcher)
    amap2, score2 = s2.run(["anomaly_map", "score"], {"image": images, **dict(zip(mem["outputs"], got["diffs"]))})
    data["map_max_abs"] = float(np.abs(amap2 - amap).max())
    data["score_max_abs"] = float(np.abs(score2 - score).max())
    data["guards_intact"] = got["guards_intact"]
    if not (data["map_max_abs"] <= 1e-4 and data["score_max_abs"] <= 1e-4 and got["guards_intact"]):
        run.fail(f"bundle_split: kernel between the halves vs the whole bundle: map {data['map_max_abs']:.2e}, "
                 f"score {data['score_max_abs']:.2e}")
    run.log(f"bundle_split: map {data['map_max_abs']:.2e}, score {data['score_max_abs']:.2e}")
    return data


def _graph(torch, fn):
    """A CUDA graph of ``fn`` (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def timed_replays(torch, graph, flush, reps: int) -> dict[str, float]:
    """Median and p90 (ms) of CUDA-event-timed replays, ``flush`` (a 256 MB write) before each."""
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.fill_(1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    arr = np.array(times)
    return {"median_ms": float(np.median(arr)), "p90_ms": float(np.percentile(arr, 90)), "reps": reps}


def copy_bandwidth(torch, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written (median of 10)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del src, dst
    return 2 * nbytes / (float(np.median(times)) * 1e-3) / 1e9


def section_timings(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    from memseg_edge import kernels

    cases = timing_cases()
    rows = []
    for case in cases:
        step = kernels.MemoryStep(case["levels"], case["samples"])
        half = case["dtype"] == "fp16"
        g = kernels.plan_geometry(step, case["batch"], half)
        itemsize = 2 if half else 4
        traffic = (step.bank_bytes(itemsize) + 2 * case["batch"] * sum(step.sizes) * itemsize + 4 * case["batch"])
        rows.append({**{k: case[k] for k in ("shape", "dtype", "batch", "samples")}, "tile": g.tile,
                     "launch1_blocks": g.launch1_blocks, "launch2_blocks": sum(g.chunks) * case["batch"],
                     "bytes_counted": traffic})
    if run.dry_run:
        return {"rows": rows, "flush_bytes": FLUSH_BYTES}
    gpu = state["gpu"]
    torch = gpu.torch
    import_train_package()
    from memseg_edge.train.memory import MemoryBank

    copy_gbs = copy_bandwidth(torch)
    run.log(f"timings: device copy {copy_gbs:.0f} GB/s (read + write)")
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    reps = 40
    for row, case in zip(rows, cases):
        run.check_budget(20)
        step = kernels.MemoryStep(case["levels"], case["samples"])
        half = case["dtype"] == "fp16"
        dtype = torch.float16 if half else torch.float32
        gen = torch.Generator(device="cuda").manual_seed(case["batch"])
        banks = [torch.randn(30, *lv, device="cuda", generator=gen).to(dtype) for lv in case["levels"]]
        pick = torch.randint(0, 30, (case["batch"],), device="cuda", generator=gen)
        feats = [(b[pick].float() + 0.5 * torch.randn(case["batch"], *b.shape[1:], device="cuda", generator=gen)).to(dtype)
                 for b in banks]
        outs = [torch.empty_like(f) for f in feats]
        index = torch.empty(step.index_shape(case["batch"]), dtype=torch.int32, device="cuda")
        ws = torch.empty(step.workspace_bytes(case["batch"]) // 4, dtype=torch.float32, device="cuda")
        launches = kernels.plan_launches(step, case["batch"], half, [f.data_ptr() for f in feats],
                                         [b.data_ptr() for b in banks], [o.data_ptr() for o in outs],
                                         index.data_ptr(), ws.data_ptr(), sm_count=gpu.launcher.sm_count)
        prepared = gpu.launcher.prepare(launches)
        both = timed_replays(torch, _graph(torch, lambda: gpu.launcher.run(prepared, gpu.stream())), flush, reps)
        first = timed_replays(torch, _graph(torch, lambda: gpu.launcher.run(prepared[:1], gpu.stream())), flush, reps)
        second = timed_replays(torch, _graph(torch, lambda: gpu.launcher.run(prepared[1:], gpu.stream())), flush, reps)
        mb = MemoryBank(list(case["levels"]), 30, "sum").to("cuda", dtype)
        for buf, b in zip(mb.banks(), banks):
            buf.copy_(b)
        with torch.no_grad():
            std = timed_replays(torch, _graph(torch, lambda: mb(feats)), flush, reps)
        gbs = row["bytes_counted"] / (both["median_ms"] * 1e-3) / 1e9
        row.update({"kernel": both, "launch1": first, "launch2": second, "standard_ops": std,
                    "gbs": round(gbs, 1), "copy_gbs": round(copy_gbs, 1), "pct_of_copy": round(100 * gbs / copy_gbs, 1),
                    "speedup_vs_standard_ops": round(std["median_ms"] / both["median_ms"], 2)})
        run.log(f"timings: {case['shape']} {case['dtype']} b{case['batch']}: kernel {both['median_ms']:.4f} ms "
                f"(p90 {both['p90_ms']:.4f}; launch1 {first['median_ms']:.4f}, launch2 {second['median_ms']:.4f}), "
                f"{gbs:.0f} GB/s = {row['pct_of_copy']:.0f} % of copy; standard ops {std['median_ms']:.4f} ms "
                f"-> {row['speedup_vs_standard_ops']:.1f}x")
        if case["shape"] == "resnet18" and case["batch"] in (1, 32):   # the planner's one knob, for tuning
            row["blocks_per_sm_sweep"] = {}
            for per_sm in BLOCKS_PER_SM_SWEEP:
                swept = gpu.launcher.prepare(kernels.plan_launches(
                    step, case["batch"], half, [f.data_ptr() for f in feats], [b.data_ptr() for b in banks],
                    [o.data_ptr() for o in outs], index.data_ptr(), ws.data_ptr(), sm_count=gpu.launcher.sm_count,
                    blocks_per_sm=per_sm))
                t = timed_replays(torch, _graph(torch, lambda: gpu.launcher.run(swept, gpu.stream())), flush, 20)
                row["blocks_per_sm_sweep"][str(per_sm)] = t["median_ms"]
            run.log(f"timings: blocks per SM -> median ms {row['blocks_per_sm_sweep']}")
        del feats, banks, outs, mb
    return {"rows": rows, "copy_gbs": round(copy_gbs, 1), "flush_bytes": FLUSH_BYTES,
            "blocks_per_sm_default": kernels.TARGET_BLOCKS_PER_SM}


def section_model(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    import torch

    import_train_package()
    from memseg_edge.train.config import MemSegConfig, apply_overrides
    from memseg_edge.train.torch_model import MemSeg

    plans = [{"backbone": b, "memory": m, "batch": n} for b in SHAPES for m in ("standard_ops", "fused_kernel")
             for n in (1, 32)]
    models = {}
    for backbone in SHAPES:
        cfg = apply_overrides(MemSegConfig(), {"model.backbone": backbone, "model.backbone_weights": "none",
                                               "data.image_size": 256, "model.memory_selection": "sum",
                                               "model.standardise_images": False})
        model = MemSeg(cfg.model, 256, weights=None).eval()
        got = [tuple(b.shape[1:]) for b in model.memory.banks()]
        if got != list(SHAPES[backbone]):
            run.fail(f"model: {backbone}'s memory levels are {got}, the timing shapes say {SHAPES[backbone]}")
        models[backbone] = model
    if run.dry_run:
        return {"rows": plans, "image_size": 256}
    gpu = state["gpu"]
    from memseg_edge import kernels

    rows = []
    for backbone, model in models.items():
        model = model.to("cuda").half().to(memory_format=torch.channels_last)
        with torch.no_grad():
            model.memory.fill([torch.randn_like(b) for b in model.memory.banks()])
        standard_forward = model.memory.forward
        step = kernels.MemoryStep(tuple(SHAPES[backbone]), model.memory.banks()[0].shape[0], model.memory.selection)
        # channels_last reaches the 4-D bank buffers too; the kernel reads NCHW rows: contiguous copies, once.
        nchw_banks = [b.contiguous() for b in model.memory.banks()]

        def fused_forward(feats, _step=step, _banks=nchw_banks):
            feats = [f.contiguous() for f in feats]
            n = feats[0].shape[0]
            outs = [torch.empty_like(f) for f in feats]
            index = torch.empty(_step.index_shape(n), dtype=torch.int32, device="cuda")
            ws = torch.empty(_step.workspace_bytes(n) // 4, dtype=torch.float32, device="cuda")
            gpu.launcher.run(kernels.plan_launches(
                _step, n, True, [f.data_ptr() for f in feats], [b.data_ptr() for b in _banks],
                [o.data_ptr() for o in outs], index.data_ptr(), ws.data_ptr(), sm_count=gpu.launcher.sm_count),
                torch.cuda.current_stream().cuda_stream)
            return outs, index

        for plan in [p for p in plans if p["backbone"] == backbone]:
            run.check_budget(25)
            model.memory.forward = standard_forward if plan["memory"] == "standard_ops" else fused_forward
            x = torch.rand(plan["batch"], 3, 256, 256, device="cuda").half().to(memory_format=torch.channels_last)
            with torch.no_grad():
                graph = _graph(torch, lambda: model(x))
                t = timed_replays(torch, graph, None, 30 if plan["batch"] == 1 else 15)
            row = {**plan, **t, "images_per_s": round(plan["batch"] / (t["median_ms"] * 1e-3), 1)}
            rows.append(row)
            run.log(f"model: {backbone} {plan['memory']} b{plan['batch']}: {t['median_ms']:.3f} ms "
                    f"(p90 {t['p90_ms']:.3f}), {row['images_per_s']:.0f} images/s")
        model.memory.forward = standard_forward
        del model
        torch.cuda.empty_cache()
    return {"rows": rows, "image_size": 256, "precision": "fp16", "memory_format": "channels_last"}


# ------------------------------------------------------------------------------------------------ schema


SECTION_KEYS = {"preflight": ("entry_points", "nvrtc"), "numerics": ("cases", "summary"),
                "plugin": ("stages", "batches"), "bundle_split": ("levels", "samples", "batch"),
                "timings": ("rows",), "model": ("rows",)}
GPU_KEYS = {"preflight": ("gpu", "arch", "sm_count", "l2_bytes", "driver_cuda", "ptx_isa", "loaded", "functions"),
            "timings": ("copy_gbs",), "bundle_split": ("map_max_abs", "score_max_abs")}


def validate(result: dict[str, Any]) -> list[str]:
    """Problems with a result's shape (empty: valid). The same rules for a dry run and a GPU run, plus the
    GPU figures when the run was on a GPU and the section passed."""
    problems = []
    for key, kind in (("schema", str), ("schema_version", int), ("dry_run", bool), ("started", str),
                      ("elapsed_s", (int, float)), ("status", str), ("exit_code", int), ("environment", dict),
                      ("kernel", dict), ("sections", dict), ("failures", list), ("errors", list)):
        if not isinstance(result.get(key), kind):
            problems.append(f"{key}: expected {kind}, found {type(result.get(key)).__name__}")
    if problems:
        return problems
    if result["schema"] != SCHEMA or result["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema {result['schema']} v{result['schema_version']}")
    if set(result["sections"]) != set(SECTIONS):
        problems.append(f"sections {sorted(result['sections'])}, expected {sorted(SECTIONS)}")
    for name, section in result["sections"].items():
        status = section.get("status")
        if status not in STATUSES:
            problems.append(f"{name}: status {status!r}")
            continue
        if not isinstance(section.get("elapsed_s"), (int, float)):
            problems.append(f"{name}: no elapsed_s")
        if status in ("pass", "fail", "dry_run"):
            problems += [f"{name}: missing {k}" for k in SECTION_KEYS.get(name, ()) if k not in section]
        if status in ("pass", "fail") and not result["dry_run"]:
            problems += [f"{name}: missing {k}" for k in GPU_KEYS.get(name, ()) if k not in section]
        if status in ("skipped", "error") and not section.get("reason"):
            problems.append(f"{name}: {status} without a reason")
    for row in result["sections"].get("numerics", {}).get("cases", []):
        for k in ("id", "dtype", "batch", "tile", "selection", "samples"):
            if k not in row:
                problems.append(f"numerics case {row.get('id')}: missing {k}")
    return problems


# ------------------------------------------------------------------------------------------------ main


def summary_table(result: dict[str, Any]) -> str:
    lines = ["| section | status | seconds | note |", "| --- | --- | ---: | --- |"]
    for name in SECTIONS:
        s = result["sections"][name]
        note = s.get("reason", "")
        if name == "numerics" and "summary" in s:
            note = f"{s['summary']['passed']}/{s['summary']['cases']} cases, tiles {s['summary']['tiles']}"
        lines.append(f"| {name} | {s['status']} | {s.get('elapsed_s', 0):.1f} | {note[:100]} |")
    rows = result["sections"]["timings"].get("rows", [])
    if rows and "kernel" in rows[0]:
        lines += ["", "| shape | I/O | batch | kernel ms (median / p90) | launch 1 / 2 ms | GB/s | % of copy | "
                  "standard ops ms | speed-up |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if "kernel" in r:
                lines.append(f"| {r['shape']} | {r['dtype']} | {r['batch']} | {r['kernel']['median_ms']:.4f} / "
                             f"{r['kernel']['p90_ms']:.4f} | {r['launch1']['median_ms']:.4f} / "
                             f"{r['launch2']['median_ms']:.4f} | {r['gbs']:.0f} | {r['pct_of_copy']:.0f} % | "
                             f"{r['standard_ops']['median_ms']:.4f} | {r['speedup_vs_standard_ops']:.1f}x |")
    mrows = result["sections"]["model"].get("rows", [])
    if mrows and "median_ms" in mrows[0]:
        lines += ["", "| backbone | memory step | batch | ms (median / p90) | images/s |", "| --- | --- | ---: | ---: | ---: |"]
        for r in mrows:
            lines.append(f"| {r['backbone']} | {r['memory']} | {r['batch']} | {r['median_ms']:.3f} / {r['p90_ms']:.3f} "
                         f"| {r['images_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for the JSON and log")
    ap.add_argument("--dry-run", action="store_true", help="run on the CPU up to the first CUDA call")
    ap.add_argument("--budget-s", type=float, default=510.0, help="internal time budget (the run stops at it)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1" if args.dry_run else "8")
    run = Run(Path(args.out), args.dry_run, args.budget_s)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")

    def on_alarm(signum, frame):
        raise BudgetExceeded(f"the {args.budget_s:.0f} s budget ran out")

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(int(args.budget_s) + 15)   # a section stuck in one call: the watchdog stops the run
    state: dict[str, Any] = {}
    timed_out = False
    try:
        run.result["environment"] = versions()
        from memseg_edge import kernels
        run.result["kernel"] = {"source_sha256": kernels.source_sha256(), "entry_points": list(kernels.ENTRY_POINTS)}
        run.log(f"gpu_check {'(dry run) ' if args.dry_run else ''}-> {run.out}; {run.result['environment']}")
        sections = {"preflight": (section_preflight, 10), "numerics": (section_numerics, 30),
                    "plugin": (section_plugin, 10), "bundle_split": (section_bundle_split, 40),
                    "timings": (section_timings, 60), "model": (section_model, 60)}
        for name in SECTIONS:
            if name not in wanted:
                run.result["sections"][name].update({"status": "skipped", "reason": "not asked for (--sections)"})
                continue
            if name != "preflight" and not args.dry_run and "gpu" not in state:
                run.result["sections"][name].update({"status": "skipped", "reason": "no GPU (preflight failed)"})
                continue
            fn, need = sections[name]
            run_section(run, name, lambda fn=fn: fn(run, state), need)
    except BudgetExceeded as exc:
        timed_out = True
        run.result["errors"].append(f"watchdog: {exc}")
        run.log(f"watchdog: {exc}")
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
    statuses = {s["status"] for s in run.result["sections"].values()}
    if run.result["failures"]:
        code = EXIT_NUMERIC
    elif state.get("no_gpu"):
        code = EXIT_NO_GPU
    elif timed_out or any("time budget" in s.get("reason", "") for s in run.result["sections"].values()):
        code = EXIT_TIMEOUT
    elif "error" in statuses or run.result["errors"]:
        code = EXIT_ERROR
    else:
        code = EXIT_PASS
    run.result["exit_code"] = code
    run.result["status"] = {EXIT_PASS: "dry_run" if args.dry_run else "pass", EXIT_NUMERIC: "fail",
                            EXIT_NO_GPU: "error", EXIT_TIMEOUT: "timeout", EXIT_ERROR: "error"}[code]
    problems = validate(run.result)
    run.result["schema_problems"] = problems
    path = run.write()
    run.log("\n" + summary_table(run.result))
    if problems:
        run.log(f"schema problems: {problems}")
        code = code or EXIT_ERROR
    run.log(f"{run.result['status']}: exit {code}; {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
