"""One typed configuration for a MemSeg run: data, model, anomaly synthesis, training, evaluation.

Loaded from YAML, overridden from the command line, printed in full at the start of a run and saved
beside every artefact (``RUN_DIR/config.yaml`` and inside ``checkpoint.pt``). Where the paper is silent
the field's comment says what was chosen and why. Numpy/yaml only: no torch here.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    root: str = ""
    """MVTec AD root (holding ``<category>/train/good``) or, with ``layout: folder``, a folder of good images."""
    category: str = ""
    layout: str = "mvtec"
    """``mvtec``: ``ROOT/CATEGORY/{train/good,test/<defect>,ground_truth/<defect>}``.
    ``folder``: ``root`` holds good training images; optional ``test_dir`` with one sub-folder per
    defect type (``good`` for defect-free) and ``mask_dir`` with ``<defect>/<stem>_mask.png``."""
    test_dir: str = ""
    mask_dir: str = ""
    image_size: int = 256
    """Square side the model works at (the paper: 256). Images are resized, not cropped, so a defect
    at the border is never cut away."""
    resize: str = "stretch"
    """How an image becomes that square (``memseg_edge.preprocess.FITS``): ``stretch`` (each side to the
    square's) or ``pad`` (aspect ratio kept, the longer side fitted, mirrored outwards to a square).
    Recorded in the checkpoint and the bundle, and every runtime prepares images the same way."""
    holdout_fraction: float = 0.1
    """Share of the good training images held out (never trained on, never in the memory bank) to
    choose the decision threshold and to validate on synthetic anomalies."""
    split_seed: int = -1
    """Seed of the split of the good training images into memory samples, held-out images and the training
    pool; -1: ``train.seed``. Set it to train again with another ``train.seed`` (initialisation, synthetic
    anomalies) on the same split, e.g. to see how much a probe figure moves with the seed alone."""


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    """``resnet18`` (the paper's) or ``mobilenet_v2``."""
    backbone_weights: str = "imagenet"
    """``imagenet``: torchvision's ImageNet weights, loaded the normal torchvision way (its cache or a
    download); a path: a local ``state_dict`` file; ``none``: random (for tests only: accuracy from a
    random encoder is meaningless, and the checkpoint records it)."""
    memory_samples: int = 30
    """N good training images whose features form the memory bank (the paper: 30)."""
    memory_selection: str = "patch"
    """``patch`` (the default): every position of the input compared with its nearest feature vector from
    any position of the memory images (a k-centre coreset of ``memory_patches`` per level), so the
    difference means something when parts are not aligned in the frame (textures, loose parts). Chosen on
    the defect probe of bottle and magnetic_tile by a rule written before the numbers (BENCHMARKS.md,
    "Recipe choice: the memory selection"): 0.019 higher on average than ``sum``, better on both products
    and every measure. ``sum``: one memory sample per image, the smallest squared-difference total over all
    three levels, compared position by position (paper Eq. 4). ``per_level``: the closest sample chosen per
    level (the authors' released code). The fused TensorRT plugin serves ``sum`` and ``per_level`` only;
    ``patch`` runs as standard ops in every runtime."""
    memory_patches: int = 4096
    """With ``memory_selection: patch``: at most this many feature vectors per level in the bank."""
    memory_rebuild_samples: int = 0
    """With ``memory_selection: patch``, above ``memory_samples``: once training has ended, the bank is
    filled again from this many good training images (the memory samples, then a seeded pick of the
    training images; never a held-out image nor one that sets the fusion normalisers), at the same size
    (``memory_patches`` per level, so inference costs the same), before the normalisers and the threshold
    are set. During training an image whose own patches were in the bank would compare with itself; after
    it, more images show the memory more of a product's normal variation. ``0`` (the default): the bank
    stays as trained. Acts after the last iteration only: ``tools/refinish_run.py`` gives a finished run
    one without training again."""
    memory_rebuild_choice: str = "always"
    """With ``memory_rebuild_samples``: ``always`` keeps the refilled bank; ``validation`` finishes the run with
    both banks and keeps the refilled one only if the trainer's synthetic validation (the mean of its image and
    pixel AUROC on the held-out good images and synthetic anomalies made from them) is at least
    ``trainer.REBUILD_MARGIN`` higher than with the trained bank; otherwise the trained bank, its fusion
    normalisers and its threshold stay. A product with many rare good patches (a texture under varied light)
    gains from the larger bank, an aligned object can lose; its own good images tell which."""
    feature_smoothing: int = 1
    """Kernel of a stride-1 average pool over the frozen features before the memory step (1 = off, the
    default). The paper is silent; the authors' released code smooths with 3x3, which makes the difference
    maps robust to one-pixel misalignment, but it also dilutes a thin defect's difference (a 3x3 window is
    12 image pixels wide at stride 4), and the patch memory is robust to misalignment by itself. 1 was
    chosen on the defect probe of bottle and magnetic_tile, two seeds each, by a rule written before the
    numbers (BENCHMARKS.md, "Recipe choice: the memory comparison without feature smoothing"): +0.0040 over
    the two products, magnetic_tile's probe AUPRO +0.026 (its thin scratches +0.043)."""
    smooth_skip_features: bool = False
    """Whether the decoder's skip features are the smoothed ones too. ``False`` (the authors' code, the
    default): smooth only for the comparison with the memory bank; the fused skips keep the sharp features.
    ``True``: this project's first design. Decided together with ``stem_skip`` on the defect probe of bottle
    and magnetic_tile, by a rule written before any number (BENCHMARKS.md, "Recipe choices"): the authors'
    design scored 0.0060 higher on average and lost at most 0.0038 on any product and metric."""
    stem_skip: bool = True
    """The frozen stem's stride-2 output as the decoder's skip at stride 2 (the authors' code concatenates
    it; ``False``: the stride-2 stage has no skip, this project's first design). Decided with
    ``smooth_skip_features`` (see there)."""
    distance_fusion: bool = True
    """Whether the output map also carries the memory step's own distance: ``F = 0.5 * (p / q_p + D / q_D)``
    returned as ``F / (F + c)`` (in [0, 1), monotone in F), where ``p`` is the decoder's anomaly probability,
    ``D`` the channel mean of the normalised difference to the memory, upsampled and averaged over the
    three levels, ``q_p``, ``q_D`` the 99th percentile of each and ``c`` the highest image score of F over
    good images of the training pool (set after training; see ``MemSeg.calibrate_fusion``). Ignored without ``use_memory``. The default since
    2026-12-06, chosen on the defect probe of bottle and magnetic_tile by a rule written before the numbers
    (BENCHMARKS.md, "Recipe choice: the memory distance fused into the output map"): 0.0105 higher on
    average, most on faint and thin defects; ``False``: the decoder's probability alone (the paper's map).
    Training never sees it, so ``tools/add_distance_fusion.py`` adds it to a run trained without it."""
    distance_weight: float = 0.5
    """With ``distance_fusion``: the memory distance's weight ``w`` in the fused map,
    ``F = (1 - w) p / q_p + w D / q_D``, in (0, 1); 0.5, the default, weighs both alike. It folds into the
    normalisers (the bundle's ``q_p``, ``q_D`` are the 99th percentiles divided by ``2 (1 - w)`` and ``2 w``),
    so the graph and every runtime are the same. Acts after training only (``tools/refinish_run.py``)."""
    position_normalisers: bool = False
    """With ``distance_fusion``: the fused map's normalisers ``q_p``, ``q_D`` become maps,
    ``q_x(i, j) = max(q_x, G * P99_x(i, j))``: the 99th percentile of the decoder's probability (and of the
    distance) at each position over the fusion's calibration images, blurred by a Gaussian of 1/32 of the side,
    never below the frame-wide 99th percentile. A good part's recurring response at a fixed place in the frame
    (a tile's chamfered corner, a fixture's edge) is damped there; no position is amplified. Acts after
    training only (``tools/refinish_run.py --position-normalisers``); in the graph, two constant maps.
    Candidate Q (BENCHMARKS.md, "per-position normalisers in the fused map")."""
    standardise_images: bool | str = "auto"
    """Per-image photometric standardisation in front of the encoder: each image's pixels (all three
    channels together, so colour is kept) shifted and scaled to mean ``STANDARD_MEAN`` and standard deviation
    ``STANDARD_STD`` (ImageNet's averages), so that a part photographed brighter or darker, or with more or
    less contrast, reaches the encoder and the memory bank alike. Part of the model's graph: exported with
    it, every runtime does it. ``False``: the image as captured (the paper). ``"auto"`` (the default): the
    trainer decides from the run's own good training images: on when their exposure varies (the 95th
    percentile of the images' mean grey level over the 5th above ``EXPOSURE_SPREAD_LIMIT``), off for a product
    under one light; the run's config and checkpoint record the true / false it chose. Chosen on the defect
    probe of both products (BENCHMARKS.md, "exposure standardised where the good images' exposure varies"):
    standardisation raised magnetic_tile's probe (spread 2.66) with both seeds and lowered bottle's (spread
    1.03), so neither always-on nor always-off holds for both. magnetic_tile's test set, evaluated once after
    the choice, bore the probe out less: image AUROC +0.005 and AUPRO -0.025 at the default recipe, lower on all
    three at the short one."""
    use_memory: bool = True
    use_multiscale: bool = True
    use_spatial_attention: bool = True
    use_coordinate_attention: bool = True
    bounded_attention: bool = True
    """Spatial attention maps as ``M / (1 + M)`` over differences in units of the memory bank's typical
    good-to-good difference (see ``torch_model.spatial_attention``); ``False``: the paper's raw product."""
    decoder_channels: list[int] = field(default_factory=list)
    """Decoder widths at strides 16, 8, 4, 2, 1; empty: the backbone's default
    (``torch_model.DECODER_WIDTHS``; MobileNetV2: 128, 64, 48, 24, 8 since 2026-12-07, 128, 64, 48, 32, 16
    before). A run's config and checkpoint record the widths it was built with; a checkpoint from before
    they were recorded loads with the widths of its time (``torch_model.UNRECORDED_DECODER_WIDTHS``)."""
    decoder_activation: str = "leaky_relu"
    """The decoder's basic blocks' activation: ``leaky_relu`` (the default since 2026-12-08: convolution, batch
    normalisation, LeakyReLU with negative slope ``torch_model.LEAKY_SLOPE``) or ``relu`` (the paper's block,
    the default before). With ReLU a run can settle where every channel of the last block is off on the
    anomalies: the decoder then never gives an anomaly probability above its logits' bias
    (``trainer.DECODER_COLLAPSE``), and anomalous pixels stop teaching it, since no gradient passes an off
    ReLU; all four short runs with ReLU and today's widths did, on both products, and none of the four with
    LeakyReLU. Chosen by a rule written before the numbers (BENCHMARKS.md, "Recipe choice: the decoder's
    activation"): non-inferior on the probe of both products (+0.0021). The encoder and the feature fusion
    keep their activations. A checkpoint saved before the option existed reads as ``relu``."""


@dataclass
class ForegroundConfig:
    method: str = "none"
    """``none`` (textures, or a product filling the frame), ``threshold`` (grey > ``threshold``) or
    ``otsu``; ``invert`` flips the mask (a dark product on a bright background)."""
    threshold: int = 128
    invert: bool = False
    open_kernel: int = 0
    """Side of the square structuring element for a morphological opening (0 = off)."""
    close_kernel: int = 0


@dataclass
class SynthesisConfig:
    textures: str = ""
    """Folder of texture images (DTD layout: one sub-folder per class, or flat). Training needs it (the
    paper's Table 3: without textures image AUROC drops 0.8 and pixel AUROC 1.5 points); ``none``
    (``--no-textures``) trains with the structure source only, on purpose. Empty is refused by ``train``."""
    texture_probability: float = 0.5
    """Odds of the texture source against the structure source (the paper: equal)."""
    perlin_min_scale: int = 0
    perlin_max_scale: int = 4
    """Perlin scales 2**k per axis with k drawn from [min, max). The paper gives no scales; public code
    used [0, 6) (up to 32 noise cells per side: thin slivers). [0, 4) gives compact blobs, and was chosen
    on the defect probe (held-out good images, never test images): bottle, MobileNetV2, default recipe,
    probe pixel AUROC 0.9814 -> 0.9926, AUPRO 0.9329 -> 0.9597 (BENCHMARKS.md, tools/probe_validation.py).
    Confirmed on both products (bottle and magnetic_tile, patch memory, short recipe): [0, 6) lowers the
    probe mean 0.9431 -> 0.9294 (configs/perlin-0-6.yaml, BENCHMARKS.md "Perlin scales on both products")."""
    perlin_threshold: float = 0.5
    line_probability: float = 0.0
    """Odds that a synthetic anomaly is thin (a few curved segments 1-4 px wide: the zero set of a Perlin
    field inside a Perlin blob) instead of a blob. Real thin defects (cracks, scratches) are unlike any
    blob; 0 makes blobs only, as the paper."""
    transparency_min: float = 0.15
    transparency_max: float = 1.0
    """delta ~ U[min, max] in Eq. 1 (the paper: [0.15, 1])."""
    structure_grid: list[int] = field(default_factory=lambda: [4, 8])
    """Rows x columns of the shuffled grid for the structure source (the paper: 4x8)."""
    foreground: ForegroundConfig = field(default_factory=ForegroundConfig)


@dataclass
class TrainConfig:
    iterations: int = 2700
    """The paper: 2700 iterations."""
    batch_size: int = 8
    """Half normal images, half synthetic anomalies (the paper: 4 + 4)."""
    optimizer: str = "sgd"
    lr: float = 0.04
    """The paper's grid-searched learning rate, with SGD and momentum 0.9 as in the authors' code."""
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 100
    """Linear warm-up before the cosine decay: a from-scratch decoder at lr 0.04 needs it."""
    min_lr: float = 0.0
    l1_weight: float = 0.6
    focal_weight: float = 0.4
    focal_gamma: float = 4.0
    focal_alpha: float = -1.0
    """Weight of the anomaly class in the focal loss (background gets 1 - alpha); -1: no weighting."""
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 1
    """Data-loading processes that synthesise anomalies while the model trains."""
    log_every: int = 20
    checkpoint_every: int = 500
    target_false_reject_rate: float = 0.01
    """Decision threshold: the score that rejects at most this share of held-out good images."""


@dataclass
class EvalConfig:
    top_k: int = 100
    """Image score: mean of the top-k pixel probabilities of the map (the paper's definition)."""


@dataclass
class MemSegConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MemSegConfig":
        return _build(cls, raw, "config")

    @classmethod
    def load(cls, path: str | Path) -> "MemSegConfig":
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of sections (data, model, ...), found {type(raw).__name__}")
        return cls.from_dict(raw)


def _build(cls: type, raw: dict[str, Any], where: str):
    """Build dataclass ``cls`` from a dict, refusing unknown keys so a typo never passes silently."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, found {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _checked(value, hints[name], f"{where}.{name}")
    return cls(**kwargs)


def _checked(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field's type, or a ValueError naming the key, the type and what was found: a
    config is validated whole before any work starts (``iterations: five`` never fails mid-run)."""
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{where}: expected a finite number, found {value!r}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    elif typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            return [_checked(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    else:
        return value
    name = getattr(hint, "__name__", None) or str(hint)
    raise ValueError(f"{where}: expected {name}, found {value!r} ({type(value).__name__})")


def apply_overrides(cfg: MemSegConfig, overrides: dict[str, Any]) -> MemSegConfig:
    """Set dotted keys (``{"train.iterations": 400}``); ``None`` values are skipped (option not given)."""
    raw = cfg.to_dict()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"unknown config key {dotted!r}")
        node[leaf] = value
    return MemSegConfig.from_dict(raw)
