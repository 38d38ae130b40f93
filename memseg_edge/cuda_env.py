"""Which CUDA GPU is here, asked through the CUDA driver API (cuda-python's ``cuda.bindings.driver``).

Nothing here creates a CUDA context, and every failure (no cuda-python, no driver library, no device,
a driver older than the bindings) ends in ``None``: callers use the answer to decide *before* creating
any TensorRT object whether there is a GPU at all (TensorRT objects created without one can crash the
process). cuda-python is imported lazily, so this module imports anywhere.
"""
from __future__ import annotations

import ctypes
from typing import Any

_NAME_LEN = 256
# CUdevice_attribute values (stable in the CUDA driver API since CUDA 4; used by the ctypes fallback).
_ATTR_CC_MAJOR = 75
_ATTR_CC_MINOR = 76


def _driver_module():
    """cuda-python's driver bindings, or None. ``cuda.bindings.driver`` from cuda-python 12.6 on, ``cuda.cuda``
    before it."""
    try:
        from cuda.bindings import driver
        return driver
    except Exception:  # ImportError, or a broken install
        pass
    try:
        from cuda import cuda as driver  # cuda-python < 12.6
        return driver
    except Exception:
        return None


def _ok(driver, result) -> bool:
    return int(result) == int(driver.CUresult.CUDA_SUCCESS)


def _via_cuda_python(driver, index: int) -> dict[str, Any] | None:
    try:
        (err,) = driver.cuInit(0)
    except Exception:  # cuda-pathfinder raises DynamicLibNotFoundError (a RuntimeError) without libcuda
        return None
    if not _ok(driver, err):
        return None
    err, count = driver.cuDeviceGetCount()
    if not _ok(driver, err) or index >= int(count):
        return None
    err, dev = driver.cuDeviceGet(index)
    if not _ok(driver, err):
        return None
    err, raw_name = driver.cuDeviceGetName(_NAME_LEN, dev)
    if not _ok(driver, err):
        return None
    attr = driver.CUdevice_attribute
    err, major = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    err2, minor = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    if not (_ok(driver, err) and _ok(driver, err2)):
        return None
    info: dict[str, Any] = {"index": index, "name": _decode(raw_name), "compute_capability": f"{int(major)}.{int(minor)}",
                            "device_count": int(count), "source": "cuda-python"}
    try:
        err, mem = driver.cuDeviceTotalMem(dev)
        if _ok(driver, err):
            info["total_memory_mb"] = int(mem) >> 20
        err, ver = driver.cuDriverGetVersion()
        if _ok(driver, err):
            info["driver_cuda_version"] = f"{int(ver) // 1000}.{int(ver) % 1000 // 10}"
    except Exception:
        pass
    return info


def _via_ctypes(index: int) -> dict[str, Any] | None:
    """The same questions straight to ``libcuda.so.1``, for a device (e.g. a Jetson) without cuda-python."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    try:
        if lib.cuInit(0) != 0:
            return None
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or index >= count.value:
            return None
        dev = ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
            return None
        name = ctypes.create_string_buffer(_NAME_LEN)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        if (lib.cuDeviceGetName(name, _NAME_LEN, dev) != 0
                or lib.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, dev) != 0
                or lib.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, dev) != 0):
            return None
    except (AttributeError, OSError):
        return None
    return {"index": index, "name": _decode(name.value), "compute_capability": f"{major.value}.{minor.value}",
            "device_count": count.value, "source": "libcuda"}


def _decode(raw) -> str:
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).split(b"\0", 1)[0].decode(errors="replace")
    return str(raw).strip()


def cuda_device(index: int = 0) -> dict[str, Any] | None:
    """``{"name", "compute_capability" ("8.6"), "index", "device_count", ...}`` for CUDA device ``index`` (as
    numbered under ``CUDA_VISIBLE_DEVICES``), or ``None`` when there is no usable driver or device."""
    driver = _driver_module()
    if driver is not None:
        try:
            return _via_cuda_python(driver, index)
        except Exception:
            return None
    return _via_ctypes(index)


def has_cuda_gpu() -> bool:
    return cuda_device() is not None
