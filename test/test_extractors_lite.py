"""The weight-free lite extractors (lite_rgb, lite_xyz) on real MVTec 3D-AD cable_gland frames."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

from mafr_ros.core.align import feature_valid_mask, mean3x3
from mafr_ros.core.extractors import available, build_extractor
from mafr_ros.core.extractors.lite import (BoxFilter, LiteRGBExtractor, LiteXYZExtractor,
                                           mean3x3_fast, smallest_eigenpairs)
from mafr_ros.data.preprocess import preprocess
from mafr_ros.errors import CheckpointError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec3d" / "cable_gland"
S = 224


def _load(split: str, kind: str, index: int):
    folder = DATA / split / kind
    rgb = np.asarray(Image.open(folder / "rgb" / f"{index:03d}.png").convert("RGB"))
    xyz = tifffile.imread(folder / "xyz" / f"{index:03d}.tiff")
    model_input = preprocess(rgb, xyz)
    return torch.from_numpy(model_input.rgb), torch.from_numpy(model_input.xyz)


@pytest.fixture(scope="module")
def batch():
    """Two preprocessed real cable_gland frames on the 224 grid: rgb (2,3,S,S), xyz (2,3,S,S)."""
    items = [_load("train", "good", 0), _load("test", "hole", 0)]
    return torch.stack([r for r, _ in items]), torch.stack([x for _, x in items])


@pytest.fixture(scope="module")
def rgb_ex():
    return build_extractor("lite_rgb")


@pytest.fixture(scope="module")
def xyz_ex():
    return build_extractor("lite_xyz")


def _dilated(valid: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(valid[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0


def _inner_pixel(xyz: torch.Tensor, margin: int) -> tuple[int, int]:
    """A valid pixel near the part's image centroid whose (2*margin+1)^2 window is fully valid."""
    valid = (xyz != 0).any(0)
    full = -F.max_pool2d(-valid[None, None].float(), 2 * margin + 1, 1, margin)[0, 0] > 0.5
    cand = full.nonzero().float()
    centre = valid.nonzero().float().mean(0)
    y, x = cand[(cand - centre).norm(dim=1).argmin()].long().tolist()
    return y, x


def _disc(y: int, x: int, radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    return (yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2, ((yy - y) ** 2 + (xx - x) ** 2).float()


# ------------------------------------------------------------------------------------ contract

def test_registry_builds_frozen_weight_free_extractors():
    assert {"lite_rgb", "lite_xyz"} <= set(available())
    rgb, xyz = build_extractor("lite_rgb"), build_extractor("lite_xyz")
    assert isinstance(rgb, LiteRGBExtractor) and rgb.modality == "rgb"
    assert isinstance(xyz, LiteXYZExtractor) and xyz.modality == "xyz"
    for ex in (rgb, xyz):
        assert 16 <= ex.out_dim <= 64
        assert list(ex.parameters()) == []  # nothing to train, nothing to load
        ex.train()  # an enclosing module switching to training must not unfreeze it
        assert not ex.training
    with pytest.raises(CheckpointError, match="weight-free"):
        build_extractor("lite_xyz", weights="/tmp/pointmae_pretrain.pth")


def test_weights_hash_identifies_the_configuration():
    a, b = build_extractor("lite_rgb"), build_extractor("lite_rgb")
    assert a.weights_hash() == b.weights_hash()
    assert build_extractor("lite_rgb", texture_weight=0.5).weights_hash() != a.weights_hash()
    x = build_extractor("lite_xyz")
    assert x.weights_hash() != build_extractor("lite_xyz", fpfh=True).weights_hash()
    desc = x.describe()
    assert desc["name"] == "lite_xyz" and desc["weights_hash"] == x.weights_hash()
    assert desc["config"]["plane_windows"] == [5, 11, 23] and "version" in desc["config"]
    assert desc["config"]["quadric_windows"] == [11, 21, 41]
    # Defaults: 3 plane variations + crease + 5 quadric channels per window; options add back
    # the plane heights (3), the normal (3) and FPFH (33).
    assert x.out_dim == 3 + 1 + 5 * 3
    full = build_extractor("lite_xyz", plane_heights=True, normals=True, fpfh=True)
    assert full.out_dim == x.out_dim + 3 + 3 + 33
    assert build_extractor("lite_xyz", quadric_windows=()).out_dim == 4


def test_batch_shapes_dtypes_and_batch_consistency(batch, rgb_ex, xyz_ex):
    rgb, xyz = batch
    for ex, inp in ((rgb_ex, rgb), (xyz_ex, xyz)):
        out = ex(inp)
        assert out.shape == (2, ex.out_dim, S, S) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert not out.requires_grad
        # A batch gives exactly what its items give one by one.
        single = torch.cat([ex(inp[i:i + 1]) for i in range(2)])
        torch.testing.assert_close(out, single, rtol=0, atol=1e-5)


def test_deterministic_across_calls_and_instances(batch):
    rgb, xyz = batch
    for name, inp in (("lite_rgb", rgb), ("lite_xyz", xyz)):
        first = build_extractor(name)(inp)
        assert torch.equal(first, build_extractor(name)(inp))


def test_no_gradient_even_for_inputs_that_require_it(batch, rgb_ex):
    rgb = batch[0][:1].clone().requires_grad_(True)
    assert not rgb_ex(rgb).requires_grad


def test_grid_parameter_scales_windows_and_output():
    ex = build_extractor("lite_xyz", grid=112)
    rgb_small = build_extractor("lite_rgb", grid=112)
    assert ex.weights_hash() != build_extractor("lite_xyz").weights_hash()
    rgb, xyz = _load("train", "good", 1)
    xyz = xyz[:, ::2, ::2].contiguous()[None]
    assert ex(xyz).shape == (1, ex.out_dim, 112, 112)
    assert rgb_small(F.avg_pool2d(rgb[None], 2)).shape == (1, rgb_small.out_dim, 112, 112)


# ------------------------------------------------------------------------- building blocks

def test_box_filter_matches_avg_pool():
    x = torch.rand(2, 4, 37, 41)
    box = BoxFilter(x, 11)
    for k in (3, 5, 11):
        torch.testing.assert_close(box.mean(k), F.avg_pool2d(x, k, 1, k // 2, count_include_pad=True))
        torch.testing.assert_close(box.mean(k, slice(1, 3), inside=True),
                                   F.avg_pool2d(x[:, 1:3], k, 1, k // 2, count_include_pad=False))
    with pytest.raises(ValueError):
        box.mean(13)
    # Window sums at chosen pixels: the same numbers as the dense means times k^2.
    index = torch.tensor([0, 5, 37 * 41 - 1, 37 * 41 + 100, 2 * 37 * 41 - 1])
    for k in (3, 11):
        dense = box.mean(k).double().permute(0, 2, 3, 1).reshape(-1, 4)[index] * k * k
        torch.testing.assert_close(box.sums_at(k, index), dense, rtol=1e-6, atol=1e-6)


def test_mean3x3_fast_matches_the_pipeline_mean3x3():
    x = torch.randn(2, 5, 30, 33) * (torch.rand(2, 1, 30, 33) > 0.4)
    torch.testing.assert_close(mean3x3_fast(x), mean3x3(x))


def test_smallest_eigenpairs_match_lapack():
    gen = torch.Generator().manual_seed(0)
    # Flat patches (one tiny eigenvalue, as on a real surface) and generic ones.
    basis = torch.linalg.qr(torch.randn(500, 3, 3, generator=gen, dtype=torch.float64))[0]
    spread = torch.rand(500, 3, generator=gen, dtype=torch.float64) * torch.tensor([1e-4, 1.0, 4.0],
                                                                                      dtype=torch.float64)
    spread[250:] = torch.rand(250, 3, generator=gen, dtype=torch.float64) + 0.1
    cov = basis @ torch.diag_embed(spread) @ basis.transpose(1, 2)
    six = torch.stack([cov[:, 0, 0], cov[:, 0, 1], cov[:, 0, 2], cov[:, 1, 1], cov[:, 1, 2], cov[:, 2, 2]], 1)
    lam, trace, vec = smallest_eigenpairs(six, torch.zeros(500, 3, dtype=torch.float64))
    ref_val, ref_vec = torch.linalg.eigh(cov)
    torch.testing.assert_close(lam, ref_val[:, 0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(trace, ref_val.sum(1))
    assert ((vec * ref_vec[:, :, 0]).sum(1).abs() > 1 - 1e-6).all()
    # Degenerate neighbourhood (a single point): the fallback vector comes back.
    lam, _, vec = smallest_eigenpairs(torch.zeros(1, 6, dtype=torch.float64),
                                      torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64))
    assert lam.item() == 0 and vec.tolist() == [[0.0, 0.0, -1.0]]


# ----------------------------------------------------------------------------- 3D behaviour

def test_xyz_features_vanish_off_the_points(batch, xyz_ex):
    xyz = batch[1]
    out = xyz_ex(xyz)
    expected = _dilated((xyz != 0).any(1))  # zero at invalid pixels, then the 3x3 mean
    assert torch.equal(feature_valid_mask(out), expected)
    assert out.permute(1, 0, 2, 3)[:, ~expected].abs().max() == 0


def test_masked_plane_fit_has_no_leakage_from_missing_points():
    """A tilted plane seen through a camera, with 30 % of its points missing: if the zeros of the
    missing points leaked into the window moments, heights and curvature would explode next to
    every hole (a zero point is 0.65 m away from the surface)."""
    gen = torch.Generator().manual_seed(1)
    v, u = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32),
                          indexing="ij")
    f = 2400.0 * S / 256
    rx, ry = (u - S / 2) / f, (v - S / 2) / f
    # plane n . p = d with n tilted 20 degrees: depth along each ray = d / (n . ray)
    n = torch.tensor([np.sin(np.radians(20.0)), 0.0, -np.cos(np.radians(20.0))])
    depth = 0.65 * n[2] / (n[0] * rx + n[1] * ry + n[2])
    xyz = torch.stack([rx * depth, ry * depth, depth])
    keep = torch.rand(S, S, generator=gen) > 0.3
    xyz = (xyz * keep)[None]
    ex = build_extractor("lite_xyz", plane_heights=True, normals=True)
    out = ex(xyz)[0]
    interior = -F.max_pool2d(-keep[None, None].float(), 3, 1, 1)[0, 0] > 0.5  # full 3x3 valid
    interior[:12] = interior[-12:] = False
    interior[:, :12] = interior[:, -12:] = False
    heights, variations = out[0:6:2, interior], out[1:6:2, interior]
    assert heights.abs().max() < 0.02   # < ~4 um, at float precision of the fit
    assert variations.max() < 0.02      # a plane has no curvature
    normal = out[6:9, interior] / 0.5
    expected = -n if float(n[2]) > 0 else n  # towards the camera (negative z)
    assert (normal.T @ expected.float()).min() > 0.999
    # Quadric channels (10: per window residual, rms, mean and Gaussian sag, slope): a plane is
    # fitted exactly, has no curvature and a constant slope, whatever points are missing.
    deep = -F.max_pool2d(-keep[None, None].float(), 3, 1, 1)[0, 0] > 0.5
    deep[:24] = deep[-24:] = False
    deep[:, :24] = deep[:, -24:] = False
    quad = out[10:25, deep].view(3, 5, -1)
    assert quad[:, :4].abs().max() < 0.05      # asinh(x / 0.2 mm): below ~10 um
    slope = quad[:, 4]
    assert (slope.amax(1) - slope.amin(1)).max() < 0.1 and slope.min() > 0.1  # perspective only


def test_quadric_channels_follow_curved_surfaces_and_see_bumps():
    """A sphere cap (a dome like the synthetic parts' caps): the plane-fit height depends on the
    window, the quadric residual stays near zero and the mean curvature is positive (convex
    towards the camera); a 1 mm bump on the dome stands out in the quadric residual."""
    v, u = torch.meshgrid(torch.arange(S, dtype=torch.float64), torch.arange(S, dtype=torch.float64),
                          indexing="ij")
    pitch = 0.0005  # 0.5 mm per pixel, about the synthetic parts' grid spacing
    x, y = (u - S / 2) * pitch, (v - S / 2) * pitch
    radius = 0.06
    cap = radius - torch.sqrt((radius ** 2 - x ** 2 - y ** 2).clamp(min=0))  # 0 at the apex
    r2 = (u - 140) ** 2 + (v - 100) ** 2
    bump = 0.001 * torch.exp(-r2 / (2 * 4.0 ** 2))
    ex = build_extractor("lite_xyz")
    n_plane = 4
    feats = []
    for height in (-cap, -cap + bump):  # towards the camera = smaller depth
        xyz = torch.stack([x, y, 0.65 - height]).float()[None]
        feats.append(ex(xyz)[0])
    smooth, bumped = feats
    centre = (slice(60, 164), slice(60, 164))
    quad = smooth[n_plane:n_plane + 15].view(3, 5, S, S)[:, :, centre[0], centre[1]]
    assert quad[:, 0].abs().max() < 0.5        # residual to the quadric < 0.1 mm (a quartic term)
    assert (quad[:, 2] > 0).all()              # convex towards the camera
    residual41 = bumped[n_plane + 10] - smooth[n_plane + 10]
    assert residual41[100, 140] > 1.5           # asinh(> 0.4 mm / 0.2 mm)
    assert residual41[100, 40:60].abs().max() < 1e-3  # 80+ px away: unchanged


def test_geometric_features_are_local(batch):
    """Removing points far away changes nothing at a pixel beyond the largest window."""
    ex = build_extractor("lite_xyz")
    xyz = batch[1][1:].clone()
    valid = (xyz[0] != 0).any(0)
    cols = valid.any(0).nonzero().squeeze(1)
    cut = int(cols.float().median())
    changed = xyz.clone()
    changed[..., cut:] = 0  # invalidate the right half of the part
    far = torch.zeros(S, S, dtype=torch.bool)
    far[:, :cut - 41 // 2 - 3] = True
    far &= valid
    a, b = ex(xyz)[0][:, far], ex(changed)[0][:, far]
    torch.testing.assert_close(a, b, rtol=0, atol=2e-4)


def test_translation_in_the_image_moves_the_features(batch, rgb_ex):
    # Every 3D option on: plane heights (0:6 with variations), normal (6:9), crease (9),
    # quadric (10:25), FPFH (25:).
    xyz_ex = build_extractor("lite_xyz", plane_heights=True, normals=True, fpfh=True)
    rgb, xyz = batch[0][:1], batch[1][:1]
    dy, dx = 9, -6
    offset = torch.tensor([0.004, -0.003, 0.0]).view(1, 3, 1, 1)  # the part moved in 3D as well
    moved_xyz = torch.roll((xyz + offset) * (xyz != 0).any(1, keepdim=True), (dy, dx), (2, 3))
    a = torch.roll(xyz_ex(xyz), (dy, dx), (2, 3))
    b = xyz_ex(moved_xyz)
    n_geo = xyz_ex.out_dim - 33
    mask = feature_valid_mask(b)[0]
    assert torch.equal(mask, torch.roll(feature_valid_mask(xyz_ex(xyz))[0], (dy, dx), (0, 1)))
    # Heights, curvature and quadric shape: translation-invariant up to float rounding.
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=2e-3)
    torch.testing.assert_close(a[:, 10:n_geo], b[:, 10:n_geo], rtol=0, atol=2e-3)
    # Normals: the camera-facing sign uses the viewing ray, which the move changes slightly; only
    # grazing pixels (normal almost perpendicular to the ray) may flip.
    normal_diff = (a[0, 6:10] - b[0, 6:10]).abs().amax(0)[mask]  # normal and crease
    assert (normal_diff < 2e-3).float().mean() > 0.998
    fpfh_diff = (a[0, n_geo:] - b[0, n_geo:]).abs().amax(0)[mask]
    assert (fpfh_diff < 1e-3).float().mean() > 0.98  # voxel boundaries may round differently
    # RGB: shift the image; away from the border band of the largest window, features move along.
    moved = rgb_ex(torch.roll(rgb, (dy, dx), (2, 3)))
    ref = torch.roll(rgb_ex(rgb), (dy, dx), (2, 3))
    band = 21 // 2 + 10
    torch.testing.assert_close(moved[..., band:-band, band:-band], ref[..., band:-band, band:-band],
                               rtol=0, atol=1e-4)


def test_dent_changes_3d_features_inside_the_disc(batch, xyz_ex):
    xyz = batch[1][0].clone()
    y, x = _inner_pixel(xyz, 9)
    radius = 5.0
    disc, d2 = _disc(y, x, radius)
    ray = xyz / xyz.norm(dim=0, keepdim=True).clamp(min=1e-9)
    depth = 0.0015 * (1 - d2 / radius ** 2).clamp(min=0)  # 1.5 mm deep, smooth profile
    dented = torch.where(disc & (xyz != 0).any(0), xyz + ray * depth, xyz)
    before, after = xyz_ex(xyz[None])[0], xyz_ex(dented[None])[0]
    change = (after - before).norm(dim=0)
    valid = (xyz != 0).any(0)
    far = ~_disc(y, x, radius + 30)[0] & valid
    inside = change[disc & valid].mean()
    assert inside > 0.5
    assert inside > 20 * change[far].mean()


def test_colour_stain_changes_2d_features_locally(batch, rgb_ex):
    rgb = batch[0][0].clone()
    xyz = batch[1][0]
    y, x = _inner_pixel(xyz, 9)
    disc, d2 = _disc(y, x, 6.0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    rgb01 = rgb * std + mean
    stain = torch.tensor([0.55, 0.35, 0.2]).view(3, 1, 1)  # rust-coloured, similar brightness
    alpha = 0.6 * disc.float()
    stained = ((rgb01 * (1 - alpha) + stain * alpha) - mean) / std
    change = (rgb_ex(stained[None])[0] - rgb_ex(rgb[None])[0]).norm(dim=0)
    reach = 6 + 21 // 2 + 1  # disc radius + half the largest (square) window
    far = torch.ones(S, S, dtype=torch.bool)
    far[y - reach:y + reach + 1, x - reach:x + reach + 1] = False
    assert change[disc].mean() > 1.0
    assert change[far].max() < 1e-4  # nothing beyond the largest window moves


# ----------------------------------------------------------------------------- real data, speed

def test_real_cable_gland_features_are_informative(batch, rgb_ex, xyz_ex):
    rgb, xyz = batch
    f2d, f3d = rgb_ex(rgb), xyz_ex(xyz)
    valid = (xyz != 0).any(1)
    # Every channel varies over the part (no dead channel) and stays in a sane range.
    for feats in (f2d, f3d):
        on_part = feats.permute(1, 0, 2, 3)[:, valid]
        assert (on_part.std(dim=1) > 1e-3).all()
        assert on_part.abs().max() < 50
    # The drilled hole of test/hole/000 stands out: its fine-scale surface variation (channel 0)
    # is above that of most of the rest of the part.
    gt = np.asarray(Image.open(DATA / "test" / "hole" / "gt" / "000.png")) > 0
    gt_grid = F.interpolate(torch.from_numpy(gt)[None, None].float(), size=(S, S), mode="nearest")[0, 0] > 0
    variation = f3d[1, 0]
    hole = variation[gt_grid & valid[1]].mean()
    rest = variation[~_dilated(gt_grid[None])[0] & valid[1]]
    assert (rest < hole).float().mean() > 0.9


@pytest.mark.parametrize("name", ["lite_rgb", "lite_xyz"])
def test_speed_per_frame(batch, name):
    ex = build_extractor(name)
    inp = (batch[0] if name == "lite_rgb" else batch[1])[:1]
    ex(inp)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        ex(inp)
        times.append(time.perf_counter() - start)
    assert sorted(times)[1] < 2.0, f"{name} took {sorted(times)[1]:.2f} s per 224 frame"
