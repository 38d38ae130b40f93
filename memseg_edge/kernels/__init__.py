"""The fused memory-bank kernel (``memory_argmin_l2.cu``): its launch plan and a launcher.

:func:`plan_geometry` picks, for a batch, the compile-time tile (images per bank read), the samples per
block and the parts of each level; :func:`plan_launches` turns it and device pointers into the two
launches of one step (kernel name, grid, block, typed arguments). :class:`DriverLauncher` loads the kernel
(cubin, else PTX, :func:`compile.choose_image`) with the CUDA driver API (cuda-python:
``cuModuleLoadData`` / ``cuModuleGetFunction`` / ``cuLaunchKernel``), packs a plan's parameters once
(:meth:`DriverLauncher.prepare`) and launches it on a stream, which is what the TensorRT plugin's
``enqueue`` does. ``tools/gpu_check.py`` runs the same plan. Nothing here imports cuda-python until a
launcher is made.
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

from .compile import (CompiledKernel, KernelCompileError, KernelLoadError, choose_image, compile_kernel, compile_ptx,
                      kernel_source, normalize_arch, source_sha256)

MAX_LEVELS = 3
SELECTIONS = ("sum", "per_level")
TILES = (1, 2, 4, 8, 16, 32)       # the compile-time tiles: one launch-1 kernel per tile and I/O type
MAX_TILE = TILES[-1]               # up to this batch the bank is read once
VECTOR_BYTES = 16
PARTIAL_BUDGET = 4096              # partial sums per image (samples x parts): what every launch-2 block reads
FIRST_KERNEL_CHUNK = 4096          # the first kernel's partials: one per this many elements of a level
TARGET_BLOCKS_PER_SM = 4
DEFAULT_SM_COUNT = 132             # an H100/H200; the launcher passes the device's own count
DIFF_CHUNK_MIN, DIFF_CHUNK_MAX = 2048, 16384


@lru_cache(maxsize=1)
def kernel_constants() -> dict[str, Any]:
    """The ``#define MEMSEG_*`` numbers of the .cu file (the one place they are set): ``BLOCK``, ``WARPS``,
    ``ACC_SLOTS`` and ``ROWS`` (tile -> 16-byte vectors per thread and image)."""
    defs = {m.group(1).decode(): int(m.group(2))
            for m in re.finditer(rb"^#define MEMSEG_(\w+) (\d+)", kernel_source(), re.M)}
    rows = {t: defs[f"ROWS_T{t}"] for t in TILES}
    return {"BLOCK": defs["BLOCK"], "WARPS": defs["WARPS"], "ACC_SLOTS": defs["ACC_SLOTS"], "ROWS": rows}


def entry_points() -> tuple[str, ...]:
    """Every kernel in the module: ``memseg_l2_<io>_t<tile>`` and ``memseg_select_diff_<io>``."""
    return tuple([f"memseg_l2_{io}_t{t}" for io in ("f32", "f16") for t in TILES]
                 + ["memseg_select_diff_f32", "memseg_select_diff_f16"])


ENTRY_POINTS = entry_points()

__all__ = ["ENTRY_POINTS", "CompiledKernel", "DriverLauncher", "Geometry", "KernelCompileError", "KernelLoadError",
           "Launch", "MemoryStep", "choose_image", "choose_tile", "compile_kernel", "compile_ptx", "kernel_constants",
           "kernel_source", "normalize_arch", "plan_geometry", "plan_launches", "source_sha256"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class MemoryStep:
    """The step's static shape: per level ``(C, H, W)``, the number of memory samples, the selection."""
    levels: tuple[tuple[int, int, int], ...]
    samples: int
    selection: str = "sum"

    def __post_init__(self):
        if not 1 <= len(self.levels) <= MAX_LEVELS:
            raise ValueError(f"the kernel takes 1 to {MAX_LEVELS} levels, found {len(self.levels)}")
        if self.samples < 1:
            raise ValueError(f"need at least one memory sample, found {self.samples}")
        if any(v < 1 for lv in self.levels for v in lv):
            raise ValueError(f"every level needs C, H, W >= 1, found {self.levels}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, found {self.selection!r}")

    @property
    def per_level(self) -> bool:
        return self.selection == "per_level"

    @property
    def sizes(self) -> tuple[int, ...]:
        """Elements per image and level, ``C * H * W``."""
        return tuple(c * h * w for c, h, w in self.levels)

    @property
    def max_parts(self) -> int:
        """The most parts a plan cuts the levels into (bounds the workspace and launch 2's reads). Never more
        than the partials engines built with the first kernel reserve (one per 4096 elements of each level),
        so their workspace stays large enough and the plugin's version 1 contract holds."""
        first_kernel = sum(-(-d // FIRST_KERNEL_CHUNK) for d in self.sizes)
        return min(max(len(self.levels), PARTIAL_BUDGET // self.samples), first_kernel)

    def index_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, len(self.levels)) if self.per_level else (batch,)

    def workspace_bytes(self, batch: int) -> int:
        """Partial sums: ``batch * samples * max_parts`` floats (whatever the device and tile)."""
        return 4 * batch * self.samples * self.max_parts

    def bank_bytes(self, itemsize: int) -> int:
        return itemsize * self.samples * sum(self.sizes)


def choose_tile(batch: int) -> int:
    """The smallest compile-time tile that holds ``min(batch, 32)`` images."""
    want = min(max(batch, 1), MAX_TILE)
    return next(t for t in TILES if t >= want)


@dataclass(frozen=True)
class Geometry:
    """How one call is cut: launch 1 grid ``(groups, sum(parts), tiles)``, launch 2 grid ``(sum(chunks), batch)``."""
    tile: int
    rows: int
    vector: int                      # elements per 16 bytes: 4 (float32) or 8 (float16)
    slab: int                        # elements of one level per block and pass: BLOCK x rows x vector
    tiles: int                       # ceil(batch / tile): how often the bank is read
    samples_per_group: int
    groups: int
    slabs_per_part: int
    parts: tuple[int, int, int]      # per level (0 for absent levels)
    chunk: int                       # launch 2: elements per block
    chunks: tuple[int, int, int]

    @property
    def n_parts(self) -> int:
        return sum(self.parts)

    @property
    def launch1_blocks(self) -> int:
        return self.groups * self.n_parts * self.tiles


def plan_geometry(step: MemoryStep, batch: int, half: bool, sm_count: int = DEFAULT_SM_COUNT,
                  blocks_per_sm: int = TARGET_BLOCKS_PER_SM) -> Geometry:
    """The tile, sample groups, parts and chunks for ``batch`` images on a GPU with ``sm_count`` SMs, aiming at
    about ``blocks_per_sm`` blocks per SM in each launch (a tuning knob: tools/gpu_check.py times several)."""
    k = kernel_constants()
    tile = choose_tile(batch)
    rows = k["ROWS"][tile]
    vector = VECTOR_BYTES // (2 if half else 4)
    slab = k["BLOCK"] * rows * vector
    tiles = _cdiv(max(batch, 1), tile)
    slabs = [_cdiv(d, slab) for d in step.sizes]
    total = sum(slabs)
    cap = step.max_parts
    target = max(1, blocks_per_sm * max(sm_count, 1) // tiles)
    groups = min(step.samples, max(1, _cdiv(target, min(total, cap))))
    per_group = min(_cdiv(step.samples, groups), k["ACC_SLOTS"] // tile)
    groups = _cdiv(step.samples, per_group)
    want_parts = max(1, min(total, cap, _cdiv(target, groups)))
    spp = max(1, total // want_parts)
    while sum(_cdiv(s, spp) for s in slabs) > cap:
        spp += 1
    parts = [_cdiv(s, spp) for s in slabs] + [0] * (MAX_LEVELS - len(slabs))
    per_call = sum(step.sizes) * max(batch, 1)
    chunk = _cdiv(_cdiv(per_call, blocks_per_sm * max(sm_count, 1)), DIFF_CHUNK_MIN) * DIFF_CHUNK_MIN
    chunk = min(max(chunk, DIFF_CHUNK_MIN), DIFF_CHUNK_MAX)
    chunks = [_cdiv(d, chunk) for d in step.sizes] + [0] * (MAX_LEVELS - len(slabs))
    return Geometry(tile, rows, vector, slab, tiles, per_group, groups, spp, tuple(parts), chunk, tuple(chunks))


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[tuple[int, Any], ...]   # (value, ctypes type)


def vector_mask(step: MemoryStep, half: bool, pointers: Sequence[Sequence[int]]) -> int:
    """Bit l set: level l's rows are 16-byte aligned (C*H*W a multiple of the vector, every pointer of the
    level aligned), so the kernel uses 16-byte loads and stores there; else scalar accesses."""
    vector = VECTOR_BYTES // (2 if half else 4)
    mask = 0
    for level, d in enumerate(step.sizes):
        if d % vector == 0 and all(int(p[level]) % VECTOR_BYTES == 0 for p in pointers):
            mask |= 1 << level
    return mask


def plan_launches(step: MemoryStep, batch: int, half: bool, features: Sequence[int], banks: Sequence[int],
                  diffs: Sequence[int], index: int, workspace: int, sm_count: int = DEFAULT_SM_COUNT,
                  blocks_per_sm: int = TARGET_BLOCKS_PER_SM) -> list[Launch]:
    """The two launches of one step on device pointers (ints). ``half``: float16 I/O, else float32.
    ``index``: int32 ``[batch]`` or ``[batch, L]``; ``workspace``: :meth:`MemoryStep.workspace_bytes`."""
    n_levels = len(step.levels)
    if not (len(features) == len(banks) == len(diffs) == n_levels):
        raise ValueError(f"expected {n_levels} feature, bank and diff pointers each")
    if batch < 1:
        return []
    g = plan_geometry(step, batch, half, sm_count, blocks_per_sm)
    pad = MAX_LEVELS - n_levels
    x = [int(p) for p in features] + [int(features[0])] * pad   # absent levels: no parts, no chunks
    b = [int(p) for p in banks] + [int(banks[0])] * pad
    y = [int(p) for p in diffs] + [int(diffs[0])] * pad
    d = list(step.sizes) + [0] * pad
    mask = vector_mask(step, half, [x, b, y])
    p1, p2 = g.parts[0], g.parts[0] + g.parts[1]
    q1, q2 = g.chunks[0], g.chunks[0] + g.chunks[1]
    vp, ll, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    io = "f16" if half else "f32"
    block = (kernel_constants()["BLOCK"], 1, 1)
    distances = Launch(
        f"memseg_l2_{io}_t{g.tile}", (g.groups, g.n_parts, g.tiles), block,
        tuple([(p, vp) for p in x + b] + [(v, ll) for v in d]
              + [(v, i32) for v in (p1, p2, g.n_parts, g.slabs_per_part, g.slabs_per_part, g.slabs_per_part, mask,
                                    batch, step.samples, g.samples_per_group)]
              + [(int(workspace), vp)]))
    select_diff = Launch(
        f"memseg_select_diff_{io}", (sum(g.chunks), batch, 1), block,
        tuple([(p, vp) for p in x + b + y] + [(v, ll) for v in d]
              + [(v, i32) for v in (p1, p2, g.n_parts, q1, q2, g.chunk, mask, n_levels, int(step.per_level),
                                    step.samples)]
              + [(int(workspace), vp), (int(index), vp)]))
    return [distances, select_diff]


@dataclass
class PreparedLaunch:
    """One launch with its parameters packed for ``cuLaunchKernel`` (the buffers stay alive with it)."""
    function: Any
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    kernel: str
    holders: list
    params: Any

    @property
    def address(self) -> int:
        return ctypes.addressof(self.params)


def pack_launch(launch: Launch, function: Any = None) -> PreparedLaunch:
    """kernelParams for the driver: a ``void*`` array pointing at each argument's value."""
    holders = [ctype(value) for value, ctype in launch.args]
    params = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
    return PreparedLaunch(function, launch.grid, launch.block, launch.kernel, holders, params)


class DriverLauncher:
    """The kernel's module in the current CUDA context, launching plans on a stream (cuda-python driver API)."""

    def __init__(self, image: bytes, kind: str = "ptx", sm_count: int = DEFAULT_SM_COUNT, kernel: CompiledKernel | None = None):
        from cuda.bindings import driver

        self._driver = driver
        self.kind = kind
        self.sm_count = sm_count
        self.kernel = kernel
        data = image.rstrip(b"\0") + b"\0" if kind == "ptx" else image   # PTX: NUL-terminated text
        self._image = ctypes.create_string_buffer(data, len(data))       # the driver copies it
        err, module = driver.cuModuleLoadData(ctypes.addressof(self._image))
        if int(err) != int(driver.CUresult.CUDA_SUCCESS):
            if "UNSUPPORTED_PTX_VERSION" in str(err) or "INVALID_PTX" in str(err):
                raise KernelLoadError(f"cuModuleLoadData({kind}) failed: {err}: the driver cannot JIT this PTX; "
                                      "compile with an NVRTC no newer than the driver (see compile.choose_image)")
            raise RuntimeError(f"cuModuleLoadData({kind}) failed: {err}")
        self._module = module
        self._functions = {name: self._check(driver.cuModuleGetFunction(self._module, name.encode()),
                                             f"cuModuleGetFunction({name})") for name in ENTRY_POINTS}

    @classmethod
    def for_current_device(cls) -> "DriverLauncher":
        """Compile (or read from the cache) the kernel for the current context's device and load the image its
        driver can take (:func:`compile.choose_image`)."""
        from cuda.bindings import driver

        dev = cls._check_static(driver, driver.cuCtxGetDevice(), "cuCtxGetDevice (is a CUDA context current?)")
        attr = driver.CUdevice_attribute
        major = cls._check_static(driver, driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute")
        minor = cls._check_static(driver, driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute")
        sms = cls._check_static(driver, driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "cuDeviceGetAttribute")
        version = int(cls._check_static(driver, driver.cuDriverGetVersion(), "cuDriverGetVersion"))
        drv = (version // 1000, version % 1000 // 10)
        arch = f"sm_{int(major)}{int(minor)}"
        kernel = compile_kernel(arch, max_version=drv)
        image, kind = choose_image(kernel, arch, drv)
        return cls(image, kind, int(sms), kernel)

    @staticmethod
    def _check_static(driver, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != int(driver.CUresult.CUDA_SUCCESS):
            raise RuntimeError(f"{what} failed: {err}")
        return rest[0] if len(rest) == 1 else tuple(rest)

    def _check(self, result, what: str):
        return self._check_static(self._driver, result, what)

    def prepare(self, launches: Sequence[Launch]) -> list[PreparedLaunch]:
        """Pack once; :meth:`run` them as often as the pointers stay the same."""
        return [pack_launch(launch, self._functions[launch.kernel]) for launch in launches]

    def run(self, launches: Sequence[Launch | PreparedLaunch], stream: int) -> None:
        driver = self._driver
        for item in launches:
            prepared = item if isinstance(item, PreparedLaunch) else pack_launch(item, self._functions[item.kernel])
            self._check(driver.cuLaunchKernel(prepared.function, *prepared.grid, *prepared.block, 0,
                                              driver.CUstream(stream), prepared.address, 0),
                        f"cuLaunchKernel({prepared.kernel})")
