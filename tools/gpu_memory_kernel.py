#!/usr/bin/env python3
"""The fused memory-bank kernel on an NVIDIA GPU, in one run (issue 4): compile, check, time.

1. Compiles ``memseg_edge/kernels/memory_argmin_l2.cu`` to PTX for this GPU (NVRTC via cuda-python,
   else nvcc; cached).
2. Checks it against the numpy reference (``memseg_edge.kernels.reference``) on fresh random inputs at
   every batch size, FP32 and FP16, both selections: outputs and workspace poisoned (NaN, index -1)
   before each run, every element checked; FP32 relative error <= 1e-5, FP16 <= 1e-2 (relative to
   max(|ref|, 2^-14) for FP16, where float16 stops being normal), index exact. Exits 1 on a failure.
3. Times it (CUDA events, CUDA graphs so Python's launch overhead is not measured) against the
   standard-op version (``train.memory.MemoryBank``: matmul expansion, argmin, gather, squared difference)
   in PyTorch on the same GPU at batch 1, 8, 32, and the device-to-device copy bandwidth; prints a
   markdown table for BENCHMARKS.md.

Launches through the same launch plan as the TensorRT plugin (``memseg_edge.kernels.plan_launches``),
with cuda-python's driver API where installed (the plugin's launcher), else CuPy's RawModule. Needs
PyTorch with CUDA; no TensorRT.

    python tools/gpu_memory_kernel.py [--levels 64x64x64,128x32x32,256x16x16] [--samples 30]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memseg_edge import kernels  # noqa: E402
from memseg_edge.kernels.reference import memory_step  # noqa: E402

RESNET18_256 = "64x64x64,128x32x32,256x16x16"   # ResNet18 levels at 256x256: 458,752 values per image


def memory_bank_class():
    try:
        from memseg_edge.train.memory import MemoryBank
    except ImportError:  # not installed: load the trainer's module from the checkout
        spec = importlib.util.spec_from_file_location("memseg_train_memory", ROOT / "train" / "memory.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        MemoryBank = mod.MemoryBank
    return MemoryBank


class Runner:
    """Launches a plan on a CUDA stream handle, with cuda-python's driver API or CuPy."""

    def __init__(self, ptx: kernels.CompiledKernel):
        self.kind = None
        try:
            from cuda.bindings import driver
            driver.cuInit(0)
            self.launcher = kernels.DriverLauncher(ptx.ptx)
            self.kind = "cuda-python driver API"
        except ImportError:
            import cupy as cp
            self.cp = cp
            self.module = cp.RawModule(path=str(ptx.path))
            self.functions = {n: self.module.get_function(n) for n in kernels.ENTRY_POINTS}
            self.kind = "CuPy RawModule"

    def run(self, launches, stream: int) -> None:
        if self.kind.startswith("cuda-python"):
            self.launcher.run(launches, stream)
            return
        import ctypes
        as_numpy = {ctypes.c_void_p: np.uint64, ctypes.c_longlong: np.int64, ctypes.c_int: np.int32}
        with self.cp.cuda.ExternalStream(stream):
            for launch in launches:
                args = tuple(as_numpy[t](v) for v, t in launch.args)
                self.functions[launch.kernel](launch.grid, launch.block, args)


def parse_levels(text: str) -> tuple[tuple[int, int, int], ...]:
    return tuple(tuple(int(v) for v in part.split("x")) for part in text.split(","))


def make_inputs(torch, step, batch, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    banks = [torch.randn(step.samples, *lv, device="cuda", generator=g).to(dtype) for lv in step.levels]
    pick = torch.randint(0, step.samples, (batch,), device="cuda", generator=g)
    feats = [(b[pick].float() + 0.5 * torch.randn(batch, *b.shape[1:], device="cuda", generator=g)).to(dtype)
             for b in banks]
    return feats, banks


def run_kernel(torch, runner, step, feats, banks, outs, index, workspace, half):
    launches = kernels.plan_launches(step, feats[0].shape[0], half, [f.data_ptr() for f in feats],
                                     [b.data_ptr() for b in banks], [o.data_ptr() for o in outs],
                                     index.data_ptr(), workspace.data_ptr())
    runner.run(launches, torch.cuda.current_stream().cuda_stream)


def check(torch, runner, step, batch, half, seed) -> tuple[float, bool]:
    dtype = torch.float16 if half else torch.float32
    feats, banks = make_inputs(torch, step, batch, dtype, seed)
    outs = [torch.full_like(f, float("nan")) for f in feats]
    index = torch.full(step.index_shape(batch), -1, dtype=torch.int32, device="cuda")
    workspace = torch.full((step.workspace_bytes(batch) // 4,), float("nan"), device="cuda")
    run_kernel(torch, runner, step, feats, banks, outs, index, workspace, half)
    torch.cuda.synchronize()
    np_feats = [f.cpu().numpy() for f in feats]
    np_banks = [b.cpu().numpy() for b in banks]
    ref, ref_index = memory_step(np_feats, np_banks, step.selection, dtype=np.float64)
    floor = 2.0 ** -14 if half else 1e-30
    worst = 0.0
    for o, r in zip(outs, ref):
        got = o.float().cpu().numpy().astype(np.float64)
        if not np.isfinite(got).all():
            return float("inf"), False
        worst = max(worst, float(np.max(np.abs(got - r) / np.maximum(np.abs(r), floor))))
    return worst, bool(np.array_equal(index.cpu().numpy(), ref_index))


def time_graph(torch, fn, iters: int = 50) -> float:
    """Mean time of ``iters`` replays of a CUDA graph of ``fn``, in ms."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def time_eager(torch, fn, iters: int = 50) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth(torch, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_eager(torch, lambda: dst.copy_(src), iters=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default=RESNET18_256, help="C x H x W per level, comma separated")
    ap.add_argument("--samples", type=int, default=30, help="memory samples M (the paper: 30)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()

    import torch
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to PyTorch", file=sys.stderr)
        return 2
    torch.zeros(1, device="cuda")  # create the primary context before loading modules into it
    props = torch.cuda.get_device_properties(0)
    arch = f"sm_{props.major}{props.minor}"
    t0 = time.perf_counter()
    ptx = kernels.compile_ptx(arch)
    print(f"GPU: {props.name} ({arch}), torch {torch.__version__}; PTX {len(ptx.ptx)} B by {ptx.compiler} in "
          f"{time.perf_counter() - t0:.2f} s ({ptx.path})")
    runner = Runner(ptx)
    print(f"launching through {runner.kind}")
    levels = parse_levels(args.levels)
    batches = [int(b) for b in args.batches.split(",")]

    failures = []
    print("\n## Correctness (fresh random inputs, outputs poisoned, every element)\n")
    print("| selection | I/O | batch | max rel. error | bound | index exact |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for selection in ("sum", "per_level"):
        step = kernels.MemoryStep(levels, args.samples, selection)
        for half in (False, True):
            for batch in sorted(set(batches + [9])):
                rel, same = check(torch, runner, step, batch, half, seed=1000 * batch + half)
                bound = 1e-2 if half else 1e-5
                print(f"| {selection} | {'fp16' if half else 'fp32'} | {batch} | {rel:.2e} | {bound:.0e} | "
                      f"{'yes' if same else 'NO'} |")
                if rel > bound or not same:
                    failures.append((selection, half, batch, rel, same))

    copy_gbs = copy_bandwidth(torch)
    MemoryBank = memory_bank_class()
    step = kernels.MemoryStep(levels, args.samples, "sum")
    print(f"\n## Speed (selection sum, M = {args.samples}, levels {args.levels}, {sum(step.sizes):,} values per "
          f"image; device copy bandwidth {copy_gbs:.0f} GB/s read+write)\n")
    print("| I/O | batch | kernel ms | bank GB/s | % of copy | torch ms (graph) | torch ms (eager) | "
          "speed-up vs graph | speed-up vs eager |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for half in (False, True):
        dtype = torch.float16 if half else torch.float32
        for batch in batches:
            feats, banks = make_inputs(torch, step, batch, dtype, seed=batch)
            outs = [torch.empty_like(f) for f in feats]
            index = torch.empty(step.index_shape(batch), dtype=torch.int32, device="cuda")
            workspace = torch.empty((step.workspace_bytes(batch) // 4,), device="cuda")
            k_ms = time_graph(torch, lambda: run_kernel(torch, runner, step, feats, banks, outs, index, workspace,
                                                         half), args.iters)
            mb = MemoryBank(list(levels), args.samples, "sum").to("cuda", dtype)
            for buf, b in zip(mb.banks(), banks):
                buf.copy_(b)
            with torch.no_grad():
                t_graph = time_graph(torch, lambda: mb(feats), args.iters)
                t_eager = time_eager(torch, lambda: mb(feats), args.iters)
            tiles = -(-batch // kernels.TILE)
            bank_bytes = step.bank_bytes(2 if half else 4) * tiles
            gbs = bank_bytes / (k_ms * 1e-3) / 1e9
            print(f"| {'fp16' if half else 'fp32'} | {batch} | {k_ms:.3f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f} % | "
                  f"{t_graph:.3f} | {t_eager:.3f} | {t_graph / k_ms:.1f}x | {t_eager / k_ms:.1f}x |")
    print("\nbank GB/s: bank bytes x ceil(batch / 8) tiles over the kernel's time (all three launches); "
          "% of copy: of the measured device-to-device copy bandwidth (read + write).")
    if failures:
        print(f"\nFAILED: {failures}", file=sys.stderr)
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
