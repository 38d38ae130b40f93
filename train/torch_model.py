"""The MemSeg network (paper section 3, Fig. 2 and 4) as a pure ``nn.Module``: no training logic.

Input: RGB ``[N, 3, H, W]`` float in [0, 1] (normalisation happens here, so exported graphs and the
checkpoint cannot disagree about it). Output in training mode: logits ``[N, 2, H, W]``; in eval mode:
the anomaly map ``[N, 1, H, W]`` in [0, 1]: the probability of the anomaly class (softmax channel 1) or,
with ``model.distance_fusion``, that probability fused with the memory step's distance map.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memseg_edge.preprocess import IMAGENET_MEAN, IMAGENET_STD

from .config import ModelConfig
from .encoders import Encoder
from .memory import MemoryBank


# Decoder widths at strides 16, 8, 4, 2, 1, in proportion to each encoder's skip widths. The full-resolution
# stages dominate the cost on a CPU, so they stay narrow. MobileNetV2's two finest stages went from 32 and 16
# to 24 and 8 channels (BENCHMARKS.md, "Recipe choice: a narrower decoder head": a step 0.74-0.86x, non-inferior
# on the probe of both products; the test sets, read once after, lost more: bottle's default pixel AUROC 0.988 ->
# 0.983). A checkpoint records the widths it was built with.
DECODER_WIDTHS = {"resnet18": (256, 128, 64, 48, 32), "mobilenet_v2": (128, 64, 48, 24, 8)}
UNRECORDED_DECODER_WIDTHS = {"resnet18": (256, 128, 64, 48, 32), "mobilenet_v2": (128, 64, 48, 32, 16)}
"""The widths of checkpoints saved before checkpoints recorded them (``model.decoder_channels: []`` then
meant these): what ``checkpoint.read_checkpoint`` reads an empty list as."""


def decoder_widths(cfg: ModelConfig) -> list[int]:
    """``model.decoder_channels`` resolved: the configured widths, or the backbone's default."""
    return list(cfg.decoder_channels) or list(DECODER_WIDTHS[cfg.backbone])


LEAKY_SLOPE = 0.1
"""``model.decoder_activation: leaky_relu``: LeakyReLU's negative slope, fixed before any run with it (not
tuned): an off channel still passes a tenth of its gradient, enough to move within one training run."""

DECODER_ACTIVATIONS = ("relu", "leaky_relu")


def conv_block(cin: int, cout: int, k: int = 3, negative_slope: float = 0.0) -> nn.Sequential:
    """The paper's basic convolution block: convolution, batch normalisation, ReLU (with ``negative_slope``
    above 0: LeakyReLU, ``model.decoder_activation``)."""
    act = nn.LeakyReLU(negative_slope, inplace=True) if negative_slope > 0 else nn.ReLU(inplace=True)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), act)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou et al., 2021): channel weights factorised along height and width."""

    def __init__(self, channels: int, reduction: int = 32):
        super().__init__()
        mid = max(8, channels // reduction)
        self.squeeze = nn.Sequential(nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.Hardswish())
        self.along_h = nn.Conv2d(mid, channels, 1)
        self.along_w = nn.Conv2d(mid, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        pooled_h = x.mean(dim=3, keepdim=True)                   # [N, C, H, 1]
        pooled_w = x.mean(dim=2, keepdim=True).transpose(2, 3)   # [N, C, W, 1]
        y = self.squeeze(torch.cat([pooled_h, pooled_w], dim=2))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        return x * torch.sigmoid(self.along_h(y_h)) * torch.sigmoid(self.along_w(y_w.transpose(2, 3)))


class MultiScaleFusion(nn.Module):
    """MSFF (Fig. 4): per level a 3x3 convolution keeping the channels and coordinate attention; then
    coarse-to-fine fusion (upsample, 1x1 convolution to the finer level's channels, add); then a 3x3
    convolution down to the decoder's skip width, weighted by the spatial attention map."""

    def __init__(self, in_channels: list[int], out_channels: list[int], coordinate_attention: bool, multiscale: bool):
        super().__init__()
        self.multiscale = multiscale
        self.local = nn.ModuleList(
            nn.Sequential(conv_block(c, c), CoordinateAttention(c) if coordinate_attention else nn.Identity())
            for c in in_channels)
        self.lateral = nn.ModuleList(conv_block(in_channels[i + 1], in_channels[i], 1)
                                     for i in range(len(in_channels) - 1)) if multiscale else None
        self.out = nn.ModuleList(conv_block(ci, co) for ci, co in zip(in_channels, out_channels))

    def forward(self, feats: list[torch.Tensor], attention: list[torch.Tensor] | None) -> list[torch.Tensor]:
        x = [blk(f) for blk, f in zip(self.local, feats)]
        if self.multiscale:
            for i in range(len(x) - 2, -1, -1):
                x[i] = x[i] + self.lateral[i](upsample2(x[i + 1]))
        out = [o(f) for o, f in zip(self.out, x)]
        if attention is not None:
            out = [o * a for o, a in zip(out, attention)]
        return out


def spatial_attention(diffs: list[torch.Tensor], bounded: bool = True) -> list[torch.Tensor]:
    """Eq. 5-7: channel means of the difference maps, each multiplied by the upsampled coarser map.
    ``diffs`` fine to coarse ``[N, C_l, H_l, W_l]`` -> maps ``[N, 1, H_l, W_l]``, fine to coarse.

    ``bounded``: each map ``M`` becomes ``M / (1 + M)`` (in [0, 1)). With the differences in units of a
    typical good-to-good difference, the raw product of three levels spans about 0.01 (good regions) to
    1e4 (a defect), which would scale features by six orders of magnitude; bounded, the maps weight
    features like a soft mask. ``False`` is the paper's raw product."""
    means = [d.mean(dim=1, keepdim=True) for d in diffs]
    maps = [means[-1]]
    for m in reversed(means[:-1]):
        maps.insert(0, m * upsample2(maps[0]))
    if bounded:
        maps = [m / (1.0 + m) for m in maps]
    return maps


class Decoder(nn.Module):
    """U-Net decoder (section 4.2): upsampling = bilinear x2 + conv block; Conv Layer = two conv blocks;
    the last Conv Layer = one conv block + a 2-channel convolution. Skips at strides 16, 8, 4 (the fused
    features) and, with ``stem`` channels, at stride 2 (the encoder's frozen stem, as the authors' code)."""

    def __init__(self, bottleneck: int, skips: list[int], widths: list[int], stem: int = 0,
                 negative_slope: float = 0.0):
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"decoder_channels needs 5 widths (strides 16, 8, 4, 2, 1), found {widths}")
        self.ups = nn.ModuleList()
        self.convs = nn.ModuleList()
        cin = bottleneck
        skip_widths = [skips[2], skips[1], skips[0], stem]  # strides 16, 8, 4, 2
        a = negative_slope
        for w, s in zip(widths[:4], skip_widths):
            self.ups.append(conv_block(cin, w, negative_slope=a))
            self.convs.append(nn.Sequential(conv_block(w + s, w, negative_slope=a), conv_block(w, w, negative_slope=a)))
            cin = w
        self.final_up = conv_block(cin, widths[4], negative_slope=a)
        self.head = nn.Sequential(conv_block(widths[4], widths[4], negative_slope=a),
                                  nn.Conv2d(widths[4], 2, 3, padding=1))

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor], stem: torch.Tensor | None = None) -> torch.Tensor:
        x = bottleneck
        for up, conv, skip in zip(self.ups, self.convs, [skips[2], skips[1], skips[0], stem]):
            x = up(upsample2(x))
            if skip is not None:
                x = torch.cat([x, skip], dim=1)
            x = conv(x)
        return self.head(self.final_up(upsample2(x)))


STANDARD_MEAN = 0.449
STANDARD_STD = 0.226
STANDARD_EPS = 1e-3
"""Floor of a standardised image's standard deviation: a flat image (a blank frame) stays finite."""


def standardise(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` -> each image shifted and scaled (one mean and one standard deviation over its
    three channels) to mean ``STANDARD_MEAN`` and standard deviation ``STANDARD_STD``. Written with plain
    reductions so that it exports to ONNX as ReduceMean, Sub, Mul, Sqrt."""
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    centred = images - mean
    std = (centred * centred).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return centred * (STANDARD_STD / (std + STANDARD_EPS)) + STANDARD_MEAN


class MemSeg(nn.Module):
    """MemSeg: frozen encoder levels -> memory module -> MSFF + spatial attention -> U-Net decoder (with
    the frozen stem as its stride-2 skip).

    ``forward(images [N, 3, H, W] in [0, 1])`` -> logits ``[N, 2, H, W]`` (training) or anomaly
    probability ``[N, 1, H, W]`` (eval). ``H`` and ``W`` must be multiples of 32.
    """

    def __init__(self, cfg: ModelConfig, image_size: int, weights: str | None = None):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image size must be a multiple of 32 (the encoder's stride), found {image_size}")
        if not isinstance(cfg.standardise_images, bool):
            # "auto" is the trainer's to decide from the training images (trainer.decide_standardise)
            raise ValueError(f"model.standardise_images must be true or false to build a model, found "
                             f"{cfg.standardise_images!r}")
        self.cfg = cfg
        self.image_size = image_size
        self.encoder = Encoder(cfg.backbone, weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        c = list(self.encoder.channels[:3])
        self.smooth = (nn.AvgPool2d(cfg.feature_smoothing, stride=1, padding=cfg.feature_smoothing // 2,
                                    count_include_pad=False) if cfg.feature_smoothing > 1 else nn.Identity())
        shapes = [(ci, image_size // s, image_size // s) for ci, s in zip(c, LEVEL_STRIDES)]
        self.memory = MemoryBank(shapes, cfg.memory_samples, cfg.memory_selection, cfg.memory_patches) if cfg.use_memory else None
        fused = [2 * ci for ci in c] if cfg.use_memory else c
        self.fusion = MultiScaleFusion(fused, c, cfg.use_coordinate_attention, cfg.use_multiscale)
        self.decoder_widths = widths = decoder_widths(cfg)
        if cfg.decoder_activation not in DECODER_ACTIVATIONS:
            raise ValueError(f"model.decoder_activation must be one of {', '.join(DECODER_ACTIVATIONS)}, found "
                             f"{cfg.decoder_activation!r}")
        self.decoder = Decoder(self.encoder.channels[3], c, widths,
                               self.encoder.stem_channels if cfg.stem_skip else 0,
                               LEAKY_SLOPE if cfg.decoder_activation == "leaky_relu" else 0.0)
        # ModelConfig.distance_fusion (without a memory step there is no distance to fuse)
        self.fuses = bool(cfg.distance_fusion and cfg.use_memory)
        if self.fuses:
            # q_p, q_D and c (fuse_maps); ones until calibrate_fusion sets them
            self.register_buffer("fusion_norm", torch.ones(3))
            if cfg.position_normalisers:
                # ModelConfig.position_normalisers: per-position factors (>= 1) on q_p and q_D; ones until
                # calibrate_fusion sets them
                self.register_buffer("fusion_position", torch.ones(2, 1, image_size, image_size))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the encoder's input: ``ModelConfig.standardise_images`` (when on), then
        ImageNet's per-channel normalisation."""
        if self.cfg.standardise_images:
            images = standardise(images)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def memory_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen, smoothed features ``[N, C_l, H_l, W_l]`` of images in [0, 1]: what the bank stores."""
        return [self.smooth(f) for f in self.encoder.frozen_features(self.normalise(images))[1]]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        prob, distance = self.component_maps(images)
        if distance is None:
            return prob
        return fuse_maps(prob, distance, self.fusion_norm, getattr(self, "fusion_position", None))

    @torch.no_grad()
    def calibrate_fusion(self, images: torch.Tensor, top_k: int, batch_size: int = 16,
                         quantile: float = 0.99) -> tuple[float, float, float]:
        """Set the fusion's constants (``fuse_maps``) from ``images``: good images in [0, 1] that are neither
        memory samples nor the held-out images that choose the threshold. ``q_p``, ``q_D``: the ``quantile``
        of the pixels of the decoder's map and of the distance map (divided by ``2 (1 - w)`` and ``2 w``,
        ``w`` = ``ModelConfig.distance_weight``: 1 at the default 0.5); ``c``: the highest image score (mean of
        the ``top_k`` highest pixels) of the unbounded fused map over the images, so the worst good part
        scores about 0.5 and the range where a threshold goes keeps its resolution (with a typical good
        part at 0.5 instead, the decoder's rare false positives on good parts land near 0.98 and the
        defects are squeezed between them and 1). With ``ModelConfig.position_normalisers`` also the
        per-position factors on ``q_p`` and ``q_D`` (``position_factors``), before ``c``. Returns (q_p, q_D, c)."""
        if not self.fuses:
            raise ValueError("calibrate_fusion: the model was built without model.distance_fusion (or without memory)")
        if not len(images):
            raise ValueError("calibrate_fusion needs at least one good image")
        was_training = self.training
        self.eval()
        ps, ds = [], []
        for i in range(0, len(images), batch_size):
            p, d = self.component_maps(images[i:i + batch_size])
            ps.append(p.float().cpu().numpy().reshape(len(p), -1))
            ds.append(d.float().cpu().numpy().reshape(len(d), -1))
        self.train(was_training)
        p, d = np.concatenate(ps), np.concatenate(ds)
        q_p, q_d = (max(float(np.percentile(v, 100 * quantile)), 1e-12) for v in (p, d))
        r_p = r_d = 1.0
        if hasattr(self, "fusion_position"):
            side = self.image_size
            r_p, r_d = (position_factors(v.reshape(len(v), side, side), q, quantile) for v, q in ((p, q_p), (d, q_d)))
            self.fusion_position.copy_(torch.from_numpy(np.stack([r_p, r_d])[:, None]).to(self.fusion_position))
            r_p, r_d = r_p.reshape(1, -1), r_d.reshape(1, -1)
        # ModelConfig.distance_weight w folds into the normalisers: 0.5 (p / q_p' + D / q_D') with
        # q_p' = q_p / (2 (1 - w)), q_D' = q_D / (2 w) is (1 - w) p / q_p + w D / q_D
        w = float(self.cfg.distance_weight)
        q_p, q_d = q_p / (2.0 * (1.0 - w)), q_d / (2.0 * w)
        f = 0.5 * (p / (q_p * r_p) + d / (q_d * r_d))
        k = min(top_k, f.shape[1])
        c = max(float(np.sort(f, axis=1)[:, -k:].mean(axis=1).max()), 1e-12)
        q = torch.tensor([q_p, q_d, c])
        if not torch.isfinite(q).all():
            raise FloatingPointError(f"calibrate_fusion: non-finite constants {q.tolist()}")
        self.fusion_norm.copy_(q.to(self.fusion_norm))
        return q_p, q_d, c

    def component_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training: (logits, None). Eval: (anomaly probability ``[N, 1, H, W]``, the memory distance map
        ``[N, 1, H, W]`` when the model fuses them, else None)."""
        x = self.normalise(images)
        stem, raw, bottleneck = self.encoder(x)
        smoothed = [self.smooth(f) for f in raw]
        # The smoothing makes the comparison with the bank robust to small misalignment; what the decoder
        # sees as skips is, by default, the sharp features (the authors' code).
        feats = smoothed if self.cfg.smooth_skip_features else raw
        attention = None
        if self.memory is not None:
            diffs, _ = self.memory(smoothed)
            # In units of a typical good-to-good difference, so their size does not depend on the encoder.
            diffs = [d / s for d, s in zip(diffs, self.memory.scales())]
            if self.cfg.use_spatial_attention:
                attention = spatial_attention(diffs, self.cfg.bounded_attention)
            feats = [torch.cat([f, d], dim=1) for f, d in zip(feats, diffs)]
        skips = self.fusion(feats, attention)
        logits = self.decoder(bottleneck, skips, stem if self.cfg.stem_skip else None)
        if self.training:
            return logits, None
        prob = torch.softmax(logits, dim=1)[:, 1:2]
        if not self.fuses:
            return prob, None
        return prob, distance_map(diffs)


LEVEL_STRIDES = (4, 8, 16)
"""Strides of the three encoder levels the memory compares (finest first)."""


def distance_map(diffs: list[torch.Tensor], strides=LEVEL_STRIDES) -> torch.Tensor:
    """Normalised differences ``[N, C_l, H_l, W_l]`` per level -> their channel means, upsampled
    (bilinear, by each level's stride, so an exported graph keeps static shapes) to the input's size and
    averaged over the levels: ``[N, 1, H, W]``."""
    levels = [F.interpolate(d.mean(dim=1, keepdim=True), scale_factor=float(s), mode="bilinear", align_corners=False)
              for d, s in zip(diffs, strides)]
    return sum(levels) / len(levels)


POSITION_BLUR = 1.0 / 32.0
"""ModelConfig.position_normalisers: the Gaussian's sigma that smooths the per-position percentiles, as a
share of the image's side (8 px at 256)."""


def position_factors(maps: np.ndarray, frame_quantile: float, quantile: float = 0.99) -> np.ndarray:
    """ModelConfig.position_normalisers: for good images' maps ``[N, H, W]`` and their frame-wide normaliser
    ``frame_quantile``, the factor ``max(1, G * P_q(i, j) / frame_quantile)`` ``[H, W]`` float32, ``P_q`` the
    ``quantile`` of the maps at each position and ``G`` a Gaussian blur (``POSITION_BLUR`` of the side,
    reflected border). Never below 1: a position can be damped, not amplified."""
    if maps.ndim != 3 or not len(maps):
        raise ValueError(f"position_factors needs maps [N, H, W] of at least one image, found shape {maps.shape}")
    per_position = np.percentile(maps, 100 * quantile, axis=0).astype(np.float32)
    sigma = POSITION_BLUR * maps.shape[1]
    blurred = cv2.GaussianBlur(per_position, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    factors = np.maximum(blurred / max(float(frame_quantile), 1e-12), 1.0).astype(np.float32)
    if not np.isfinite(factors).all():
        raise FloatingPointError("position_factors: non-finite factors")
    return factors


def fuse_maps(prob: torch.Tensor, distance: torch.Tensor, norm: torch.Tensor,
              position: torch.Tensor | None = None) -> torch.Tensor:
    """ModelConfig.distance_fusion: ``F = 0.5 * (p / q_p + D / q_D)`` returned as ``F / (F + c)``, with
    ``norm = (q_p, q_D, c)``: in [0, 1), monotone in F, the worst good calibration image's score 0.5. With
    ``position`` ``[2, 1, H, W]`` (ModelConfig.position_normalisers) ``q_p`` and ``q_D`` are multiplied by its
    per-position factors."""
    if position is None:
        f = 0.5 * (prob / norm[0] + distance / norm[1])
    else:
        f = 0.5 * (prob / (norm[0] * position[0]) + distance / (norm[1] * position[1]))
    return f / (f + norm[2])
