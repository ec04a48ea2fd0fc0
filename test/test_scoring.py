"""Anomaly maps, smoothing, image scores, threshold calibration and score normalisation."""
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from mafr_ros.core.scoring import (ScoringConfig, Thresholds, anomaly_maps, box_cascade_smooth,
                                   calibrate_pixel_threshold, calibrate_threshold,
                                   expected_false_positive_rate, fuse_maps, gaussian_smooth,
                                   image_score, nonempty_feature_mask, normalize_score,
                                   restoration_errors, score_scale)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def test_restoration_errors_are_per_pixel_l2(rng):
    f, g = rng.standard_normal((2, 7, 5, 6)), rng.standard_normal((2, 7, 5, 6))
    got = restoration_errors(torch.from_numpy(f), torch.from_numpy(g))
    np.testing.assert_allclose(got.numpy(), np.sqrt(((f - g) ** 2).sum(1)), rtol=1e-12)
    tokens = restoration_errors(torch.from_numpy(f[0].reshape(7, -1).T),
                                torch.from_numpy(g[0].reshape(7, -1).T))
    np.testing.assert_allclose(tokens.numpy(), got[0].numpy().ravel(), rtol=1e-12)


def test_fusion_modes_and_zeroing(rng):
    a, b = np.abs(rng.standard_normal((2, 6, 6))), np.abs(rng.standard_normal((2, 6, 6)))
    mask = rng.random((2, 6, 6)) > 0.4
    ta, tb, tm = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(mask)
    for mode, want in (("product", a * b), ("sum", a + b), ("max", np.maximum(a, b))):
        np.testing.assert_array_equal(fuse_maps(ta, tb, mode).numpy(), want)
        np.testing.assert_array_equal(fuse_maps(ta, tb, mode, tm).numpy(), np.where(mask, want, 0.0))
    with pytest.raises(ValueError, match="fusion mode"):
        fuse_maps(ta, tb, "mean")


def test_nonempty_mask_is_not_fooled_by_a_zero_sum():
    f3d = torch.zeros(1, 3, 2, 2)
    f3d[0, :, 0, 0] = torch.tensor([1.0, -1.0, 0.0])  # sums to 0 but is a real feature
    f3d[0, 1, 1, 1] = 2.0
    assert nonempty_feature_mask(f3d).tolist() == [[[True, False], [False, True]]]


@pytest.mark.parametrize("padding", ["reflect", "nearest", "constant"])
@pytest.mark.parametrize("shape, sigma", [((2, 40, 33), 4.0), ((1, 8, 6), 4.0), ((1, 30, 30), 1.3)])
def test_gaussian_matches_scipy(rng, padding, shape, sigma):
    maps = rng.random(shape)
    got = gaussian_smooth(torch.from_numpy(maps), sigma, truncate=3.0, padding=padding).numpy()
    want = np.stack([ndimage.gaussian_filter(m, sigma, mode=padding, truncate=3.0) for m in maps])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_box_cascade_matches_scipy_and_a_gaussian_of_sigma_4_69(rng):
    maps = rng.random((2, 64, 64))
    want = maps.copy()
    for size, passes in ((5, 5), (7, 3)):
        for _ in range(passes):
            want = ndimage.uniform_filter(want, size=(1, size, size), mode="constant")
    np.testing.assert_allclose(box_cascade_smooth(torch.from_numpy(maps)).numpy(), want,
                               rtol=1e-10, atol=1e-12)
    impulse = torch.zeros(1, 81, 81, dtype=torch.float64)
    impulse[0, 40, 40] = 1.0
    response = box_cascade_smooth(impulse)[0, 40].numpy()
    variance = (response / response.sum() * (np.arange(81) - 40) ** 2).sum()
    assert variance == pytest.approx(22.0)  # 5 * (25-1)/12 + 3 * (49-1)/12


def test_image_scores_match_numpy(rng):
    maps = np.abs(rng.standard_normal((3, 20, 20)))
    maps[maps < 0.5] = 0.0
    maps[2] = 0.0
    t = torch.from_numpy(maps)
    nonzero_means = [m[m != 0].mean() if (m != 0).any() else np.nan for m in maps]
    want_ref = [m.max() / np.sqrt(mu) if (m != 0).any() else 0.0 for m, mu in zip(maps, nonzero_means)]
    np.testing.assert_allclose(image_score(t, "reference").numpy(), want_ref, rtol=1e-12)
    np.testing.assert_allclose(image_score(t, "max").numpy(), maps.reshape(3, -1).max(1))
    k = int(np.ceil(0.01 * 400))
    want_topk = np.sort(maps.reshape(3, -1), axis=1)[:, -k:].mean(1)
    np.testing.assert_allclose(image_score(t, "topk", 0.01).numpy(), want_topk, rtol=1e-12)
    assert image_score(t, "topk", 1e-9).tolist() == image_score(t, "max").tolist()


def test_calibrated_threshold_achieves_the_target_fpr():
    # Expected FPR on new good parts = (k + 1) / (n + 1) for the chosen order statistic: check it
    # with the exact normal tail over many independent calibration sets.
    rng = np.random.default_rng(1)
    n, target = 1999, 0.01
    thresholds = np.array([calibrate_threshold(rng.standard_normal(n), target) for _ in range(300)])
    true_fpr = stats.norm.sf(thresholds)
    assert true_fpr.mean() == pytest.approx(target, abs=6e-4)
    assert expected_false_positive_rate(n, target) == pytest.approx(0.01)
    scores = rng.standard_normal(n)
    t = calibrate_threshold(scores, target)
    assert (scores > t).mean() <= target
    # Few samples: nothing can guarantee 1 %, the rule falls back to the maximum.
    few = rng.standard_normal(10)
    assert calibrate_threshold(few, target) == few.max()
    assert expected_false_positive_rate(10, target) == pytest.approx(1 / 11)
    with pytest.raises(ValueError, match="NaN"):
        calibrate_threshold([0.1, float("nan")], target)
    with pytest.raises(ValueError, match="zero good scores"):
        calibrate_threshold([], target)


def test_pixel_threshold_uses_masked_pixels_and_subsamples():
    rng = np.random.default_rng(2)
    maps = rng.standard_normal((20, 64, 64)).astype(np.float32)
    mask = rng.random(maps.shape) > 0.5
    maps[~mask] = -100.0  # background values that must not count
    t = calibrate_pixel_threshold(torch.from_numpy(maps), 0.01, torch.from_numpy(mask))
    assert t == calibrate_threshold(maps[mask], 0.01)
    assert abs(calibrate_pixel_threshold(maps, 0.01, mask) - t) == 0.0  # NumPy inputs too
    sub = calibrate_pixel_threshold(maps, 0.01, mask, max_pixels=20_000)
    assert sub != t and abs(stats.norm.sf(sub) - 0.01) < 0.002


def test_normalized_score_is_monotone_with_half_at_threshold():
    rng = np.random.default_rng(3)
    good = rng.gamma(2.0, 1.0, 500)
    threshold = calibrate_threshold(good, 0.02)
    scale = score_scale(good, threshold)
    assert normalize_score(threshold, threshold, scale) == 0.5
    assert normalize_score(float(np.median(good)), threshold, scale) == pytest.approx(0.1)
    assert float(normalize_score(torch.tensor(threshold, dtype=torch.float64), threshold, scale)) == 0.5
    grid = np.linspace(-1e4, 1e4, 20001)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings at extreme scores
        values = normalize_score(grid, threshold, scale)
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert np.all(np.diff(values) >= 0)
    middle = normalize_score(np.linspace(threshold - 3 * scale, threshold + 3 * scale, 101), threshold, scale)
    assert np.all(np.diff(middle) > 0)
    as_tensor = normalize_score(torch.from_numpy(grid), threshold, scale).numpy()
    np.testing.assert_allclose(as_tensor, values, atol=1e-12)
    # Degenerate good scores still give a usable (positive) scale.
    assert score_scale(np.ones(10), 1.0) > 0


def test_thresholds_and_config_round_trip():
    rng = np.random.default_rng(4)
    maps = torch.from_numpy(np.abs(rng.standard_normal((30, 16, 16))))
    scores = image_score(maps, "reference")
    th = Thresholds.calibrate(scores, maps, target_fpr=0.05)
    assert (scores > th.image).float().mean() <= 0.05
    assert float(th.normalize_image(torch.tensor(th.image, dtype=scores.dtype))) == 0.5
    assert th.normalize_pixel(th.pixel) == 0.5 and th.num_good_images == 30
    assert Thresholds.from_dict(th.to_dict()) == th
    cfg = ScoringConfig(image_score="topk", topk_fraction=0.01, padding="constant")
    assert ScoringConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ScoringConfig keys"):
        ScoringConfig.from_dict({"sigmaa": 2})
    with pytest.raises(ValueError, match="fusion"):
        ScoringConfig(fusion="mean")


def test_anomaly_maps_compose_the_reference_pipeline():
    rng = np.random.default_rng(5)
    f2d = torch.from_numpy(rng.standard_normal((2, 6, 24, 24)))
    f3d = torch.from_numpy(rng.standard_normal((2, 5, 24, 24)))
    f3d[:, :, :4] = 0.0  # no 3D feature in the top rows
    r2d, r3d = f2d + 0.1 * torch.randn_like(f2d), f3d + 0.1 * torch.randn_like(f3d)
    r3d[:, :, 10:14, 10:14] += 2.0  # a defect that both modalities cannot restore
    r2d[:, :, 10:14, 10:14] += 2.0
    maps, scores = anomaly_maps(f2d, r2d, f3d, r3d, cfg=ScoringConfig.reference())
    fused = np.linalg.norm((r2d - f2d).numpy(), axis=1) * np.linalg.norm((r3d - f3d).numpy(), axis=1)
    fused[:, :4] = 0.0
    want = box_cascade_smooth(torch.from_numpy(fused))
    np.testing.assert_allclose(maps.numpy(), want.numpy(), rtol=1e-12)
    np.testing.assert_allclose(scores.numpy(), image_score(want).numpy(), rtol=1e-12)
    peak = np.unravel_index(maps[0].argmax().item(), (24, 24))
    assert 9 <= peak[0] <= 14 and 9 <= peak[1] <= 14


def test_single_modality_fusion_modes_keep_one_error_and_the_mask():
    from mafr_ros.core.scoring import fuse_maps

    r2d = torch.rand(2, 5, 5) + 0.1
    r3d = torch.rand(2, 5, 5) + 0.1
    mask = torch.rand(2, 5, 5) > 0.3
    assert torch.equal(fuse_maps(r2d, r3d, "2d", mask), torch.where(mask, r2d, torch.zeros(())))
    assert torch.equal(fuse_maps(r2d, r3d, "3d", mask), torch.where(mask, r3d, torch.zeros(())))
    assert torch.equal(fuse_maps(r2d, r3d, "3d"), r3d)
