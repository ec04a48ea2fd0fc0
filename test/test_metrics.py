"""Metrics against independent references: sklearn for AUROC, slow loops for the PRO curve."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

from mafr_ros.errors import InputError
from mafr_ros.metrics import (
    DEFAULT_LIMITS,
    ClassMetrics,
    aupro,
    aupro_at,
    compute_class_metrics,
    image_auroc,
    normalised_area,
    pixel_auroc,
    pro_curve,
    roc_curve_points,
)

LIMITS = (1.0, 0.3, 0.1, 0.05, 0.01)


# --------------------------------------------------------------------------------------------------
# Slow, obviously-correct references
# --------------------------------------------------------------------------------------------------
def _regions_of(gts):
    """One boolean mask per (image, 8-connected region)."""
    regions = []
    for i, gt in enumerate(gts):
        labelled, count = ndimage.label(np.asarray(gt) != 0, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    return regions


def brute_force_points(maps, gts, thresholds):
    """(fpr, pro) at each threshold, flagging score >= t, by direct counting."""
    regions = _regions_of(gts)
    n_ok = sum(int(np.count_nonzero(np.asarray(g) == 0)) for g in gts)
    points = []
    for t in thresholds:
        false_pos = sum(int(np.count_nonzero((np.asarray(m) >= t) & (np.asarray(g) == 0)))
                        for m, g in zip(maps, gts))
        overlaps = [np.count_nonzero(np.asarray(maps[i])[mask] >= t) / np.count_nonzero(mask)
                    for i, mask in regions]
        points.append((false_pos / n_ok, sum(overlaps) / len(overlaps)))
    return points


def integrate_points(points, limit):
    """Trapezoid under a polyline up to ``limit``, segment by segment, divided by the limit."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_at) / 2
    return area / limit


def brute_force_aupro(maps, gts, fpr_limit, thresholds):
    """AU-PRO from the operating points at ``thresholds`` (plus 'nothing flagged')."""
    ordered = [math.inf] + sorted(set(float(t) for t in thresholds), reverse=True)
    return integrate_points(brute_force_points(maps, gts, ordered), fpr_limit)


def reference_99_aupro(maps, gts, fpr_limit, num_thresholds=99):
    """Transcription of the reference's sampled PRO (§9) with explicit loops."""
    regions = _regions_of(gts)
    ok_scores = np.sort(np.concatenate([np.asarray(m)[np.asarray(g) == 0] for m, g in zip(maps, gts)]))
    n_ok = ok_scores.size
    fprs, pros = [1.0], [1.0]
    for rank in np.linspace(0, n_ok - 1, num=num_thresholds).astype(int):
        t = ok_scores[rank]
        fprs.append(1.0 - (rank + 1) / n_ok)
        pros.append(sum(np.count_nonzero(np.asarray(maps[i])[mask] > t) / np.count_nonzero(mask)
                        for i, mask in regions) / len(regions))
    return integrate_points(list(zip(fprs[::-1], pros[::-1])), fpr_limit)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def random_case(seed, levels=None):
    """Maps of different sizes with several defect regions each, plus defect-free images.

    ``levels`` quantises the scores so that many pixels tie (inside and across OK/region pixels).
    """
    rng = np.random.default_rng(seed)
    sizes = [(12, 15), (9, 9), (20, 7), (16, 16), (10, 13)]
    maps, gts = [], []
    for k, (h, w) in enumerate(sizes):
        gt = np.zeros((h, w), dtype=np.uint8)
        if k % 2 == 0:  # images 1 and 3 stay defect-free
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, h), rng.integers(0, w)
                gt[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = 255
            gt[rng.random((h, w)) < 0.05] = 253  # scattered pixels: isolated and diagonal regions
        score = rng.random((h, w)) + 0.6 * (gt > 0) * rng.random((h, w))
        if levels:
            score = np.round(score * levels) / levels
        maps.append(score)
        gts.append(gt)
    return maps, gts


def blob_case(seed, n=30, size=128, positives=0.5):
    """Larger realistic maps: smooth blobs as defects, noisy scores that mostly rise on them."""
    rng = np.random.default_rng(seed)
    gts = np.zeros((n, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(int(n * positives)):
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(3, 15)
            gts[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 255
    maps = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 2, 2)) + 0.05 * (gts > 0)
    return maps.astype(np.float32), gts


# --------------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + 0.7 * labels, 1)  # ~60 distinct values: many ties
    assert np.unique(scores).size < 100
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(scores, labels.astype(bool)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_known_values():
    assert image_auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert image_auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert image_auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn_on_maps_of_different_sizes(seed):
    maps, gts = random_case(seed, levels=8)
    flat_scores = np.concatenate([m.ravel() for m in maps])
    flat_labels = np.concatenate([g.ravel() != 0 for g in gts])
    assert pixel_auroc(maps, gts) == pytest.approx(roc_auc_score(flat_labels, flat_scores), abs=1e-12)


def test_pixel_auroc_stacked_equals_list_and_keeps_float32():
    maps, gts = blob_case(1, n=8, size=64)
    expected = roc_auc_score((gts > 0).ravel(), maps.ravel())
    assert pixel_auroc(maps, gts) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(list(maps), list(gts)) == pytest.approx(expected, abs=1e-12)


def test_auroc_single_class_is_a_clear_value_error():
    with pytest.raises(ValueError, match="both classes.*no defective"):
        image_auroc([0.1, 0.4, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="both classes.*no good"):
        image_auroc([0.1, 0.4, 0.3], [1, 1, 1])
    with pytest.raises(InputError, match="no defective"):
        pixel_auroc(np.random.default_rng(0).random((2, 8, 8)), np.zeros((2, 8, 8), np.uint8))


def test_malformed_inputs_are_rejected():
    with pytest.raises(InputError, match="NaN or infinite"):
        image_auroc([0.1, np.nan, 0.3], [0, 1, 1])
    with pytest.raises(InputError, match="0 \\(good\\) or 1"):
        image_auroc([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(InputError, match="expected 3 labels"):
        image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(InputError, match="differ in size"):
        pixel_auroc([np.zeros((4, 4))], [np.zeros((4, 5))])
    with pytest.raises(InputError, match="2 anomaly maps but 1"):
        pixel_auroc([np.zeros((4, 4))] * 2, [np.zeros((4, 4))])


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_points_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 120)
    scores = np.round(rng.random(120) + 0.3 * labels, 2)
    fpr, tpr, thr = roc_curve_points(scores, labels)
    ref_fpr, ref_tpr, ref_thr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    np.testing.assert_array_equal(thr[1:], ref_thr[1:])
    assert thr[0] == np.inf and np.trapezoid(tpr, fpr) == pytest.approx(image_auroc(scores, labels))


# --------------------------------------------------------------------------------------------------
# PRO curve and AU-PRO
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,levels", [(0, 6), (1, 10), (2, None), (3, 4)])
def test_exact_curve_matches_brute_force_at_every_distinct_score(seed, levels):
    maps, gts = random_case(seed, levels)
    distinct = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    expected = brute_force_points(maps, gts, distinct)

    full = pro_curve(maps, gts, all_points=True)
    np.testing.assert_array_equal(full.thresholds, np.concatenate(([np.inf], distinct)))
    np.testing.assert_allclose(full.fpr, [0.0] + [p[0] for p in expected], rtol=0, atol=1e-12)
    np.testing.assert_allclose(full.pro, [0.0] + [p[1] for p in expected], rtol=0, atol=1e-12)
    assert full.n_regions == len(_regions_of(gts)) and full.exact

    # The default (corner) curve is the same piecewise-linear function: equal areas up to any
    # limit, including every brute-force FPR value, and its thresholds reproduce its points.
    corners = pro_curve(maps, gts)
    assert corners.fpr.size <= full.fpr.size
    polyline = [(0.0, 0.0)] + expected  # brute-force points, (0, 0) = nothing flagged
    assert brute_force_points(maps, gts, [math.inf]) == [(0.0, 0.0)]
    for limit in set(LIMITS) | {p[0] for p in expected if p[0] > 0}:
        reference = integrate_points(polyline, limit)
        assert corners.area(limit) == pytest.approx(reference, abs=1e-9)
        assert full.area(limit) == pytest.approx(reference, abs=1e-9)
    at_thresholds = brute_force_points(maps, gts, corners.thresholds[1:])
    np.testing.assert_allclose(corners.fpr[1:], [p[0] for p in at_thresholds], atol=1e-12)
    np.testing.assert_allclose(corners.pro[1:], [p[1] for p in at_thresholds], atol=1e-12)


def test_eight_connectivity_and_per_image_regions():
    gt = np.zeros((6, 6), np.uint8)
    gt[0, 0] = gt[1, 1] = 1       # diagonal neighbours: one region
    gt[3, 3] = gt[5, 4] = 1       # a knight's move apart: two regions
    assert pro_curve([np.zeros((6, 6))], [gt]).n_regions == 3
    # Touching edges of two images never merge.
    left, right = np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
    left[:, -1] = 255
    right[:, 0] = 255
    curve = pro_curve(np.zeros((2, 4, 4)), np.stack([left, right]))
    assert curve.n_regions == 2 and curve.n_ok_pixels == 24


def test_region_weighting_is_per_region_not_per_pixel():
    # A big region fully detected and a small one missed: PRO = 0.5 whatever their sizes.
    gt = np.zeros((20, 20), np.uint8)
    gt[:10, :10] = 1
    gt[15, 15] = 1
    score = np.zeros((20, 20))
    score[:10, :10] = 1.0
    curve = pro_curve([score], [gt])
    assert curve.pro[curve.thresholds == 1.0] == pytest.approx(0.5)
    # Then every other pixel switches at once: a straight line from (0, 0.5) to (1, 1).
    assert aupro([score], [gt], 0.3) == pytest.approx(0.5 + 0.5 * 0.3 / 2)


def test_perfect_inverted_and_constant_maps():
    _, gts = random_case(7)
    perfect = [(g != 0).astype(float) for g in gts]
    inverted = [1.0 - p for p in perfect]
    constant = [np.full(g.shape, 0.25) for g in gts]
    for limit in DEFAULT_LIMITS:
        assert aupro(perfect, gts, limit) == pytest.approx(1.0, abs=1e-12)
        assert aupro(perfect, gts, limit, num_thresholds=99) == pytest.approx(1.0, abs=1e-12)
        assert aupro(inverted, gts, limit) == pytest.approx(0.0, abs=1e-12)
        assert aupro(inverted, gts, limit, num_thresholds=99) == pytest.approx(0.0, abs=1e-12)
        # All pixels switch together: the curve is the diagonal, whose normalised area is limit/2.
        assert aupro(constant, gts, limit) == pytest.approx(limit / 2, abs=1e-12)
        # The reference's rank-based FPR ignores ties: a constant map scores 0 there (§9 caveat).
        assert aupro(constant, gts, limit, num_thresholds=99) == pytest.approx(0.0, abs=1e-12)
    curve = pro_curve(perfect, gts)
    assert (curve.fpr[0], curve.pro[0], curve.fpr[-1], curve.pro[-1]) == (0.0, 0.0, 1.0, 1.0)


@pytest.mark.parametrize("seed,levels", [(0, 5), (4, None)])
def test_99_threshold_mode_reproduces_the_reference_procedure(seed, levels):
    maps, gts = random_case(seed, levels)
    for n in (99, 10):
        curve = pro_curve(maps, gts, num_thresholds=n)
        assert not curve.exact and curve.fpr.size == n + 1
        for limit in LIMITS:
            assert curve.area(limit) == pytest.approx(reference_99_aupro(maps, gts, limit, n), abs=1e-12)


def test_99_threshold_mode_is_close_to_exact_on_large_continuous_maps():
    maps, gts = blob_case(3, n=30, size=128)
    exact = aupro_at(maps, gts)
    sampled = aupro_at(maps, gts, num_thresholds=99)
    assert 0.05 < exact[0.3] < 0.95  # a non-trivial curve
    assert abs(exact[0.3] - sampled[0.3]) < 0.005
    assert abs(exact[0.01] - sampled[0.01]) < 0.05  # 99 samples put ~1 point below FPR 1 %


def test_aupro_at_gives_one_value_per_limit_from_one_curve():
    maps, gts = random_case(5, levels=20)
    values = aupro_at(maps, gts, limits=(0.3, 0.1, 0.05, 0.01))
    assert list(values) == [0.3, 0.1, 0.05, 0.01]
    for limit, value in values.items():
        assert value == aupro(maps, gts, limit) and 0.0 <= value <= 1.0
        assert isinstance(value, float)


def test_large_batch_corners_equal_all_points():
    """100 maps of 400x400 (16 M pixels): the compact curve equals the per-score one."""
    rng = np.random.default_rng(11)
    gts = np.zeros((100, 400, 400), np.uint8)
    for i in range(50):
        y, x, r = *rng.integers(30, 370, 2), rng.integers(4, 30)
        gts[i, y - r:y + r, x - r:x + r] = 255
    maps = rng.random((100, 400, 400), dtype=np.float32)
    maps += 0.3 * (gts > 0)
    corners = pro_curve(maps, gts)
    full = pro_curve(maps, gts, all_points=True)
    assert corners.fpr.size < full.fpr.size / 20
    for limit in DEFAULT_LIMITS:
        assert corners.area(limit) == pytest.approx(full.area(limit), abs=1e-9)


def test_pro_input_errors():
    maps = np.random.default_rng(0).random((2, 5, 5))
    with pytest.raises(InputError, match="at least one defect region"):
        aupro(maps, np.zeros((2, 5, 5)))
    with pytest.raises(InputError, match="OK"):
        aupro(maps, np.ones((2, 5, 5)))
    gts = np.zeros((2, 5, 5))
    gts[0, 2, 2] = 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InputError, match="fpr_limit"):
            aupro(maps, gts, bad)
    with pytest.raises(InputError, match="num_thresholds"):
        aupro(maps, gts, 0.3, num_thresholds=0)
    with pytest.raises(InputError, match="start at FPR 0"):
        normalised_area(np.array([0.1, 1.0]), np.array([0.0, 1.0]), 0.3)


def test_real_mvtec_masks_exact_against_brute_force(cable_gland):
    """The 15 cable_gland test masks (real defect shapes, 224x224 like the reference) with a
    quantised synthetic score that is high near the defects."""
    rng = np.random.default_rng(0)
    maps, gts = [], []
    for path in sorted((cable_gland / "test").glob("*/gt/*.png")):
        mask = np.asarray(Image.open(path).resize((224, 224), Image.Resampling.NEAREST)) > 0
        smooth = ndimage.gaussian_filter(mask.astype(float), 4) + 0.3 * rng.random(mask.shape)
        maps.append(np.round(smooth * 12) / 12)
        gts.append(mask)
    assert len(gts) == 15 and sum(g.any() for g in gts) == 12
    distinct = np.unique(np.concatenate([m.ravel() for m in maps]))
    values = aupro_at(maps, gts, limits=LIMITS)
    for limit in LIMITS:
        assert values[limit] == pytest.approx(brute_force_aupro(maps, gts, limit, distinct), abs=1e-9)
    assert pixel_auroc(maps, gts) == pytest.approx(
        roc_auc_score(np.concatenate([g.ravel() for g in gts]), np.concatenate([m.ravel() for m in maps])),
        abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Per-class summary
# --------------------------------------------------------------------------------------------------
def test_compute_class_metrics_and_round_trip():
    maps, gts = random_case(2, levels=10)
    labels = np.array([g.any() for g in gts], dtype=int)
    image_scores = np.array([m.max() for m in maps])
    result = compute_class_metrics("cable_gland", image_scores, labels, maps, gts)
    assert result.i_auroc == image_auroc(image_scores, labels)
    assert result.p_auroc == pixel_auroc(maps, gts)
    assert result.aupro == aupro_at(maps, gts)
    assert (result.n_good, result.n_defect) == (2, 3)
    assert result.n_regions == len(_regions_of(gts))
    assert result.aupro_value(0.3) == result.aupro[0.3] and math.isnan(result.aupro_value(0.2))
    back = ClassMetrics.from_dict(result.to_dict())
    assert back == result
