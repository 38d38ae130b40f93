"""Build a TensorRT engine from a model bundle, and check an engine before loading it.

One code path serves both TensorRT flavours (docs/architecture.md, "Engines"):

* ``tensorrt`` (full TensorRT 10.x / 11.x: Jetson, data centre, desktop GPUs). Builds on the GPU that
  will run the engine; the engine is tied to that GPU model and TensorRT version.
* ``tensorrt-rtx`` (TensorRT for RTX, the ``tensorrt-rtx`` PyPI wheel, ``import tensorrt_rtx``). Its
  builder compiles ahead of time and runs on a CPU-only machine; the engine runs on any GPU of the
  compute capabilities it was built for.

Precision lives in the ONNX file (``model.onnx`` FP32, ``model.fp16.onnx``, ``model.int8.onnx`` with
Q/DQ nodes); the network is strongly typed, so the builder only selects the file. Differences between
the flavours are found by feature checks (``hasattr``) on the imported module, never by version strings.

Every engine gets a sidecar ``<engine>.json`` describing what it was built from, with what and for which
GPU; :func:`check_engine` reads it before an engine is loaded and refuses a mismatch with a message that
says what to do. tensorrt / tensorrt_rtx / cuda-python are imported inside functions only.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from .bundle import INPUT_NAME, MAP_NAME, PRECISION_FILES, SCORE_NAME, load_bundle, sha256_file

ENGINE_FORMAT = "memseg-edge-engine"
ENGINE_FORMAT_VERSION = 1
FLAVOURS = ("tensorrt", "tensorrt-rtx")
_ALIASES = {"tensorrt": "tensorrt", "trt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx", "tensorrt_rtx": "tensorrt-rtx",
            "rtx": "tensorrt-rtx"}
# TensorRT-RTX builds, when no target is named, for "compute capability 8.0, 8.6, 8.9, 12.0, and later"
# (NVIDIA, TensorRT-RTX docs, "CPU-only AOT engines"); Turing (7.5) must be named explicitly.
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")
RTX_DEFAULT_LATER_FROM = (12, 0)

# What to do without an engine: the runtime and eval run a bundle's ONNX file with onnxruntime on the CPU.
ONNX_INSTEAD = "memseg-edge run --model BUNDLE (or memseg-edge eval BUNDLE) runs the bundle with onnxruntime, no engine"
TRT_MISSING = (
    "TensorRT is not installed ({why}): on the device with the NVIDIA GPU, pip install 'memseg-edge[trt]' "
    "(on a Jetson, JetPack's TensorRT: apt install python3-libnvinfer, venv with --system-site-packages); "
    "or build with --backend tensorrt-rtx (pip install 'memseg-edge[rtx]', builds on a CPU too); or skip the "
    "engine: " + ONNX_INSTEAD + ".")
RTX_MISSING = (
    "TensorRT for RTX is not installed ({why}): pip install 'memseg-edge[rtx]'; or build with --backend tensorrt "
    "(NVIDIA's full TensorRT on the target GPU); or skip the engine: " + ONNX_INSTEAD + ".")
NO_GPU = (
    "full TensorRT builds an engine on the GPU that will run it, and no CUDA GPU is usable here "
    "(no NVIDIA driver, no device, or CUDA_VISIBLE_DEVICES hides it). Run build-engine on the target device, "
    "or use --backend tensorrt-rtx, whose builder runs on a CPU.")


class EngineError(RuntimeError):
    """Base class of this module's errors; the message says what to do."""


class EngineBuildError(EngineError):
    """An engine could not be built (missing TensorRT, no GPU, unparsable graph, failed build...)."""


class EngineCheckError(EngineError):
    """An engine must not be loaded here (other GPU, TensorRT version or flavour; changed file; no sidecar)."""


# ----------------------------------------------------------------------------------------------------
# tensorrt-rtx packaging fix
# ----------------------------------------------------------------------------------------------------

_rtx_lock = threading.Lock()
_rtx_prepared: dict[str, Any] = {}   # "dir": Path | None once done, "handle": the CDLL kept alive


def _find_spec(name: str):
    """``importlib.util.find_spec`` without its exceptions (a module set to None in sys.modules raises)."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None



def _rtx_link_base() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memseg-edge" / "trt-rtx-libs"


def _ensure_link(link: Path, target: Path) -> None:
    """``link -> target``, replacing a stale link (e.g. to another venv's libraries) atomically."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _pick_lib(libdir: Path, stem: str) -> Path | None:
    """``libfoo.so.1`` for stem ``libfoo.so`` (the shortest versioned name, i.e. the soname)."""
    found = sorted((p for p in libdir.glob(stem + ".*") if p.is_file()), key=lambda p: (len(p.name), p.name))
    return found[0] if found else None


def prepare_tensorrt_rtx(log: Callable[[str], Any] | None = None) -> Path | None:
    """Work around the tensorrt-rtx wheel's missing ``libtensorrt_rtx.so`` link; call before the first
    ``import tensorrt_rtx`` (``build_engine`` does).

    The wheel ships ``libtensorrt_rtx.so.1`` only, and its ONNX parser ``dlopen``s ``libtensorrt_rtx.so``
    when it adds a plugin layer: the process aborts. Fix (no write into site-packages): a per-user cache
    folder holds links ``libtensorrt_rtx.so`` and ``libtensorrt_onnxparser_rtx.so.1`` to the wheel's files,
    and the parser is loaded through its link with ``RTLD_GLOBAL`` first, so its ``$ORIGIN`` is that folder;
    the wheel's own loader then finds the parser already mapped, and the parser's later ``dlopen`` finds the
    link and gets the already loaded library (one copy, one plugin registry).

    Idempotent and thread-safe. Returns the folder the parser's ``$ORIGIN`` resolves to, or ``None`` when
    nothing could be done (wheel not installed, already imported, no writable folder); never raises.
    """
    say = log or (lambda msg: None)
    with _rtx_lock:
        if "dir" in _rtx_prepared:
            return _rtx_prepared["dir"]
        result = None
        try:
            result = _prepare_tensorrt_rtx(say)
        except Exception as exc:  # never let a workaround break the import that follows
            say(f"tensorrt-rtx library links not prepared ({type(exc).__name__}: {exc}); "
                "ONNX models with plugin layers may abort the parser")
        if result is not None or _find_spec("tensorrt_rtx_libs") is not None:
            _rtx_prepared["dir"] = result  # do not retry; a missing wheel may still be installed later
        return result


def _prepare_tensorrt_rtx(say: Callable[[str], Any]) -> Path | None:
    spec = _find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.origin:
        return None
    libdir = Path(spec.origin).parent
    if (libdir / "libtensorrt_rtx.so").exists():
        return libdir  # a fixed wheel: nothing to do
    core = _pick_lib(libdir, "libtensorrt_rtx.so")
    parser = _pick_lib(libdir, "libtensorrt_onnxparser_rtx.so")
    if core is None or parser is None:
        say(f"tensorrt-rtx libraries not found in {libdir}; not preparing links")
        return None
    if "tensorrt_rtx_bindings" in sys.modules or "tensorrt_rtx_libs" in sys.modules:
        say("tensorrt_rtx was imported before prepare_tensorrt_rtx(): the library-link fix cannot apply in this "
            "process; ONNX models with plugin layers may abort the parser")
        return None
    key = hashlib.sha256(str(libdir.resolve()).encode()).hexdigest()[:16]  # one folder per installed wheel
    candidates = [_rtx_link_base() / key,
                  Path(tempfile.gettempdir()) / f"memseg-edge-trt-rtx-libs-{os.getuid()}" / key]
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _ensure_link(folder / "libtensorrt_rtx.so", core)
            _ensure_link(folder / parser.name, parser)
        except OSError:
            continue
        _rtx_prepared["handle"] = ctypes.CDLL(str(folder / parser.name), mode=ctypes.RTLD_GLOBAL)
        return folder
    say("no writable folder for the tensorrt-rtx library links; ONNX models with plugin layers may abort the parser")
    return None


# ----------------------------------------------------------------------------------------------------
# the flavour adapter
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flavour:
    """An imported TensorRT module and what it can do."""
    name: str                      # "tensorrt" | "tensorrt-rtx"
    trt: Any                       # the module
    version: str
    strongly_typed_flag: bool      # NetworkDefinitionCreationFlag.STRONGLY_TYPED exists
    compute_targets: bool          # builder config takes compute-capability targets (ahead-of-time, CPU builds)
    timing_cache: bool             # a timing cache changes the build (a deprecated no-op in TensorRT-RTX)

    @property
    def needs_gpu_to_build(self) -> bool:
        return not self.compute_targets


def normalize_backend(backend: str) -> str:
    key = str(backend).strip().lower()
    if key == "onnxruntime":
        raise EngineBuildError("onnxruntime runs the bundle's ONNX file directly; there is no engine to build "
                               "(memseg-edge run --model BUNDLE)")
    if key not in _ALIASES:
        raise EngineBuildError(f"unknown TensorRT backend {backend!r}: use one of {', '.join(FLAVOURS)}")
    return _ALIASES[key]


def import_flavour(backend: str, log: Callable[[str], Any] | None = None) -> Flavour:
    """Import ``tensorrt`` or ``tensorrt_rtx`` (the latter after :func:`prepare_tensorrt_rtx`)."""
    name = normalize_backend(backend)
    if name == "tensorrt":
        try:
            trt = importlib.import_module("tensorrt")
        except Exception as exc:  # ImportError, or OSError when libnvinfer is missing
            raise EngineBuildError(TRT_MISSING.format(why=f"import tensorrt: {exc}")) from exc
    else:
        prepare_tensorrt_rtx(log)
        try:
            trt = importlib.import_module("tensorrt_rtx")
        except Exception as exc:
            raise EngineBuildError(RTX_MISSING.format(why=f"import tensorrt_rtx: {exc}")) from exc
    if not hasattr(trt, "Builder") or not hasattr(trt, "OnnxParser"):
        raise EngineBuildError(f"the installed {name} module has no Builder/OnnxParser: reinstall it")
    compute_targets = hasattr(trt, "ComputeCapability") and hasattr(trt.IBuilderConfig, "set_compute_capability")
    return Flavour(
        name=name, trt=trt, version=str(getattr(trt, "__version__", "unknown")),
        strongly_typed_flag=hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
        compute_targets=compute_targets,
        timing_cache=name == "tensorrt" and hasattr(trt.IBuilderConfig, "set_timing_cache"))


def _auto_flavour(log: Callable[[str], Any]) -> tuple[Flavour, dict | None]:
    from .cuda_env import cuda_device
    device = cuda_device()
    has_trt = _find_spec("tensorrt") is not None
    has_rtx = _find_spec("tensorrt_rtx") is not None
    if device is not None and has_trt:
        try:
            return import_flavour("tensorrt", log), device
        except EngineBuildError as exc:
            if not has_rtx:
                raise
            log(f"{exc}\nfalling back to tensorrt-rtx")
    if has_rtx:
        return import_flavour("tensorrt-rtx", log), device
    if has_trt:
        raise EngineBuildError(NO_GPU)
    raise EngineBuildError(
        "no TensorRT is installed (neither tensorrt nor tensorrt_rtx can be imported). On the device with the "
        "NVIDIA GPU: pip install 'memseg-edge[trt]' tensorrt (on a Jetson, JetPack's TensorRT: apt install "
        "python3-libnvinfer); for GeForce/RTX GPUs, or to build on a machine without a GPU: "
        "pip install 'memseg-edge[rtx]' and --backend tensorrt-rtx. Without an engine, " + ONNX_INSTEAD + ".")


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

def sidecar_path(engine_path: str | Path) -> Path:
    """``model.fp16.engine`` -> ``model.fp16.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "gpu"


def default_engine_name(precision: str, flavour: str, device: dict | None) -> str:
    """``model.<gpu>.<precision>.engine`` (docs/architecture.md); ``rtx`` in place of the GPU for a TensorRT-RTX engine,
    which runs on every GPU it targets."""
    tag = "rtx" if flavour == "tensorrt-rtx" else _slug(device["name"] if device else "gpu")
    return f"model.{tag}.{precision}.engine"


def _cc_str(cc: Any) -> str | None:
    """``(8, 6)``, ``"8.6"``, ``"86"``, ``"sm_86"``, ``8.6`` -> ``"8.6"``."""
    if cc is None:
        return None
    if isinstance(cc, (tuple, list)):
        return f"{int(cc[0])}.{int(cc[1])}"
    s = str(cc).strip().lower().replace("sm_", "").replace("sm", "")
    if "." in s:
        major, minor = s.split(".", 1)
        return f"{int(major)}.{int(minor)}"
    if s.isdigit() and len(s) >= 2:
        return f"{int(s[:-1])}.{int(s[-1])}"
    raise ValueError(f"not a compute capability: {cc!r} (write it as 8.6)")


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


def _atomic_write(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _make_logger(trt, log: Callable[[str], Any], verbose: bool):
    """A TensorRT logger that forwards warnings (and info with ``verbose``) to ``log`` and keeps errors."""
    sev = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg):  # called by TensorRT, possibly from its own threads
            level = int(severity)
            if level <= int(sev.ERROR):
                self.errors.append(msg)
                log(f"TensorRT error: {msg}")
            elif level == int(sev.WARNING):
                self.warnings.append(msg)
                log(f"TensorRT warning: {msg}")
            elif verbose and level == int(sev.INFO):
                log(f"TensorRT: {msg}")

    return _Logger()


def _parser_errors(parser, flavour: Flavour, onnx_path: Path) -> str:
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node_name = e.node_name() if hasattr(e, "node_name") else ""
        op = e.node_operator() if hasattr(e, "node_operator") else ""
        node = e.node()
        where = f"node {node_name or '#' + str(node)!r} (op {op})" if node >= 0 or node_name else "the model"
        desc = str(e.desc()).strip().replace("\n", "\n    ")
        hint = ""
        if "Plugin not found" in desc or "No importer registered" in desc:
            hint = (f"\n    -> {flavour.name} {flavour.version} has no layer for op {op!r} and no plugin is registered "
                    "for it")
        elif "UInt8" in desc:
            hint = ("\n    -> TensorRT accepts a uint8 tensor only as the input of a Cast: the export must cast the "
                    "image to float before any other op (e.g. the NHWC->NCHW Transpose)")
        lines.append(f"  {where}: {desc} [{e.code()}]{hint}")
    body = "\n".join(lines) or "  (the parser gave no reason)"
    return (f"{flavour.name} {flavour.version} cannot parse {onnx_path}:\n{body}\n"
            "The node(s) above use an operator or data type this TensorRT does not support: change the export, "
            f"or run the ONNX file with onnxruntime (memseg-edge run --model {onnx_path}).")


# ----------------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------------

_timing_cache_note_logged = False


def build_engine(bundle: str | Path, out: str | Path | None = None, precision: str = "fp32",
                 backend: str | None = None, max_batch: int = 8, opt_batch: int | None = None,
                 workspace_mb: int | None = None, timing_cache: str | Path | None = None,
                 log: Callable[[str], Any] = print, *, compute_capabilities: Iterable[Any] | None = None,
                 register_plugins: Callable[[Any], Iterable[str] | None] | None = None,
                 plugin: bool = False, verbose: bool = False, compare: bool = True,
                 compare_images: str | Path | None = None) -> Path:
    """Build a TensorRT engine for ``precision``'s ONNX file of ``bundle``; returns the engine's path.

    ``out``: the engine file (``<out>.json`` is its sidecar); a folder or ``None`` puts
    ``model.<gpu>.<precision>.engine`` there (or in the bundle). ``backend``: ``"tensorrt"``,
    ``"tensorrt-rtx"`` or ``None`` (full TensorRT where it is importable and a CUDA GPU is here, else
    TensorRT-RTX). The batch dimension of input ``image`` gets the profile (1, ``opt_batch`` or
    ``max_batch``, ``max_batch``). ``timing_cache``: a file read before and written after the build (full
    TensorRT only). ``compute_capabilities`` (TensorRT-RTX only): targets such as ``["7.5", "8.6"]`` or
    ``["current"]`` (the GPU here); default: NVIDIA's default targets (8.0, 8.6, 8.9, 12.0 and later).
    ``register_plugins(trt_module)`` runs before the ONNX file is parsed and returns the names of the plugins
    it registered (recorded in the sidecar). ``plugin``: build the bundle's plugin variant
    (``model.plugin.onnx`` / ``model.fp16.plugin.onnx``, written from the precision variant if absent), in
    which one ``memseg::MemoryArgminL2`` node (the fused memory-bank kernel) replaces the standard-op memory
    step; its creator is registered before parsing. ``compare``: after the build, run the engine and its
    ONNX variant on a few images (``compare_images``, a folder, else seeded random images) where this machine
    can run the engine, and record the result, or why there was none, as ``comparison`` in the sidecar
    (:func:`compare_with_onnx`). An FP16 variant that does not exist yet is made first (``calibrate --fp16``).
    Raises :class:`EngineBuildError` with what to do.
    """
    t_start = time.perf_counter()
    if precision not in PRECISION_FILES:
        raise EngineBuildError(f"precision must be one of {', '.join(PRECISION_FILES)}, found {precision!r}")
    max_batch = int(max_batch)
    opt = int(opt_batch) if opt_batch is not None else max_batch
    if max_batch < 1 or not 1 <= opt <= max_batch:
        raise EngineBuildError(f"need 1 <= opt_batch <= max_batch, found opt_batch={opt_batch}, max_batch={max_batch}")

    # The bundle first: a wrong path or a missing variant is the most common mistake.
    try:
        bnd, _ = load_bundle(bundle)
        if precision == "fp16":
            _ensure_fp16(bnd, log)
        onnx_path = _plugin_variant(bnd, precision, log) if plugin else bnd.verify(precision)
    except (FileNotFoundError, ValueError) as exc:
        raise EngineBuildError(str(exc)) from exc
    if plugin and register_plugins is None:
        from .plugin import register_plugin as register_plugins
    onnx_sha = sha256_file(onnx_path)
    declared = bnd.precision_of(onnx_path)
    if declared != precision:
        log(f"note: model.json records {onnx_path.name} as {declared}, building it as requested ({precision})")

    # The TensorRT module, and for full TensorRT a GPU: checked before any TensorRT object exists.
    if backend is None:
        flavour, device = _auto_flavour(log)
    else:
        flavour = import_flavour(backend, log)
        from .cuda_env import cuda_device
        device = cuda_device()
    if flavour.needs_gpu_to_build and device is None:
        raise EngineBuildError(NO_GPU)
    trt = flavour.trt
    log(f"building a {precision} engine from {onnx_path} with {flavour.name} {flavour.version} "
        f"on {device['name'] + ' (compute ' + device['compute_capability'] + ')' if device else 'the CPU'}")

    plugins: list[str] = []
    if register_plugins is not None:
        plugins = [str(p) for p in (register_plugins(trt) or [])]

    logger = _make_logger(trt, log, verbose)
    builder = trt.Builder(logger)
    if flavour.strongly_typed_flag:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    else:  # TensorRT before strong typing: explicit batch, and precision by builder flags (below)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        log(f"warning: {flavour.name} {flavour.version} has no strongly typed networks; precision set by builder flags")
    network = builder.create_network(flags)
    strongly_typed = bool(network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) \
        if flavour.strongly_typed_flag and hasattr(network, "get_flag") else False
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(_parser_errors(parser, flavour, onnx_path))

    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    if INPUT_NAME not in inputs:
        raise EngineBuildError(f"{onnx_path} has no input {INPUT_NAME!r} (found {sorted(inputs)}): "
                               "not a memseg-edge bundle model; export it with `memseg-edge export`")
    missing = [n for n in (MAP_NAME, SCORE_NAME) if n not in outputs]
    if missing:
        raise EngineBuildError(f"{onnx_path} lacks output(s) {missing} (found {sorted(outputs)}): "
                               "not a memseg-edge bundle model; export it with `memseg-edge export`")
    shape = list(inputs[INPUT_NAME].shape)
    if len(shape) != 4:
        raise EngineBuildError(f"input {INPUT_NAME!r} of {onnx_path} has shape {shape}; expected [N, H, W, 3]")
    fixed = [d if d >= 0 else v for d, v in zip(shape[1:], (bnd.image_size, bnd.image_size, 3))]
    if shape[0] >= 0:  # a static batch: the profile can only be that batch
        log(f"warning: {onnx_path.name} has a static batch of {shape[0]}; max_batch/opt_batch set to it")
        max_batch = opt = min_b = shape[0]
    else:
        min_b = 1

    config = builder.create_builder_config()
    if not flavour.strongly_typed_flag:
        if precision == "fp16" and hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8" and hasattr(trt.BuilderFlag, "INT8"):
            config.set_flag(trt.BuilderFlag.INT8)
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, [min_b, *fixed], [opt, *fixed], [max_batch, *fixed])
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"TensorRT refused the batch profile (1, {opt}, {max_batch}) for {INPUT_NAME!r}: "
                               + "; ".join(logger.errors[-3:]))

    targets = _configure_targets(flavour, config, compute_capabilities, device, log)

    cache = None
    global _timing_cache_note_logged
    if timing_cache is not None:
        if flavour.timing_cache:
            cache = _load_timing_cache(config, Path(timing_cache), log)
        elif not _timing_cache_note_logged:
            _timing_cache_note_logged = True
            log(f"note: {flavour.name} ignores timing caches (a deprecated no-op that would also force a GPU "
                "query); --timing-cache skipped")

    t_build = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_only = time.perf_counter() - t_build
    if serialized is None or serialized.nbytes == 0:
        why = "\n".join(f"  {m}" for m in logger.errors[-8:]) or "  (TensorRT gave no reason)"
        raise EngineBuildError(
            f"{flavour.name} {flavour.version} could not build an engine from {onnx_path}:\n{why}\n"
            "Try: a larger workspace (--workspace MB), a smaller --max-batch, another --precision"
            + (", or --backend tensorrt on the target GPU" if flavour.name == "tensorrt-rtx" else "")
            + f", or run the ONNX file with onnxruntime (memseg-edge run --model {onnx_path}).")

    out_path = _resolve_out(out, bnd.root, precision + (".plugin" if plugin else ""), flavour.name, device)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    view = memoryview(serialized)
    _atomic_write(out_path, view)
    engine_sha = hashlib.sha256(view).hexdigest()
    if cache is not None:
        try:
            _atomic_write(Path(timing_cache), memoryview(config.get_timing_cache().serialize()))
        except Exception as exc:  # a cache is an optimisation: never fail the build for it
            log(f"warning: timing cache not saved to {timing_cache}: {exc}")

    if flavour.compute_targets:
        gpu: dict[str, Any] = {"built_on": device["name"] if device else "cpu", **targets}
    else:
        gpu = {"name": device["name"], "compute_capability": device["compute_capability"]}
    meta = {
        "format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION,
        "flavour": flavour.name, "trt_version": flavour.version, "gpu": gpu,
        "precision": precision, "strongly_typed": strongly_typed,
        "max_batch": max_batch, "opt_batch": opt, "min_batch": min_b,
        "input": {"name": INPUT_NAME, "shape": ["batch", *fixed], "dtype": "uint8"},
        "outputs": [MAP_NAME, SCORE_NAME],
        "workspace_mb": workspace_mb,
        "bundle": str(bnd.root.resolve()), "onnx_file": onnx_path.name, "onnx_sha256": onnx_sha,
        "model_json_sha256": sha256_file(bnd.root / "model.json"),
        "image_size": bnd.image_size, "resize": bnd.fit, "threshold": bnd.threshold_for(onnx_path.name),
        "top_k": bnd.top_k,
        "plugins": plugins,
        "engine_file": out_path.name, "engine_bytes": int(serialized.nbytes), "engine_sha256": engine_sha,
        "warnings": logger.warnings[-20:],
        "built": _now(), "build_seconds": round(time.perf_counter() - t_start, 3),
        "builder_seconds": round(build_only, 3),
    }
    _atomic_write(sidecar_path(out_path), (json.dumps(meta, indent=2) + "\n").encode())
    log(f"wrote {out_path} ({serialized.nbytes / 1e6:.2f} MB, {meta['build_seconds']:.1f} s) and "
        f"{sidecar_path(out_path).name}")
    if compare:
        try:
            meta["comparison"] = compare_with_onnx(out_path, compare_images, log=log)
        except Exception as exc:  # the engine is built and checked; a failed comparison is recorded, not fatal
            meta["comparison"] = {"compared": False, "reason": f"the comparison failed: {type(exc).__name__}: {exc}"}
            log(f"warning: engine not compared with its ONNX file ({meta['comparison']['reason']})")
        _atomic_write(sidecar_path(out_path), (json.dumps(meta, indent=2) + "\n").encode())
    return out_path


COMPARE_IMAGES = 4


def _comparison_batch(images: str | Path | None, size: int, n: int, fit: str = "stretch"):
    """``n`` RGB uint8 images ``[n, size, size, 3]`` from folder ``images`` (the first by name), else seeded
    random ones; and a description of where they came from."""
    import numpy as np

    from .preprocess import list_images, load_rgb, prepare

    if images is not None:
        paths = list_images(images)[:n]
        if paths:
            return np.stack([prepare(load_rgb(p), size, fit) for p in paths]), f"{len(paths)} images from {images}"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), f"{n} random images (seed 0)"


def compare_with_onnx(engine_path: str | Path, images: str | Path | None = None, n: int = COMPARE_IMAGES,
                      log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run a freshly built engine and the ONNX variant it came from (onnxruntime, CPU) on ``n`` images and
    compare them, as polygraphy does after a build; returns the sidecar's ``comparison`` record.

    A plugin engine is compared with the same precision's standard-op variant (onnxruntime has no fused
    kernel). Where the engine cannot run here (no CUDA GPU, a GPU it was not built for), the record says
    ``compared: false`` and why; the comparison is then for the target device (``memseg-edge eval`` of the
    engine and of the ONNX file on the same images)."""
    import numpy as np

    from .backends import OnnxRuntimeBackend
    from .cuda_env import cuda_device
    from .threads import configured, default_threads

    engine = Path(engine_path)
    meta = load_engine_meta(engine)
    onnx_name = PRECISION_FILES.get(meta.get("precision", "fp32"), "model.onnx") if meta.get("plugins") \
        else meta.get("onnx_file", "model.onnx")
    onnx_path = Path(meta.get("bundle") or engine.parent) / onnx_name
    later = (f"compare on the target device: memseg-edge eval {engine} and memseg-edge eval {onnx_path} on the same "
             "test images")
    if cuda_device() is None:
        record = {"compared": False, "reason": f"no CUDA GPU on the machine that built the engine; {later}"}
        log(f"not compared with {onnx_name}: {record['reason']}")
        return record
    from .trt_backend import TensorRTBackend

    try:
        trt_backend = TensorRTBackend(engine, log=log)
    except (EngineError, RuntimeError) as exc:
        record = {"compared": False, "reason": f"the engine cannot run here ({exc}); {later}"}
        log(f"not compared with {onnx_name}: {record['reason']}")
        return record
    try:
        reference = OnnxRuntimeBackend(onnx_path, threads=configured() or default_threads())
        batch, source = _comparison_batch(images, trt_backend.image_size, n, meta.get("resize", "stretch"))
        map_e, score_e = trt_backend.infer(batch)
        map_o, score_o = reference.infer(batch)
    finally:
        trt_backend.close()
    threshold = meta.get("threshold")
    diff = np.abs(map_e.astype(np.float64) - map_o)
    record = {
        "compared": True, "against": f"{onnx_name} (onnxruntime, CPU)", "images": source,
        "gpu": cuda_device()["name"],
        "max_abs_map_diff": float(diff.max()), "mean_abs_map_diff": float(diff.mean()),
        "max_abs_score_diff": float(np.abs(score_e.astype(np.float64) - score_o).max()),
        "verdicts_agree": None if threshold is None else
        f"{int(((score_e >= threshold) == (score_o >= threshold)).sum())}/{len(batch)}",
    }
    log(f"compared with {onnx_name} on {source}: max |map difference| {record['max_abs_map_diff']:.2e}, max |score "
        f"difference| {record['max_abs_score_diff']:.2e}"
        + (f", verdicts agree {record['verdicts_agree']}" if threshold is not None else ""))
    return record


def _ensure_fp16(bnd, log: Callable[[str], Any]) -> None:
    """Make the bundle's FP16 variant when it does not exist yet (what ``calibrate --fp16`` does: no images
    needed), so ``build-engine --precision fp16`` works right after ``export`` or an INT8-only ``calibrate``."""
    path = bnd.root / PRECISION_FILES["fp16"]
    if path.is_file():
        return
    try:
        from .calibration.fp16 import convert_fp16
    except ImportError as exc:
        raise EngineBuildError(f"{path} does not exist and making it needs onnx ({exc.name} is not installed): "
                               f"pip install 'memseg-edge[onnx]', then memseg-edge calibrate {bnd.root} --fp16") from exc
    log(f"{path.name} does not exist yet: making it (as memseg-edge calibrate {bnd.root} --fp16 does)")
    try:
        convert_fp16(bnd.root, log=log)
    except (ValueError, RuntimeError) as exc:
        raise EngineBuildError(f"{path} not found and could not be made here ({exc}); make it with "
                               f"`memseg-edge calibrate {bnd.root} --fp16`") from exc
    bnd.meta = json.loads((bnd.root / "model.json").read_text())


def _plugin_variant(bnd, precision: str, log: Callable[[str], Any]) -> Path:
    """The bundle's plugin variant for ``precision`` (written on first use), checked against model.json."""
    from .plugin_rewrite import PLUGIN_FILES, write_plugin_variants

    if precision not in PLUGIN_FILES:
        raise ValueError(f"--plugin builds {' and '.join(PLUGIN_FILES)} engines; the INT8 variant keeps the memory "
                         "step as FP32 standard ops (build it without --plugin)")
    path = bnd.root / PLUGIN_FILES[precision]
    entry = bnd.meta.get("files", {}).get(path.name)
    if not path.is_file() or entry is None:
        write_plugin_variants(bnd.root, precisions=(precision,), log=log)
        bnd.meta = json.loads((bnd.root / "model.json").read_text())
        entry = bnd.meta.get("files", {}).get(path.name)
    if entry is None or sha256_file(path) != entry["sha256"]:
        raise ValueError(f"{path} does not match the sha256 in model.json: delete it and build again "
                         "(it is rewritten from the bundle's model)")
    return path


def _resolve_out(out, bundle_root: Path, precision: str, flavour: str, device: dict | None) -> Path:
    if out is None:
        return bundle_root / default_engine_name(precision, flavour, device)
    out = Path(out)
    if out.is_dir():
        return out / default_engine_name(precision, flavour, device)
    return out


def _configure_targets(flavour: Flavour, config, compute_capabilities, device: dict | None,
                       log: Callable[[str], Any]) -> dict[str, Any]:
    """Compute-capability targets of an ahead-of-time (TensorRT-RTX) build; ``{}`` for full TensorRT."""
    if not flavour.compute_targets:
        if compute_capabilities:
            log(f"note: {flavour.name} builds for the GPU it runs on; compute_capabilities ignored")
        return {}
    trt = flavour.trt
    wanted = [str(c).strip().lower() for c in (compute_capabilities or [])]
    if not wanted and device is not None and not _rtx_default_covers(device["compute_capability"]):
        log(f"note: {device['name']} (compute {device['compute_capability']}) is not among TensorRT-RTX's default "
            "targets; building for it")
        wanted = [device["compute_capability"]]
    if not wanted:
        return {"compute_capabilities": list(RTX_DEFAULT_TARGETS), "targets": "default"}
    members, ccs = [], []
    for c in wanted:
        if c == "current":
            if device is None:
                raise EngineBuildError("compute capability 'current' needs a GPU here; name the targets instead "
                                       "(e.g. 8.6) to build on a CPU")
            members.append(trt.ComputeCapability.CURRENT)
            ccs.append(device["compute_capability"])
            continue
        try:
            cc = _cc_str(c)
        except ValueError as exc:
            raise EngineBuildError(str(exc)) from exc
        member = getattr(trt.ComputeCapability, "SM" + cc.replace(".", ""), None)
        if member is None:
            known = [n[2:-1] + "." + n[-1] for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
            raise EngineBuildError(f"{flavour.name} {flavour.version} cannot target compute capability {cc}; "
                                   f"it knows {', '.join(known)} (use --backend tensorrt for other GPUs)")
        members.append(member)
        ccs.append(cc)
    config.num_compute_capabilities = len(members)
    for i, m in enumerate(members):
        config.set_compute_capability(m, i)
    return {"compute_capabilities": sorted(set(ccs), key=_cc_tuple), "targets": "explicit"}


def _rtx_default_covers(cc: str) -> bool:
    return cc in RTX_DEFAULT_TARGETS or _cc_tuple(cc) >= RTX_DEFAULT_LATER_FROM


def _load_timing_cache(config, path: Path, log: Callable[[str], Any]):
    data = b""
    if path.is_file():
        data = path.read_bytes()
        log(f"timing cache: {path} ({len(data)} bytes)")
    try:
        cache = config.create_timing_cache(data)
        if cache is None or not config.set_timing_cache(cache, False):
            raise ValueError("it does not match this GPU or TensorRT version")
    except Exception as exc:
        log(f"warning: timing cache {path} not used ({exc}); starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, True)
    return cache


# ----------------------------------------------------------------------------------------------------
# checking
# ----------------------------------------------------------------------------------------------------

def _rebuild_hint(meta: dict, engine: Path, flavour: str | None = None) -> str:
    bundle = meta.get("bundle") or "BUNDLE"
    return (f"rebuild it on this device with `memseg-edge build-engine {bundle} --precision "
            f"{meta.get('precision', 'fp32')} --backend {flavour or meta.get('flavour', 'tensorrt')} --out {engine}`")


def load_engine_meta(engine_path: str | Path) -> dict:
    """The sidecar of an engine; :class:`EngineCheckError` when it is missing or not one."""
    engine = Path(engine_path)
    if not engine.is_file():
        raise EngineCheckError(f"engine {engine} not found: build it with "
                               f"`memseg-edge build-engine BUNDLE --out {engine}`")
    side = sidecar_path(engine)
    if not side.is_file():
        raise EngineCheckError(f"{side} not found: an engine without its description cannot be checked against "
                               f"this device; rebuild it with `memseg-edge build-engine BUNDLE --out {engine}` "
                               "(it writes both files; copy them together)")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise EngineCheckError(f"{side} is unreadable ({exc}): rebuild the engine with `memseg-edge build-engine`") \
            from exc
    if not isinstance(meta, dict) or meta.get("format") != ENGINE_FORMAT:
        raise EngineCheckError(f"{side} is not a memseg-edge engine description")
    if int(meta.get("format_version", 0)) > ENGINE_FORMAT_VERSION:
        raise EngineCheckError(f"{side} has engine format {meta.get('format_version')}; this memseg-edge reads up to "
                               f"{ENGINE_FORMAT_VERSION}: upgrade memseg-edge")
    return meta


def check_engine(engine_path: str | Path, flavour: str, trt_version: str, gpu_name: str | None,
                 compute_capability: Any) -> dict:
    """Refuse an engine that this process must not load; returns its sidecar.

    ``flavour``/``trt_version``: the TensorRT module this process would load the engine with;
    ``gpu_name``/``compute_capability`` (``"8.6"`` or ``(8, 6)``): the GPU it would run on (see
    :func:`memseg_edge.cuda_env.cuda_device`). Pass ``None`` for both to check everything but the GPU.
    A full-TensorRT engine must match the GPU's name and compute capability; a TensorRT-RTX engine, one of
    the compute capabilities it was built for. Also checked: flavour, exact TensorRT version, and the
    engine file's sha256 against the sidecar.
    """
    engine = Path(engine_path)
    meta = load_engine_meta(engine)
    here = normalize_backend(flavour)
    if meta.get("flavour") != here:
        raise EngineCheckError(f"{engine} was built with {meta.get('flavour')} and cannot be loaded with {here}: "
                               + _rebuild_hint(meta, engine, here))
    if str(meta.get("trt_version")) != str(trt_version):
        raise EngineCheckError(f"{engine} was built with {here} {meta.get('trt_version')}, this device has "
                               f"{trt_version}; engines only load with the version that built them: "
                               + _rebuild_hint(meta, engine, here))
    gpu = meta.get("gpu") or {}
    cc = _cc_str(compute_capability)
    if gpu_name is not None or cc is not None:
        if here == "tensorrt":
            if gpu.get("name") != gpu_name or _cc_str(gpu.get("compute_capability")) != cc:
                raise EngineCheckError(
                    f"{engine} was built for {gpu.get('name')} (compute {gpu.get('compute_capability')}), this device "
                    f"is {gpu_name} (compute {cc}); a TensorRT engine runs only on the GPU model it was built on: "
                    + _rebuild_hint(meta, engine, here))
        else:
            targets = [_cc_str(c) for c in gpu.get("compute_capabilities") or []]
            covered = cc in targets or (gpu.get("targets") == "default" and cc is not None
                                        and _cc_tuple(cc) >= RTX_DEFAULT_LATER_FROM)
            if not covered:
                raise EngineCheckError(
                    f"{engine} was built for compute capabilities {', '.join(targets) or '?'}"
                    f"{' and later' if gpu.get('targets') == 'default' else ''}, this GPU ({gpu_name}) is "
                    f"compute {cc}: rebuild it with `memseg-edge build-engine {meta.get('bundle') or 'BUNDLE'} "
                    f"--precision {meta.get('precision', 'fp32')} --backend tensorrt-rtx --compute-capability {cc} "
                    f"--out {engine}` (if TensorRT-RTX cannot target it, use --backend tensorrt)")
    recorded = meta.get("engine_sha256")
    if not recorded:
        raise EngineCheckError(f"{sidecar_path(engine)} records no engine_sha256: " + _rebuild_hint(meta, engine))
    actual = sha256_file(engine)
    if actual != recorded:
        raise EngineCheckError(f"{engine} differs from the engine that was built (sha256 {actual[:12]}..., sidecar "
                               f"says {recorded[:12]}...): it was changed or copied incompletely; copy it again or "
                               + _rebuild_hint(meta, engine))
    return meta


def runtime_identity(backend: str) -> dict[str, Any]:
    """What :func:`check_engine` needs about this process: ``{"flavour", "trt_version", "gpu_name",
    "compute_capability"}`` (GPU fields ``None`` without a CUDA GPU). Imports the TensorRT module."""
    from .cuda_env import cuda_device
    flavour = import_flavour(backend)
    device = cuda_device()
    return {"flavour": flavour.name, "trt_version": flavour.version,
            "gpu_name": device["name"] if device else None,
            "compute_capability": device["compute_capability"] if device else None}


def no_gpu_to_run(engine_path: str | Path, meta: dict | None = None) -> str:
    """The refusal for an engine on a machine without a CUDA GPU, naming the ONNX file to run instead."""
    engine = Path(engine_path)
    if meta is None:
        try:
            meta = load_engine_meta(engine)
        except EngineCheckError:
            meta = {}
    bundle = meta.get("bundle") or "BUNDLE"
    onnx_file = Path(bundle) / (meta.get("onnx_file") or "model.onnx")
    return (f"no CUDA GPU is usable here, and {engine} needs one: pass the bundle folder it was built from instead, "
            f"which runs with onnxruntime on the CPU (memseg-edge run --model {bundle}, or "
            f"memseg-edge eval {onnx_file} --data ...)")


def check_engine_here(engine_path: str | Path, backend: str) -> dict:
    """:func:`check_engine` against this process's TensorRT module and CUDA device; refuses when there is no
    GPU (an engine needs one to run)."""
    ident = runtime_identity(backend)
    if ident["gpu_name"] is None:
        raise EngineCheckError(no_gpu_to_run(engine_path))
    return check_engine(engine_path, **ident)
