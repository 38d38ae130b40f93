"""CUDA C -> PTX for the fused memory-bank kernel, cached by source hash and architecture.

Compilers, in order: NVRTC through cuda-python (``cuda.bindings.nvrtc``); another NVRTC library
through ctypes (``MEMSEG_EDGE_NVRTC=/path/libnvrtc.so.12``, or the ``nvidia-cuda-nvrtc-cu12`` wheel's
library) for architectures the installed NVRTC no longer knows (CUDA 13 dropped sm_72, Jetson Xavier);
``nvcc`` (``$CUDA_HOME/bin/nvcc``, ``/usr/local/cuda/bin/nvcc`` or on ``PATH``). The cache lives in
``$XDG_CACHE_HOME/memseg-edge/kernels`` (``~/.cache/...``), one file per (source sha256, arch); a
compiler is only looked for on a cache miss, so a device that has the PTX needs none.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE_NAME = "memory_argmin_l2.cu"


class KernelCompileError(RuntimeError):
    """The kernel could not be compiled; the message says what to install."""


@dataclass(frozen=True)
class CompiledKernel:
    ptx: bytes            # NUL-free PTX text
    arch: str             # "sm_87"
    path: Path            # the cache file
    cached: bool          # True: read from the cache, no compiler ran
    compiler: str         # "nvrtc 13.0", "nvrtc-ctypes 12.9", "nvcc", or "cache"


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


def compile_ptx(arch: str | int | tuple, *, use_cache: bool = True) -> CompiledKernel:
    """PTX of the kernel for ``arch`` (e.g. ``"sm_87"``); raises :class:`KernelCompileError`."""
    arch = normalize_arch(arch)
    src = kernel_source()
    digest = hashlib.sha256(src).hexdigest()[:20]
    path = cache_dir() / f"memory_argmin_l2-{digest}-{arch}.ptx"
    if use_cache and path.is_file():
        return CompiledKernel(path.read_bytes(), arch, path, True, "cache")
    errors: list[str] = []
    ptx = compiler = None
    for name, fn in (("nvrtc", _nvrtc_cuda_python), ("nvrtc-ctypes", _nvrtc_ctypes), ("nvcc", _nvcc)):
        try:
            result = fn(src, arch)
        except KernelCompileError as exc:
            errors.append(f"{name}: {exc}")
            continue
        if result is not None:
            ptx, compiler = result
            break
    if ptx is None:
        raise KernelCompileError(
            f"cannot compile {SOURCE_NAME} for {arch}:\n  " + "\n  ".join(errors or ["no compiler found"]) +
            "\nInstall cuda-python (pip install 'cuda-python>=12.6', brings NVRTC) or the CUDA toolkit's nvcc; "
            "CUDA 13 no longer targets sm_72 and older: for those, pip install nvidia-cuda-nvrtc-cu12 or point "
            "MEMSEG_EDGE_NVRTC at a CUDA 12 libnvrtc.so.12.")
    ptx = ptx.rstrip(b"\0")
    if use_cache:
        _write_cache(path, ptx)
    return CompiledKernel(ptx, arch, path, False, compiler)


def _write_cache(path: Path, ptx: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ptx-")
        with os.fdopen(fd, "wb") as f:
            f.write(ptx)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache is an optimisation


def _options(arch: str) -> list[bytes]:
    return [f"--gpu-architecture=compute_{arch[3:]}".encode(), b"--std=c++14"]


def _nvrtc_cuda_python(src: bytes, arch: str):
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        try:
            from cuda import nvrtc  # cuda-python < 12.6
        except ImportError:
            return None
    ok = nvrtc.nvrtcResult.NVRTC_SUCCESS
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # libnvrtc missing under the bindings
        raise KernelCompileError(f"NVRTC not loadable ({exc})") from exc
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
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return ptx, f"nvrtc {major}.{minor}"


def _nvrtc_libraries() -> list[str]:
    found = []
    env = os.environ.get("MEMSEG_EDGE_NVRTC")
    if env:
        found.append(env)
    for entry in sys.path:
        found += sorted(glob.glob(os.path.join(entry, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.1[0-9]")))
    return found


def _nvrtc_ctypes(src: bytes, arch: str):
    libs = _nvrtc_libraries()
    if not libs:
        return None
    failures = []
    for lib_path in libs:
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError as exc:
            failures.append(f"{lib_path}: {exc}")
            continue
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        prog = ctypes.c_void_p()
        if lib.nvrtcCreateProgram(ctypes.byref(prog), src, SOURCE_NAME.encode(), 0, None, None) != 0:
            failures.append(f"{lib_path}: nvrtcCreateProgram failed")
            continue
        try:
            opts = _options(arch)
            arr = (ctypes.c_char_p * len(opts))(*opts)
            if lib.nvrtcCompileProgram(prog, len(opts), arr) != 0:
                size = ctypes.c_size_t(0)
                lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
                log = ctypes.create_string_buffer(size.value)
                lib.nvrtcGetProgramLog(prog, log)
                text = log.value.decode(errors="replace").strip()
                failures.append(f"NVRTC {major.value}.{minor.value} ({lib_path}): {text}")
                continue
            size = ctypes.c_size_t(0)
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            if lib.nvrtcGetPTX(prog, buf) != 0:
                failures.append(f"{lib_path}: nvrtcGetPTX failed")
                continue
            return buf.raw, f"nvrtc-ctypes {major.value}.{minor.value}"
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))
    raise KernelCompileError("; ".join(failures))


def nvcc_path() -> str | None:
    for cand in (os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return shutil.which("nvcc")


def _nvcc(src: bytes, arch: str):
    nvcc = nvcc_path()
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory(prefix="memseg-nvcc-") as tmp:
        cu = Path(tmp) / SOURCE_NAME
        cu.write_bytes(src)
        out = Path(tmp) / "k.ptx"
        proc = subprocess.run([nvcc, "-ptx", f"-arch=compute_{arch[3:]}", "-std=c++14", str(cu), "-o", str(out)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise KernelCompileError(f"{nvcc}, {arch}: {(proc.stderr or proc.stdout).strip()}")
        return out.read_bytes(), "nvcc"
