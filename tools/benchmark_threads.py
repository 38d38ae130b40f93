#!/usr/bin/env python3
"""How many CPU threads should memseg-edge use? Measures the choices a user has, on this machine.

Two workloads, each timed for --seconds in a fresh process (a thread pool is sized once per process):

* train: MemSeg training steps (MobileNetV2 encoder, random weights, --image-size, batch 8), PyTorch;
* onnx:  the same model exported to ONNX, judged by onnxruntime (batch 8), as `memseg-edge run` does;

with four thread settings:

* library default: what PyTorch / onnxruntime do when nobody sets anything (one thread per core);
* 1:               --threads 1;
* physical cores:  --threads <physical cores>;
* memseg-edge:     no --threads, i.e. memseg_edge.threads.default_threads();

each once with no other load started by this script ("alone") and once with a competing process (a
second training loop with the libraries' default threads, as another job on a shared server would be).
Prints a table of images/s, and writes it as JSON with --json FILE.

    tools/benchmark_threads.py                       # about 16 x (--seconds + start-up)
    tools/benchmark_threads.py --seconds 3 --workloads onnx

"alone" is only idle when nothing else runs: the load average at the start is printed with the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ("library default", "1", "physical cores", "memseg-edge")
BATCH = 8


def _model(image_size: int):
    from memseg_edge.train.config import MemSegConfig
    from memseg_edge.train.torch_model import MemSeg

    cfg = MemSegConfig().model
    cfg.backbone = "mobilenet_v2"
    cfg.memory_samples = 8
    cfg.standardise_images = False
    model = MemSeg(cfg, image_size, weights="none")
    import torch

    torch.manual_seed(0)
    model.memory.fill(model.memory_features(torch.rand(cfg.memory_samples, 3, image_size, image_size)))
    return model


def _train_rate(image_size: int, seconds: float) -> float:
    import torch

    model = _model(image_size)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    x = torch.rand(BATCH, 3, image_size, image_size)
    target = (torch.rand(BATCH, image_size, image_size) > 0.9).long()

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()

    step()   # warm-up: allocations, thread pool start
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * BATCH / (time.perf_counter() - t0)


def _export(image_size: int, path: Path) -> None:
    import torch

    from memseg_edge.bundle import INPUT_NAME, MAP_NAME, SCORE_NAME
    from memseg_edge.train.export import ExportModel

    wrapper = ExportModel(_model(image_size), 100).eval()
    with torch.no_grad():
        torch.onnx.export(wrapper, (torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8),), str(path),
                          input_names=[INPUT_NAME], output_names=[MAP_NAME, SCORE_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, MAP_NAME: {0: "batch"}, SCORE_NAME: {0: "batch"}},
                          opset_version=17, dynamo=False)


def _onnx_rate(model: Path, image_size: int, seconds: float, threads: int | None) -> float:
    import numpy as np
    import onnxruntime as ort

    from memseg_edge.threads import ort_session_options

    opts = ort_session_options(threads=threads) if threads else ort.SessionOptions()
    session = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (BATCH, image_size, image_size, 3), dtype=np.uint8)
    session.run(None, {"image": images})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, {"image": images})
        n += 1
    return n * BATCH / (time.perf_counter() - t0)


def worker(args) -> None:
    """One measurement in this process: set the threads first, then run the workload."""
    from memseg_edge.threads import apply_threads, physical_cores

    threads = None
    if args.setting != "library default":
        wanted = {"1": 1, "physical cores": physical_cores(), "memseg-edge": None}[args.setting]
        threads = apply_threads(wanted)
    if args.worker == "train":
        rate = _train_rate(args.image_size, args.seconds)
    else:
        rate = _onnx_rate(Path(args.model), args.image_size, args.seconds, threads)
    import torch

    used = torch.get_num_threads() if args.worker == "train" else (threads or "ort default")
    print(json.dumps({"images_per_s": rate, "threads": used}), flush=True)


def _clean_env() -> dict:
    """The environment of a process nobody configured (no OMP_NUM_THREADS, MKL_NUM_THREADS)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MEMSEG_EDGE_THREADS")}


def _measure(workload: str, setting: str, args, model: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", workload, "--setting", setting, "--seconds", str(args.seconds),
           "--image-size", str(args.image_size), "--model", str(model)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=args.seconds * 20 + 300)
    if out.returncode != 0:
        raise RuntimeError(f"{workload}/{setting} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="Timed seconds per measurement (default 10).")
    parser.add_argument("--image-size", type=int, default=64, help="Model input side, a multiple of 32 (default 64).")
    parser.add_argument("--workloads", nargs="+", choices=["train", "onnx"], default=["train", "onnx"])
    parser.add_argument("--json", dest="json_path", default=None, help="Also write the table here.")
    parser.add_argument("--worker", choices=["train", "onnx"], help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from memseg_edge.threads import default_threads, physical_cores, usable_cpus

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{usable_cpus()} usable CPUs, {physical_cores()} physical cores; memseg-edge's default: "
          f"{default_threads()} thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
          f"load average at start {load:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.onnx"
        if "onnx" in args.workloads:
            _export(args.image_size, model)
        for load_name in ("alone", "competing"):
            competitor = None
            if load_name == "competing":   # a second job with the libraries' default threads
                competitor = subprocess.Popen(
                    [sys.executable, __file__, "--worker", "train", "--setting", "library default", "--seconds",
                     "1e9", "--image-size", str(args.image_size), "--model", str(model)],
                    env=_clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(3.0)   # let it reach its training loop
            try:
                for workload in args.workloads:
                    for setting in SETTINGS:
                        r = _measure(workload, setting, args, model)
                        rows.append({"workload": workload, "load": load_name, "setting": setting, **r})
                        print(f"  {workload:5s} {load_name:9s} {setting:15s} threads {str(r['threads']):11s} "
                              f"{r['images_per_s']:8.1f} images/s", flush=True)
            finally:
                if competitor is not None:
                    competitor.terminate()
                    competitor.wait(30)
    print()
    print("| workload | setting | threads | alone (images/s) | with a competing process (images/s) |")
    print("| --- | --- | --- | ---: | ---: |")
    for workload in args.workloads:
        for setting in SETTINGS:
            cells = {r["load"]: r for r in rows if r["workload"] == workload and r["setting"] == setting}
            alone, busy = cells.get("alone"), cells.get("competing")
            print(f"| {workload} | {setting} | {(alone or busy)['threads']} | "
                  f"{alone['images_per_s']:.1f} | {busy['images_per_s']:.1f} |")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"load_average_at_start": load, "seconds": args.seconds,
                                                    "image_size": args.image_size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
