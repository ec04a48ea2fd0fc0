"""Scoring option ``erode`` (the image score leaves the silhouette band out), its CLI flags, and
the pseudo-defect generator used to choose scoring options without a test set (issue 3)."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from mafr_ros.cli import build_parser
from mafr_ros.core.detector import Detector
from mafr_ros.core.scoring import (ScoringConfig, anomaly_maps, erode_mask, fuse_maps,
                                   image_score, score_map, smooth_maps)
from mafr_ros.data.preprocess import GridFrame, IMAGENET_MEAN, IMAGENET_STD, ModelInput
from mafr_ros.data.pseudo_defects import ALL_KINDS, PseudoDefectConfig, add_pseudo_defect


def _blob_mask(seed=0, size=48):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    m = np.hypot(yy - size / 2, xx - size / 2) < size / 3
    m &= rng.random((size, size)) > 0.02  # a few holes inside
    return m


@pytest.mark.parametrize("radius", [1, 2.5, 4])
def test_erode_mask_matches_the_euclidean_distance_transform(radius):
    masks = np.stack([_blob_mask(0), _blob_mask(1)])
    out = erode_mask(torch.from_numpy(masks), radius).numpy()
    # pad with "outside" so that the image border counts as outside, as documented
    expected = np.stack([ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1] > radius
                         for m in masks])
    np.testing.assert_array_equal(out, expected & masks)


def test_erode_zero_is_the_identity_and_negative_is_refused():
    m = torch.from_numpy(_blob_mask()[None])
    assert torch.equal(erode_mask(m, 0), m)
    with pytest.raises(ValueError, match="erode"):
        ScoringConfig(erode=-1)
    with pytest.raises(ValueError, match="B, H, W"):
        erode_mask(m[0], 2)


def test_erode_pixels_at_the_image_border_are_removed():
    m = torch.ones(1, 10, 10, dtype=torch.bool)
    out = erode_mask(m, 1)
    assert not out[0, 0].any() and not out[0, :, -1].any() and out[0, 1:-1, 1:-1].all()


def test_erode_changes_the_image_score_not_the_map():
    torch.manual_seed(0)
    f2, f3 = torch.randn(2, 5, 40, 40), torch.randn(2, 4, 40, 40)
    h2, h3 = f2 + 0.1 * torch.randn_like(f2), f3 + 0.1 * torch.randn_like(f3)
    mask = torch.from_numpy(np.stack([_blob_mask(0, 40), _blob_mask(1, 40)]))
    # a huge error right at the silhouette: it decides the score unless eroded
    edge = mask & ~erode_mask(mask, 1)
    ys, xs = torch.nonzero(edge[0], as_tuple=True)
    h2[0, :, ys[0], xs[0]] += 50.0
    for smoothing in ("none", "gaussian"):
        cfg0 = ScoringConfig(smoothing=smoothing, image_score="max")
        cfg3 = ScoringConfig(smoothing=smoothing, image_score="max", erode=3)
        maps0, s0 = anomaly_maps(f2, h2, f3, h3, mask, cfg0)
        maps3, s3 = anomaly_maps(f2, h2, f3, h3, mask, cfg3)
        assert torch.equal(maps0, maps3)  # the published map keeps the border
        assert s0[0] > 3 * s3[0]
        r2 = torch.linalg.vector_norm(h2 - f2, dim=1)
        r3 = torch.linalg.vector_norm(h3 - f3, dim=1)
        inner = smooth_maps(fuse_maps(r2, r3, "product", erode_mask(mask, 3)), cfg3)
        assert torch.allclose(s3, image_score(inner, "max"))
        assert score_map(maps0, r2, r3, mask, cfg0) is maps0  # erode 0: no second map


def test_detector_applies_erode_like_the_scoring_module():
    cfg = ScoringConfig(erode=4.0)
    det = Detector.build("lite", scoring_cfg=cfg)
    plain = Detector.build("lite")
    size = det.preprocess_cfg.grid
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    inside = np.hypot(yy - size / 2, xx - size / 2) < size / 4
    z = 0.3 + 0.002 * np.sin(xx / 5) * inside
    xyz = np.stack([(xx - size / 2) * 4e-4, (yy - size / 2) * 4e-4, z]) * inside
    xyz = xyz.astype(np.float32)
    rng = np.random.default_rng(0)
    rgb = rng.standard_normal((3, size, size)).astype(np.float32)
    item = ModelInput(rgb=rgb, xyz=xyz, valid=inside, frame=GridFrame.for_shape(size, size, size))
    maps, scores = det.score_inputs([item])
    plain.heads.load_state_dict(det.heads.state_dict())
    maps0, scores0 = plain.score_inputs([item])
    assert torch.equal(maps, maps0)
    f2d, f3d, mask = det.extract(torch.from_numpy(rgb[None]), torch.from_numpy(xyz[None]))
    r2d, r3d = det.error_maps(f2d, f3d, mask)
    expected = image_score(smooth_maps(fuse_maps(r2d, r3d, "product", erode_mask(mask, 4.0)), cfg))
    assert torch.allclose(scores, expected) and not torch.allclose(scores, scores0)
    # the metadata of a detector records the option, and metadata without it still loads
    assert det.metadata["scoring"]["erode"] == 4.0
    legacy = dict(det.metadata["scoring"])
    legacy.pop("erode")
    assert ScoringConfig.from_dict(legacy).erode == 0.0


def test_cli_train_scoring_flags():
    args = build_parser().parse_args(["train", "--dataset", "d", "--category", "c", "--out", "o",
                                      "--erode", "4", "--image-score", "max"])
    assert args.erode == 4.0 and args.image_score == "max"
    args = build_parser().parse_args(["train", "--dataset", "d", "--category", "c", "--out", "o"])
    assert args.erode is None and args.image_score is None


def test_cli_train_scoring_flags_reach_the_training_config(monkeypatch):
    from mafr_ros import cli

    class Stop(Exception):
        pass

    def fake_train(root, category, out, cfg):
        raise Stop(cfg)

    monkeypatch.setattr("mafr_ros.train.train", fake_train)
    base = ["train", "--dataset", "d", "--category", "c", "--out", "o"]
    with pytest.raises(Stop) as info:
        cli._cmd_train(build_parser().parse_args(base + ["--erode", "4", "--image-score", "max",
                                                         "--fusion", "sum"]))
    scoring = info.value.args[0].scoring
    assert (scoring.erode, scoring.image_score, scoring.fusion) == (4.0, "max", "sum")
    with pytest.raises(Stop) as info:
        cli._cmd_train(build_parser().parse_args(base))
    assert info.value.args[0].scoring == ScoringConfig()
    with pytest.raises(SystemExit, match="erode must be >= 0"):
        cli._cmd_train(build_parser().parse_args(base + ["--erode", "-1"]))


# -- pseudo-defects ----------------------------------------------------------------------------
def _part(size=96, seed=0):
    """A dome-shaped part, 0.3 mm per grid pixel, on the ImageNet-normalised grey image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.hypot(yy - size / 2, xx - size / 2)
    valid = r < size * 0.4
    x, y = (xx - size / 2) * 3e-4, (yy - size / 2) * 3e-4
    z = 0.4 - 0.004 * np.cos(r / size * math.pi)
    xyz = (np.stack([x, y, z]) * valid).astype(np.float32)
    grey = 0.5 + 0.02 * rng.standard_normal((size, size)).astype(np.float32)
    rgb = ((np.stack([grey] * 3) - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None])
    return ModelInput(rgb=rgb.astype(np.float32), xyz=xyz, valid=valid,
                      frame=GridFrame.for_shape(size, size, size))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_pseudo_defect_changes_only_its_region(kind):
    base = _part()
    out, mask = add_pseudo_defect(base, kind, np.random.default_rng(3))
    assert mask.any() and not (mask & ~base.valid).any()
    np.testing.assert_array_equal(out.valid, base.valid)
    dz = np.abs(out.xyz[2] - base.xyz[2]) * 1000  # mm
    drgb = np.abs(out.rgb - base.rgb).max(axis=0)
    assert np.array_equal(out.xyz[:2], base.xyz[:2])
    assert (out.xyz[:, ~base.valid] == 0).all()
    far = ~ndimage.binary_dilation(mask, iterations=4)
    assert dz[far].max() < 1e-6 and drgb[far].max() < 1e-5
    if kind == "stain":
        assert dz.max() == 0 and drgb[mask].max() > 0.1
    elif kind == "scratches":
        # shallow grooves, several separate lines (not one band), darker than their surroundings
        assert 0.1 <= dz[mask].max() <= 0.4 + 1e-3
        assert ndimage.label(dz > 0.5 * dz.max())[1] >= 2
        assert (out.rgb - base.rgb).mean(axis=0)[dz > 0.5 * dz.max()].mean() < -0.05
    else:
        assert dz[mask].max() > 0.5
    if kind == "bump":
        assert (out.xyz[2] - base.xyz[2])[mask].max() < 0  # towards the camera
    elif kind != "stain":
        assert (out.xyz[2] - base.xyz[2])[mask].min() > 0
    assert not np.shares_memory(out.xyz, base.xyz) and not np.shares_memory(out.rgb, base.rgb)


def test_pseudo_defects_are_seeded_and_stay_inside_unless_asked():
    base = _part()
    a = add_pseudo_defect(base, "dent", np.random.default_rng(7))
    b = add_pseudo_defect(base, "dent", np.random.default_rng(7))
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0].xyz, b[0].xyz)
    inner = ndimage.distance_transform_edt(base.valid)
    for seed in range(10):
        _, m = add_pseudo_defect(base, "dent", np.random.default_rng(seed))
        assert inner[m].min() > 2.0 / 0.3 - 1  # margin_mm at 0.3 mm per pixel
    near = 0
    for seed in range(20):
        _, m = add_pseudo_defect(base, "dent", np.random.default_rng(seed),
                                 PseudoDefectConfig(inside=False))
        near += int(inner[m].min() <= 2)
    assert near > 0
    with pytest.raises(ValueError, match="kind"):
        add_pseudo_defect(base, "scratchy", np.random.default_rng(0))
