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
from .torch_model import STANDARD_MEAN, STANDARD_STD, UNRECORDED_DECODER_WIDTHS, MemSeg

FORMAT_VERSION = 2
"""2: the frozen encoder is fixed in inference mode (FrozenBatchNorm) and the decoder has a stride-2 skip.
Format 1 checkpoints filled their memory bank through an encoder still in training mode (batch statistics),
so their bank does not match what the encoder computes at inference: they are refused, never reinterpreted."""


def save_checkpoint(path: str | Path, model: MemSeg, cfg: MemSegConfig, *, iteration: int, threshold: dict | None,
                    data: dict[str, Any], backbone_weights: str, validation: dict | None = None,
                    optimizer: dict | None = None, scheduler: dict | None = None,
                    train_seconds: float | None = None) -> Path:
    """Write atomically (temporary file, then rename): an interrupted save never leaves a broken file.
    ``train_seconds``: training time up to ``iteration``, summed over the sessions of a resumed run."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = cfg.to_dict()
    # the widths the model was built with, never "the default" (defaults change between releases)
    config["model"]["decoder_channels"] = list(model.decoder_widths)
    ckpt = {
        "format": "memseg-edge-checkpoint",
        "format_version": FORMAT_VERSION,
        "model_state": state,
        "config": config,
        "image_size": cfg.data.image_size,
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input": "RGB in [0, 1]",
                          **({"per_image": f"each image first shifted and scaled to mean {STANDARD_MEAN} and "
                                           f"standard deviation {STANDARD_STD} (model.standardise_images)"}
                             if cfg.model.standardise_images else {})},
        "top_k": cfg.eval.top_k,
        "threshold": threshold,
        "data": data,
        "backbone_weights": backbone_weights,
        "iteration": iteration,
        "validation": validation,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "train_seconds": train_seconds,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint; every way it can be unusable is a ``ValueError`` that says what to do."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: pass the checkpoint.pt inside it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): the training that wrote it was interrupted or the copy "
                         "failed; train again or copy the file again")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x08") or path.suffix in (".onnx", ".engine"):
        raise ValueError(f"{path} is not a checkpoint (it looks like an ONNX model or an engine): export takes the "
                         "checkpoint.pt of a training run; a bundle is already exported")
    if not head.startswith(b"PK"):
        raise ValueError(f"{path} is not a memseg-edge checkpoint (not a PyTorch file): pass the checkpoint.pt "
                         "that `memseg-edge train` wrote")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, a pickle with foreign objects, ...
        raise ValueError(f"{path} cannot be read as a checkpoint ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}); it is probably truncated "
                         "or corrupt: train again or copy the file again") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "memseg-edge-checkpoint":
        raise ValueError(f"{path} is not a memseg-edge checkpoint")
    version = ckpt.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"{path} has no valid format version: it is not a memseg-edge checkpoint")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {version}; this memseg-edge reads up to "
                         f"{FORMAT_VERSION}: upgrade memseg-edge")
    if version < FORMAT_VERSION:
        raise ValueError(
            f"{path} was made by an older memseg-edge (checkpoint format {version}) whose memory bank was filled "
            f"with the frozen encoder in training mode, so its maps are not what this version computes. It cannot "
            f"be converted: train it again (same command; the data and config are in the run folder)")
    model_cfg = ckpt.get("config", {}).get("model") if isinstance(ckpt.get("config"), dict) else None
    if isinstance(model_cfg, dict) and "distance_fusion" not in model_cfg:
        # saved before model.distance_fusion existed: its maps and its threshold are the decoder's alone
        model_cfg["distance_fusion"] = False
    if isinstance(model_cfg, dict) and "standardise_images" not in model_cfg:
        # saved before model.standardise_images existed: its encoder saw the images as captured
        model_cfg["standardise_images"] = False
    if isinstance(model_cfg, dict) and "distance_weight" not in model_cfg:
        # saved before model.distance_weight existed: its normalisers were set for equal weights
        model_cfg["distance_weight"] = 0.5
    if isinstance(model_cfg, dict) and "position_normalisers" not in model_cfg:
        # saved before model.position_normalisers existed: one frame-wide normaliser per term
        model_cfg["position_normalisers"] = False
    if isinstance(model_cfg, dict) and "decoder_activation" not in model_cfg:
        # saved before model.decoder_activation existed: its decoder's blocks end in ReLU
        model_cfg["decoder_activation"] = "relu"
    if isinstance(model_cfg, dict) and not model_cfg.get("decoder_channels"):
        # saved before checkpoints recorded the decoder's widths: it was built with that release's default
        backbone = model_cfg.get("backbone", "mobilenet_v2")
        if backbone in UNRECORDED_DECODER_WIDTHS:
            model_cfg["decoder_channels"] = list(UNRECORDED_DECODER_WIDTHS[backbone])
    return ckpt


def load_model(path_or_ckpt: str | Path | dict, device: str = "cpu") -> tuple[MemSeg, dict[str, Any]]:
    """Checkpoint -> (model in eval mode on ``device``, checkpoint dict)."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else read_checkpoint(path_or_ckpt)
    cfg = MemSegConfig.from_dict(ckpt["config"])
    model = MemSeg(cfg.model, ckpt["image_size"], weights=None)
    model.load_state_dict(ckpt["model_state"], strict=True)
    return model.to(device).eval(), ckpt
