"""MAFR heads (shapes, parameter counts, per-pixel behaviour) and training losses."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from mafr_ros.core.heads import FusionRestorationHeads, PixelGate
from mafr_ros.core.losses import (LossConfig, census_loss_reference, mafr_loss, restoration_loss,
                                  smoothness_loss, soft_census_loss, znssd_loss)
from mafr_ros.errors import InputError

SMALL = dict(dim_2d=48, dim_3d=40, latent=64)  # the weight-free profile's widths


def smooth_maps(b, c, h, w, seed, sigma=1.5):
    """Spatially correlated random feature maps (features of real images are smooth)."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal((b, c, h, w)), sigma=(0, 0, sigma, sigma))
    return torch.from_numpy(x / x.std()).float()


@pytest.fixture(scope="module")
def small_heads():
    torch.manual_seed(0)
    return FusionRestorationHeads(**SMALL).eval()


# -- heads -----------------------------------------------------------------------------------------
def test_default_parameter_counts_match_the_reference():
    with torch.device("meta"):  # count without allocating 53 MB of weights
        heads = FusionRestorationHeads()
    counts = heads.parameter_counts()
    assert counts["fusion_encoder"] == 3_691_200
    assert counts["decoder_2d"] == 3_324_050
    assert counts["decoder_3d"] == 6_368_426
    assert counts["total"] == 13_383_676
    assert heads.macs_per_pixel() == 13_363_200  # the 13.36 M MAC per pixel of the reference
    summary = heads.parameter_summary()
    for value in ("3,691,200", "3,324,050", "6,368,426", "13,383,676"):
        assert value in summary


@pytest.mark.parametrize("d2, d3, lat, enc, dec", [(48, 40, 64, 2, 3), (32, 96, 20, 1, 2)])
def test_parameter_count_follows_the_layer_formula(d2, d3, lat, enc, dec):
    def linear(i, o):
        return i * o + o

    def decoder(o):
        gate = linear(o, max(1, o // 16)) + linear(max(1, o // 16), o) + 2 * 7 * 7
        return linear(lat, o) + linear(lat, o) + (dec - 1) * linear(o, o) + 2 * o + gate + linear(o, o)

    encoder = linear(d2 + d3, lat) + (enc - 1) * linear(lat, lat) + 2 * lat + linear(lat, lat)
    with torch.device("meta"):
        heads = FusionRestorationHeads(d2, d3, lat, enc, dec)
    assert heads.parameter_counts()["total"] == encoder + decoder(d2) + decoder(d3)
    assert FusionRestorationHeads.from_config(heads.config()).config() == heads.config()


def reference_heads_forward(heads, f2d, f3d):
    """Section 5 of the reference, written with functional ops and CBAM run on real 1x1 maps."""
    def cbam(gate, x):
        x4 = x[:, :, None, None]
        def mlp(v):
            return F.linear(F.relu(F.linear(v.flatten(1), gate.channel_fc1.weight, gate.channel_fc1.bias)),
                            gate.channel_fc2.weight, gate.channel_fc2.bias)[:, :, None, None]
        x4 = x4 * torch.sigmoid(mlp(F.adaptive_avg_pool2d(x4, 1)) + mlp(F.adaptive_max_pool2d(x4, 1)))
        pooled = torch.cat([x4.mean(dim=1, keepdim=True), x4.amax(dim=1, keepdim=True)], dim=1)
        k = gate.spatial_weight.shape[-1]
        x4 = x4 * torch.sigmoid(F.conv2d(pooled, gate.spatial_weight, padding=k // 2))
        return x4.flatten(1)

    enc = heads.fusion_encoder
    x = torch.cat([f2d, f3d], 1)
    for layer in enc.layers:
        x = F.layer_norm(F.gelu(layer(x)), (layer.out_features,), enc.norm.weight, enc.norm.bias)
    z = enc.output(x)
    outs = []
    for dec in (heads.decoder_2d, heads.decoder_3d):
        h = z
        for layer in dec.layers:
            h = F.gelu(F.layer_norm(layer(h), (layer.out_features,), dec.norm.weight, dec.norm.bias))
        outs.append(dec.output(cbam(dec.gate, h)) + dec.skip(z))
    return outs


def test_heads_compute_the_reference_layers(small_heads):
    torch.manual_seed(1)
    with torch.no_grad():  # gate taps are random, not the near-zero init, so the gates matter
        for dec in (small_heads.decoder_2d, small_heads.decoder_3d):
            dec.gate.spatial_weight.normal_()
        f2d, f3d = torch.randn(300, 48), torch.randn(300, 40)
        got = small_heads(f2d, f3d)
        want = reference_heads_forward(small_heads, f2d, f3d)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_gate_uses_only_the_centre_taps():
    gate = PixelGate(32)
    gate(torch.randn(50, 32)).sum().backward()
    grad = gate.spatial_weight.grad[0]
    assert grad[:, 3, 3].abs().min() > 0
    grad[:, 3, 3] = 0
    assert grad.abs().max() == 0


def test_batched_grid_equals_per_image_and_tokens(small_heads):
    f2d, f3d = smooth_maps(3, 48, 12, 10, 0), smooth_maps(3, 40, 12, 10, 1)
    with torch.no_grad():
        r2d, r3d = small_heads.forward_grid(f2d, f3d)
        assert r2d.shape == (3, 48, 12, 10) and r3d.shape == (3, 40, 12, 10)
        for i in range(3):
            s2d, s3d = small_heads.forward_grid(f2d[i:i + 1], f3d[i:i + 1])
            torch.testing.assert_close(r2d[i], s2d[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(r3d[i], s3d[0], rtol=0, atol=1e-6)
        t2d, _ = small_heads(f2d[1, :, 4, 7][None], f3d[1, :, 4, 7][None])
        torch.testing.assert_close(t2d[0], r2d[1, :, 4, 7], rtol=0, atol=1e-6)


def test_masked_grid_equals_full_grid_on_masked_pixels(small_heads):
    f2d, f3d = smooth_maps(2, 48, 16, 16, 2), smooth_maps(2, 40, 16, 16, 3)
    mask = torch.from_numpy(np.random.default_rng(0).random((2, 16, 16)) > 0.6)
    with torch.no_grad():
        full = small_heads.forward_grid(f2d, f3d)
        masked = small_heads.forward_grid(f2d, f3d, mask)
        chunked = small_heads.forward_grid(f2d, f3d, mask, max_tokens=37)
    for f, m, c in zip(full, masked, chunked):
        assert m.is_contiguous()
        keep = mask.unsqueeze(1).expand_as(f)
        torch.testing.assert_close(m[keep], f[keep], rtol=0, atol=1e-6)
        assert torch.count_nonzero(m[~keep]) == 0
        torch.testing.assert_close(c, m, rtol=0, atol=1e-6)


def test_heads_reject_mismatched_inputs(small_heads):
    with pytest.raises(InputError, match="widths"):
        small_heads(torch.randn(5, 768), torch.randn(5, 40))
    with pytest.raises(InputError, match="forward_grid"):
        small_heads(torch.randn(1, 48, 4, 4), torch.randn(1, 40, 4, 4))
    with pytest.raises(InputError, match="mask"):
        small_heads.forward_grid(torch.randn(1, 48, 4, 4), torch.randn(1, 40, 4, 4),
                                 torch.ones(1, 4, 4))


@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig.reference()], ids=["default", "reference"])
def test_adam_steps_reduce_the_loss_and_gradients_reach_every_part(cfg):
    torch.manual_seed(0)
    heads = FusionRestorationHeads(**SMALL)
    f2d, f3d = smooth_maps(2, 48, 16, 16, 4), smooth_maps(2, 40, 16, 16, 5)
    mask = torch.ones(2, 16, 16, dtype=torch.bool)
    mask[:, :3] = False
    optimiser = torch.optim.Adam(heads.parameters(), lr=1e-3)
    losses = []
    for step in range(12):
        r2d, r3d = heads.forward_grid(f2d, f3d)
        total, terms = mafr_loss(f2d, r2d, f3d, r3d, mask, cfg)
        optimiser.zero_grad()
        total.backward()
        if step == 0:
            for part in (heads.fusion_encoder, heads.decoder_2d, heads.decoder_3d):
                assert sum(p.grad.abs().sum() for p in part.parameters() if p.grad is not None) > 0
        optimiser.step()
        losses.append(float(total.detach()))
    assert losses[-1] < 0.8 * losses[0]


# -- losses ----------------------------------------------------------------------------------------
def test_znssd_is_two_minus_two_pearson():
    x, y = smooth_maps(2, 30, 9, 11, 6), smooth_maps(2, 30, 9, 11, 7)
    xn, yn = x.double().numpy(), y.double().numpy()
    xc, yc = xn - xn.mean(1, keepdims=True), yn - yn.mean(1, keepdims=True)
    rho = (xc * yc).sum(1) / np.sqrt((xc ** 2).sum(1) * (yc ** 2).sum(1))
    assert float(znssd_loss(x, y)) == pytest.approx(np.mean(2 * (1 - rho)), rel=1e-4)
    mask = torch.from_numpy(np.random.default_rng(1).random((2, 9, 11)) > 0.5)
    assert float(znssd_loss(x, y, mask)) == pytest.approx(np.mean(2 * (1 - rho)[mask.numpy()]), rel=1e-4)


def test_znssd_ignores_per_pixel_gain_and_offset():
    x = smooth_maps(1, 64, 8, 8, 8)
    gain = torch.rand(1, 1, 8, 8) * 3 + 0.2
    offset = torch.randn(1, 1, 8, 8) * 5
    assert float(znssd_loss(x, gain * x + offset)) < 1e-5
    assert float(znssd_loss(x, smooth_maps(1, 64, 8, 8, 9))) > 0.5


def test_reference_census_equals_box_filter_l1():
    x, y = smooth_maps(2, 6, 13, 10, 10), smooth_maps(2, 6, 13, 10, 11)
    box = lambda a: ndimage.uniform_filter(a.double().numpy(), size=(1, 1, 7, 7), mode="constant")
    want = np.abs(box(x) - box(y)).mean()
    assert float(census_loss_reference(x, y)) == pytest.approx(want, rel=1e-5)


def soft_census_numpy(y, mask, window, temperature, floor=0.01):
    """Independent per-offset implementation of the soft census (K-channel maps)."""
    b, k, h, w = y.shape
    r = window // 2
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]
    ypad = np.pad(y, ((0, 0), (0, 0), (r, r), (r, r)))
    mpad = np.pad(mask.astype(float), ((0, 0), (r, r), (r, r)))
    d = np.stack([ypad[:, :, r + dy:r + dy + h, r + dx:r + dx + w] - y for dy, dx in offsets], 2)
    pair = np.stack([mpad[:, r + dy:r + dy + h, r + dx:r + dx + w] * mask for dy, dx in offsets], 1)
    contrast = (np.abs(d) * pair[:, None]).sum(2) / np.maximum(pair.sum(1), 1)[:, None]
    image = ((contrast * mask[:, None]).sum((2, 3), keepdims=True)
             / np.maximum(mask.sum((1, 2)), 1)[:, None, None, None])
    return np.tanh(d / (temperature * (contrast + floor * image + 1e-12))[:, :, None]), pair


def test_soft_census_matches_an_independent_implementation():
    from mafr_ros.core.losses import census_projections
    x, y = smooth_maps(2, 12, 11, 9, 12), smooth_maps(2, 12, 11, 9, 13)
    mask = np.random.default_rng(2).random((2, 11, 9)) > 0.3
    proj = census_projections(12, 4).double().numpy()
    px = np.einsum("kc,bchw->bkhw", proj, x.double().numpy())
    py = np.einsum("kc,bchw->bkhw", proj, y.double().numpy())
    sx, pair = soft_census_numpy(px, mask, 5, 0.5)
    sy, _ = soft_census_numpy(py, mask, 5, 0.5)
    want = (np.abs(sx - sy).mean(1) * 0.5 * pair).sum() / pair.sum()
    got = soft_census_loss(x.double(), y.double(), torch.from_numpy(mask), window=5, projections=4)
    assert float(got) == pytest.approx(want, rel=1e-9)


def test_soft_census_has_census_invariances_that_the_reference_lacks():
    x = smooth_maps(1, 16, 20, 20, 14)
    assert float(soft_census_loss(x, x)) == 0.0
    brighter = 3.0 * x + 5.0  # monotone brightness change: gain and offset
    assert float(soft_census_loss(x, brighter)) < 1e-5
    assert float(census_loss_reference(x, brighter)) > 1.0
    # A smooth non-linear monotone change (single channel: projections are then exact views).
    x1 = smooth_maps(1, 1, 24, 24, 15)
    curved = torch.exp(0.5 * x1)
    structure = smooth_maps(1, 1, 24, 24, 16)
    warped_loss = float(soft_census_loss(x1, curved))
    assert warped_loss < 0.2 * float(soft_census_loss(x1, structure))
    # Local structure matters: the same values mirrored left-right is far from the original.
    assert float(soft_census_loss(x, torch.flip(x, dims=[3]))) > 0.2


def test_smoothness_reference_channels_and_all_channels():
    r, x = smooth_maps(2, 5, 9, 8, 17), smooth_maps(2, 5, 9, 8, 18)
    rn, img = r.double().numpy(), x.double().numpy().mean(1)
    dx = np.abs(rn[:, :, :-1, 1:] - rn[:, :, :-1, :-1])
    dy = np.abs(rn[:, :, 1:, :-1] - rn[:, :, :-1, :-1])
    wx = np.exp(-np.abs(img[:, :-1, 1:] - img[:, :-1, :-1]))[:, None]
    wy = np.exp(-np.abs(img[:, 1:, :-1] - img[:, :-1, :-1]))[:, None]
    per_channel = dx * wx + dy * wy
    reference = per_channel[:, :2].sum(1).mean()  # the published formula: u and v summed
    assert 2 * float(smoothness_loss(r, x, channels=(0, 1))) == pytest.approx(reference, rel=1e-5)
    assert float(smoothness_loss(r, x)) == pytest.approx(per_channel.mean(), rel=1e-5)
    assert float(smoothness_loss(r, x)) != pytest.approx(float(smoothness_loss(r, x, channels=(0, 1))))
    assert float(smoothness_loss(r, x.mean(1))) == pytest.approx(per_channel.mean(), rel=1e-5)


def test_masked_losses_ignore_invalid_pixels():
    f2d, f3d = smooth_maps(2, 10, 14, 12, 19), smooth_maps(2, 8, 14, 12, 20)
    r2d, r3d = smooth_maps(2, 10, 14, 12, 21), smooth_maps(2, 8, 14, 12, 22)
    mask = torch.ones(2, 14, 12, dtype=torch.bool)
    mask[:, 5:9, 3:8] = False
    mask[1, :, :2] = False
    noise = lambda t, s: torch.where(mask.unsqueeze(1), t, smooth_maps(*t.shape, s) * 7)
    g2d, g3d, h2d, h3d = noise(f2d, 23), noise(f3d, 24), noise(r2d, 25), noise(r3d, 26)
    for fn in (znssd_loss, census_loss_reference, soft_census_loss):
        assert float(fn(f2d, r2d, mask)) == pytest.approx(float(fn(g2d, h2d, mask)), rel=1e-6)
    assert float(smoothness_loss(r2d - f2d, f2d, mask)) == pytest.approx(
        float(smoothness_loss(h2d - g2d, g2d, mask)), rel=1e-6)
    a, _ = mafr_loss(f2d, r2d, f3d, r3d, mask)
    b, _ = mafr_loss(g2d, h2d, g3d, h3d, mask)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    unmasked = LossConfig(mask_invalid=False)
    assert float(mafr_loss(f2d, r2d, f3d, r3d, mask, unmasked)[0]) != pytest.approx(
        float(mafr_loss(g2d, h2d, g3d, h3d, mask, unmasked)[0]), rel=1e-3)


def test_nan_guard_names_the_term():
    f2d, f3d = smooth_maps(1, 10, 8, 8, 27), smooth_maps(1, 8, 8, 8, 28)
    bad = f3d.clone()
    bad[0, 2, 4, 4] = float("nan")
    with pytest.raises(FloatingPointError, match="_3d"):
        mafr_loss(f2d, f2d, f3d, bad)
    total, terms = mafr_loss(f2d, f2d, f3d, f3d)
    assert set(terms) == {f"{t}_{m}" for t in ("similarity", "census", "local_mean", "smoothness")
                          for m in ("2d", "3d")}
    assert float(total) < 1e-5


def test_loss_config_round_trip_and_validation():
    cfg = LossConfig(census="reference", smoothness_channels=[0, 1], w_smoothness=0.5)
    assert cfg.smoothness_channels == (0, 1)
    assert LossConfig.from_dict(cfg.to_dict()) == cfg
    assert LossConfig.from_dict(LossConfig.reference().to_dict()) == LossConfig.reference()
    with pytest.raises(ValueError, match="census"):
        LossConfig(census="hard")
    with pytest.raises(ValueError, match="unknown LossConfig keys"):
        LossConfig.from_dict({"w_censsus": 1.0})


def test_restoration_loss_is_the_masked_per_pixel_mse():
    f, r = smooth_maps(2, 6, 9, 7, 31), smooth_maps(2, 6, 9, 7, 32)
    mask = torch.ones(2, 9, 7, dtype=torch.bool)
    mask[0, :3] = False
    expected = (r - f).square().mean(dim=1)[mask].mean()
    assert float(restoration_loss(f, r, mask)) == pytest.approx(float(expected), rel=1e-6)
    assert float(restoration_loss(f, r)) == pytest.approx(float((r - f).square().mean()), rel=1e-6)
    # Off by default (the published loss); a weight adds exactly its terms for both modalities.
    plain, terms = mafr_loss(f, r, f, r, mask)
    assert not any(name.startswith("restoration") for name in terms)
    cfg = LossConfig(w_restoration=2.0)
    total, terms = mafr_loss(f, r, f, r, mask, cfg)
    assert float(total) == pytest.approx(float(plain) + 4.0 * float(expected), rel=1e-5)
    assert {"restoration_2d", "restoration_3d"} <= set(terms)
    with pytest.raises(ValueError, match="w_restoration"):
        LossConfig(w_restoration=-1.0)


def test_feature_norm_standardises_valid_pixels_and_keeps_invalid_ones_zero():
    from mafr_ros.core.normalization import FeatureNorm
    f2d = smooth_maps(3, 5, 10, 11, 33) * torch.tensor([1.0, 10.0, 0.5, 3.0, 1.0]).view(1, -1, 1, 1) + 4.0
    f3d = smooth_maps(3, 4, 10, 11, 34) * 0.01
    f3d[:, 3] = 0.5  # a channel constant on good parts: its scale is floored, not 0
    mask = torch.ones(3, 10, 11, dtype=torch.bool)
    mask[1, 2:6, 3:9] = False
    norm = FeatureNorm.fit(f2d.half(), f3d.half(), mask, chunk=2)
    a, b = norm.apply(f2d, f3d, mask)
    valid_2d = a.permute(0, 2, 3, 1)[mask]
    assert torch.allclose(valid_2d.mean(0), torch.zeros(5), atol=2e-2)
    assert torch.allclose(valid_2d.std(0), torch.ones(5), atol=2e-2)
    assert torch.isfinite(b).all() and float(b[:, 3].abs().max()) < 10.0
    assert float(a[1, :, 2:6, 3:9].abs().max()) == 0.0 and float(b[1, :, 2:6, 3:9].abs().max()) == 0.0
    assert FeatureNorm.from_dict(norm.to_dict()) == norm and FeatureNorm.from_dict(None) is None
    with pytest.raises(ValueError, match="inconsistent"):
        FeatureNorm.from_dict({**norm.to_dict(), "std_2d": [0.0] * 5})
