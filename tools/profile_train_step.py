#!/usr/bin/env python
"""Where a training step's time goes: the default model, one batch, on this machine's CPU.

    python tools/profile_train_step.py --backbone-weights ../shared/weights/mobilenet_v2-imagenet-features.pth

Builds today's default model (``MemSegConfig()``'s model section with ``--backbone``; only the memory bank is filled from random
images, which does not change the cost), times the training step (forward, loss, backward, SGD) as the
trainer runs it, then profiles a few steps with ``torch.profiler`` and sums each operator's own CPU time by
the spatial size of its first input: how much of a step the full-resolution stages cost, how much the
stride-2 stage, and so on. Separately it times the anomaly synthesis of one batch (what the loader worker
does beside the step, on one thread). Timing only: no accuracy figure comes from this model.

Run it with nothing else on the machine: the medians are only as quiet as the machine is.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import click


def _size_of(shapes) -> str:
    """The spatial size ``HxW`` of an operator's first 4-D input, or a label for the rest."""
    for s in shapes or []:
        if isinstance(s, (list, tuple)) and len(s) == 4 and all(isinstance(v, int) for v in s):
            return f"{s[2]}x{s[3]}"
    return "other (memory step, loss, optimiser, ...)"


@click.command()
@click.option("--backbone-weights", required=True,
              help="The encoder's local state_dict (realistic feature statistics for the memory step), or "
                   "'none' for random weights (the cost is the same).")
@click.option("--backbone", default="mobilenet_v2", show_default=True,
              help="The encoder (the benchmarks' recipes use mobilenet_v2 with the shared weights).")
@click.option("--image-size", default=256, show_default=True)
@click.option("--batch", default=8, show_default=True, help="The training batch (the recipe's: 8).")
@click.option("--threads", default=2, show_default=True)
@click.option("--steps", default=7, show_default=True, help="Timed steps (after two warm-up steps).")
@click.option("--profiled-steps", default=3, show_default=True)
@click.option("--textures", type=click.Path(exists=True, file_okay=False),
              help="DTD images for the synthesis timing (without it, structure anomalies only).")
@click.option("--images", type=click.Path(exists=True, file_okay=False),
              help="A folder of good images for the synthesis timing (without it, that timing is skipped).")
@click.option("--compile", "compiled", is_flag=True,
              help="Time the step through torch.compile (inductor) instead: the first step's time (the compilation) "
                   "and the median after it; no profile.")
@click.option("--compare-widths", multiple=True,
              help="Decoder widths at strides 16,8,4,2,1 to time against today's, interleaved round by round "
                   "(repeatable), e.g. 128,64,48,24,8; no profile.")
@click.option("--compare-activation", type=click.Choice(["relu", "leaky_relu"]), multiple=True,
              help="A decoder activation (model.decoder_activation) to time against today's, interleaved like "
                   "--compare-widths (repeatable); no profile.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False))
def main(backbone, backbone_weights, image_size, batch, threads, steps, profiled_steps, textures, images, compiled,
         compare_widths, compare_activation, json_path):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from memseg_edge.train.config import MemSegConfig
    from memseg_edge.train.loss import memseg_loss
    from memseg_edge.train.torch_model import DECODER_WIDTHS, MemSeg
    from memseg_edge.train.trainer import to_tensor

    torch.set_num_threads(threads)
    cfg = MemSegConfig()
    model_cfg = cfg.model
    model_cfg.backbone = backbone
    if not isinstance(model_cfg.standardise_images, bool):  # "auto" is decided from a product's images
        model_cfg.standardise_images = False
    # the batch as the trainer hands it to the model (trainer.to_tensor: an RGB uint8 [N, H, W, 3] batch
    # permuted, so channels-last in memory). The layout matters: PyTorch's CPU convolutions follow the input's,
    # and a contiguous NCHW batch makes a step about 1.4x slower, the narrower head's share of it larger
    torch.manual_seed(0)
    x = to_tensor(torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8).numpy(), "cpu")
    target = (torch.rand(batch, image_size, image_size) > 0.9).float()
    tc = cfg.train

    def make(widths, compile_it=False, activation=None):
        """A model (random decoder, the given decoder widths; [] = today's; ``activation``: another
        model.decoder_activation) and its training step."""
        torch.manual_seed(0)
        net_cfg = dataclasses.replace(model_cfg, decoder_channels=list(widths))
        if activation:
            net_cfg = dataclasses.replace(net_cfg, decoder_activation=activation)
        model = MemSeg(net_cfg, image_size, weights=backbone_weights)
        if model.memory is not None:
            model.memory.fill(model.memory_features(torch.rand(net_cfg.memory_samples, 3, image_size, image_size)))
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        net = torch.compile(model) if compile_it else model

        def step():
            loss, _ = memseg_loss(net(x), target, tc.l1_weight, tc.focal_weight, tc.focal_gamma, tc.focal_alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    if compare_widths or compare_activation:
        variants = {"today": make([])}
        for w in compare_widths:
            widths = [int(v) for v in w.split(",")]
            variants[",".join(map(str, widths))] = make(widths)
        for a in compare_activation:
            variants[a] = make([], activation=a)
        rounds = {k: [] for k in variants}
        for r in range(steps + 1):  # interleaved, so the machine's drift hits every variant alike
            for k, fn in variants.items():
                t = time.perf_counter()
                fn()
                if r:
                    rounds[k].append(time.perf_counter() - t)
        base = statistics.median(rounds["today"])
        print(f"decoder widths at strides 16, 8, 4, 2, 1 or activations ({model_cfg.backbone}, {image_size} px, batch "
              f"{batch}, {threads} threads), training step, median of {steps} interleaved rounds:")
        for k, v in rounds.items():
            label = ("today's (" + ",".join(map(str, DECODER_WIDTHS[model_cfg.backbone])) + ", "
                     + model_cfg.decoder_activation + ")") if k == "today" else k
            print(f"  {label:>26s}: {statistics.median(v):.3f} s, {statistics.median(v) / base:.3f} x today's")
        if json_path:
            Path(json_path).write_text(json.dumps({"widths_step_seconds": rounds, "today_widths": list(
                DECODER_WIDTHS[model_cfg.backbone]), "today_activation": model_cfg.decoder_activation,
                "input_channels_last": x.is_contiguous(
                memory_format=torch.channels_last)}, indent=2) + "\n")
        return

    step = make([], compiled)

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    if compiled:
        print(f"default model ({model_cfg.backbone}, {image_size} px) through torch.compile, batch {batch}, {threads} "
              f"threads: first step (compilation) {first:.1f} s, then a step's median {med:.3f} s over {steps} steps")
        if json_path:
            Path(json_path).write_text(json.dumps({"compiled": True, "first_step_s": first, "step_seconds": times,
                                                   "step_median_s": med}, indent=2) + "\n")
        return
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(profiled_steps):
            step()
    by_size: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        by_size[_size_of(event.input_shapes)] += event.self_cpu_time_total
    total = sum(by_size.values())
    shares = dict(sorted(((k, v / total) for k, v in by_size.items()), key=lambda kv: -kv[1]))
    small = [k for k, v in shares.items() if v < 0.005]
    if len(small) > 1:  # the attention's pooled vectors and the like: one line
        shares = {**{k: v for k, v in shares.items() if k not in small}, "rest": sum(shares[k] for k in small)}

    synthesis = None
    if images:
        import cv2

        from memseg_edge.train.datasets import TrainingStream, load_images
        from memseg_edge.train.synthesis import AnomalySynthesizer

        cv2.setNumThreads(1)
        paths = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        if not paths:
            raise click.UsageError(f"no images in {images}")
        cfg.synthesis.textures = textures
        stream = TrainingStream(load_images(paths[:40], image_size, cfg.data.resize), AnomalySynthesizer(cfg.synthesis),
                                seed=0, length=10 ** 6)
        rounds = []
        for r in range(6):
            t = time.perf_counter()
            for i in range(r * batch, (r + 1) * batch):
                stream[i]
            rounds.append(time.perf_counter() - t)
        synthesis = statistics.median(rounds[1:])

    print(f"default model ({model_cfg.backbone}, {image_size} px), batch {batch}, {threads} threads: "
          f"training step median {med:.3f} s over {steps} steps (min {min(times):.3f}, max {max(times):.3f})")
    print(f"operators' own CPU time over {profiled_steps} profiled steps, by the spatial size of their first input:")
    for k, v in shares.items():
        print(f"  {k:>12s}: {100 * v:5.1f} %")
    if synthesis is not None:
        print(f"anomaly synthesis of one batch ({batch} items, half synthetic), one thread: {synthesis:.3f} s")
    if json_path:
        Path(json_path).write_text(json.dumps({
            "image_size": image_size, "batch": batch, "threads": threads, "step_seconds": times,
            "first_step_s": first, "step_median_s": med,
            "input_channels_last": x.is_contiguous(memory_format=torch.channels_last), "self_cpu_share_by_input_size": shares, "synthesis_batch_s": synthesis,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
