"""One factory for MemSeg encoders: a table of torchvision backbones cut into a frozen part (the stem at
stride 2, a skip for the decoder; the three feature levels at strides 4, 8, 16, whose features feed the
memory bank) and a trainable stage at stride 32 (the U-Net bottleneck). ``resnet18`` and ``mobilenet_v2``
differ only in their table row.

The frozen part can never leave inference mode: its BatchNorm layers are replaced by fixed affine layers
(``FrozenBatchNorm``) when the encoder is built, so no ``train()`` call, no forward pass and no caller can
make it normalise with batch statistics or move the ImageNet running statistics. (The memory bank was
once filled through a frozen encoder that was still in training mode; this makes that impossible.)"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
import torchvision


@dataclass(frozen=True)
class EncoderSpec:
    build: Callable[[], nn.Module]
    weights: Callable[[], object]
    """torchvision's ImageNet weights enum member."""
    stages: Callable[[nn.Module], list[nn.Module]]
    """stride-2 (the stem), stride-4, stride-8, stride-16 (all frozen) and stride-32 (trainable)."""
    channels: tuple[int, int, int, int, int]
    """Output channels of the five stages."""


def _resnet18_stages(m: nn.Module) -> list[nn.Module]:
    return [nn.Sequential(m.conv1, m.bn1, m.relu), nn.Sequential(m.maxpool, m.layer1), m.layer2, m.layer3, m.layer4]


def _mobilenet_v2_stages(m: nn.Module) -> list[nn.Module]:
    f = m.features
    # Block boundaries where the resolution halves: 0-1 end at stride 2, 2-3 at 4, 4-6 at 8, 7-13 at 16,
    # 14-17 at 32.
    return [f[:2], f[2:4], f[4:7], f[7:14], f[14:18]]


ENCODERS: dict[str, EncoderSpec] = {
    "resnet18": EncoderSpec(
        build=lambda: torchvision.models.resnet18(weights=None),
        weights=lambda: torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
        stages=_resnet18_stages,
        channels=(64, 64, 128, 256, 512),
    ),
    "mobilenet_v2": EncoderSpec(
        build=lambda: torchvision.models.mobilenet_v2(weights=None),
        weights=lambda: torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
        stages=_mobilenet_v2_stages,
        channels=(16, 24, 32, 96, 320),
    ),
}


class FrozenBatchNorm(nn.Module):
    """A BatchNorm2d fixed in inference mode: ``(x - mean) / sqrt(var + eps) * weight + bias`` with the
    stored statistics, whatever mode the module is in. Same buffers as BatchNorm2d (``weight``, ``bias``,
    ``running_mean``, ``running_var``), all buffers: nothing here can be trained or updated."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.eps = float(bn.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, getattr(bn, name).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inference-mode batch norm, always: never batch statistics, never an update of the stored ones. The
        # same op as an eval-mode BatchNorm2d, so the exporter folds it into the convolution before it (a
        # hand-written multiply-add would stay two unfused layers and cost INT8/FP16 accuracy).
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            momentum=0.0, eps=self.eps)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d inside ``module`` by a :class:`FrozenBatchNorm` with its statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm(child))
        else:
            freeze_batchnorm(child)
    return module


class Encoder(nn.Module):
    """Image ``[N, 3, H, W]`` (normalised) -> the stem at stride 2 and features at strides 4, 8, 16 (all
    frozen), and the bottleneck at stride 32 (trainable).

    The frozen part cannot move: its BatchNorm layers are :class:`FrozenBatchNorm` (ImageNet statistics,
    whatever mode anyone sets), it is kept in eval mode, and its parameters need no gradient, so its
    features always match the memory bank built at the start.
    ``weights``: see :func:`load_backbone_weights`; ``None`` when a checkpoint will supply them.
    """

    def __init__(self, name: str, weights: str | None = None):
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(ENCODERS)}")
        self.name = name
        spec = ENCODERS[name]
        net = spec.build()
        self.weights_origin = "from checkpoint" if weights is None else load_backbone_weights(net, name, weights)
        s2, s4, s8, s16, s32 = spec.stages(net)
        # Only the stages are registered: classifier heads never run and never land in a checkpoint.
        self.stem = freeze_batchnorm(s2)
        self.frozen = freeze_batchnorm(nn.ModuleList([s4, s8, s16]))
        self.bottleneck = s32
        self.stem_channels = spec.channels[0]
        self.channels = spec.channels[1:]
        """Channels at strides 4, 8, 16 (the memory levels) and 32 (the bottleneck)."""
        for p in list(self.stem.parameters()) + list(self.frozen.parameters()):
            p.requires_grad_(False)
        self.stem.eval()
        self.frozen.eval()

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        self.stem.eval()
        self.frozen.eval()
        return self

    def frozen_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> the stem ``[N, C_2, H/2, W/2]`` and the levels ``[N, C_l, H_l, W_l]`` at strides 4, 8, 16."""
        with torch.no_grad():
            stem = self.stem(x)
            feats = []
            x = stem
            for stage in self.frozen:
                x = stage(x)
                feats.append(x)
        return stem, feats

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """-> (stem, frozen levels fine to coarse, bottleneck ``[N, C_32, H/32, W/32]``)."""
        stem, feats = self.frozen_features(x)
        return stem, feats, self.bottleneck(feats[-1])


def load_backbone_weights(net: nn.Module, name: str, source: str) -> str:
    """Load ImageNet weights into torchvision model ``net``; returns a description for the checkpoint.

    ``source``: ``imagenet`` (torchvision's weights: its cache, else a download), a path to a
    ``state_dict`` file (keys as in torchvision's model, classifier keys optional), or ``none``.
    """
    if source == "none":
        warnings.warn(
            "backbone weights: none: the encoder is randomly initialised; accuracy from such a model is "
            "meaningless (use it for tests only)", stacklevel=2)
        return "none (random initialisation)"
    if source == "imagenet":
        weights = ENCODERS[name].weights()
        try:
            state = weights.get_state_dict(progress=True, check_hash=True)
        except Exception as exc:  # no network, no cache
            raise RuntimeError(
                f"could not get torchvision's ImageNet weights for {name} ({exc.__class__.__name__}: "
                f"{exc}). On a machine without internet, pass a local file with --backbone-weights FILE "
                f"(a state_dict for torchvision.models.{name}()), or put the file in torchvision's "
                f"cache ({torch.hub.get_dir()}/checkpoints)") from exc
        _load_state(net, name, state, f"torchvision {weights}")
        return f"imagenet: torchvision {weights}"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights file {path} not found; pass a state_dict file, 'imagenet' or 'none'")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    _load_state(net, name, state, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"file: {path.name} sha256:{digest[:16]}"


def _load_state(net: nn.Module, name: str, state: dict, origin: str) -> None:
    """Load into the backbone; every key the used stages need must be present (a partial file is an error)."""
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(("fc.", "classifier."))}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    needed = set(own)
    missing = sorted(needed - set(state))
    if missing:
        raise ValueError(
            f"{origin} lacks {len(missing)} weight(s) that {name} needs, e.g. {missing[:3]}: "
            f"is it a state_dict for torchvision.models.{name}()?")
    bad = [k for k in needed if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{origin}: shape mismatch for {bad[:3]}: not weights for {name}")
    net.load_state_dict({k: state[k] for k in needed}, strict=False)


DOWNLOAD_TIMEOUT_S = 20.0
"""How long the demo waits for torchvision's download before it goes on with a random encoder."""


def imagenet_weights(log: Callable[[str], None] = print) -> str:
    """``"imagenet"`` when torchvision's MobileNetV2 ImageNet weights are in its cache or download now (the
    normal torchvision way), else ``"none"`` after saying why."""
    import socket

    weights = ENCODERS["mobilenet_v2"].weights()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)   # an offline machine must not hang on the download
    try:
        weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # no network, a proxy, a full disk: all mean "no weights"
        log(f"NOTE: no ImageNet weights: torchvision's cache has none and the download failed "
            f"({type(exc).__name__}: {exc}).")
        return "none"
    finally:
        socket.setdefaulttimeout(previous)
    return "imagenet"
