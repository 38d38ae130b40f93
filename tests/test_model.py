"""The network: output shapes in training and eval mode, the frozen encoder (weights, BatchNorm
statistics and mode never move), the Table 5 ablation switches, encoder weights from a local file,
and the loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memseg_edge.train.config import ModelConfig
from memseg_edge.train.encoders import Encoder
from memseg_edge.train.loss import focal_loss, memseg_loss
from memseg_edge.train.torch_model import MemSeg, spatial_attention

SIZE = 64


def small_model(**kw) -> MemSeg:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=kw.pop("backbone", "mobilenet_v2"), memory_samples=3,
                      standardise_images=kw.pop("standardise_images", False), **kw)
    model = MemSeg(cfg, SIZE, weights=None)
    if model.memory is not None:
        model.memory.fill(model.memory_features(torch.rand(3, 3, SIZE, SIZE)))
    return model


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_model_gives_logits_in_training_and_a_probability_map_in_eval(backbone):
    model = small_model(backbone=backbone)
    x = torch.rand(2, 3, SIZE, SIZE)
    model.train()
    assert model(x).shape == (2, 2, SIZE, SIZE)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 1, SIZE, SIZE)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_frozen_encoder_levels_never_change_during_training():
    model = small_model()
    frozen_before = {k: v.clone() for k, v in model.encoder.frozen.state_dict().items()}
    bottleneck_before = {k: v.clone() for k, v in model.encoder.bottleneck.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    model.train()
    for _ in range(3):
        logits = model(torch.rand(2, 3, SIZE, SIZE))
        loss, _ = memseg_loss(logits, (torch.rand(2, SIZE, SIZE) > 0.8).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Weights and BatchNorm running statistics of the stem and the three levels are untouched ...
    for k, v in model.encoder.frozen.state_dict().items():
        assert torch.equal(v, frozen_before[k]), f"frozen tensor {k} changed"
    # ... the frozen part stays in eval mode even though the model is training ...
    assert model.training and not any(m.training for m in model.encoder.frozen.modules())
    assert not any(p.requires_grad for p in model.encoder.frozen.parameters())
    # ... while the stride-32 stage trains.
    changed = [k for k, v in model.encoder.bottleneck.state_dict().items() if not torch.equal(v, bottleneck_before[k])]
    assert changed


@pytest.mark.parametrize("switch", ["use_memory", "use_multiscale", "use_spatial_attention", "use_coordinate_attention"])
def test_each_module_can_be_switched_off_for_the_ablation(switch):
    model = small_model(**{switch: False})
    if switch == "use_memory":
        assert model.memory is None
    if switch == "use_coordinate_attention":
        assert not any(type(m).__name__ == "CoordinateAttention" for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, SIZE, SIZE)).shape == (1, 1, SIZE, SIZE)


def test_standardise_images_gives_every_image_the_same_exposure_and_keeps_colour():
    from memseg_edge.train.torch_model import STANDARD_MEAN, STANDARD_STD, standardise

    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.5 * torch.rand(3, 3, SIZE, SIZE, generator=g)
    x[1, 0] *= 0.5  # a colour cast on one image: kept, only the image's overall level and spread change
    y = standardise(x)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.full((3,), STANDARD_MEAN), atol=1e-5)
    assert torch.allclose(y.std(dim=(1, 2, 3), unbiased=False), torch.full((3,), STANDARD_STD), rtol=0.02)
    assert float(y[1, 0].mean()) < float(y[1, 1].mean()) - 0.05
    # A flat frame (lens cap, blank belt) stays finite: the mean, not a division by zero.
    flat = standardise(torch.full((1, 3, 8, 8), 0.7))
    assert torch.isfinite(flat).all() and torch.allclose(flat, torch.tensor(STANDARD_MEAN), atol=1e-4)


def test_a_model_with_standardised_images_sees_a_darker_or_flatter_exposure_as_the_same_part():
    """model.standardise_images: the same scene at another exposure (gain and offset) gives the same map; the
    model without it does not. Without the option the encoder's input is ImageNet's normalisation alone."""
    g = torch.Generator().manual_seed(1)
    x = 0.3 + 0.4 * torch.rand(2, 3, SIZE, SIZE, generator=g)
    darker = 0.6 * x + 0.05
    on, off = small_model(standardise_images=True).eval(), small_model().eval()
    with torch.no_grad():
        moved_on = float((on(x) - on(darker)).abs().max())
        moved_off = float((off(x) - off(darker)).abs().max())
        assert moved_on < 0.02 * float(on(x).max())
        assert moved_off > 5 * moved_on
        assert torch.equal(off.normalise(x), (x - off.mean) / off.std)


def test_the_exported_graph_standardises_as_pytorch_does(tmp_path):
    import onnxruntime as ort

    from memseg_edge.train.export import write_onnx
    from memseg_edge.train.trainer import predict_maps

    model = small_model(standardise_images=True).eval()
    write_onnx(model, 10, tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    images = np.stack([rng.integers(40, 120, (SIZE, SIZE, 3)), rng.integers(100, 250, (SIZE, SIZE, 3))]).astype(np.uint8)
    ref = predict_maps(model, images, "cpu")
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    amap = sess.run(None, {sess.get_inputs()[0].name: images})[0]
    assert float(np.abs(amap[:, 0] - ref).max()) < 1e-4


def test_spatial_attention_follows_equations_5_to_7():
    d3 = torch.rand(1, 5, 2, 2)
    d2 = torch.rand(1, 4, 4, 4)
    d1 = torch.rand(1, 3, 8, 8)
    m1, m2, m3 = spatial_attention([d1, d2, d3], bounded=False)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2.0, mode="bilinear", align_corners=False)
    torch.testing.assert_close(m3, d3.mean(1, keepdim=True))
    torch.testing.assert_close(m2, d2.mean(1, keepdim=True) * up(m3))
    torch.testing.assert_close(m1, d1.mean(1, keepdim=True) * up(m2))
    b1, _, _ = spatial_attention([d1, d2, d3], bounded=True)
    torch.testing.assert_close(b1, m1 / (1 + m1))


def test_encoder_loads_weights_from_a_local_file(mobilenet_weights):
    enc = Encoder("mobilenet_v2", str(mobilenet_weights))
    state = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    torch.testing.assert_close(enc.stem[0][0].weight, state["features.0.0.weight"])
    assert enc.weights_origin.startswith("file: ")


def test_encoder_refuses_a_file_for_another_backbone(mobilenet_weights):
    with pytest.raises(ValueError, match="lacks"):
        Encoder("resnet18", str(mobilenet_weights))
    with pytest.raises(FileNotFoundError):
        Encoder("resnet18", "/nonexistent/weights.pth")


def test_focal_loss_matches_the_formula_and_l1_uses_one_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 4, 4, generator=g)
    target = (torch.rand(2, 4, 4, generator=g) > 0.5).float()
    p1 = torch.softmax(logits, 1)[:, 1].numpy().astype(np.float64)
    t = target.numpy()
    pt = np.where(t > 0.5, p1, 1 - p1)
    expected = np.mean(-((1 - pt) ** 4) * np.log(pt))
    assert float(focal_loss(logits, target, gamma=4.0)) == pytest.approx(expected, rel=1e-5)
    total, parts = memseg_loss(logits, target)
    assert parts["l1"] == pytest.approx(np.abs(p1 - t).mean(), rel=1e-5)
    assert float(total) == pytest.approx(0.6 * parts["l1"] + 0.4 * expected, rel=1e-5)


def test_position_factors_damp_where_good_images_respond_and_never_amplify():
    """model.position_normalisers: the factor on a normaliser is the blurred per-position 99th percentile of good
    images' maps over the frame-wide one, never below 1: large where a quarter of the good images respond in
    one corner, 1 (or barely above) where no good image does."""
    from memseg_edge.train.torch_model import position_factors

    rng = np.random.default_rng(0)
    maps = (rng.random((40, 64, 64)) * 0.1).astype(np.float32)
    maps[::4, :8, :8] = 5.0
    frame = float(np.percentile(maps, 99))
    r = position_factors(maps, frame)
    assert r.shape == (64, 64) and r.dtype == np.float32
    assert float(r.min()) == 1.0
    assert float(r[:4, :4].min()) > 0.5 * 5.0 / frame  # the corner's response, divided back down
    assert float(r[24:, 24:].max()) < 1.05
    with pytest.raises(ValueError, match="at least one image"):
        position_factors(maps[:0], frame)


def test_position_normalisers_give_the_documented_map_and_only_ever_lower_the_fused_score():
    """With model.position_normalisers, calibration keeps the frame-wide q_p, q_D (the floors), sets the
    per-position factors from the same good images, and the map is F / (F + c) with
    F = 0.5 (p / (q_p r_p) + D / (q_D r_D)); F is never above the frame-wide fusion's F for any input, and
    the worst good calibration image still scores about 0.5."""
    from memseg_edge.scoring import image_scores
    from memseg_edge.train.torch_model import position_factors

    good, other = torch.rand(6, 3, SIZE, SIZE), torch.rand(3, 3, SIZE, SIZE)
    plain = small_model(distance_fusion=True).eval()
    plain.calibrate_fusion(good, top_k=10)
    model = small_model(distance_fusion=True, position_normalisers=True).eval()
    assert torch.equal(model.fusion_position, torch.ones(2, 1, SIZE, SIZE))  # until calibrated
    q_p, q_d, c = model.calibrate_fusion(good, top_k=10)
    assert (q_p, q_d) == pytest.approx(plain.fusion_norm[:2].tolist(), rel=1e-6)
    with torch.no_grad():
        pg, dg = model.component_maps(good)
        r_p = position_factors(pg[:, 0].numpy(), float(np.percentile(pg.numpy(), 99)))
        r_d = position_factors(dg[:, 0].numpy(), float(np.percentile(dg.numpy(), 99)))
        torch.testing.assert_close(model.fusion_position[:, 0], torch.from_numpy(np.stack([r_p, r_d])))
        p, d = model.component_maps(other)
        f_q = 0.5 * (p / (q_p * torch.from_numpy(r_p)) + d / (q_d * torch.from_numpy(r_d)))
        torch.testing.assert_close(model(other), f_q / (f_q + c), rtol=1e-5, atol=1e-6)
        f_plain = 0.5 * (p / q_p + d / q_d)
        assert bool(torch.all(f_q <= f_plain * (1 + 1e-6)))
        assert 0.49 < float(image_scores(model(good)[:, 0].numpy(), 10).max()) <= 0.5 + 1e-6


def test_the_distance_weight_weighs_the_fused_map_and_the_default_is_todays_map():
    """model.distance_weight w: after calibration the map is ``F / (F + c)`` with
    ``F = (1 - w) p / q_p + w D / q_D`` (q_p, q_D the 99th percentiles over the calibration images) and c
    the highest calibration score, so the worst good image scores about 0.5 whatever w is; w = 0.5 gives
    exactly the normalisers (and maps) of the unweighted fusion."""
    import numpy as np

    from memseg_edge.scoring import image_scores

    good, other = torch.rand(4, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    plain = small_model(distance_fusion=True).eval()
    q_p, q_d, _ = plain.calibrate_fusion(good, top_k=10)
    with torch.no_grad():
        p, d = plain.component_maps(other)
        for w in (0.5, 0.75, 0.2):
            model = small_model(distance_fusion=True, distance_weight=w).eval()
            model.calibrate_fusion(good, top_k=10)
            if w == 0.5:
                assert torch.equal(model.fusion_norm, plain.fusion_norm)
            f = (1 - w) * p / q_p + w * d / q_d
            c = max(float(np.sort(((1 - w) * pg / q_p + w * dg / q_d).flatten(1).numpy(), 1)[:, -10:].mean(1).max())
                    for pg, dg in [model.component_maps(good)])
            # the same map up to one constant factor (which F / (F + c) takes out, c scaling alike)
            torch.testing.assert_close(model(other), f / (f + c), rtol=1e-5, atol=1e-6)
            # (a top-k mean of F / (F + c) is at most 0.5 at the worst good image, by concavity)
            assert 0.49 < float(image_scores(model(good)[:, 0].numpy(), 10).max()) <= 0.5 + 1e-6
