"""The fused memory-bank kernel (memseg_edge.kernels): PTX for the target GPUs, the cache, the launch
plan against the PTX's signatures, and the numpy reference held equal to the exported standard-op
subgraph (onnxruntime) and to train.memory.MemoryBank (torch). The kernel's numerics against the
reference need a GPU (marked ``gpu``; tools/gpu_memory_kernel.py does it with timings)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from memseg_edge import kernels
from memseg_edge.cuda_env import cuda_device
from memseg_edge.kernels import compile as kc
from memseg_edge.kernels.reference import memory_step

TARGETS = ("sm_87", "sm_89", "sm_90")   # Jetson Orin, Ada, Hopper; sm_72 (Xavier) below


def _have_compiler() -> bool:
    try:
        from cuda.bindings import nvrtc  # noqa: F401
        return True
    except ImportError:
        return kc.nvcc_path() is not None


needs_compiler = pytest.mark.skipif(not _have_compiler(),
                                    reason="no CUDA compiler: pip install cuda-python (NVRTC) or install nvcc")


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "memseg-edge" / "kernels"


def _entries(ptx: str) -> dict[str, list[str]]:
    """Kernel name -> its parameter types (``u64``, ``u32``...) from PTX text."""
    out = {}
    for m in re.finditer(r"\.visible \.entry (\w+)\(([^)]*)\)", ptx):
        out[m.group(1)] = re.findall(r"\.param \.(\w+)", m.group(2))
    return out


# ------------------------------------------------------------------ compilation


@needs_compiler
@pytest.mark.parametrize("arch", TARGETS)
def test_kernel_compiles_to_ptx_for_each_target(kernel_cache, arch):
    k = kc.compile_ptx(arch)
    text = k.ptx.decode()
    assert re.search(rf"^\.target {arch}\b", text, re.M), text[:400]
    assert set(_entries(text)) == set(kernels.ENTRY_POINTS)
    assert not k.cached and k.path.is_file() and k.path.parent == kernel_cache


def test_sm_72_for_jetson_xavier(kernel_cache):
    """CUDA 13's NVRTC and nvcc dropped sm_72; a CUDA 12 NVRTC (nvidia-cuda-nvrtc-cu12, or MEMSEG_EDGE_NVRTC)
    still targets it."""
    if not any("so.12" in p or "so.11" in p for p in kc._nvrtc_libraries()):
        pytest.skip("no CUDA 12 NVRTC for sm_72 (CUDA 13 dropped it): pip install nvidia-cuda-nvrtc-cu12 or set "
                    "MEMSEG_EDGE_NVRTC=/path/to/libnvrtc.so.12")
    k = kc.compile_ptx("sm_72")
    assert re.search(r"^\.target sm_72\b", k.ptx.decode(), re.M)
    assert set(_entries(k.ptx.decode())) == set(kernels.ENTRY_POINTS)


@needs_compiler
def test_second_compile_hits_the_cache_keyed_by_source_and_arch(kernel_cache, monkeypatch):
    first = kc.compile_ptx("8.9")
    again = kc.compile_ptx("sm_89")
    assert again.cached and again.compiler == "cache" and again.ptx == first.ptx and again.path == first.path
    assert not kc.compile_ptx("sm_90").cached
    edited = kc.kernel_source() + b"\n// edited\n"
    monkeypatch.setattr(kc, "kernel_source", lambda: edited)
    changed = kc.compile_ptx("sm_89")
    assert not changed.cached and changed.path != first.path
    assert len(list(kernel_cache.glob("*.ptx"))) == 3


def test_without_any_compiler_the_error_says_what_to_install(kernel_cache, monkeypatch):
    for name in ("_nvrtc_cuda_python", "_nvrtc_ctypes", "_nvcc"):
        monkeypatch.setattr(kc, name, lambda src, arch: None)
    with pytest.raises(kc.KernelCompileError, match="pip install"):
        kc.compile_ptx("sm_87")


@needs_compiler
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("selection", ["sum", "per_level"])
def test_launch_plan_matches_the_kernel_signatures(kernel_cache, half, selection):
    params = _entries(kc.compile_ptx("sm_87").ptx.decode())
    step = kernels.MemoryStep(((24, 16, 16), (32, 8, 8), (96, 4, 4)), 30, selection)
    size = {"u64": 8, "s64": 8, "b64": 8, "u32": 4, "s32": 4, "b32": 4}
    launches = kernels.plan_launches(step, 11, half, [1, 2, 3], [4, 5, 6], [7, 8, 9], 10, 11)
    assert [launch.kernel for launch in launches] == [
        f"memseg_partial_l2_{'f16' if half else 'f32'}", "memseg_select", f"memseg_diff_{'f16' if half else 'f32'}"]
    for launch in launches:
        want = [size[t] for t in params[launch.kernel]]
        got = [__import__("ctypes").sizeof(t) for _, t in launch.args]
        assert got == want, launch.kernel
    partial, select, diff = launches
    chunks = sum(step.chunks)
    assert partial.grid == (30, chunks, 2)             # every sample x every chunk x ceil(11 / TILE) tiles
    assert select.grid == (11, 1, 1) and diff.grid == (chunks, 11, 1)
    assert chunks == sum(-(-d // kernels.CHUNK) for d in step.sizes)
    assert step.workspace_bytes(11) == 4 * 11 * 30 * chunks
    assert step.index_shape(11) == ((11, 3) if selection == "per_level" else (11,))


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
        "train.iterations": 1, "train.batch_size": 2, "train.num_workers": 0, "train.warmup_iterations": 1,
        "train.checkpoint_every": 0})
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
    first; compare every element with the reference. Returns (max relative error, index equal)."""
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
