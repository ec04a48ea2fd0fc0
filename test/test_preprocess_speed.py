"""The fast preprocessing path (the default) gives bit-identical arrays to the original implementation
(method="reference") on the real Kinect frame, every real cable_gland frame, synthetic training
frames and the configuration corners; timings are reported per stage.

Bit-identical, not close: the embedded model and every preprocessing cache were made with the
reference numbers, so any difference would be a silent change of the model's input.
"""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from mafr_ros.data.mvtec import MVTecDataset
from mafr_ros.data.preprocess import (PREPROCESS_VERSION, PreprocessConfig, clean_cloud,
                                      preprocess)
from mafr_ros.data.synthetic import CATEGORIES, render_sample
from mafr_ros.errors import InputError
from mafr_ros.geometry import CameraIntrinsics, depth_to_xyz

KINECT_STEM = "frame_20121214T142255.814212"
KINECT = CameraIntrinsics(fx=525.0, fy=525.0, cx=320.0, cy=240.0, width=640, height=480)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (so -0.0 vs 0.0 or a changed NaN payload would count)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _assert_identical(rgb, xyz, cfg=None) -> np.ndarray:
    """Both methods, both entry points; returns the fast path's kept-pixel mask."""
    ref = preprocess(rgb, xyz, cfg, method="reference")
    new = preprocess(rgb, xyz, cfg)
    assert new.frame == ref.frame
    for field in ("rgb", "xyz", "valid"):
        assert _same_bits(getattr(new, field), getattr(ref, field)), field
    cleaned_ref = clean_cloud(xyz, cfg, method="reference")
    cleaned = clean_cloud(xyz, cfg)
    assert _same_bits(cleaned, cleaned_ref)
    return (cleaned != 0).any(axis=-1)


@pytest.fixture(scope="module")
def kinect(kinect_dir):
    rgb = tifffile.imread(kinect_dir / f"{KINECT_STEM}_rgb.tiff")
    depth = tifffile.imread(kinect_dir / f"{KINECT_STEM}_depth.tiff")
    return np.ascontiguousarray(rgb[..., :3]), depth_to_xyz(depth, KINECT)


@pytest.fixture(scope="module")
def gland_samples(cable_gland):
    return [sample for split in ("train", "validation", "test")
            for sample in MVTecDataset(cable_gland.parent, "cable_gland", split)]


def test_kinect_frame_is_bit_identical(kinect):
    rgb, xyz = kinect
    kept = _assert_identical(rgb, xyz)
    # Not a vacuous comparison: the frame has a large background and a sizeable kept cluster.
    valid = (xyz != 0).any(axis=-1) & np.isfinite(xyz).all(axis=-1)
    assert valid.sum() > 250_000 and 20_000 < kept.sum() < 0.5 * valid.sum()


def test_every_cable_gland_frame_is_bit_identical(gland_samples):
    assert len(gland_samples) == 85
    for index, sample in enumerate(gland_samples):
        # The full-resolution cleaned cloud (foreground mask and values) of every frame ...
        assert _same_bits(clean_cloud(sample.xyz), clean_cloud(sample.xyz, method="reference")), \
            sample.xyz_path
        if index % 10 == 0:  # ... and the model-grid arrays of every tenth (the same pixels, sampled)
            ref = preprocess(sample.rgb, sample.xyz, method="reference")
            new = preprocess(sample.rgb, sample.xyz)
            for field in ("rgb", "xyz", "valid"):
                assert _same_bits(getattr(new, field), getattr(ref, field)), (sample.xyz_path, field)


def test_synthetic_training_frames_are_bit_identical():
    # The embedded model's training distribution (mafr synth), good and defective parts.
    for category in CATEGORIES:
        for defect, seed in (("good", 0), ("dent", 1), ("missing", 2)):
            rgb, xyz, _ = render_sample(category, defect, seed, 256)
            _assert_identical(rgb, xyz)


def test_configuration_corners_are_bit_identical(gland_samples, kinect):
    sample = gland_samples[-1]
    rgb, xyz = sample.rgb, sample.xyz
    _assert_identical(rgb, xyz.astype(np.float64))  # float64 clouds: same float32 casts
    with_nan = xyz.copy()
    with_nan[~(xyz != 0).any(axis=-1)] = np.nan
    with_nan[5, 7] = (np.inf, 0.0, 1.0)
    _assert_identical(rgb, with_nan)
    # Non-contiguous, non-square views: padding on the left/right and on top/bottom.
    _assert_identical(rgb[20:380:2, 50:330], xyz[20:380:2, 50:330])
    _assert_identical(kinect[0][100:400, ::2], kinect[1][100:400, ::2])
    for cfg in (PreprocessConfig(remove_plane=False), PreprocessConfig(cluster=False),
                PreprocessConfig(remove_plane=False, cluster=False), PreprocessConfig(seed=7, border=4),
                PreprocessConfig(grid=112, dbscan_eps=0.004, dbscan_min_points=60),
                PreprocessConfig(plane_ransac_n=5, plane_iterations=50)):
        _assert_identical(rgb, xyz, cfg)
    # Exact DBSCAN (no voxels) on a 100 x 100 subsample; and a frame with no valid point at all.
    _assert_identical(rgb[::4, ::4], xyz[::4, ::4], PreprocessConfig(border=3, cluster_voxel_size=0.0))
    _assert_identical(rgb, np.zeros_like(xyz))


def test_method_and_timings(kinect):
    rgb, xyz = kinect
    with pytest.raises(InputError, match="method must be one of"):
        preprocess(rgb, xyz, method="approximate")
    with pytest.raises(InputError, match="method must be one of"):
        clean_cloud(xyz, method="")
    timings = {}
    preprocess(rgb, xyz, timings=timings)
    assert set(timings) == {"plane", "cluster", "grid"} and all(v > 0 for v in timings.values())
    # Outputs are unchanged, so the cache version (part of every PreprocessCache key) is too.
    assert PREPROCESS_VERSION == 1


def test_degenerate_clouds_are_bit_identical():
    rgb = np.zeros((30, 30, 3), np.uint8)
    one_voxel = np.zeros((30, 30, 3), np.float32)
    one_voxel[5:12, 5:12] = (0.1, 0.1, 1.0)  # 49 points in one voxel: a core unit without pairs
    single = np.zeros((30, 30, 3), np.float32)
    single[5, 5] = (0.1, 0.1, 1.0)  # no core unit at all: nothing is kept
    tie = np.zeros((30, 30, 3), np.float32)
    tie[2:8, 2:8] = (0.1, 0.1, 1.0)
    tie[20:26, 20:26] = (0.5, 0.1, 1.0)  # two equally large clusters: the first unit's wins
    blob = (np.random.default_rng(1).random((30, 30, 3)) * 0.02 + (0, 0, 1)).astype(np.float32)
    for xyz, kept in ((one_voxel, 49), (single, 0), (tie, 36), (blob, None)):
        for cfg in (PreprocessConfig(remove_plane=False), PreprocessConfig(),
                    PreprocessConfig(remove_plane=False, cluster_voxel_size=0.0)):
            mask = _assert_identical(rgb, xyz, cfg)
            if kept is not None:
                assert mask.sum() == kept
    assert _assert_identical(rgb, tie, PreprocessConfig(remove_plane=False))[2:8, 2:8].all()
