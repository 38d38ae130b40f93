#!/usr/bin/env python
"""The cost of the memory step, whole-image (``sum``) against per-position (``patch``).

Training (default): one training step (forward, backward, SGD) on a batch of random images and the memory
step alone. ``--inference``: the exported graph (uint8 image -> map and score, as a bundle's model.onnx) of
each selection in onnxruntime on the CPU, batch 1, what an edge device without a GPU pays per frame. Both
selections in one process, interleaved round by round so machine noise hits both alike; prints medians and
the ratio. Timing only: latency does not depend on the weights' values, so the decoder is untrained (never
an accuracy figure); the encoder weights only set realistic feature statistics. Needs the trainer (torch).

    python tools/benchmark_memory_step.py --backbone-weights ../shared/weights/mobilenet_v2-imagenet-features.pth
    python tools/benchmark_memory_step.py --inference --rounds 21 --threads 1 --backbone-weights ...
"""
from __future__ import annotations

import statistics
import time

import click


@click.command()
@click.option("--backbone", default="mobilenet_v2", show_default=True)
@click.option("--backbone-weights", default="none", show_default=True,
              help="A local state_dict for the encoder ('none': random; timing only).")
@click.option("--image-size", default=256, show_default=True)
@click.option("--batch", default=8, show_default=True, help="Training batch (the default recipe's: 8).")
@click.option("--rounds", default=7, show_default=True, help="Rounds; the first is a warm-up and not counted.")
@click.option("--threads", default=2, show_default=True)
@click.option("--inference", is_flag=True,
              help="Time the exported graphs in onnxruntime (batch 1) instead of the training step.")
def main(backbone, backbone_weights, image_size, batch, rounds, threads, inference):
    import torch

    from memseg_edge.train.config import MemSegConfig
    from memseg_edge.train.torch_model import MemSeg

    torch.set_num_threads(threads)
    models = {}
    for selection in ("sum", "patch"):
        cfg = MemSegConfig().model
        cfg.backbone, cfg.memory_selection, cfg.standardise_images = backbone, selection, False
        torch.manual_seed(0)
        model = MemSeg(cfg, image_size, weights=backbone_weights)
        model.memory.fill(model.memory_features(torch.rand(cfg.memory_samples, 3, image_size, image_size)))
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        models[selection] = (model, opt)
    if inference:
        _time_exported({k: m for k, (m, _) in models.items()}, image_size, rounds, threads, backbone)
        return
    x = torch.rand(batch, 3, image_size, image_size)
    step = {k: [] for k in models}
    memory = {k: [] for k in models}
    for _ in range(rounds):
        for selection, (model, opt) in models.items():
            t = time.perf_counter()
            loss = model(x).float().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step[selection].append(time.perf_counter() - t)
            with torch.no_grad():
                feats = model.memory_features(x)
                t = time.perf_counter()
                model.memory(feats)
                memory[selection].append(time.perf_counter() - t)
    med = {k: (statistics.median(step[k][1:]), statistics.median(memory[k][1:])) for k in models}
    print(f"{backbone}, {image_size} px, batch {batch}, {threads} threads, median of {rounds - 1} rounds:")
    for k, (s, m) in med.items():
        print(f"  {k:5s}: training step {s:.3f} s, memory step alone {m:.3f} s")
    print(f"  patch / sum training step: {med['patch'][0] / med['sum'][0]:.3f}")


def _time_exported(models, image_size: int, rounds: int, threads: int, backbone: str) -> None:
    import tempfile
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort

    from memseg_edge.bundle import INPUT_NAME
    from memseg_edge.train.export import write_onnx

    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for selection, model in models.items():
            path = Path(tmp) / f"{selection}.onnx"
            write_onnx(model, 100, path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            sessions[selection] = (ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]),
                                   path.stat().st_size / 1e6)
    frame = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3), dtype=np.uint8)
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for selection, (session, _) in sessions.items():
            t = time.perf_counter()
            session.run(None, {INPUT_NAME: frame})
            times[selection].append(time.perf_counter() - t)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"{backbone}, {image_size} px, exported graph, onnxruntime CPU, batch 1, {threads} threads, "
          f"median of {rounds - 1} rounds:")
    for k in sessions:
        print(f"  {k:5s}: {med[k] * 1e3:.1f} ms per frame, model.onnx {sessions[k][1]:.1f} MB")
    print(f"  patch / sum per frame: {med['patch'] / med['sum']:.3f}")


if __name__ == "__main__":
    main()
