"""How many CPU threads the heavy libraries may use: one ``--threads N`` option for every command that
computes (train, eval, calibrate, predict, demo, run) and one function that applies the count.

Why the default is not "every core": PyTorch (OpenMP) and onnxruntime start one worker per core and
their workers spin while they wait for each other. When another process holds one of those cores (a
second job, the camera driver, another helper on a shared server), every parallel region waits for a
worker that is not scheduled, and the step becomes an order of magnitude slower, not twice as slow
(docs/architecture.md, "CPU threads"). The default is therefore half the physical cores this process
may run on, at least 1 (on a 2-core edge PC: 1 thread, the setting that kept the demo's training fast
under load where the libraries' own default crawled). ``OMP_NUM_THREADS``, when
set, is the default instead (whoever set it knew the machine); ``MEMSEG_EDGE_THREADS`` sets it for all
commands. ``tools/benchmark_threads.py`` measures the choices on a machine, idle and under load.

Never imports torch: it is configured only when something else already loaded it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

ENV_VAR = "MEMSEG_EDGE_THREADS"

_applied: int | None = None


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. a container's or taskset's limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):   # not Linux
        return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical cores among the usable CPUs (hyper-threads of one core counted once); the usable CPU
    count where the topology cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return usable_cpus()
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            return usable_cpus()
    return max(1, len(cores))


def _env_int(name: str) -> int | None:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return None
    return value if value >= 1 else None


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set to a positive integer, else half the physical cores, at least 1."""
    return _env_int("OMP_NUM_THREADS") or max(1, physical_cores() // 2)


def apply_threads(threads: int | None = None) -> int:
    """Use ``threads`` (``None``: :func:`default_threads`) CPU threads from now on; returns the count.

    Sets ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` (read by child processes, and by PyTorch when it is
    imported after this call), OpenCV's thread count, and, when torch is already imported, its intra-op
    and inter-op threads. onnxruntime has no process-wide setting: sessions take
    :func:`configured` through ``SessionOptions.intra_op_num_threads`` (see :func:`ort_session_options`).
    Safe to call again, e.g. right after a command imported torch.
    """
    global _applied
    n = int(threads) if threads else default_threads()
    if n < 1:
        raise ValueError(f"threads must be at least 1, found {threads}")
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    import cv2

    cv2.setNumThreads(n)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)
        set_interop = getattr(torch, "set_num_interop_threads", None) or getattr(torch, "set_interop_threads", None)
        try:
            set_interop(n)
        except (RuntimeError, TypeError):   # only before the first inter-op parallel work; then it stays as it is
            pass
    _applied = n
    return n


def configured() -> int | None:
    """The count :func:`apply_threads` last applied in this process, ``None`` before."""
    return _applied


def ort_session_options(options=None, threads: int | None = None):
    """An ``onnxruntime.SessionOptions`` (``options`` or a new one) with ``threads`` intra-op threads
    (default: :func:`configured`, else :func:`default_threads`) and one inter-op thread."""
    import onnxruntime as ort

    options = options if options is not None else ort.SessionOptions()
    options.intra_op_num_threads = int(threads or configured() or default_threads())
    options.inter_op_num_threads = 1
    return options


def _on_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int:
    return apply_threads(value)


def threads_option(f):
    """``--threads N`` (also ``MEMSEG_EDGE_THREADS``): applied as soon as the command line is parsed; the
    command receives the count actually used as ``threads``."""
    return click.option(
        "--threads", type=click.IntRange(min=1), default=None, envvar=ENV_VAR, callback=_on_threads,
        metavar="N",
        help=f"CPU threads for PyTorch, onnxruntime and OpenCV (env {ENV_VAR}). Default: OMP_NUM_THREADS when set, "
             f"else half the physical cores (here {max(1, physical_cores() // 2)}): all cores crawl when another "
             "process shares them.")(f)
