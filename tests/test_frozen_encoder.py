"""The invariants of MemSeg's memory path: the frozen encoder (stem and the three memory levels) computes
inference-mode features from the moment it is built, whatever mode anyone sets, so the memory bank equals
what the encoder computes at test time, and its BatchNorm statistics stay the loaded ImageNet ones through
training. A checkpoint from before this was guaranteed is refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import MOBILENET_WEIGHTS, MVTEC, require
from memseg_edge.train.checkpoint import read_checkpoint
from memseg_edge.train.config import ModelConfig
from memseg_edge.train.torch_model import MemSeg

SIZE = 64


def _frozen_modules(model: MemSeg) -> list[nn.Module]:
    return list(model.encoder.stem.modules()) + list(model.encoder.frozen.modules())


def assert_bank_holds(memory, reference: list[torch.Tensor], tol: float = 0.0) -> None:
    """The bank was filled from exactly these features ``[M, C, H, W]`` per level: the same tensors
    (whole-image selection), or (patch selection) every bank vector is one of their position vectors."""
    for level, (bank, ref) in enumerate(zip(memory.banks(), reference)):
        if memory.selection == "patch":
            vectors = ref.permute(0, 2, 3, 1).reshape(-1, ref.shape[1])
            nearest = vectors[torch.cdist(bank.double(), vectors.double()).argmin(1)]
            torch.testing.assert_close(bank, nearest, rtol=tol, atol=tol, msg=f"memory level {level}")
        elif tol == 0.0:
            assert torch.equal(bank, ref), f"memory level {level} differs"
        else:
            torch.testing.assert_close(bank, ref, rtol=tol, atol=tol, msg=f"memory level {level}")


@pytest.mark.parametrize("selection", ["sum", "patch"])
def test_frozen_encoder_is_in_inference_mode_from_construction_whatever_the_caller_does(selection):
    torch.manual_seed(0)
    model = MemSeg(ModelConfig(backbone="mobilenet_v2", memory_samples=4, memory_selection=selection,
                               standardise_images=False), SIZE,
                   weights=None)
    assert model.training  # a new nn.Module is in training mode ...
    # ... but nothing in the frozen part can use batch statistics: there is no BatchNorm left in it.
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in _frozen_modules(model))
    x = torch.rand(4, 3, SIZE, SIZE)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items() if k.startswith(("stem", "frozen"))}
    reference = [f.clone() for f in model.memory_features(x)]
    # Force everything into training mode, the way a careless caller (or the old trainer) would.
    model.apply(lambda m: m.train())
    model.memory.fill(model.memory_features(x))
    assert_bank_holds(model.memory, reference)  # features do not depend on the module's mode
    model(x)  # a training-mode forward
    after = model.encoder.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"frozen tensor {k} moved"
    # A single image gives the same features as the same image inside a batch (no batch statistics).
    one = model.memory_features(x[:1])
    for a, b in zip(one, reference):
        torch.testing.assert_close(a, b[:1], rtol=1e-5, atol=1e-6)


def _torchvision_eval_features(weights: Path, images: torch.Tensor, smoothing: int) -> list[torch.Tensor]:
    """An independent reference: torchvision's MobileNetV2 in eval mode with the same weights, cut at the
    same block boundaries, smoothed with the model's ``model.feature_smoothing`` average pool (1: none)."""
    net = torchvision.models.mobilenet_v2(weights=None)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=False)
    net.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (images - mean) / std
    pool = (nn.AvgPool2d(smoothing, stride=1, padding=smoothing // 2, count_include_pad=False) if smoothing > 1
            else nn.Identity())
    feats = []
    with torch.no_grad():
        x = net.features[:4](x)
        feats.append(pool(x))
        x = net.features[4:7](x)
        feats.append(pool(x))
        x = net.features[7:14](x)
        feats.append(pool(x))
    return feats


def test_memory_bank_equals_inference_features_and_imagenet_statistics_survive_training(bottle_model):
    """The trained session model (real bottle images, real ImageNet weights): its bank equals what an
    eval-mode torchvision encoder computes for its memory images, and every frozen BatchNorm statistic is
    bit-identical to the weights file after training."""
    from memseg_edge.train.checkpoint import load_model
    from memseg_edge.train.datasets import load_images

    model, ckpt = load_model(bottle_model["checkpoint"])
    state = torch.load(MOBILENET_WEIGHTS, map_location="cpu", weights_only=True)
    enc = model.encoder.state_dict()
    # stem = features[0:2], frozen.0 = features[2:4], frozen.1 = features[4:7], frozen.2 = features[7:14];
    # a slice of a Sequential keeps the original indices, so stem.1 is features.1 and frozen.1.5 features.5
    offsets = {"stem": 0, "frozen.0": 0, "frozen.1": 0, "frozen.2": 0}
    checked = 0
    for key, value in enc.items():
        if not key.endswith(("running_mean", "running_var")) and not (".weight" in key or ".bias" in key):
            continue
        prefix = next((p for p in offsets if key.startswith(p + ".")), None)
        if prefix is None:
            continue
        rest = key[len(prefix) + 1:].split(".", 1)
        source = f"features.{offsets[prefix] + int(rest[0])}.{rest[1]}"
        assert torch.equal(value, state[source]), f"{key} differs from the ImageNet weights ({source})"
        checked += key.endswith(("running_mean", "running_var"))
    assert checked >= 2 * 30, "expected the running statistics of every frozen BatchNorm to be checked"

    names = ckpt["data"]["memory_images"]
    paths = [MVTEC / "bottle" / "train" / "good" / n for n in names]
    images = torch.from_numpy(load_images(paths, ckpt["image_size"])).permute(0, 3, 1, 2).float() / 255.0
    reference = _torchvision_eval_features(MOBILENET_WEIGHTS, images, model.cfg.feature_smoothing)
    assert_bank_holds(model.memory, reference, tol=1e-4)


def test_a_checkpoint_from_before_the_fix_is_refused_with_the_reason(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"format": "memseg-edge-checkpoint", "format_version": 1, "model_state": {}}, old)
    with pytest.raises(ValueError, match="training mode.*train it again"):
        read_checkpoint(old)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\x08\x07\x12\x07pytorch", "ONNX model"),
    (b"not a checkpoint at all", "not a PyTorch file"),
])
def test_unusable_checkpoint_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_checkpoint(path)


def test_a_truncated_checkpoint_says_so(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"format": "memseg-edge-checkpoint", "format_version": 2, "x": torch.zeros(1000)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_checkpoint(cut)


@pytest.mark.parametrize("stem_skip", [True, False])
def test_the_decoder_takes_the_frozen_stem_as_its_stride_2_skip(stem_skip):
    torch.manual_seed(0)
    model = MemSeg(ModelConfig(backbone="resnet18", memory_samples=2, stem_skip=stem_skip,
                               standardise_images=False), SIZE, weights=None)
    model.memory.fill(model.memory_features(torch.rand(2, 3, SIZE, SIZE)))
    first = model.decoder.convs[3][0][0]  # the stride-2 stage's first convolution
    width = model.decoder.ups[3][0].out_channels
    assert first.in_channels == width + (64 if stem_skip else 0)
    seen = {}
    model.encoder.stem.register_forward_hook(lambda m, i, o: seen.__setitem__("stem", o.shape))
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, SIZE, SIZE)).shape == (1, 1, SIZE, SIZE)
    assert seen["stem"] == (1, 64, SIZE // 2, SIZE // 2)


def test_skip_features_are_sharp_and_only_the_comparison_is_smoothed():
    torch.manual_seed(0)
    x = torch.rand(1, 3, SIZE, SIZE)
    captured = {}
    for smooth in (False, True):
        model = MemSeg(ModelConfig(backbone="mobilenet_v2", memory_samples=2, smooth_skip_features=smooth,
                                   standardise_images=False), SIZE,
                       weights=None)
        model.memory.fill(model.memory_features(torch.rand(2, 3, SIZE, SIZE)))
        model.fusion.register_forward_hook(lambda m, i, o, s=smooth: captured.__setitem__(s, i[0][0]))
        model.eval()
        with torch.no_grad():
            model(x)
        raw = model.encoder.frozen_features(model.normalise(x))[1][0]
        c = raw.shape[1]
        expected = model.smooth(raw) if smooth else raw
        torch.testing.assert_close(captured[smooth][:, :c], expected)
