"""How MemSeg is trained (the network itself is in ``torch_model.py``).

Batches of good images and synthetic anomalies 1:1, L1 + focal loss, SGD with warm-up and cosine decay,
seeded and resumable; the memory bank is filled once from N good images before the first step; at the
end the decision threshold is chosen on held-out good images only, and the model is validated on
synthetic anomalies made from those held-out images (never on test images). CPU, one GPU, or several
GPUs through ``torchrun`` (DistributedDataParallel: each process trains on its own share of every batch).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from memseg_edge.calibration.threshold import describe_threshold, threshold_for_false_reject_rate
from memseg_edge.preprocess import FITS
from memseg_edge.scoring import image_scores

from . import metrics
from .checkpoint import read_checkpoint, save_checkpoint
from .config import MemSegConfig, apply_overrides
from .datasets import TrainingStream, discover, hash_image_list, load_images, run_split
from .loss import memseg_loss
from .synthesis import NO_TEXTURES, AnomalySynthesizer, foreground_mask
from .torch_model import MemSeg, decoder_widths, fuse_maps


def to_tensor(images: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """RGB uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [0, 1] on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def predict_maps(model: MemSeg, images: np.ndarray, device: str | torch.device, batch_size: int = 16) -> np.ndarray:
    """Anomaly maps ``[N, H, W]`` float32 for RGB uint8 images ``[N, H, W, 3]`` at the model's size: the model's
    forward, the graph that export writes."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        out.append(model(to_tensor(images[i:i + batch_size], device))[:, 0].float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:3], np.float32)


@torch.no_grad()
def predict_components(model: MemSeg, images: np.ndarray, device: str | torch.device,
                       batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly maps, the decoder's anomaly probability) ``[N, H, W]`` float32 each, in one pass; the two are
    the same map for a model without the distance fusion. The maps are ``predict_maps``' (the forward's
    composition, ``MemSeg.forward``; a test holds them equal)."""
    was_training = model.training
    model.eval()
    maps, probs = [], []
    for i in range(0, len(images), batch_size):
        prob, distance = model.component_maps(to_tensor(images[i:i + batch_size], device))
        fused = prob if distance is None else fuse_maps(prob, distance, model.fusion_norm,
                                                        getattr(model, "fusion_position", None))
        maps.append(fused[:, 0].float().cpu().numpy())
        probs.append(prob[:, 0].float().cpu().numpy())
    model.train(was_training)
    if not maps:
        empty = np.zeros((0,) + images.shape[1:3], np.float32)
        return empty, empty
    return np.concatenate(maps), np.concatenate(probs)


def check_cuda_device(device: str) -> None:
    """Refuse ``--device cuda[:N]`` before loading anything when PyTorch sees no such GPU (RuntimeError)."""
    index = int(device.split(":", 1)[1]) if ":" in device and device.split(":", 1)[1].isdigit() else 0
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: PyTorch sees no CUDA GPU here (no NVIDIA driver, or a CPU-only "
                           "PyTorch build); leave out --device to evaluate on the CPU")
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                           f"numbered from 0; use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def lr_factor(it: int, cfg) -> float:
    """Linear warm-up (:func:`effective_warmup`), then cosine decay from ``lr`` to ``min_lr`` at the last
    iteration."""
    warmup = effective_warmup(cfg)
    if it < warmup:
        return (it + 1) / warmup
    span = max(1, cfg.iterations - warmup)
    progress = min(1.0, (it - warmup) / span)
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StreamSampler(Sampler[int]):
    """Indices of the global training stream that this process trains on, from ``start`` on: for each
    iteration, its own block of ``batch`` consecutive items (so every block is half good, half synthetic)."""

    def __init__(self, start_iteration: int, iterations: int, batch: int, rank: int, world: int):
        self.start, self.iterations, self.batch, self.rank, self.world = start_iteration, iterations, batch, rank, world

    def __len__(self) -> int:
        return (self.iterations - self.start) * self.batch

    def __iter__(self):
        for it in range(self.start, self.iterations):
            base = (it * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)


def _collate(items):
    images = np.stack([a for a, _ in items])
    masks = np.stack([m for _, m in items])
    return torch.from_numpy(images), torch.from_numpy(masks)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def check_config(cfg: MemSegConfig) -> list[str]:
    """Every check of a training config that needs no data and no model, run before any work (a run never
    fails half-way on a setting). Raises ``ValueError`` with what to change; returns notes to print."""
    from .encoders import ENCODERS
    from .memory import SELECTIONS

    tc, mc, dc = cfg.train, cfg.model, cfg.data
    notes = []
    if mc.backbone not in ENCODERS:
        raise ValueError(f"model.backbone {mc.backbone!r} is unknown: choose one of {sorted(ENCODERS)}")
    if mc.memory_selection not in SELECTIONS:
        raise ValueError(f"model.memory_selection must be one of {SELECTIONS}, found {mc.memory_selection!r}")
    if dc.resize not in FITS:
        raise ValueError(f"data.resize must be one of {', '.join(FITS)}, found {dc.resize!r}")
    if dc.image_size < 32 or dc.image_size % 32:
        raise ValueError(f"data.image_size must be a multiple of 32 (the encoder's stride), found {dc.image_size}")
    if not 0.0 <= dc.holdout_fraction < 1.0:
        raise ValueError(f"data.holdout_fraction must be in [0, 1), found {dc.holdout_fraction}")
    if dc.split_seed < -1:
        raise ValueError(f"data.split_seed must be -1 (train.seed) or a seed >= 0, found {dc.split_seed}")
    if tc.iterations < 1:
        raise ValueError(f"train.iterations must be >= 1, found {tc.iterations}")
    if tc.batch_size < 2 or tc.batch_size % 2:
        raise ValueError(f"train.batch_size must be even (half good, half synthetic), found {tc.batch_size}")
    if tc.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"train.optimizer {tc.optimizer!r} is unknown: use sgd or adamw")
    if not tc.lr > 0:
        raise ValueError(f"train.lr must be > 0, found {tc.lr}")
    if not 0.0 <= tc.target_false_reject_rate < 1.0:
        raise ValueError(f"train.target_false_reject_rate must be in [0, 1), found {tc.target_false_reject_rate}")
    if tc.warmup_iterations < 0:
        raise ValueError(f"train.warmup_iterations must be >= 0, found {tc.warmup_iterations}")
    if tc.warmup_iterations > tc.iterations:
        notes.append(f"note: warm-up ({tc.warmup_iterations} iterations) is longer than training "
                     f"({tc.iterations}); the learning rate would never reach {tc.lr:g}, so the warm-up is scaled "
                     f"to {effective_warmup(tc)} iterations (10 % of training)")
    if not (isinstance(mc.standardise_images, bool) or mc.standardise_images == "auto"):
        raise ValueError(f"model.standardise_images must be true, false or auto, found {mc.standardise_images!r}")
    if not 0.0 < mc.distance_weight < 1.0:
        raise ValueError(f"model.distance_weight must be in (0, 1) (0.5: the decoder's map and the memory distance "
                         f"alike; model.distance_fusion: false for the decoder's map alone), found {mc.distance_weight}")
    if mc.memory_rebuild_samples:
        if mc.memory_selection != "patch" or not mc.use_memory:
            raise ValueError("model.memory_rebuild_samples needs model.memory_selection: patch (the other "
                             "selections compare with every memory image, so more images would cost more at "
                             "inference); set it to 0")
        if mc.memory_rebuild_samples <= mc.memory_samples:
            raise ValueError(f"model.memory_rebuild_samples must be 0 (off) or more than model.memory_samples "
                             f"({mc.memory_samples}), found {mc.memory_rebuild_samples}")
    if mc.memory_rebuild_choice not in REBUILD_CHOICES:
        raise ValueError(f"model.memory_rebuild_choice must be one of {', '.join(REBUILD_CHOICES)}, found "
                         f"{mc.memory_rebuild_choice!r}")
    if mc.memory_rebuild_choice == "validation" and not mc.memory_rebuild_samples:
        notes.append("note: model.memory_rebuild_choice: validation has nothing to choose without "
                     "model.memory_rebuild_samples (e.g. 120): the bank stays as trained")
    if not cfg.synthesis.textures and cfg.synthesis.texture_probability > 0:
        raise ValueError(
            "no texture folder: MemSeg's texture anomaly source needs one (the paper's Table 3: training without it "
            "costs about 0.8 image and 1.5 pixel AUROC points). Pass --textures DTD/images (the Describable Textures "
            "Dataset layout: one sub-folder per class of .jpg images, or a flat folder of .jpg/.png), or "
            "--no-textures to train with the structure source only")
    AnomalySynthesizer(cfg.synthesis)  # checks the synthesis settings and lists the textures
    return notes


EXPOSURE_SPREAD_LIMIT = 1.25
"""``model.standardise_images: auto`` turns standardisation on when the good training images' exposure spread
(``exposure_spread``) is above this: a typical good image a quarter brighter than another. Set from the two
products before any model figure (bottle 1.03, magnetic_tile 2.66; BENCHMARKS.md, "exposure standardised
where the good images' exposure varies")."""


def exposure_spread(images: np.ndarray) -> tuple[float, float, float]:
    """RGB uint8 images ``[N, H, W, 3]`` -> the 5th and 95th percentiles of their mean grey level (in [0, 1])
    and the spread, their ratio (each + 1/255, so black images stay finite)."""
    grey = np.array([float(img.mean()) / 255.0 for img in images])
    low, high = (float(v) for v in np.percentile(grey, [5, 95]))
    return low, high, (high + 1 / 255) / (low + 1 / 255)


def decide_standardise(images: np.ndarray, log=print) -> bool:
    """``model.standardise_images: auto`` on a run's good training images: standardise when their exposure
    varies more than ``EXPOSURE_SPREAD_LIMIT``; the log says what was measured and chosen."""
    low, high, spread = exposure_spread(images)
    on = spread > EXPOSURE_SPREAD_LIMIT
    log(f"exposure: the {len(images)} training images' mean grey level spans {low:.3f}-{high:.3f} (5th-95th "
        f"percentile), a spread of {spread:.2f}x: model.standardise_images auto -> {str(on).lower()} "
        + (f"(above {EXPOSURE_SPREAD_LIMIT}x: each image is brought to one exposure)" if on else
           f"(at most {EXPOSURE_SPREAD_LIMIT}x: images as captured)"))
    return on


def effective_warmup(tc) -> int:
    """The warm-up actually used: as configured, or 10 % of training when it would end after training (the
    learning rate would never reach its peak)."""
    return tc.warmup_iterations if tc.warmup_iterations <= tc.iterations else max(1, tc.iterations // 10)


def foreground_shares(images: np.ndarray, fg_cfg) -> np.ndarray:
    """Share of each image ``[N, H, W, 3]`` that the foreground setting lets anomalies cover -> ``[N]``."""
    return np.array([float(foreground_mask(img, fg_cfg).mean()) for img in images])


def foreground_report(shares: np.ndarray, names: list[str], low: float = 0.05, high: float = 0.95) -> list[str]:
    """Lines about the foreground's share of each training image; a warning for images outside
    [``low``, ``high``] (a binarisation that keeps almost nothing or almost everything is probably wrong)."""
    lines = [f"foreground: {100 * np.min(shares):.1f} % / {100 * np.median(shares):.1f} % / "
             f"{100 * np.max(shares):.1f} % of the frame (min / median / max over {len(shares)} training images)"]
    odd = [(n, s) for n, s in zip(names, shares) if not low <= s <= high]
    if odd:
        shown = ", ".join(f"{n} {100 * s:.1f} %" for n, s in odd[:5])
        lines.append(f"WARNING: the foreground covers less than {100 * low:g} % or more than {100 * high:g} % of "
                     f"{len(odd)} of {len(shares)} training images ({shown}{', ...' if len(odd) > 5 else ''}): check "
                     "the foreground setting with `memseg-edge synth-preview`")
    return lines


def train(cfg: MemSegConfig, out_dir: str | Path, resume: str | Path | None = None, progress: bool = True,
          log=print) -> Path:
    """Train MemSeg as ``cfg`` says; writes ``out_dir/checkpoint.pt`` and ``out_dir/config.yaml``.
    Returns the checkpoint path. ``resume``: a checkpoint of the same run to continue from."""
    rank, world = _distributed()
    main = rank == 0
    log = log if main else (lambda *a, **k: None)
    out_dir = Path(out_dir)
    tc = cfg.train
    notes = check_config(cfg)
    device = torch.device(tc.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but PyTorch sees no CUDA GPU: use --device cpu")
        if world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
    seed_everything(tc.seed)

    start_it = 0
    earlier_seconds, unrecorded = 0.0, False
    ckpt = None
    if resume is not None:
        ckpt = read_checkpoint(resume)
        saved = MemSegConfig.from_dict(ckpt["config"])
        # The fusion, its weight and the memory refill act after the last iteration only, so a run may be
        # resumed with any of them changed (a run started before it existed, say).
        if cfg.model.standardise_images == "auto":  # goes on as the run decided when it started
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, standardise_images=saved.model.standardise_images))
        if not cfg.model.decoder_channels:  # goes on with the widths it was built with, whatever today's default
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, decoder_channels=list(saved.model.decoder_channels)))
        if (dataclasses.replace(saved.model, **{k.split(".")[1]: getattr(cfg.model, k.split(".")[1])
                                                for k in AFTER_TRAINING}) != cfg.model
                or saved.data.image_size != cfg.data.image_size or saved.data.resize != cfg.data.resize):
            raise ValueError(f"{resume} was trained with a different model, image size or data.resize; resume needs "
                             "the same")
        # Defaults change between releases (e.g. the Perlin scales): a resumed run must keep synthesising
        # the anomalies it started with. The texture folder may move between machines.
        changed = [f.name for f in dataclasses.fields(saved.synthesis) if f.name != "textures"
                   and getattr(saved.synthesis, f.name) != getattr(cfg.synthesis, f.name)]
        if changed:
            raise ValueError(f"{resume} was trained with other synthesis settings ({', '.join(changed)}); resume "
                             f"with the run's own configuration: --config {Path(resume).parent / 'config.yaml'}")
        start_it = int(ckpt["iteration"])
        # Training time before this session (checkpoints written before it was recorded have none).
        earlier_seconds = float(ckpt.get("train_seconds") or 0.0)
        unrecorded = ckpt.get("train_seconds") is None and start_it > 0

    data = discover(cfg.data)
    split = run_split(cfg, data.train_good)
    if ckpt is not None and run_split(saved, data.train_good) != split:
        # the held-out images must never have been trained on, nor the memory samples change mid-run
        raise ValueError(f"{resume} split its good images into memory, held-out and training images otherwise "
                         "(train.seed, data.split_seed, data.holdout_fraction or model.memory_samples differ); "
                         f"resume with the run's own configuration: --config {Path(resume).parent / 'config.yaml'}")
    size = cfg.data.image_size
    train_images = load_images(split.train, size, cfg.data.resize)
    if cfg.model.standardise_images == "auto":  # a new run (a resumed one took its own choice above)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, standardise_images=decide_standardise(train_images, log)))
    if not cfg.model.decoder_channels:  # a new run records its widths: the default may change later
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, decoder_channels=decoder_widths(cfg.model)))
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")
        log("memseg-edge train: configuration\n" + cfg.to_yaml())
        log(f"data: {len(data.train_good)} good training images -> {len(split.memory)} memory samples, "
            f"{len(split.holdout)} held out (threshold, validation), {len(split.train)} for training")

    for note in notes:
        log(note)
    if cfg.synthesis.foreground.method != "none":
        for line in foreground_report(foreground_shares(train_images, cfg.synthesis.foreground),
                                      [p.name for p in split.train]):
            log(line)
    model = MemSeg(cfg.model, size, weights=None if ckpt else cfg.model.backbone_weights).to(device)
    backbone_origin = ckpt["backbone_weights"] if ckpt else model.encoder.weights_origin
    log(f"encoder: {cfg.model.backbone}, weights: {backbone_origin}")
    if ckpt:
        # the fusion's constants are set again at the end
        state = {k: v for k, v in ckpt["model_state"].items() if k not in FUSION_CONSTANTS}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - FUSION_CONSTANTS:
            raise ValueError(f"{resume}: its weights do not fit the model (missing {missing}, unexpected {unexpected})")
        if model.memory is not None and ckpt["data"].get("memory_refill_images"):
            # the bank was refilled after the run's last iteration: training goes on with the bank it trained
            # with, and the end of the run refills it again only if asked to (and, with
            # model.memory_rebuild_choice: validation, compares the two)
            model.memory.fill(memory_features(model, load_images(split.memory, size, cfg.data.resize), device))
    elif model.memory is not None:
        model.memory.fill(memory_features(model, load_images(split.memory, size, cfg.data.resize), device))

    synthesizer = AnomalySynthesizer(cfg.synthesis)
    log(f"anomaly sources: {synthesizer.sources}")
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    elif tc.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {tc.optimizer!r}: use sgd or adamw")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, tc))
    if ckpt and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    stream = TrainingStream(train_images, synthesizer, tc.seed, length=tc.iterations * tc.batch_size * world)
    per_rank = tc.batch_size // world if world > 1 else tc.batch_size
    if world > 1 and (tc.batch_size % (2 * world)):
        raise ValueError(f"batch size {tc.batch_size} must split evenly into {world} processes of good+synthetic pairs")
    loader = DataLoader(stream, batch_size=per_rank, sampler=StreamSampler(start_it, tc.iterations, per_rank, rank, world),
                        num_workers=tc.num_workers, collate_fn=_collate, persistent_workers=False,
                        prefetch_factor=4 if tc.num_workers > 0 else None)

    data_info = {
        "training_list_sha256": hash_image_list(split.train + split.memory),
        "n_train": len(split.train),
        "memory_images": [p.name for p in split.memory],
        "holdout_images": [p.name for p in split.holdout],
        "root": str(Path(cfg.data.root).resolve()),
        "category": cfg.data.category,
    }

    def checkpoint(it: int, threshold=None, validation=None, seconds: float | None = None) -> Path:
        return save_checkpoint(out_dir / "checkpoint.pt", model, cfg, iteration=it, threshold=threshold,
                               data=data_info, backbone_weights=backbone_origin, validation=validation,
                               optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                               train_seconds=None if unrecorded else earlier_seconds + (
                                   time.perf_counter() - t0 if seconds is None else seconds))

    model.train()
    it = start_it
    bar = tqdm(total=tc.iterations, initial=start_it, desc="train", unit="it", disable=not (progress and main),
               file=sys.stderr, dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    history = []
    for images, masks in loader:
        x = to_tensor(images.numpy(), device)
        target = masks.to(device)
        logits = net(x)
        loss, parts = memseg_loss(logits, target, tc.l1_weight, tc.focal_weight, tc.focal_gamma, tc.focal_alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        it += 1
        seen += len(x) * world
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at iteration {it}: lower --lr")
        rate = seen / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss_value:.4f}", l1=f"{parts['l1']:.3f}", focal=f"{parts['focal']:.4f}",
                        img_s=f"{rate:.1f}", lr=f"{scheduler.get_last_lr()[0]:.4f}")
        bar.update(1)
        if it % tc.log_every == 0 or it == tc.iterations:
            history.append({"iteration": it, "loss": loss_value, **parts, "images_per_s": rate})
        if main and tc.checkpoint_every and it % tc.checkpoint_every == 0 and it < tc.iterations:
            checkpoint(it)
    bar.close()
    elapsed = time.perf_counter() - t0
    if main:
        log(f"trained {it - start_it} iterations in {elapsed:.0f} s ({seen / max(elapsed, 1e-9):.1f} images/s)"
            + (f"; {earlier_seconds + elapsed:.0f} s over all {it} iterations of the run" if start_it and not unrecorded
               else f"; the time of the first {start_it} was not recorded in {resume}" if unrecorded else ""))

    if world > 1:
        dist.barrier()
    if not main:
        dist.destroy_process_group()
        return out_dir / "checkpoint.pt"

    threshold, validation, refill = finish_model(model, cfg, split, synthesizer, device, log)
    data_info.pop("memory_refill_images", None)
    if refill:
        data_info["memory_refill_images"] = [p.name for p in refill]
    validation = {**(validation or {}), "history": history,
                  "train_seconds": None if unrecorded else earlier_seconds + elapsed}
    path = checkpoint(it, threshold, validation, seconds=elapsed)
    if world > 1:
        dist.destroy_process_group()
    log(f"checkpoint: {path}")
    return path


REBUILD_CHOICES = ("always", "validation")
REBUILD_MARGIN = 0.002
"""``model.memory_rebuild_choice: validation`` keeps a refilled bank only if the synthetic validation's mean of
image and pixel AUROC gains at least this much: a change in the fourth digit, which a saturated validation
gives by noise alone, keeps the paper's bank."""


def _validation_mean(v: dict[str, Any]) -> float:
    return 0.5 * (float(v["image_auroc"]) + float(v["pixel_auroc"]))


def _set_constants(model: MemSeg, calibration: list[Path], holdout: np.ndarray, cfg: MemSegConfig, synthesizer,
                   device, log) -> tuple[dict | None, dict | None]:
    """The fusion normalisers (from ``calibration``), then the threshold and the synthetic validation (from
    ``holdout``) for the model's current bank; (None, None) without held-out images."""
    size, tc = cfg.data.image_size, cfg.train
    if model.fuses:
        q_p, q_d, c = model.calibrate_fusion(to_tensor(load_images(calibration, size, cfg.data.resize), device), cfg.eval.top_k)
        w = cfg.model.distance_weight
        log(f"distance fusion: q_p {q_p:.4g}, q_D {q_d:.4g} (99th percentile"
            + (f"s over 2 (1 - w) and 2 w, distance weight w {w:g}" if w != 0.5 else "")
            + f"), c {c:.4g} (highest score), over {len(calibration)} good training images")
        if hasattr(model, "fusion_position"):
            r = model.fusion_position.float().cpu().numpy()
            log("per-position normalisers: " + "; ".join(
                f"{name} damped on {100 * float((x > 1).mean()):.0f} % of the frame, at most {float(x.max()):.2f}x"
                for name, x in (("q_p", r[0]), ("q_D", r[1]))))
    if not len(holdout):
        return None, None
    good_scores = image_scores(predict_maps(model, holdout, device), cfg.eval.top_k)
    # every map the model returns is in [0, 1]: a threshold at or above 1 would pass every part
    threshold = threshold_for_false_reject_rate(good_scores, tc.target_false_reject_rate, upper=1.0)
    validation = validate_on_synthetic(model, holdout, good_scores, synthesizer, tc.seed, device, cfg.eval.top_k,
                                       threshold["threshold"])
    log(describe_threshold(threshold))
    for line in validation_report(validation):
        log(line)
    return threshold, validation


def finish_model(model: MemSeg, cfg: MemSegConfig, split, synthesizer, device,
                 log=print) -> tuple[dict | None, dict | None, list[Path]]:
    """What follows the last iteration, on good images only: the memory bank refilled from more images
    (``model.memory_rebuild_samples``; with ``model.memory_rebuild_choice: validation`` only where the synthetic
    validation gains), the distance-fusion normalisers (from the training pool), then the decision threshold
    (held-out images) and the synthetic validation. Leaves ``model`` in eval mode; returns (threshold,
    validation, the images of a refilled bank or []), the first two None without held-out images."""
    model.eval()
    size, tc = cfg.data.image_size, cfg.train
    calibration = fusion_calibration_images(split.train, tc.seed) if model.fuses else []
    holdout = load_images(split.holdout, size, cfg.data.resize)
    rebuild = bool(model.memory is not None and cfg.model.memory_rebuild_samples)
    choose = rebuild and cfg.model.memory_rebuild_choice == "validation"
    if choose and not len(holdout):
        log("note: model.memory_rebuild_choice: validation needs held-out good images to choose with; the bank "
            "stays as trained")
        rebuild = choose = False
    trained = None
    if choose:
        log("finishing with the trained bank first (model.memory_rebuild_choice: validation)")
        threshold, validation = _set_constants(model, calibration, holdout, cfg, synthesizer, device, log)
        kept = {name: buf.detach().clone() for name, buf in model.named_buffers()
                if name.startswith("memory.") or name in FUSION_CONSTANTS}
        trained = (threshold, validation, kept)
    refill = []
    if rebuild:
        refill = memory_refill_images(split, calibration, cfg.model.memory_rebuild_samples, tc.seed)
        t0 = time.perf_counter()
        model.memory.fill(memory_features(model, load_images(refill, size, cfg.data.resize), device))
        log(f"memory bank refilled from {len(refill)} good training images ({len(split.memory)} memory samples + "
            f"{len(refill) - len(split.memory)} training images) in {time.perf_counter() - t0:.0f} s")
        if len(refill) < cfg.model.memory_rebuild_samples:
            log(f"note: model.memory_rebuild_samples asks {cfg.model.memory_rebuild_samples}, but only "
                f"{len(refill)} good training images are neither held out nor fusion-calibration images")
    threshold, validation = _set_constants(model, calibration, holdout, cfg, synthesizer, device, log)
    if choose:
        before, after = _validation_mean(trained[1]), _validation_mean(validation)
        keep = after >= before + REBUILD_MARGIN
        record = {"choice": "validation", "margin": REBUILD_MARGIN, "as_trained": before, "refilled": after,
                  "kept": "refilled" if keep else "as trained", "refill_images": len(refill)}
        log(f"memory bank: synthetic validation (mean of image and pixel AUROC) {before:.4f} with the trained bank, "
            f"{after:.4f} refilled from {len(refill)} images: "
            + ("the refilled bank is kept" if keep else
               f"the trained bank is kept (the refill must gain at least {REBUILD_MARGIN:g}); its threshold and "
               "validation are the ones above it"))
        if not keep:
            with torch.no_grad():
                for name, buf in model.named_buffers():
                    if name in trained[2]:
                        buf.copy_(trained[2][name])
            threshold, validation, refill = trained[0], trained[1], []
        validation = {**validation, "memory_rebuild": record}
    return threshold, validation, refill


def load_run(run: str | Path, data_root: str | Path, category: str):
    """A run (its folder or checkpoint) and how its good images under ``data_root``/``category`` split
    (memory, held-out, training), as the tools that score a run on its own held-out images need them:
    -> (model in eval mode, checkpoint dict, config, split)."""
    from .checkpoint import load_model
    from .config import DataConfig

    run = Path(run)
    model, ckpt = load_model(run / "checkpoint.pt" if run.is_dir() else run)
    cfg = MemSegConfig.from_dict(ckpt["config"])
    data = discover(DataConfig(root=str(data_root), category=category, image_size=int(ckpt["image_size"])))
    return model, ckpt, cfg, run_split(cfg, data.train_good)


AFTER_TRAINING = ("model.distance_fusion", "model.distance_weight", "model.position_normalisers",
                  "model.memory_rebuild_samples", "model.memory_rebuild_choice")
"""Settings that act only after the last iteration: a finished run can be finished again with them changed."""

FUSION_CONSTANTS = {"fusion_norm", "fusion_position"}
"""The buffers ``finish_model`` sets after the last iteration (``MemSeg.calibrate_fusion``): never taken from a
checkpoint that training goes on from or that is finished again."""


def finish_again(run: str | Path, out: str | Path, changes: dict[str, Any], log=print) -> Path:
    """A finished run (its folder or checkpoint) finished again as training finishes (``finish_model``) with
    ``changes`` (dotted keys of ``AFTER_TRAINING``) applied: what the same command would have trained with
    them. The weights are copied unchanged; a bank refilled earlier goes back to the memory samples' first;
    the run's own data split is checked against the checkpoint. Test images are never read. Writes
    OUT/checkpoint.pt and OUT/config.yaml; returns the checkpoint's path."""
    run, out = Path(run), Path(out)
    unknown = sorted(set(changes) - set(AFTER_TRAINING))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} change training itself: train again (only {', '.join(AFTER_TRAINING)} "
                         "act after the last iteration)")
    ckpt = read_checkpoint(run / "checkpoint.pt" if run.is_dir() else run)
    if ckpt.get("threshold") is None:
        raise ValueError(f"{run}'s checkpoint is not a finished run (no threshold): finish training first")
    cfg = apply_overrides(MemSegConfig.from_dict(ckpt["config"]), changes)
    check_config(cfg)
    model = MemSeg(cfg.model, int(ckpt["image_size"]), weights=None)
    state = {k: v for k, v in ckpt["model_state"].items() if k not in FUSION_CONSTANTS}  # set again below
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - FUSION_CONSTANTS or unexpected:
        raise ValueError(f"{run}: its weights do not fit this model (missing {missing}, unexpected {unexpected})")
    split = run_split(cfg, discover(cfg.data).train_good)
    data = dict(ckpt["data"])
    if ([p.name for p in split.memory] != data["memory_images"]
            or [p.name for p in split.holdout] != data["holdout_images"]):
        raise ValueError(f"{run}: the good images under {cfg.data.root} no longer split as they did in training "
                         "(memory or held-out images differ); this needs the run's own data")
    if data.pop("memory_refill_images", None) and model.memory is not None:
        # the trained bank first, whatever follows: a refill starts from images, and a choice compares with it
        model.memory.fill(memory_features(model, load_images(split.memory, cfg.data.image_size, cfg.data.resize), "cpu"))
    threshold, validation, refill = finish_model(model, cfg, split, AnomalySynthesizer(cfg.synthesis), "cpu", log)
    if refill:
        data["memory_refill_images"] = [p.name for p in refill]
    old = ckpt.get("validation") or {}
    validation = {**(validation or {}), "history": old.get("history", []), "train_seconds": old.get("train_seconds")}
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    path = save_checkpoint(out / "checkpoint.pt", model, cfg, iteration=int(ckpt["iteration"]), threshold=threshold,
                           data=data, backbone_weights=ckpt["backbone_weights"], validation=validation,
                           optimizer=ckpt.get("optimizer"), scheduler=ckpt.get("scheduler"),
                           train_seconds=ckpt.get("train_seconds"))
    log(f"checkpoint: {path}")
    return path


@torch.no_grad()
def memory_features(model: MemSeg, images: np.ndarray, device, batch_size: int = 16) -> list[torch.Tensor]:
    """What the memory bank stores for ``images`` (uint8 ``[N, H, W, 3]``), computed ``batch_size`` at a time."""
    parts = [model.memory_features(to_tensor(images[i:i + batch_size], device)) for i in range(0, len(images), batch_size)]
    return [torch.cat(level) for level in zip(*parts)]


def memory_refill_images(split, calibration: list[Path], count: int, seed: int) -> list[Path]:
    """The images of a bank refilled after training: the memory samples, then a seeded pick of the training
    images that do not set the fusion normalisers (their distance to the bank must be a stranger's), up to
    ``count`` in all. Never a held-out image."""
    skip = set(calibration)
    pool = [p for p in split.train if p not in skip]
    extra = max(0, count - len(split.memory))
    pick = np.random.default_rng(seed).permutation(len(pool))[:extra]
    return list(split.memory) + [pool[i] for i in sorted(pick)]


FUSION_CALIBRATION_IMAGES = 64
"""At most this many good training images (a seeded pick) set the distance-fusion normalisers."""


def fusion_calibration_images(pool: list[Path], seed: int, count: int = FUSION_CALIBRATION_IMAGES) -> list[Path]:
    """The good images that set ``q_p`` and ``q_D`` (``MemSeg.calibrate_fusion``): a seeded pick from the
    training pool, never a memory sample or a held-out image."""
    pick = np.random.default_rng(seed).choice(len(pool), min(count, len(pool)), replace=False)
    return [pool[i] for i in sorted(pick)]


DECODER_COLLAPSE = """A collapsed decoder head: the 2-channel convolution that gives the logits reads the ReLU outputs of
the last basic block (the paper's design); where every one of those channels is off, the anomaly logit is the
convolution's bias alone, and no gradient reaches the block from those pixels. A run can settle into encoding
"anomalous" as "every channel off": its decoder then never gives an anomaly probability above
sigmoid(bias difference) (0.414 in the magnetic_tile run that showed it, 2026-12-07), on any defect, and learns
only from good pixels. The validation reports the decoder's highest probability on the synthetic anomalies."""

SYNTHETIC_MISS_WARNING = 0.5
"""Above this share of missed synthetic anomalies at the model's own threshold, ``train`` warns loudly."""


def validation_report(v: dict[str, Any]) -> list[str]:
    """Lines for a person: AUROC and, beside it, what the threshold does; a loud warning when it misses most."""
    lines = ["validation on synthetic anomalies of held-out good images (not test images): "
             f"image AUROC {v['image_auroc']:.4f}, pixel AUROC {v['pixel_auroc']:.4f}; at the threshold: "
             f"{100 * v['false_reject_rate']:.1f} % of held-out good images rejected, "
             f"{100 * v['miss_rate']:.1f} % of synthetic anomalies missed"]
    top = v.get("decoder_max_probability")
    if top is not None:
        lines.append(f"the decoder alone calls {100 * v['decoder_anomalous_share']:.1f} % of the synthetic anomalies' "
                     f"pixels anomalous (probability >= 0.5; its highest there {top:.3f})")
        if top < 0.5:
            lines.append(
                f"WARNING: the decoder never calls a pixel anomalous (its probability tops out at {top:.3f}): its "
                "last block has collapsed, every channel off where the anomalies are, so they no longer teach it "
                "(see DECODER_COLLAPSE in train/trainer.py). Its scores crowd just above the good parts' and the "
                "threshold misses most defects. Train again with another --seed (with model.decoder_activation: relu, "
                "with the default leaky_relu)")
    if v["miss_rate"] > SYNTHETIC_MISS_WARNING:
        lines.append(
            f"WARNING: the decision threshold misses {100 * v['miss_rate']:.0f} % of the synthetic anomalies: a line "
            "running this model would pass most defective parts whatever its AUROC. Train longer (the default "
            "--iterations 2700), check the foreground with synth-preview, or set the threshold yourself")
    return lines


def validate_on_synthetic(model: MemSeg, holdout: np.ndarray, good_scores: np.ndarray, synthesizer,
                          seed: int, device, top_k: int, threshold: float | None = None) -> dict[str, Any]:
    """Image and pixel AUROC of held-out good images against synthetic anomalies made from them: a
    check of training that never looks at test images. With ``threshold``: its false-reject rate on the
    held-out good images and its miss rate on the synthetic anomalies."""
    rng = np.random.default_rng([seed, 7919])
    pairs = [synthesizer(img, rng) for img in holdout]
    bad = np.stack([a for a, _ in pairs])
    bad_masks = np.stack([m for _, m in pairs]) > 0.5
    bad_maps, bad_probs = predict_components(model, bad, device)
    bad_scores = image_scores(bad_maps, top_k)
    good_maps = predict_maps(model, holdout, device)
    labels = np.r_[np.zeros(len(good_scores), bool), np.ones(len(bad_scores), bool)]
    inside = bad_probs[bad_masks]
    return {
        # the decoder alone (the fused map's other term is the memory distance): whether it calls anomalous
        # pixels anomalous at all (DECODER_COLLAPSE)
        "decoder_max_probability": float(inside.max()) if inside.size else None,
        "decoder_anomalous_share": float(np.mean(inside >= 0.5)) if inside.size else None,
        "image_auroc": metrics.image_auroc(np.r_[good_scores, bad_scores], labels),
        "pixel_auroc": metrics.pixel_auroc(np.concatenate([good_maps, bad_maps]),
                                           np.concatenate([np.zeros_like(bad_masks), bad_masks])),
        "n_images": int(len(labels)),
        "what": "held-out good images vs synthetic anomalies made from them",
        **({"false_reject_rate": float(np.mean(good_scores >= threshold)),
            "miss_rate": float(np.mean(bad_scores < threshold))} if threshold is not None else {}),
    }
