"""CUDA C -> cubin (machine code for one architecture) + PTX (the fallback) for the fused memory-bank kernel,
cached by source hash, architecture and compiler version.

Compilers, in order: NVRTC through cuda-python (``cuda.bindings.nvrtc``); another NVRTC library through
ctypes (``MEMSEG_EDGE_NVRTC=/path/libnvrtc.so.12``, or the ``nvidia-cuda-nvrtc-cu12`` wheel's library) for
architectures the installed NVRTC no longer knows (CUDA 13 dropped sm_72, Jetson Xavier) or a driver older
than it; ``nvcc`` (``$CUDA_HOME/bin/nvcc``, ``/usr/local/cuda/bin/nvcc`` or on ``PATH``). One NVRTC
compilation for a real architecture (``-arch=sm_87``) yields both the cubin (``nvrtcGetCUBIN``) and its PTX.

The cache lives in ``$XDG_CACHE_HOME/memseg-edge/kernels`` (``~/.cache/...``): ``memory_argmin_l2-<sha>-<arch>-
<compiler><version>.{ptx,cubin}``, so an NVRTC upgrade never reuses a stale image. A device that has a cached
image needs no compiler at all (any cached version is taken when none is installed).

Which image a driver can load (:func:`choose_image`): the cubin when it is for the device's architecture
and its compiler's major version is not newer than the driver's CUDA; else the PTX when its compiler is
not newer than the driver (the driver JIT-compiles it); else :class:`KernelLoadError` with what to do.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SOURCE_NAME = "memory_argmin_l2.cu"
Version = tuple  # (major, minor)


class KernelCompileError(RuntimeError):
    """The kernel could not be compiled; the message says what to install."""


class KernelLoadError(RuntimeError):
    """The driver cannot load any image of the kernel that is at hand; the message says what to do."""


@dataclass(frozen=True)
class CompiledKernel:
    ptx: bytes                   # NUL-free PTX text (the fallback the driver JIT-compiles)
    cubin: bytes | None          # machine code for ``arch`` (None where the compiler gave none)
    arch: str                    # "sm_87"
    path: Path                   # the cached PTX file (the cubin beside it, suffix .cubin)
    cached: bool                 # True: read from the cache, no compiler ran
    compiler: str                # "nvrtc 13.0", "nvrtc-ctypes 12.9", "nvcc 13.0"; "cache" when read back
    version: Version             # (major, minor) of the compiler that made the images

    @property
    def ptx_isa(self) -> str:
        """The PTX ISA version the PTX declares (``.version 9.0``)."""
        m = re.search(rb"^\.version\s+(\d+\.\d+)", self.ptx, re.M)
        return m.group(1).decode() if m else "?"


def kernel_source() -> bytes:
    return (Path(__file__).with_name(SOURCE_NAME)).read_bytes()


def source_sha256() -> str:
    return hashlib.sha256(kernel_source()).hexdigest()


def normalize_arch(arch: str | int | tuple) -> str:
    """``"sm_87"``, ``"8.7"``, ``87``, ``(8, 7)``, ``"compute_87"`` -> ``"sm_87"``."""
    if isinstance(arch, (tuple, list)):
        return f"sm_{int(arch[0])}{int(arch[1])}"
    s = str(arch).strip().lower()
    for prefix in ("sm_", "compute_", "sm"):
        if s.startswith(prefix):
            s = s[len(prefix):]
            break
    s = s.replace(".", "")
    if not s.isdigit() or len(s) < 2:
        raise ValueError(f"not a GPU architecture: {arch!r} (write it as sm_87 or 8.7)")
    return f"sm_{int(s)}"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memseg-edge" / "kernels"


def _cache_stem(digest: str, arch: str, tag: str, version: Version) -> str:
    return f"memory_argmin_l2-{digest}-{arch}-{tag}{version[0]}.{version[1]}"


@dataclass(frozen=True)
class _Compiler:
    tag: str                                       # "nvrtc", "nvrtc-ctypes", "nvcc"
    version: Version
    run: Callable[[bytes, str], tuple[bytes, bytes | None]]

    @property
    def name(self) -> str:
        return f"{self.tag} {self.version[0]}.{self.version[1]}"


def _available_compilers() -> tuple[list[_Compiler], list[str]]:
    """The compilers found here with their versions (cheap: no compilation), and why others are missing."""
    found, notes = [], []
    for probe in (_probe_cuda_python, _probe_ctypes, _probe_nvcc):
        try:
            found += probe()
        except KernelCompileError as exc:
            notes.append(str(exc))
    return found, notes


def compile_kernel(arch: str | int | tuple, *, use_cache: bool = True,
                   max_version: Version | None = None) -> CompiledKernel:
    """Cubin + PTX of the kernel for ``arch`` (e.g. ``"sm_87"``). ``max_version``: the driver's CUDA version;
    compilers newer than it are tried last (their PTX would not load). Raises :class:`KernelCompileError`."""
    arch = normalize_arch(arch)
    src = kernel_source()
    digest = hashlib.sha256(src).hexdigest()[:20]
    folder = cache_dir()
    compilers, notes = _available_compilers()
    if max_version is not None:   # stable sort: the usable ones first, in their order
        compilers.sort(key=lambda c: tuple(c.version) > tuple(max_version))
    if use_cache:
        for comp in compilers:
            hit = _read_cache(folder / _cache_stem(digest, arch, comp.tag, comp.version), arch, comp.version)
            if hit is not None:
                return hit
        if not compilers:   # a device with a filled cache needs no compiler
            for path in sorted(folder.glob(f"memory_argmin_l2-{digest}-{arch}-*.ptx"), reverse=True):
                m = re.search(r"-(\d+)\.(\d+)\.ptx$", path.name)
                version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
                if max_version is None or version <= tuple(max_version):
                    hit = _read_cache(Path(str(path)[:-len(".ptx")]), arch, version)
                    if hit is not None:
                        return hit
    errors = list(notes)
    for comp in compilers:
        try:
            ptx, cubin = comp.run(src, arch)
        except KernelCompileError as exc:
            errors.append(f"{comp.name}: {exc}")
            continue
        ptx = ptx.rstrip(b"\0")
        stem = str(folder / _cache_stem(digest, arch, comp.tag, comp.version))   # "...-nvrtc13.0": no with_suffix
        if use_cache:
            _write_cache(Path(stem + ".ptx"), ptx)
            if cubin:
                _write_cache(Path(stem + ".cubin"), cubin)
        return CompiledKernel(ptx, cubin or None, arch, Path(stem + ".ptx"), False, comp.name, comp.version)
    raise KernelCompileError(
        f"cannot compile {SOURCE_NAME} for {arch}:\n  " + "\n  ".join(errors or ["no compiler found"]) +
        "\nInstall cuda-python (pip install 'cuda-python>=12.6', brings NVRTC) or the CUDA toolkit's nvcc; "
        "CUDA 13 no longer targets sm_72 and older: for those, pip install nvidia-cuda-nvrtc-cu12 or point "
        "MEMSEG_EDGE_NVRTC at a CUDA 12 libnvrtc.so.12.")


def compile_ptx(arch: str | int | tuple, *, use_cache: bool = True) -> CompiledKernel:
    """The same as :func:`compile_kernel` (kept for callers that only want ``.ptx``)."""
    return compile_kernel(arch, use_cache=use_cache)


def _read_cache(stem: Path, arch: str, version: Version) -> CompiledKernel | None:
    ptx_path = Path(str(stem) + ".ptx")
    if not ptx_path.is_file():
        return None
    cubin_path = Path(str(stem) + ".cubin")
    cubin = cubin_path.read_bytes() if cubin_path.is_file() else None
    return CompiledKernel(ptx_path.read_bytes(), cubin, arch, ptx_path, True, "cache", tuple(version))


def _write_cache(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".img-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache is an optimisation


def _options(arch: str) -> list[bytes]:
    # A real architecture: NVRTC then gives the cubin and, from the same compilation, the PTX.
    return [f"--gpu-architecture={arch}".encode(), b"--std=c++14"]


# ------------------------------------------------------------------------------- NVRTC (cuda-python)


def _nvrtc_module():
    try:
        from cuda.bindings import nvrtc
        return nvrtc
    except ImportError:
        try:
            from cuda import nvrtc  # cuda-python < 12.6
            return nvrtc
        except ImportError:
            return None


def _probe_cuda_python() -> list[_Compiler]:
    nvrtc = _nvrtc_module()
    if nvrtc is None:
        return []
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # libnvrtc missing under the bindings
        raise KernelCompileError(f"cuda-python's NVRTC is not loadable ({exc})") from exc
    return [_Compiler("nvrtc", (int(major), int(minor)), _nvrtc_cuda_python)]


def _nvrtc_cuda_python(src: bytes, arch: str) -> tuple[bytes, bytes | None]:
    nvrtc = _nvrtc_module()
    ok = nvrtc.nvrtcResult.NVRTC_SUCCESS
    _, major, minor = nvrtc.nvrtcVersion()
    err, prog = nvrtc.nvrtcCreateProgram(src, SOURCE_NAME.encode(), 0, [], [])
    if err != ok:
        raise KernelCompileError(f"nvrtcCreateProgram: {err}")
    try:
        opts = _options(arch)
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != ok:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise KernelCompileError(f"NVRTC {major}.{minor}, {arch}: {err.name}: "
                                     f"{log.rstrip(bytes(1)).decode(errors='replace').strip()}")
        _, size = nvrtc.nvrtcGetPTXSize(prog)
        ptx = b" " * size
        (err,) = nvrtc.nvrtcGetPTX(prog, ptx)
        if err != ok:
            raise KernelCompileError(f"nvrtcGetPTX: {err}")
        cubin = None
        if hasattr(nvrtc, "nvrtcGetCUBIN"):
            err, size = nvrtc.nvrtcGetCUBINSize(prog)
            if err == ok and size:
                cubin = b" " * size
                (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
                if err != ok:
                    cubin = None
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return ptx, cubin


# ------------------------------------------------------------------------------- NVRTC (ctypes)


def _nvrtc_libraries() -> list[str]:
    found = []
    env = os.environ.get("MEMSEG_EDGE_NVRTC")
    if env:
        found.append(env)
    for entry in sys.path:
        found += sorted(glob.glob(os.path.join(entry, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.1[0-9]")))
    return list(dict.fromkeys(found))


def _probe_ctypes() -> list[_Compiler]:
    out, failures = [], []
    for lib_path in _nvrtc_libraries():
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError as exc:
            failures.append(f"{lib_path}: {exc}")
            continue
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        out.append(_Compiler("nvrtc-ctypes", (major.value, minor.value),
                             lambda src, arch, _p=lib_path: _nvrtc_ctypes(_p, src, arch)))
    if failures and not out:
        raise KernelCompileError("; ".join(failures))
    return out


def _nvrtc_ctypes(lib_path: str, src: bytes, arch: str) -> tuple[bytes, bytes | None]:
    lib = ctypes.CDLL(lib_path)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, SOURCE_NAME.encode(), 0, None, None) != 0:
        raise KernelCompileError(f"{lib_path}: nvrtcCreateProgram failed")
    try:
        opts = _options(arch)
        arr = (ctypes.c_char_p * len(opts))(*opts)
        if lib.nvrtcCompileProgram(prog, len(opts), arr) != 0:
            size = ctypes.c_size_t(0)
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise KernelCompileError(f"NVRTC {major.value}.{minor.value} ({lib_path}), {arch}: "
                                     f"{log.value.decode(errors='replace').strip()}")
        size = ctypes.c_size_t(0)
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        if lib.nvrtcGetPTX(prog, buf) != 0:
            raise KernelCompileError(f"{lib_path}: nvrtcGetPTX failed")
        cubin = None
        if hasattr(lib, "nvrtcGetCUBINSize"):
            csize = ctypes.c_size_t(0)
            if lib.nvrtcGetCUBINSize(prog, ctypes.byref(csize)) == 0 and csize.value:
                cbuf = ctypes.create_string_buffer(csize.value)
                if lib.nvrtcGetCUBIN(prog, cbuf) == 0:
                    cubin = cbuf.raw
        return buf.raw, cubin
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ------------------------------------------------------------------------------- nvcc


def nvcc_path() -> str | None:
    for cand in (os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return shutil.which("nvcc")


def _probe_nvcc() -> list[_Compiler]:
    nvcc = nvcc_path()
    if nvcc is None:
        return []
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelCompileError(f"{nvcc} --version failed: {exc}") from exc
    m = re.search(r"release (\d+)\.(\d+)", text)
    version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return [_Compiler("nvcc", version, _nvcc)]


def _nvcc(src: bytes, arch: str) -> tuple[bytes, bytes | None]:
    nvcc = nvcc_path()
    with tempfile.TemporaryDirectory(prefix="memseg-nvcc-") as tmp:
        cu = Path(tmp) / SOURCE_NAME
        cu.write_bytes(src)
        images = {}
        for kind, flag in (("ptx", f"-arch=compute_{arch[3:]}"), ("cubin", f"-arch={arch}")):
            out = Path(tmp) / f"k.{kind}"
            proc = subprocess.run([nvcc, f"-{kind}", flag, "-std=c++14", str(cu), "-o", str(out)],
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise KernelCompileError(f"{nvcc}, {arch}: {(proc.stderr or proc.stdout).strip()}")
            images[kind] = out.read_bytes()
        return images["ptx"], images["cubin"]


# ------------------------------------------------------------------------------- what a driver can load


def choose_image(kernel: CompiledKernel, device_arch: str, driver_version: Version) -> tuple[bytes, str]:
    """``(image, "cubin" | "ptx")`` that a driver for CUDA ``driver_version`` can load on a ``device_arch``
    GPU; :class:`KernelLoadError` when neither can be."""
    device_arch = normalize_arch(device_arch)
    drv = tuple(int(v) for v in driver_version[:2])
    made = tuple(int(v) for v in kernel.version[:2])
    if kernel.cubin and kernel.arch == device_arch and made[0] <= drv[0]:
        return kernel.cubin, "cubin"
    if made <= drv:
        return kernel.ptx, "ptx"
    raise KernelLoadError(
        f"the fused kernel's PTX (PTX ISA {kernel.ptx_isa}, made by {kernel.compiler} {made[0]}.{made[1]}) is "
        f"newer than this driver, which supports CUDA {drv[0]}.{drv[1]}: the driver cannot load it"
        + ("" if kernel.cubin and kernel.arch == device_arch else f", and there is no {device_arch} cubin to use instead")
        + f". Update the NVIDIA driver to one for CUDA >= {made[0]}.{made[1]}, or compile with an NVRTC no newer "
        f"than the driver: pip install 'nvidia-cuda-nvrtc-cu{drv[0]}=={drv[0]}.{drv[1]}.*' (or point "
        f"MEMSEG_EDGE_NVRTC at that libnvrtc.so.{drv[0]}).")

