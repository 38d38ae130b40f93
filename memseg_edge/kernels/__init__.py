"""The fused memory-bank kernel (``memory_argmin_l2.cu``): its launch plan and a launcher.

:func:`plan_launches` turns shapes and device pointers into the three launches of one step (kernel
name, grid, block, typed arguments); :class:`DriverLauncher` runs them with the CUDA driver API
(cuda-python: ``cuModuleLoadData`` / ``cuModuleGetFunction`` / ``cuLaunchKernel``) on a given stream,
which is what the TensorRT plugin's ``enqueue`` does. ``tools/gpu_memory_kernel.py`` runs the same
plan. Nothing here imports cuda-python until a launcher is made.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Sequence

from .compile import CompiledKernel, KernelCompileError, compile_ptx, kernel_source, normalize_arch, source_sha256

ENTRY_POINTS = ("memseg_partial_l2_f32", "memseg_partial_l2_f16", "memseg_select", "memseg_diff_f32",
                "memseg_diff_f16")
MAX_LEVELS = 3
TILE = 8              # images per bank read (MEMSEG_TILE in the .cu file)
CHUNK = 4096          # elements of one level per block
BLOCK = 256
SELECT_BLOCK = 128    # a power of two <= 256 (the select kernel's shared arrays)
SELECTIONS = ("sum", "per_level")

__all__ = ["ENTRY_POINTS", "CompiledKernel", "DriverLauncher", "KernelCompileError", "Launch", "MemoryStep",
           "compile_ptx", "kernel_source", "normalize_arch", "plan_launches", "source_sha256"]


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
    def chunks(self) -> tuple[int, int, int]:
        counts = [-(-d // CHUNK) for d in self.sizes]
        return tuple(counts + [0] * (MAX_LEVELS - len(counts)))  # type: ignore[return-value]

    def index_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, len(self.levels)) if self.per_level else (batch,)

    def workspace_bytes(self, batch: int) -> int:
        """Partial sums: ``batch * samples * chunks`` floats."""
        return 4 * batch * self.samples * sum(self.chunks)

    def bank_bytes(self, itemsize: int) -> int:
        return itemsize * self.samples * sum(self.sizes)


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[tuple[int, Any], ...]   # (value, ctypes type)


def plan_launches(step: MemoryStep, batch: int, half: bool, features: Sequence[int], banks: Sequence[int],
                  diffs: Sequence[int], index: int, workspace: int) -> list[Launch]:
    """The three launches of one step on device pointers (ints). ``half``: float16 I/O, else float32.
    ``index``: int32 ``[batch]`` or ``[batch, L]``; ``workspace``: :meth:`MemoryStep.workspace_bytes`."""
    n_levels = len(step.levels)
    if not (len(features) == len(banks) == len(diffs) == n_levels):
        raise ValueError(f"expected {n_levels} feature, bank and diff pointers each")
    if batch < 1:
        return []
    pad = MAX_LEVELS - n_levels
    x = list(features) + [features[0]] * pad   # unused levels: size 0, never dereferenced
    b = list(banks) + [banks[0]] * pad
    y = list(diffs) + [diffs[0]] * pad
    d = list(step.sizes) + [0] * pad
    c0, c1, c2 = step.chunks
    vp, ll, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    suffix = "f16" if half else "f32"
    partial = Launch(
        f"memseg_partial_l2_{suffix}", (step.samples, c0 + c1 + c2, -(-batch // TILE)), (BLOCK, 1, 1),
        tuple([(p, vp) for p in x + b] + [(v, ll) for v in d]
              + [(c0, i32), (c1, i32), (c2, i32), (batch, i32), (step.samples, i32), (CHUNK, i32),
                 (workspace, vp)]))
    select = Launch(
        "memseg_select", (batch, 1, 1), (SELECT_BLOCK, 1, 1),
        ((workspace, vp), (c0, i32), (c1, i32), (c2, i32), (n_levels, i32), (step.samples, i32),
         (int(step.per_level), i32), (index, vp)))
    diff = Launch(
        f"memseg_diff_{suffix}", (c0 + c1 + c2, batch, 1), (BLOCK, 1, 1),
        tuple([(p, vp) for p in x + b + y] + [(v, ll) for v in d]
              + [(c0, i32), (c1, i32), (CHUNK, i32), (index, vp), (n_levels, i32), (int(step.per_level), i32)]))
    return [partial, select, diff]


class DriverLauncher:
    """Loads the PTX into the current CUDA context and launches plans on a stream (cuda-python driver API)."""

    def __init__(self, ptx: bytes):
        from cuda.bindings import driver

        self._driver = driver
        image = ctypes.create_string_buffer(ptx.rstrip(b"\0"))   # NUL-terminated; the driver copies it
        self._module = self._check(driver.cuModuleLoadData(ctypes.addressof(image)), "cuModuleLoadData")
        self._functions = {name: self._check(driver.cuModuleGetFunction(self._module, name.encode()),
                                             f"cuModuleGetFunction({name})") for name in ENTRY_POINTS}

    @classmethod
    def for_current_device(cls) -> "DriverLauncher":
        """Compile (or read from the cache) PTX for the current context's device and load it."""
        from cuda.bindings import driver

        dev = cls._check_static(driver, driver.cuCtxGetDevice(), "cuCtxGetDevice")
        attr = driver.CUdevice_attribute
        major = cls._check_static(driver, driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute")
        minor = cls._check_static(driver, driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute")
        return cls(compile_ptx((major, minor)).ptx)

    @staticmethod
    def _check_static(driver, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != int(driver.CUresult.CUDA_SUCCESS):
            raise RuntimeError(f"{what} failed: {err}")
        return rest[0] if len(rest) == 1 else tuple(rest)

    def _check(self, result, what: str):
        return self._check_static(self._driver, result, what)

    def run(self, launches: Sequence[Launch], stream: int) -> None:
        driver = self._driver
        for launch in launches:
            # kernelParams: a void** array pointing at each argument's value (the driver copies them)
            holders = [ctype(value) for value, ctype in launch.args]
            params = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
            self._check(driver.cuLaunchKernel(self._functions[launch.kernel], *launch.grid, *launch.block, 0,
                                              driver.CUstream(stream), ctypes.addressof(params), 0),
                        f"cuLaunchKernel({launch.kernel})")
