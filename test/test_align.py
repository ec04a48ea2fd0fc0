"""Grid alignment and point grouping (mafr_ros.core.align) against brute-force NumPy references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mafr_ros.core.align import (farthest_point_sample, feature_valid_mask, mean3x3,
                                 nearest_neighbours, scatter_point_features, spread_group_features,
                                 upsample_patch_features)


def _random_cloud_grid(rng: np.random.Generator, b: int, s: int, invalid_fraction: float) -> np.ndarray:
    xyz = rng.normal(size=(b, 3, s, s)).astype(np.float32)
    xyz[:, 2] += 5.0
    xyz *= rng.random((b, 1, s, s)) >= invalid_fraction  # invalid pixels are exactly (0, 0, 0)
    return xyz


def _spread_reference(xyz: np.ndarray, centres: np.ndarray, feats: np.ndarray, k: int) -> np.ndarray:
    """Brute force in float64: full distance matrix, full argsort, the published weight rule."""
    b, _, s, _ = xyz.shape
    out = np.zeros((b, feats.shape[2], s, s))
    for item in range(b):
        for row in range(s):
            for col in range(s):
                p = xyz[item, :, row, col].astype(np.float64)
                if not p.any():
                    continue
                d2 = ((centres[item].astype(np.float64) - p) ** 2).sum(axis=1)
                nearest = np.argsort(d2)[:k]
                inv = 1.0 / (d2[nearest] + 1e-8)
                out[item, :, row, col] = (inv / inv.sum()) @ feats[item, nearest].astype(np.float64)
    return out


def _fps_reference(points: np.ndarray, n: int) -> list[int]:
    """Textbook farthest-point sampling of one cloud, from index 0, first index wins ties."""
    chosen = [0]
    min_d2 = np.full(len(points), np.inf)
    for _ in range(n - 1):
        min_d2 = np.minimum(min_d2, ((points - points[chosen[-1]]) ** 2).sum(axis=1))
        chosen.append(int(np.argmax(min_d2)))
    return chosen


def test_spread_group_features_matches_brute_force():
    rng = np.random.default_rng(0)
    xyz = _random_cloud_grid(rng, b=2, s=11, invalid_fraction=0.3)
    centres = rng.normal(size=(2, 17, 3)).astype(np.float32)
    centres[:, :, 2] += 5.0
    xyz[0, :, 3, 5] = (0.5, -0.25, 5.0)
    centres[0, 4] = xyz[0, :, 3, 5]  # a pixel exactly on a centre: weight 1e8 takes that centre
    feats = rng.normal(size=(2, 17, 6)).astype(np.float32)

    # chunk=7 forces several chunks per item and a ragged last one.
    raw = spread_group_features(torch.from_numpy(xyz), torch.from_numpy(centres),
                                torch.from_numpy(feats), k=3, chunk=7, smooth=False)
    expected = _spread_reference(xyz, centres, feats, k=3)
    assert raw.shape == (2, 6, 11, 11)
    np.testing.assert_allclose(raw.numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(raw[0, :, 3, 5].numpy(), feats[0, 4], rtol=1e-5)
    invalid = ~(xyz != 0).any(axis=1)
    assert invalid.any() and (raw.numpy().transpose(0, 2, 3, 1)[invalid] == 0).all()

    smoothed = spread_group_features(torch.from_numpy(xyz), torch.from_numpy(centres),
                                     torch.from_numpy(feats), k=3)
    torch.testing.assert_close(smoothed, mean3x3(raw))


def test_mean3x3_keeps_a_lit_pixel_centred():
    grid = torch.zeros(1, 2, 9, 12)
    grid[0, :, 4, 7] = 9.0
    out = mean3x3(grid)
    assert out.shape == grid.shape
    lit = out[0, 0].nonzero()
    # Exactly the 3x3 block around (4, 7), each 9 / 9: no shift as with "pool (S-2) then resize".
    assert lit[:, 0].tolist() == [3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert lit[:, 1].tolist() == [6, 7, 8] * 3
    torch.testing.assert_close(out[0, :, 3:6, 6:9], torch.ones(2, 3, 3))

    corner = torch.zeros(1, 1, 5, 5)
    corner[0, 0, 0, 0] = 4.0
    # count_include_pad=False: a corner averages its 4 in-image pixels, not 9.
    assert float(mean3x3(corner)[0, 0, 0, 0]) == 1.0
    constant = torch.full((1, 3, 6, 6), 2.5)
    torch.testing.assert_close(mean3x3(constant), constant)  # borders not damped


@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 2, 1, 5), (1, 1, 4, 1), (1, 1, 1, 1)])
def test_mean3x3_equals_padded_average_pooling(shape):
    grid = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    expected = torch.nn.functional.avg_pool2d(grid, 3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(mean3x3(grid), expected)


def test_upsample_patch_features_registers_token_centres():
    # A ramp over the token columns: with align_corners=False, pixel p of an 8x upsampling samples
    # token coordinate (p + 0.5) / 8 - 0.5, i.e. each token sits at the centre of its 8-pixel cell.
    tokens = torch.arange(28, dtype=torch.float32).repeat(28, 1)[None, None]
    pixels = upsample_patch_features(tokens, 224)
    assert pixels.shape == (1, 1, 224, 224)
    p = torch.arange(224, dtype=torch.float32)
    expected = ((p + 0.5) / 8 - 0.5).clamp(0, 27)
    torch.testing.assert_close(pixels[0, 0, 100], expected)
    same = torch.randn(1, 4, 28, 28)
    assert upsample_patch_features(same, 28) is same


def test_farthest_point_sample_matches_reference_and_ignores_padding():
    rng = np.random.default_rng(1)
    clouds = rng.normal(size=(2, 300, 3)).astype(np.float32)
    chosen = farthest_point_sample(torch.from_numpy(clouds), 40)
    assert chosen.shape == (2, 40)
    for item in range(2):
        assert chosen[item].tolist() == _fps_reference(clouds[item].astype(np.float64), 40)

    # Item 1 padded after 120 points with far-away junk: padding must never be chosen.
    padded = clouds.copy()
    padded[1, 120:] = 1e3
    valid = np.ones((2, 300), bool)
    valid[1, 120:] = False
    chosen = farthest_point_sample(torch.from_numpy(padded), 40, torch.from_numpy(valid))
    assert chosen[0].tolist() == _fps_reference(clouds[0].astype(np.float64), 40)
    assert chosen[1].tolist() == _fps_reference(clouds[1, :120].astype(np.float64), 40)

    with pytest.raises(ValueError, match="samples"):
        farthest_point_sample(torch.from_numpy(padded), 121, torch.from_numpy(valid))


def test_nearest_neighbours_exact_and_masked():
    rng = np.random.default_rng(2)
    points = rng.normal(size=(2, 200, 3)).astype(np.float32)
    query = rng.normal(size=(2, 37, 3)).astype(np.float32)
    valid = rng.random((2, 200)) > 0.25
    dist2, index = nearest_neighbours(torch.from_numpy(query), torch.from_numpy(points), 5,
                                      torch.from_numpy(valid), chunk=8)
    assert dist2.shape == index.shape == (2, 37, 5)
    for item in range(2):
        candidates = np.flatnonzero(valid[item])
        d2 = ((query[item, :, None].astype(np.float64) - points[item, candidates]) ** 2).sum(-1)
        order = np.argsort(d2, axis=1)[:, :5]
        np.testing.assert_array_equal(index[item].numpy(), candidates[order])
        np.testing.assert_allclose(dist2[item].numpy(), np.take_along_axis(d2, order, 1), rtol=1e-5)
    # Exact distances even far from the origin, where |a|^2 + |b|^2 - 2ab would cancel in float32.
    far = torch.tensor([[[0.3, -0.2, 0.65], [0.3002, -0.2, 0.65], [0.3, -0.2001, 0.65]]])
    d2, idx = nearest_neighbours(far[:, :1], far, 3)
    assert idx[0, 0].tolist() == [0, 2, 1]
    torch.testing.assert_close(d2[0, 0], torch.tensor([0.0, 1e-8, 4e-8]), rtol=1e-3, atol=1e-12)


def test_scatter_point_features_raster_order():
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[0, 1, 2] = mask[0, 3, 0] = mask[0, 0, 4] = True
    mask[1, 2, 2] = True
    feats = [torch.tensor([[1.0, -1.0], [2.0, -2.0], [3.0, -3.0]]), torch.tensor([[7.0, 8.0]])]
    grid = scatter_point_features(mask, feats)
    assert grid.shape == (2, 2, 4, 5)
    # Raster order: (0, 4) first, then (1, 2), then (3, 0).
    assert grid[0, :, 0, 4].tolist() == [1.0, -1.0]
    assert grid[0, :, 1, 2].tolist() == [2.0, -2.0]
    assert grid[0, :, 3, 0].tolist() == [3.0, -3.0]
    assert grid[1, :, 2, 2].tolist() == [7.0, 8.0]
    assert int((grid != 0).any(dim=1).sum()) == 4

    padded = torch.zeros(2, 3, 2)
    padded[0] = feats[0]
    padded[1, 0] = feats[1][0]
    torch.testing.assert_close(scatter_point_features(mask, padded), grid)
    with pytest.raises(ValueError, match="valid pixels"):
        scatter_point_features(mask, [feats[0][:2], feats[1]])


def test_feature_valid_mask_uses_any_nonzero_channel():
    grid = torch.zeros(1, 3, 2, 2)
    grid[0, :, 0, 0] = torch.tensor([1.0, -1.0, 0.0])  # sums to zero, still a feature
    grid[0, 2, 1, 1] = 1e-30
    assert feature_valid_mask(grid).tolist() == [[[True, False], [False, True]]]
