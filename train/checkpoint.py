"""The checkpoint boundary (docs/architecture.md): one ``.pt`` file that ``torch.load(weights_only=True)`` reads,
with the weights (memory bank included, as buffers), the resolved config, image size and normalisation,
the decision threshold and its rule, and the hash of the training image list."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from memseg_edge.preprocess import IMAGENET_MEAN, IMAGENET_STD

from .config import MemSegConfig
from .torch_model import MemSeg

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, model: MemSeg, cfg: MemSegConfig, *, iteration: int, threshold: dict | None,
                    data: dict[str, Any], backbone_weights: str, validation: dict | None = None,
                    optimizer: dict | None = None, scheduler: dict | None = None) -> Path:
    """Write atomically (temporary file, then rename): an interrupted save never leaves a broken file."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {
        "format": "memseg-edge-checkpoint",
        "format_version": FORMAT_VERSION,
        "model_state": state,
        "config": cfg.to_dict(),
        "image_size": cfg.data.image_size,
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input": "RGB in [0, 1]"},
        "top_k": cfg.eval.top_k,
        "threshold": threshold,
        "data": data,
        "backbone_weights": backbone_weights,
        "iteration": iteration,
        "validation": validation,
        "optimizer": optimizer,
        "scheduler": scheduler,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "memseg-edge-checkpoint":
        raise ValueError(f"{path} is not a memseg-edge checkpoint")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {ckpt['format_version']}; this memseg-edge reads up to "
                         f"{FORMAT_VERSION}: upgrade memseg-edge")
    return ckpt


def load_model(path_or_ckpt: str | Path | dict, device: str = "cpu") -> tuple[MemSeg, dict[str, Any]]:
    """Checkpoint -> (model in eval mode on ``device``, checkpoint dict)."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else read_checkpoint(path_or_ckpt)
    cfg = MemSegConfig.from_dict(ckpt["config"])
    model = MemSeg(cfg.model, ckpt["image_size"], weights=None)
    model.load_state_dict(ckpt["model_state"], strict=True)
    return model.to(device).eval(), ckpt
