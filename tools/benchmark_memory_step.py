#!/usr/bin/env python
"""The cost of the memory step in training, whole-image (``sum``) against per-position (``patch``): one
training step (forward, backward, SGD) on a batch of random images and the memory step alone, for both
selections in one process, interleaved round by round so machine noise hits both alike. Prints medians
and the ratio. Needs the trainer (torch); the encoder weights only set realistic feature statistics.

    python tools/benchmark_memory_step.py --backbone-weights ../shared/weights/mobilenet_v2-imagenet-features.pth
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
def main(backbone, backbone_weights, image_size, batch, rounds, threads):
    import torch

    from memseg_edge.train.config import MemSegConfig
    from memseg_edge.train.torch_model import MemSeg

    torch.set_num_threads(threads)
    models = {}
    for selection in ("sum", "patch"):
        cfg = MemSegConfig().model
        cfg.backbone, cfg.memory_selection = backbone, selection
        torch.manual_seed(0)
        model = MemSeg(cfg, image_size, weights=backbone_weights)
        model.memory.fill(model.memory_features(torch.rand(cfg.memory_samples, 3, image_size, image_size)))
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        models[selection] = (model, opt)
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


if __name__ == "__main__":
    main()
