"""The fused memory-bank kernel (memseg_edge.kernels): cubin + PTX for the target GPUs, the cache keyed by
compiler version, which image a driver can load, the launch plan for every tile (replayed block by block
in numpy, memseg_edge.kernels.emulate) against the kernel's signatures and the reference, and the numpy
reference held equal to the exported standard-op subgraph (onnxruntime) and to train.memory.MemoryBank
(torch). The kernel's numerics need a GPU (marked ``gpu``; tools/gpu_check.py does it with timings)."""
from __future__ import annotations

import ctypes
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from memseg_edge import kernels
from memseg_edge.cuda_env import cuda_device
from memseg_edge.kernels import compile as kc
from memseg_edge.kernels.emulate import PlanError, emulate
from memseg_edge.kernels.reference import memory_step

TARGETS = ("sm_72", "sm_87", "sm_89", "sm_90")   # Jetson Xavier (CUDA 12 NVRTC), Orin, Ada, Hopper
PARAM_BYTES = {"u64": 8, "s64": 8, "b64": 8, "u32": 4, "s32": 4, "b32": 4}


def _have_nvrtc_13() -> bool:
    try:
        from cuda.bindings import nvrtc
        return int(nvrtc.nvrtcVersion()[1]) >= 13
    except Exception:
        return False


def _have_nvrtc_12() -> bool:
    return any(p.endswith((".so.12", ".so.11")) for p in kc._nvrtc_libraries())


def _compiler_for(arch: str):
    if arch == "sm_72":
        return pytest.mark.skipif(not _have_nvrtc_12(), reason=(
            "no CUDA 12 NVRTC for sm_72 (CUDA 13 dropped it): pip install nvidia-cuda-nvrtc-cu12 or set "
            "MEMSEG_EDGE_NVRTC=/path/to/libnvrtc.so.12"))
    return pytest.mark.skipif(not _have_nvrtc_13(), reason="no CUDA 13 NVRTC: pip install 'cuda-python>=13'")


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "memseg-edge" / "kernels"


_COMPILED: dict[str, kc.CompiledKernel] = {}


def compiled(arch: str, tmp_path_factory) -> kc.CompiledKernel:
    """One real compilation per architecture and test session (each takes NVRTC 10-30 s here)."""
    if arch not in _COMPILED:
        import os
        old = os.environ.get("XDG_CACHE_HOME")
        os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.getbasetemp() / "kernel_cache")
        try:
            _COMPILED[arch] = kc.compile_kernel(arch)
        finally:
            if old is None:
                os.environ.pop("XDG_CACHE_HOME", None)
            else:
                os.environ["XDG_CACHE_HOME"] = old
    return _COMPILED[arch]


def _entries(ptx: str) -> dict[str, list[str]]:
    """Kernel name -> its parameter types (``u64``, ``u32``...) from PTX text."""
    out = {}
    for m in re.finditer(r"\.visible \.entry (\w+)\(([^)]*)\)", ptx):
        out[m.group(1)] = re.findall(r"\.param \.(\w+)", m.group(2))
    return out


def _cubin_sm(cubin: bytes) -> set[int]:
    """The SM number an ELF cubin's e_flags name (CUDA 13 keeps it in bits 8-15, CUDA 12 in bits 0-7)."""
    assert cubin[:4] == b"\x7fELF" and struct.unpack_from("<H", cubin, 18)[0] == 190   # EM_CUDA
    flags = struct.unpack_from("<I", cubin, 48)[0]
    return {(flags >> 8) & 0xFF, flags & 0xFF}


# ------------------------------------------------------------------ compilation


@pytest.mark.parametrize("arch", [pytest.param(a, marks=_compiler_for(a)) for a in TARGETS])
def test_kernel_compiles_to_a_cubin_and_ptx_for_each_target(tmp_path_factory, arch):
    k = compiled(arch, tmp_path_factory)
    text = k.ptx.decode()
    assert re.search(rf"^\.target {arch}\b", text, re.M), text[:400]
    assert set(_entries(text)) == set(kernels.ENTRY_POINTS)
    assert k.cubin is not None and int(arch[3:]) in _cubin_sm(k.cubin)
    assert k.version[0] == (12 if arch == "sm_72" else 13)
    assert k.path.name.endswith(f"-{arch}-{k.compiler.split()[0]}{k.version[0]}.{k.version[1]}.ptx")
    assert Path(str(k.path)[:-len(".ptx")] + ".cubin").read_bytes() == k.cubin
    assert k.ptx_isa.startswith("9." if k.version[0] == 13 else "8.")


def _fake_compiler(version, calls):
    def run(src, arch):
        calls.append((version, arch))
        return f".version 9.0\n.target {arch}\n// fake {version}\n".encode(), b"\x7fELF fake"
    return kc._Compiler("nvrtc", version, run)


def test_cache_is_keyed_by_source_arch_and_compiler_version(kernel_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(kc, "_available_compilers", lambda: ([_fake_compiler((13, 0), calls)], []))
    first = kc.compile_kernel("8.9")
    again = kc.compile_kernel("sm_89")
    assert not first.cached and again.cached and again.ptx == first.ptx and again.cubin == first.cubin
    assert again.version == (13, 0) and calls == [((13, 0), "sm_89")]
    assert not kc.compile_kernel("sm_90").cached
    # An NVRTC upgrade never reuses the old images.
    monkeypatch.setattr(kc, "_available_compilers", lambda: ([_fake_compiler((13, 1), calls)], []))
    upgraded = kc.compile_kernel("sm_89")
    assert not upgraded.cached and upgraded.version == (13, 1) and b"(13, 1)" in upgraded.ptx
    edited = kc.kernel_source() + b"\n// edited\n"
    monkeypatch.setattr(kc, "kernel_source", lambda: edited)
    assert not kc.compile_kernel("sm_89").cached
    assert len(list(kernel_cache.glob("*.ptx"))) == 4 and len(list(kernel_cache.glob("*.cubin"))) == 4
    # A device without any compiler takes what the cache holds.
    monkeypatch.setattr(kc, "_available_compilers", lambda: ([], []))
    monkeypatch.setattr(kc, "kernel_source", lambda: edited)
    assert kc.compile_kernel("sm_89").cached


def test_compilers_newer_than_the_driver_are_tried_last(kernel_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(kc, "_available_compilers",
                        lambda: ([_fake_compiler((13, 0), calls), _fake_compiler((12, 6), calls)], []))
    k = kc.compile_kernel("sm_87", max_version=(12, 8))
    assert k.version == (12, 6) and calls == [((12, 6), "sm_87")]
    assert kc.compile_kernel("sm_87").cached                          # any installed compiler's cached image
    assert kc.compile_kernel("sm_87", use_cache=False).version == (13, 0)   # a fresh compile: the first


def test_without_any_compiler_the_error_says_what_to_install(kernel_cache, monkeypatch):
    monkeypatch.setattr(kc, "_available_compilers", lambda: ([], []))
    with pytest.raises(kc.KernelCompileError, match="pip install"):
        kc.compile_kernel("sm_87")


def _kernel(version, arch="sm_90", cubin=b"\x7fELF"):
    return kc.CompiledKernel(b".version 9.0\n.target sm_90\n", cubin, arch, Path("/tmp/k.ptx"), False,
                             f"nvrtc {version[0]}.{version[1]}", version)


def test_the_driver_gets_the_cubin_then_ptx_it_can_load_else_a_clear_error():
    assert kc.choose_image(_kernel((13, 0)), "sm_90", (13, 0)) == (b"\x7fELF", "cubin")
    assert kc.choose_image(_kernel((12, 9)), "9.0", (13, 0))[1] == "cubin"
    assert kc.choose_image(_kernel((13, 0), arch="sm_89"), "sm_90", (13, 1))[1] == "ptx"   # other arch: JIT
    assert kc.choose_image(_kernel((12, 6), cubin=None), "sm_87", (12, 6))[1] == "ptx"
    with pytest.raises(kc.KernelLoadError) as err:
        kc.choose_image(_kernel((13, 0)), "sm_87", (12, 6))
    msg = str(err.value)
    assert "PTX ISA 9.0" in msg and "CUDA 12.6" in msg and "newer than this driver" in msg
    assert "nvidia-cuda-nvrtc-cu12==12.6.*" in msg and "sm_87 cubin" in msg
    with pytest.raises(kc.KernelLoadError):   # a cubin from a newer major toolkit does not load either
        kc.choose_image(_kernel((13, 0)), "sm_90", (12, 8))


# ------------------------------------------------------------------ the launch plan


@pytest.mark.skipif(not _have_nvrtc_13(), reason="no CUDA 13 NVRTC: pip install 'cuda-python>=13'")
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 9, 32])   # tiles 1, 2, 4, 8, 16, 32
def test_launch_plan_matches_the_kernel_signatures(tmp_path_factory, half, batch):
    params = _entries(compiled("sm_87", tmp_path_factory).ptx.decode())
    for selection in ("sum", "per_level"):
        step = kernels.MemoryStep(((24, 16, 16), (32, 8, 8), (96, 4, 4)), 30, selection)
        launches = kernels.plan_launches(step, batch, half, [16, 32, 48], [64, 80, 96], [112, 128, 144], 160, 176)
        io = "f16" if half else "f32"
        assert [launch.kernel for launch in launches] == [f"memseg_l2_{io}_t{kernels.choose_tile(batch)}",
                                                          f"memseg_select_diff_{io}"]
        for launch in launches:
            assert [ctypes.sizeof(t) for _, t in launch.args] == [PARAM_BYTES[t] for t in params[launch.kernel]]
            assert launch.block == (kernels.kernel_constants()["BLOCK"], 1, 1)


def test_every_batch_gets_the_smallest_tile_and_reads_the_bank_once_up_to_32():
    tiles = {b: kernels.choose_tile(b) for b in range(1, 65)}
    assert set(tiles.values()) == set(kernels.TILES)
    assert all(t >= min(b, 32) and (t == 1 or t // 2 < min(b, 32)) for b, t in tiles.items())
    step = kernels.MemoryStep(((64, 64, 64), (128, 32, 32), (256, 16, 16)), 30)   # ResNet18 at 256
    for batch in range(1, 65):
        for half in (False, True):
            g = kernels.plan_geometry(step, batch, half)
            assert g.tiles == (1 if batch <= 32 else 2)
            assert g.n_parts <= step.max_parts and g.samples_per_group * g.tile <= 1024
            assert g.launch1_blocks >= 132, (batch, half, g)   # at least one block per SM of an H200
    assert set(kernels.kernel_constants()["ROWS"]) == set(kernels.TILES)


@pytest.mark.parametrize("levels", [((64, 64, 64), (128, 32, 32), (256, 16, 16)), ((3, 5, 7),), ((24, 16, 16), (5, 1, 3))])
@pytest.mark.parametrize("samples", [1, 4, 30, 129, 5000])
def test_workspace_never_exceeds_what_first_kernel_engines_reserve(levels, samples):
    """Engines built with the first kernel (plugin version 1) reserved 4 x N x M x sum(ceil(C*H*W / 4096))
    bytes; the plan must fit in that for every batch and device, so those engines stay safe to run."""
    step = kernels.MemoryStep(levels, samples)
    first = sum(-(-d // 4096) for d in step.sizes)
    assert len(levels) <= step.max_parts <= first
    for batch in (1, 7, 32, 40):
        assert step.workspace_bytes(batch) <= 4 * batch * samples * first
        for half in (False, True):
            for sms in (1, 16, 132, 1000):
                assert kernels.plan_geometry(step, batch, half, sms).n_parts <= step.max_parts


SHAPES_ODD = [((3, 5, 7),), ((3, 5, 7), (8, 4, 4)), ((24, 16, 16), (32, 8, 8), (96, 4, 4)),
              ((1, 1, 1), (2, 3, 1), (5, 1, 3))]


def _tie_nan_data(levels, samples, batch, dtype, rng):
    """Integer-valued data (every distance exact in float32), a duplicate sample (exact ties), and a NaN in
    the first image's features."""
    banks = [rng.integers(-3, 4, (samples, *lv)).astype(dtype) for lv in levels]
    if samples > 2:
        for b in banks:
            b[samples // 2] = b[1]
    pick = rng.integers(0, samples, batch)
    if samples > 2:
        pick[-1] = samples // 2           # a real tie: the copy of sample 1
    feats = [bank[pick] + rng.integers(-1, 2, (batch, *lv)) * (rng.random((batch, *lv)) < 0.2)
             for bank, lv in zip(banks, levels)]
    feats = [f.astype(dtype) for f in feats]
    if batch > 1:
        feats[0][0].flat[0] = np.nan
    return feats, banks


@pytest.mark.parametrize("levels", SHAPES_ODD, ids=lambda lv: "x".join(str(len(lv))) + "levels")
@pytest.mark.parametrize("samples", [1, 30, 129])
@pytest.mark.parametrize("selection", ["sum", "per_level"])
def test_the_plan_replayed_block_by_block_is_the_reference_for_every_tile(levels, samples, selection):
    rng = np.random.default_rng(samples + len(levels))
    step = kernels.MemoryStep(levels, samples, selection)
    for batch in (1, 2, 3, 5, 9, 17, 33):    # tiles 1 to 32, and two tiles of 32
        for dtype in (np.float32, np.float16):
            feats, banks = _tie_nan_data(levels, samples, batch, dtype, rng)
            diffs, index = emulate(step, feats, banks, sm_count=132 if batch % 2 else 16)
            ref_diffs, ref_index = memory_step(feats, banks, selection, dtype=np.float64)
            np.testing.assert_array_equal(index, ref_index)
            for got, ref in zip(diffs, ref_diffs):
                np.testing.assert_array_equal(got, ref)


def test_nan_and_tie_semantics_are_the_reference_definition():
    bank = [np.array([[3.0], [1.0], [1.0], [np.nan], [0.5]], np.float32).reshape(5, 1, 1, 1)]
    x = [np.array([[1.0], [0.75], [np.nan]], np.float32).reshape(3, 1, 1, 1)]
    _, index = memory_step(x, bank)
    assert list(index) == [3, 3, 0]     # the NaN sample wins for every image; a NaN image picks sample 0
    clean = [bank[0][[0, 1, 2, 4]]]
    _, index = memory_step([x[0][:2]], clean)
    assert list(index) == [1, 1]        # exact ties (1 = 2; 1, 2 and 4 for 0.75): the lowest index
    step = kernels.MemoryStep(((1, 1, 1),), 5)
    assert list(emulate(step, x, bank)[1]) == [3, 3, 0]


def test_a_plan_that_misses_elements_is_caught(monkeypatch):
    """The replay is a real check: a geometry that leaves slabs or chunks out fails it."""
    from dataclasses import replace

    step = kernels.MemoryStep(((16, 64, 64), (8, 4, 4)), 4)
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((1, *lv)).astype(np.float32) for lv in step.levels]
    banks = [rng.standard_normal((4, *lv)).astype(np.float32) for lv in step.levels]
    real = kernels.plan_geometry
    g = real(step, 1, False, 1)
    assert g.slabs_per_part > 1 and g.chunks[0] > 1
    emulate(step, feats, banks, sm_count=1)
    for broken in (replace(g, slabs_per_part=1), replace(g, chunks=(g.chunks[0] - 1, *g.chunks[1:]))):
        monkeypatch.setattr(kernels, "plan_geometry", lambda *a, _g=broken, **k: _g)
        with pytest.raises(PlanError, match="unevenly"):
            emulate(step, feats, banks, sm_count=1)


@pytest.fixture(scope="session")
def host_kernel(tmp_path_factory) -> Path:
    """The .cu file's kernels compiled for the CPU (memseg_edge/kernels/host_emulation.h: one fiber per CUDA
    thread), built once per test session."""
    from memseg_edge.kernels.emulate import build_host_emulation

    try:
        return build_host_emulation(tmp_path_factory.mktemp("host_kernel"))
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}: the CPU replay of the kernel source needs g++ (C++20)")


def _case_data(levels, samples, batch, dtype, kind, rng):
    dt = np.float16 if dtype == "fp16" else np.float32
    pick = rng.integers(0, samples, batch)
    if kind == "random":
        banks = [rng.standard_normal((samples, *lv)).astype(dt) for lv in levels]
        return [(b[pick].astype(np.float64) + rng.normal(0, 0.5, b[pick].shape)).astype(dt) for b in banks], banks
    banks = [rng.integers(-3, 4, (samples, *lv)).astype(dt) for lv in levels]
    if samples > 2:
        for b in banks:
            b[samples // 2] = b[1]        # exact ties: image 0 is as close to sample 1 as to its copy
        pick[0] = samples // 2
    feats = [(b[pick] + rng.integers(-1, 2, b[pick].shape) * (rng.random(b[pick].shape) < 0.2)).astype(dt)
             for b in banks]
    if kind == "nan_image":
        feats[0][batch // 2].flat[0] = np.nan
    if kind == "nan_bank" and samples > 1:
        banks[-1][samples - 1].flat[-1] = np.nan
    return feats, banks


MOBILENET64 = ((24, 16, 16), (32, 8, 8), (96, 4, 4))
HOST_CASES = [   # levels, samples, selection, batch (-> tile), I/O, data, misaligned pointers
    (((3, 5, 7),), 1, "sum", 1, "fp32", "ties", False),
    (((3, 5, 7),), 129, "per_level", 2, "fp16", "ties", False),
    (((3, 5, 7), (8, 4, 4)), 30, "sum", 3, "fp32", "nan_image", False),
    (((3, 5, 7), (8, 4, 4)), 30, "per_level", 5, "fp16", "nan_bank", False),
    (((1, 1, 1), (2, 3, 1), (5, 1, 3)), 129, "sum", 9, "fp32", "ties", False),
    (((1, 1, 1), (2, 3, 1), (5, 1, 3)), 30, "per_level", 17, "fp16", "ties", False),
    (((1, 1, 1), (2, 3, 1), (5, 1, 3)), 1, "per_level", 33, "fp32", "nan_image", False),
    (MOBILENET64, 30, "sum", 3, "fp32", "random", False),
    (MOBILENET64, 30, "per_level", 9, "fp16", "random", False),
    (MOBILENET64, 30, "sum", 33, "fp32", "ties", False),
    (MOBILENET64, 7, "sum", 32, "fp16", "ties", False),
    (((3, 5, 7), (8, 4, 4)), 30, "sum", 5, "fp32", "random", True),
    (MOBILENET64, 30, "sum", 2, "fp16", "ties", True),
]


@pytest.mark.parametrize("levels,samples,selection,batch,io,kind,offset", HOST_CASES,
                         ids=[f"{len(c[0])}lv-m{c[1]}-{c[2]}-b{c[3]}-{c[4]}-{c[5]}{'-offset' if c[6] else ''}"
                              for c in HOST_CASES])
def test_the_kernel_source_run_on_the_cpu_matches_the_reference(host_kernel, tmp_path, levels, samples, selection,
                                                                 batch, io, kind, offset):
    """The .cu kernels themselves (not a model of them), every CUDA thread a fiber: index exact (ties to the
    lowest index, NaN first), diffs exact on integer data and within rounding on random data, NaN exactly
    where the reference has it, guard bytes intact, 16-byte vectors only on aligned rows."""
    from memseg_edge.kernels.emulate import run_host_emulation

    rng = np.random.default_rng(batch * 1000 + samples)
    step = kernels.MemoryStep(levels, samples, selection)
    feats, banks = _case_data(levels, samples, batch, io, kind, rng)
    got = run_host_emulation(host_kernel, step, feats, banks, tmp_path, offset=offset)
    assert got["status"] == 0, got["stderr"]
    assert got["kernels"] == [f"memseg_l2_{'f16' if io == 'fp16' else 'f32'}_t{kernels.choose_tile(batch)}",
                              f"memseg_select_diff_{'f16' if io == 'fp16' else 'f32'}"]
    vector = 8 if io == "fp16" else 4
    assert got["vec_mask"] == (0 if offset else sum(1 << l for l, d in enumerate(step.sizes) if d % vector == 0))
    ref_diffs, ref_index = memory_step(feats, banks, selection, dtype=np.float64)
    np.testing.assert_array_equal(got["index"], ref_index)
    floor = 2.0 ** -14 if io == "fp16" else 1e-30
    bound = 1e-3 if io == "fp16" else (1e-5 if kind == "random" else 0.0)
    for g, r in zip(got["diffs"], ref_diffs):
        g = g.astype(np.float64)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(r))
        ok = ~np.isnan(r)
        assert np.max(np.abs(g[ok] - r[ok]) / np.maximum(np.abs(r[ok]), floor), initial=0.0) <= bound


def test_vector_loads_only_where_rows_and_pointers_are_16_byte_aligned():
    step = kernels.MemoryStep(((3, 5, 7), (8, 4, 4), (4, 2, 2)), 4)    # 105, 128, 16 elements
    assert kernels.vector_mask(step, False, [[0, 16, 32], [48, 64, 80]]) == 0b110
    assert kernels.vector_mask(step, True, [[0, 16, 32]]) == 0b110       # 16 halves: one vector
    assert kernels.vector_mask(step, False, [[0, 20, 32]]) == 0b100      # level 1 pointer misaligned
    launches = kernels.plan_launches(step, 2, False, [0, 16, 36], [48, 64, 80], [96, 112, 128], 144, 160)
    assert [int(v) for v, _ in launches[0].args][15] == 0b010 and [int(v) for v, _ in launches[1].args][18] == 0b010

# ------------------------------------------------------------------ the reference


def make_memory_bundle(tmp_path_factory) -> Path:
    """A tiny MemSeg (64x64, MobileNetV2 with random weights, 4 memory samples, one training iteration)
    on the synthetic product dataset, exported to a bundle; built once per test session."""
    root = tmp_path_factory.getbasetemp() / "memory_bundle"
    bundle = root / "bundle"
    if (bundle / "model.json").is_file():
        return bundle
    pytest.importorskip("torch", reason="the trainer needs torch (pip install 'memseg-edge[train]')")
    pytest.importorskip("onnx", reason="export needs onnx (pip install 'memseg-edge[onnx]')")
    import warnings

    from conftest import make_product_dataset
    from memseg_edge.train.config import MemSegConfig, apply_overrides
    from memseg_edge.train.export import export_bundle
    from memseg_edge.train.trainer import train

    data = make_product_dataset(root / "data", n_train=12, n_test_good=1, n_test_bad=1)
    cfg = apply_overrides(MemSegConfig(), {
        "data.root": str(data), "data.category": "widget", "data.image_size": 64, "data.holdout_fraction": 0.2,
        "model.backbone": "mobilenet_v2", "model.backbone_weights": "none", "model.memory_samples": 4,
        "model.memory_selection": "sum",  # the fused kernel serves the whole-image step
        "train.iterations": 1, "train.batch_size": 2, "train.num_workers": 0, "train.warmup_iterations": 1,
        "train.checkpoint_every": 0, "synthesis.textures": "none"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt = train(cfg, root / "run", progress=False, log=lambda *a: None)
    return export_bundle(ckpt, bundle, log=lambda *a: None)


@pytest.fixture(scope="session")
def memory_bundle(tmp_path_factory) -> Path:
    return make_memory_bundle(tmp_path_factory)


def test_reference_matches_the_exported_subgraph_in_onnxruntime(memory_bundle):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    meta = json.loads((memory_bundle / "model.json").read_text())
    mem = meta["memory_subgraph"]
    model = onnx.load(str(memory_bundle / "model.onnx"))
    argmin = [n for n in model.graph.node if n.name.startswith(mem["node_prefix"]) and n.op_type == "ArgMin"]
    assert len(argmin) == 1, "the exported step has one ArgMin (selection 'sum')"
    inferred = onnx.shape_inference.infer_shapes(model)  # the extractor needs the boundary tensors' types
    sub = onnx.utils.Extractor(inferred).extract_model(mem["inputs"], mem["outputs"] + [argmin[0].output[0]])
    # the named nodes, plus the exporter's shared Constant nodes (reduction axes) they read
    assert all(n.name.startswith(mem["node_prefix"]) or n.op_type == "Constant" for n in sub.graph.node)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    banks = [inits[b] for b in mem["bank_initializers"]]
    m = len(banks[0])
    rng = np.random.default_rng(1)
    # Each image near a different memory sample (plus noise), and one far from all of them.
    picks = [2, 0, 3, 1, 2]
    feats = [np.stack([b[p] + rng.normal(0, 0.3 * (b.std() + 1e-3), b.shape[1:]) for p in picks]
                      + [rng.normal(b.mean(), 3 * b.std() + 1e-3, b.shape[1:])]).astype(np.float32) for b in banks]
    sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip(mem["inputs"], feats)))
    diffs, index = memory_step(feats, banks, "sum")
    np.testing.assert_array_equal(got[-1].astype(np.int32), index)
    assert list(index[:5]) == picks and 0 <= index[5] < m
    for ort_diff, ref_diff in zip(got[:3], diffs):
        assert ort_diff.shape == ref_diff.shape and ref_diff.dtype == np.float32
        np.testing.assert_allclose(ort_diff, ref_diff, rtol=1e-5, atol=1e-30)


SHAPES = [(6, 8, 8), (8, 4, 4), (12, 2, 2)]


def _torch_memory_step(feats, bank, selection):
    torch = pytest.importorskip("torch", reason="train.memory needs torch")
    from memseg_edge.train.memory import MemoryBank

    mb = MemoryBank([b.shape[1:] for b in bank], len(bank[0]), selection)
    for buf, b in zip(mb.banks(), bank):
        buf.copy_(torch.from_numpy(b))
    with torch.no_grad():
        diffs, index = mb([torch.from_numpy(f) for f in feats])
    return [d.numpy() for d in diffs], index.numpy().astype(np.int32)


@pytest.mark.parametrize("selection", ["sum", "per_level"])
def test_reference_matches_memory_bank_in_torch_on_random_inputs(selection):
    rng = np.random.default_rng(2)
    bank = [rng.standard_normal((7, *s)).astype(np.float32) for s in SHAPES]
    picks = [5, 0, 3, 6, 2]
    feats = [np.concatenate([b[picks] + rng.normal(0, 0.3, (5, *b.shape[1:])),
                             rng.standard_normal((3, *b.shape[1:]))]).astype(np.float32) for b in bank]
    t_diffs, t_index = _torch_memory_step(feats, bank, selection)
    diffs, index = memory_step(feats, bank, selection)
    np.testing.assert_array_equal(t_index, index)
    assert list(index[:5] if selection == "sum" else index[:5, 0]) == picks
    assert index.shape == ((8, 3) if selection == "per_level" else (8,))
    for t, r in zip(t_diffs, diffs):
        np.testing.assert_allclose(t, r, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("selection", ["sum", "per_level"])
def test_reference_and_memory_bank_send_ties_to_the_lowest_index(selection):
    """Small integers make every distance exact in float32 (whatever order a GEMM sums in), so ties are
    real ties in both: a duplicate sample (4 = 1) and two different samples at the same distance
    (2 and 5 hold the same values in other places)."""
    rng = np.random.default_rng(4)
    bank, feats = [], []
    for s in SHAPES:
        b = rng.integers(-3, 4, (7, *s)).astype(np.float32)
        b[4] = b[1]
        b[5] = 0
        b[5].flat[:2] = 1
        b[2] = 0
        b[2].flat[-2:] = 1
        noise = rng.integers(-1, 2, (2, *s)) * (rng.random((2, *s)) < 0.1)
        x = np.stack([b[1] + noise[0], np.zeros(s), b[4], b[3] + noise[1]])
        feats.append(np.concatenate([x, rng.integers(-3, 4, (2, *s))]).astype(np.float32))
        bank.append(b)
    t_diffs, t_index = _torch_memory_step(feats, bank, selection)
    diffs, index = memory_step(feats, bank, selection)
    np.testing.assert_array_equal(t_index, index)
    expected = np.array([1, 2, 1, 3])
    if selection == "per_level":
        expected = np.repeat(expected[:, None], len(SHAPES), axis=1)
    np.testing.assert_array_equal(index[:4], expected)
    for t, r in zip(t_diffs, diffs):
        np.testing.assert_array_equal(t, r)


def test_reference_keeps_fp16_and_can_return_exact_diffs():
    rng = np.random.default_rng(3)
    bank = [rng.standard_normal((3, 2, 4, 4)).astype(np.float16)]
    x = [rng.standard_normal((2, 2, 4, 4)).astype(np.float16)]
    d16, _ = memory_step(x, bank)
    d64, idx = memory_step(x, bank, dtype=np.float64)
    assert d16[0].dtype == np.float16 and d64[0].dtype == np.float64 and idx.dtype == np.int32
    np.testing.assert_allclose(d16[0].astype(np.float64), d64[0], rtol=1e-3)


# ------------------------------------------------------------------ on a GPU


def _gpu_check(selection: str, half: bool, batch: int):
    """Run the kernel through the plugin's launcher (cuda-python driver API) on random inputs, outputs poisoned
    first; compare every element with the reference. Returns (max relative error, index equal).
    tools/gpu_check.py covers far more (odd shapes, ties, NaN, guard bytes, timings) in one run."""
    from cuda.bindings import driver

    def ok(res):
        err, *rest = res if isinstance(res, tuple) else (res,)
        assert int(err) == 0, err
        return rest[0] if len(rest) == 1 else rest

    ok(driver.cuInit(0))
    dev = ok(driver.cuDeviceGet(0))
    ctx = ok(driver.cuDevicePrimaryCtxRetain(dev))
    ok(driver.cuCtxSetCurrent(ctx))
    step = kernels.MemoryStep(((24, 16, 16), (32, 8, 8), (96, 4, 4)), 10, selection)
    dt = np.float16 if half else np.float32
    rng = np.random.default_rng(batch)
    banks = [rng.standard_normal((step.samples, *lv)).astype(dt) for lv in step.levels]
    feats = [(b[rng.integers(0, step.samples, batch)] + rng.normal(0, 0.5, (batch, *b.shape[1:]))).astype(dt)
             for b in banks]
    allocs = []

    def upload(a):
        p = ok(driver.cuMemAlloc(max(a.nbytes, 4)))
        ok(driver.cuMemcpyHtoD(p, a.ctypes.data, a.nbytes))
        allocs.append(p)
        return p

    def empty(nbytes, poison16=None, poison32=None):
        p = ok(driver.cuMemAlloc(max(nbytes, 4)))
        if poison16 is not None:
            ok(driver.cuMemsetD16(p, poison16, nbytes // 2))
        else:
            ok(driver.cuMemsetD32(p, poison32, nbytes // 4))
        allocs.append(p)
        return p

    xs = [upload(f) for f in feats]
    bs = [upload(b) for b in banks]
    ys = [empty(f.nbytes, poison16=0x7E00) if half else empty(f.nbytes, poison32=0x7FC00000) for f in feats]
    idx_shape = step.index_shape(batch)
    ip = empty(4 * int(np.prod(idx_shape)), poison32=0xFFFFFFFF)
    ws = empty(step.workspace_bytes(batch), poison32=0x7FC00000)
    launcher = kernels.DriverLauncher.for_current_device()
    launcher.run(kernels.plan_launches(step, batch, half, [int(p) for p in xs], [int(p) for p in bs],
                                       [int(p) for p in ys], int(ip), int(ws)), 0)
    ok(driver.cuCtxSynchronize())
    outs = []
    for f, y in zip(feats, ys):
        h = np.empty_like(f)
        ok(driver.cuMemcpyDtoH(h.ctypes.data, y, h.nbytes))
        outs.append(h)
    index = np.empty(idx_shape, np.int32)
    ok(driver.cuMemcpyDtoH(index.ctypes.data, ip, index.nbytes))
    for p in allocs:
        driver.cuMemFree(p)
    ref, ref_index = memory_step(feats, banks, selection, dtype=np.float64)
    floor = 6.1e-5 if half else 1e-30   # below float16's smallest normal, relative error is not defined by its rounding
    rel = max(float(np.max(np.abs(o.astype(np.float64) - r) / np.maximum(np.abs(r), floor))) for o, r in zip(outs, ref))
    finite = all(np.isfinite(o).all() for o in outs)
    return rel if finite else float("inf"), bool(np.array_equal(index, ref_index))


@pytest.mark.gpu
@pytest.mark.skipif(cuda_device() is None, reason="no CUDA GPU here")
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("selection", ["sum", "per_level"])
@pytest.mark.parametrize("batch", [1, 9])
def test_kernel_matches_reference_on_the_gpu(selection, half, batch):
    pytest.importorskip("cuda.bindings", reason="cuda-python launches the kernel")
    rel, same_index = _gpu_check(selection, half, batch)
    assert same_index
    assert rel <= (1e-2 if half else 1e-5)
