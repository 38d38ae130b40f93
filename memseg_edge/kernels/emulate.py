"""The fused kernel's two launches replayed on the CPU, from the launch plan's own arguments: in numpy, block
by block (:func:`emulate`), and as the kernel's own CUDA source compiled for the CPU with every CUDA thread a
fiber (:func:`build_host_emulation`, :func:`run_host_emulation`; host_emulation.h).

What it checks without a GPU: that a plan's grid and arguments make launch 1 cover every element of every
level exactly once per sample group, write every (image, sample, part) partial sum that launch 2 reads and
no other, and make launch 2 write every diff element exactly once and every index entry; and that the
selection launch 2 makes from those partials (double sums in part order, NaN first, ties to the lowest
index) is reference.py's. It mirrors the .cu file's index arithmetic (the same names), not its floating-
point order: sums here are float64, so the result is compared with the reference exactly, not to a
tolerance. tests/test_kernel.py runs it for every tile; the GPU check runs the real kernel.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np

from . import MAX_LEVELS, MemoryStep, kernel_constants, plan_launches

GRID_LIMITS = (2**31 - 1, 65535, 65535)


class PlanError(AssertionError):
    """A launch plan that would read or write the wrong elements."""


def _args(launch) -> list[int]:
    return [int(v) for v, _ in launch.args]


def _level(i: int, first1: int, first2: int) -> tuple[int, int]:
    level = 0 if i < first1 else (1 if i < first2 else 2)
    return level, i - (0 if level == 0 else (first1 if level == 1 else first2))


def emulate(step: MemoryStep, features: Sequence[np.ndarray], banks: Sequence[np.ndarray], sm_count: int = 132
            ) -> tuple[list[np.ndarray], np.ndarray]:
    """Run the plan for ``features`` (``[N, C, H, W]`` per level) and ``banks`` (``[M, C, H, W]``) -> (diffs in
    float64, index int32), raising :class:`PlanError` on a coverage fault."""
    n_levels = len(step.levels)
    batch = len(features[0])
    half = np.asarray(features[0]).dtype == np.float16
    # Fake, distinct, 16-byte aligned "pointers": one per buffer, so the arguments name the buffers.
    ptr = {name: 4096 * (i + 1) for i, name in enumerate(
        [f"x{l}" for l in range(n_levels)] + [f"b{l}" for l in range(n_levels)] + [f"y{l}" for l in range(n_levels)]
        + ["index", "workspace"])}
    by_ptr = {v: k for k, v in ptr.items()}
    launches = plan_launches(step, batch, half, [ptr[f"x{l}"] for l in range(n_levels)],
                             [ptr[f"b{l}"] for l in range(n_levels)], [ptr[f"y{l}"] for l in range(n_levels)],
                             ptr["index"], ptr["workspace"], sm_count=sm_count)
    if len(launches) != 2:
        raise PlanError(f"expected two launches, found {[l.kernel for l in launches]}")
    first, second = launches
    for launch in launches:
        if any(g < 1 or g > lim for g, lim in zip(launch.grid, GRID_LIMITS)):
            raise PlanError(f"{launch.kernel}: grid {launch.grid} outside CUDA's limits")
    k = kernel_constants()
    tile = int(first.kernel.rsplit("_t", 1)[1])
    rows = k["ROWS"][tile]
    vector = 8 if half else 4
    x = [np.asarray(f, np.float64).reshape(batch, -1) for f in features]
    b = [np.asarray(m, np.float64).reshape(len(m), -1) for m in banks]

    # ---- launch 1: memseg_l2_<io>_t<tile>(x0..2, b0..2, d0..2, p1, p2, n_parts, spp0..2, vec_mask, n_images,
    #      n_samples, m_per_group, partial)
    a = _args(first)
    xs, bs, ds = a[0:3], a[3:6], a[6:9]
    p1, p2, n_parts, spp0, spp1, spp2, _mask, n_images, n_samples, m_per_group, partial_ptr = a[9:20]
    if n_images != batch or n_samples != step.samples or by_ptr.get(partial_ptr) != "workspace":
        raise PlanError("launch 1's image count, sample count or workspace is wrong")
    if n_parts * n_samples * batch * 4 > step.workspace_bytes(batch):
        raise PlanError(f"{n_parts} parts overflow the workspace of {step.workspace_bytes(batch)} bytes")
    if m_per_group * tile > k["ACC_SLOTS"]:
        raise PlanError(f"{m_per_group} samples x tile {tile} overflow the shared accumulators")
    groups, parts_grid, tiles = first.grid
    if parts_grid != n_parts or groups * m_per_group < n_samples or (groups - 1) * m_per_group >= n_samples:
        raise PlanError(f"launch 1 grid {first.grid} does not match {n_parts} parts and groups of {m_per_group}")
    if tiles * tile < batch or (tiles - 1) * tile >= batch:
        raise PlanError(f"{tiles} tiles of {tile} do not cover batch {batch}")
    partial = np.full((batch, n_samples, n_parts), np.nan)
    written = np.zeros(partial.shape, np.int64)
    covered = [np.zeros((n_samples, len(bb[0])), np.int64) for bb in b]
    slab = k["BLOCK"] * rows * vector
    for part in range(n_parts):
        level, local = _level(part, p1, p2)
        if level >= n_levels or by_ptr[xs[level]] != f"x{level}" or by_ptr[bs[level]] != f"b{level}":
            raise PlanError(f"part {part} maps to level {level} with the wrong buffers")
        d = ds[level]
        if d != step.sizes[level]:
            raise PlanError(f"level {level}: d = {d}, expected {step.sizes[level]}")
        spp = (spp0, spp1, spp2)[level]
        begin = local * spp * slab
        end = min(begin + spp * slab, d)
        if begin >= end:
            raise PlanError(f"part {part} (level {level}) is empty")
        for g in range(groups):
            m0, m1 = g * m_per_group, min(g * m_per_group + m_per_group, n_samples)
            covered[level][m0:m1, begin:end] += 1
            for z in range(tiles):
                n0 = z * tile
                imgs = [min(n0 + t, batch - 1) for t in range(tile)]
                sums = ((x[level][imgs, None, begin:end] - b[level][None, m0:m1, begin:end]) ** 2).sum(-1)
                for t in range(tile):
                    if n0 + t < batch:
                        partial[n0 + t, m0:m1, part] = sums[t]
                        written[n0 + t, m0:m1, part] += 1
    for level, cov in enumerate(covered):
        if not (cov == 1).all():
            raise PlanError(f"launch 1 covers level {level} unevenly: counts {np.unique(cov).tolist()}")
    if not (written == 1).all():
        raise PlanError(f"launch 1 writes partials unevenly: counts {np.unique(written).tolist()}")

    # ---- launch 2: memseg_select_diff_<io>(x0..2, b0..2, y0..2, d0..2, p1, p2, n_parts, q1, q2, chunk_elems,
    #      vec_mask, n_levels, per_level, n_samples, partial, index)
    a = _args(second)
    ys = a[6:9]
    q_p1, q_p2, q_parts, q1, q2, chunk, _mask, levels_arg, per_level, samples_arg, partial2, index_ptr = a[12:24]
    if (q_p1, q_p2, q_parts, samples_arg, levels_arg, per_level) != (p1, p2, n_parts, n_samples, n_levels,
                                                                      int(step.per_level)):
        raise PlanError("launch 2 disagrees with launch 1 on parts, samples or levels")
    if by_ptr.get(partial2) != "workspace" or by_ptr.get(index_ptr) != "index":
        raise PlanError("launch 2 reads or writes the wrong buffers")
    if chunk % vector:
        raise PlanError(f"chunk {chunk} is not a whole number of 16-byte vectors")
    if second.grid[1] != batch:
        raise PlanError(f"launch 2 grid {second.grid}: one row of blocks per image expected")
    first_part = [0, p1, p2, n_parts]
    diffs = [np.full_like(xx, np.nan) for xx in x]
    diff_written = [np.zeros(xx.shape, np.int64) for xx in x]
    index = np.full(step.index_shape(batch), -1, np.int64)
    index_written = np.zeros(index.shape, np.int64)
    for chunk_id in range(second.grid[0]):
        level, local = _level(chunk_id, q1, q2)
        if level >= n_levels or by_ptr[ys[level]] != f"y{level}":
            raise PlanError(f"chunk {chunk_id} maps to level {level} with the wrong buffers")
        pa, pb = (first_part[level], first_part[level + 1]) if per_level else (0, n_parts)
        begin, end = local * chunk, min(local * chunk + chunk, step.sizes[level])
        if begin >= end:
            raise PlanError(f"chunk {chunk_id} (level {level}) is empty")
        for n in range(batch):
            sums = partial[n, :, pa:pb].sum(-1)        # ascending part order, as the kernel
            nan = np.isnan(sums)
            m = int(np.argmax(nan)) if nan.any() else int(np.argmin(sums))   # NaN first, then lowest index
            if local == 0:
                if per_level:
                    index[n, level] = m
                    index_written[n, level] += 1
                elif level == 0:
                    index[n] = m
                    index_written[n] += 1
            diffs[level][n, begin:end] = (x[level][n, begin:end] - b[level][m, begin:end]) ** 2
            diff_written[level][n, begin:end] += 1
    for level, w in enumerate(diff_written):
        if not (w == 1).all():
            raise PlanError(f"launch 2 writes level {level} unevenly: counts {np.unique(w).tolist()}")
    if not (index_written == 1).all():
        raise PlanError("launch 2 does not write every index entry exactly once")
    return ([dd.reshape(np.asarray(f).shape) for dd, f in zip(diffs, features)], index.astype(np.int32))


HERE = Path(__file__).resolve().parent


def build_host_emulation(out_dir: str | Path) -> Path:
    """Compile host_emulation.cpp (the .cu file's kernels for the CPU) with the C++ compiler here; returns the
    program. Raises FileNotFoundError without a C++20 compiler, RuntimeError when it does not compile."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++, c++ or clang++) on PATH")
    out = Path(out_dir) / "memseg_kernel_emulation"
    proc = subprocess.run([cxx, "-std=c++20", "-O1", "-Wno-unknown-pragmas", f"-I{HERE}", str(HERE / "host_emulation.cpp"),
                           "-o", str(out)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"host_emulation.cpp does not compile:\n{proc.stderr[-4000:]}")
    return out


def run_host_emulation(program: str | Path, step: MemoryStep, features: Sequence[np.ndarray],
                       banks: Sequence[np.ndarray], workdir: str | Path, *, offset: bool = False,
                       sm_count: int = 1) -> dict:
    """Run the plan for these inputs through the compiled kernels (outputs and workspace poisoned first).
    ``offset``: shift the feature, bank and diff pointers by one element (no 16-byte vectors: the scalar
    path). Returns ``{"diffs", "index", "status", "stderr", "kernels"}``; status 3: guard bytes changed."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    n_levels, batch = len(step.levels), len(features[0])
    half = np.asarray(features[0]).dtype == np.float16
    dt = np.float16 if half else np.float32
    shift = dt().itemsize if offset else 0
    buffers = []

    def add(name: str, data: bytes, shifted: bool) -> int:
        base = (len(buffers) + 1) << 32
        buffers.append((name, base, (bytes(shift) if shifted else b"") + data))
        return base + (shift if shifted else 0)

    xs = [add(f"x{l}", np.ascontiguousarray(f, dt).tobytes(), True) for l, f in enumerate(features)]
    bs = [add(f"b{l}", np.ascontiguousarray(b, dt).tobytes(), True) for l, b in enumerate(banks)]
    ys = [add(f"y{l}", np.full(np.shape(f), np.nan, dt).tobytes(), True) for l, f in enumerate(features)]
    ix = add("index", np.full(step.index_shape(batch), -1, np.int32).tobytes(), False)
    ws = add("workspace", np.full(step.workspace_bytes(batch) // 4, np.nan, np.float32).tobytes(), False)
    launches = plan_launches(step, batch, half, xs, bs, ys, ix, ws, sm_count=sm_count)
    lines = []
    for name, base, data in buffers:
        (work / f"{name}.in").write_bytes(data)
        lines.append(f"B {name} {base} {len(data)} {work / f'{name}.in'} {work / f'{name}.out'}")
    for launch in launches:
        args = " ".join(str(int(v)) for v, _ in launch.args)
        lines.append(f"L {launch.kernel} {launch.grid[0]} {launch.grid[1]} {launch.grid[2]} {launch.block[0]} "
                     f"{len(launch.args)} {args}")
    (work / "spec.txt").write_text("\n".join(lines) + "\n")
    proc = subprocess.run([str(program), str(work / "spec.txt")], capture_output=True, text=True, timeout=1200)

    def read(name: str, dtype, shape, shifted: bool):
        raw = (work / f"{name}.out").read_bytes()[shift if shifted else 0:]
        return np.frombuffer(raw, dtype).reshape(shape)

    diffs = [read(f"y{l}", dt, np.shape(f), True) for l, f in enumerate(features)] if proc.returncode in (0, 3) else []
    index = read("index", np.int32, step.index_shape(batch), False) if proc.returncode in (0, 3) else None
    return {"diffs": diffs, "index": index, "status": proc.returncode, "stderr": proc.stderr,
            "kernels": [launch.kernel for launch in launches], "vec_mask": int(launches[0].args[15][0])}


__all__ = ["MAX_LEVELS", "PlanError", "build_host_emulation", "emulate", "run_host_emulation"]
