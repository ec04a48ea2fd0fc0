"""Depth -> organised cloud and cloud -> pixel grid, checked against the OpenNI driver's own cloud."""
import numpy as np
import open3d as o3d
import pytest
import tifffile

from mafr_ros.errors import InputError
from mafr_ros.geometry import (CameraIntrinsics, depth_to_xyz, project_points_to_grid,
                               valid_mask)

STEM = "frame_20121214T142255.814212"
KINECT = CameraIntrinsics(fx=525.0, fy=525.0, cx=320.0, cy=240.0, width=640, height=480)


@pytest.fixture(scope="module")
def kinect(kinect_dir):
    depth = tifffile.imread(kinect_dir / f"{STEM}_depth.tiff")
    cloud = o3d.t.io.read_point_cloud(str(kinect_dir / f"{STEM}.pcd"), remove_nan_points=False)
    reference = cloud.point.positions.numpy().reshape(480, 640, 3)
    return depth, reference


def test_golden_kinect_projection_matches_openni_cloud(kinect):
    depth, reference = kinect
    assert depth.dtype == np.uint16 and depth.shape == (480, 640)
    xyz = depth_to_xyz(depth, KINECT)  # 16UC1 millimetres scaled automatically
    assert xyz.dtype == np.float32 and xyz.shape == (480, 640, 3)
    ours_invalid = ~np.isfinite(xyz).all(axis=-1)
    ref_invalid = ~np.isfinite(reference).all(axis=-1)
    assert np.array_equal(ours_invalid, ref_invalid)
    assert 0.05 < ours_invalid.mean() < 0.2  # about 12 % of the frame has no reading
    assert np.array_equal(ours_invalid, depth == 0)
    error = np.abs(xyz[~ours_invalid] - reference[~ref_invalid])
    assert error.max() <= 1e-5


def test_matrix_forms_and_float_depth_agree(kinect):
    depth, _ = kinect
    from_k = depth_to_xyz(depth, KINECT.matrix)
    from_flat_p = depth_to_xyz(depth, [525, 0, 320, 0, 0, 525, 240, 0, 0, 0, 1, 0])
    metres = depth.astype(np.float32) * np.float32(0.001)
    metres[depth == 0] = np.nan  # 32FC1 marks missing depth with NaN
    from_float = depth_to_xyz(metres, KINECT)
    np.testing.assert_array_equal(from_k, from_flat_p)
    np.testing.assert_allclose(from_float, from_k, atol=1e-6, equal_nan=True)


def test_invalid_float_depth_values_become_nan():
    depth = np.array([[0.0, np.nan, np.inf], [-np.inf, 1.0, 2.0]], dtype=np.float32)
    xyz = depth_to_xyz(depth, CameraIntrinsics(100, 100, 1, 0.5, 3, 2))
    finite = np.isfinite(xyz).all(axis=-1)
    assert finite.tolist() == [[False, False, False], [False, True, True]]
    assert xyz[1, 2, 2] == 2.0
    assert xyz[1, 2, 0] == pytest.approx((2 - 1) * 2.0 / 100)


def test_explicit_depth_scale_and_preallocated_output(kinect):
    depth, _ = kinect
    out = np.empty((480, 640, 3), np.float32)
    result = depth_to_xyz(depth, KINECT, depth_scale=0.002, out=out)
    assert result is out
    doubled = depth_to_xyz(depth, KINECT)
    np.testing.assert_allclose(result, 2 * doubled, rtol=1e-6, equal_nan=True)


def test_reverse_projection_rebuilds_the_organised_grid(kinect):
    depth, reference = kinect
    organised = depth_to_xyz(depth, KINECT)
    points = organised.reshape(-1, 3)
    rng = np.random.default_rng(0)
    shuffled = points[rng.permutation(points.shape[0])]  # unorganised, NaN points included
    grid, valid = project_points_to_grid(shuffled, KINECT)
    assert grid.shape == (480, 640, 3) and valid.shape == (480, 640)
    assert np.array_equal(valid, np.isfinite(organised).all(axis=-1))
    np.testing.assert_array_equal(grid[valid], organised[valid])
    assert np.isnan(grid[~valid]).all()


def test_reverse_projection_nearest_point_wins():
    intr = CameraIntrinsics(100.0, 100.0, 2.0, 2.0, 5, 5)
    far = [0.0, 0.0, 2.0]
    near = [0.0, 0.0, 1.0]
    other = [0.1, 0.0, 1.0]  # u = 0.1 / 1 * 100 + 2 = 12 -> outside the 5 px image
    behind = [0.0, 0.0, -1.0]
    grid, valid = project_points_to_grid(np.array([far, near, other, behind, [np.nan] * 3]), intr)
    assert valid.sum() == 1 and valid[2, 2]
    assert grid[2, 2].tolist() == near


def test_valid_mask_accepts_zero_and_nan_markers():
    xyz = np.array([[[0, 0, 0], [np.nan, 1, 1], [0.1, 0.2, 0.6]]], dtype=np.float32)
    assert valid_mask(xyz).tolist() == [[False, False, True]]


@pytest.mark.parametrize("kwargs, words", [
    (dict(fx=0.0, fy=525.0, cx=1, cy=1, width=4, height=4), "focal length"),
    (dict(fx=525.0, fy=525.0, cx=1, cy=1, width=0, height=4), "image size"),
    (dict(fx=np.nan, fy=525.0, cx=1, cy=1, width=4, height=4), "fx is nan"),
])
def test_bad_intrinsics_are_refused(kwargs, words):
    with pytest.raises(InputError, match=words):
        CameraIntrinsics(**kwargs)


def test_bad_depth_inputs_are_refused():
    with pytest.raises(InputError, match="non-empty 2-D"):
        depth_to_xyz(np.zeros((0, 4), np.uint16), np.eye(3))
    with pytest.raises(InputError, match="registered depth"):
        depth_to_xyz(np.zeros((480, 640), np.uint16), KINECT.cropped(0, 0, 320, 240))
    with pytest.raises(InputError, match="9 \\(K\\) or 12 \\(P\\)"):
        depth_to_xyz(np.zeros((4, 4), np.uint16), [1, 2, 3])
    with pytest.raises(InputError, match="depth_scale"):
        depth_to_xyz(np.ones((4, 4), np.uint16), CameraIntrinsics(1, 1, 1, 1, 4, 4), depth_scale=0)
    with pytest.raises(InputError, match=r"\(N, 3\)"):
        project_points_to_grid(np.zeros((5, 2)), KINECT)


def test_intrinsics_crop_and_scale_keep_rays():
    cropped = KINECT.cropped(100, 50, 200, 100)
    assert (cropped.cx, cropped.cy) == (220.0, 190.0)
    half = KINECT.scaled(320, 240)
    assert half.fx == 262.5
    # the centre of pixel (u, v) in the full image is the centre of (u/2 - 0.25, ...) in the half one
    assert half.cx == pytest.approx((320 + 0.5) / 2 - 0.5)
