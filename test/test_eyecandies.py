"""Eyecandies reader on a fixture written in the dataset's layout from an analytic scene: a tilted
table with a sphere on it, seen by a pin-hole camera with a known pose. The back-projected cloud,
the background removal, labels, masks, normals and the metadata errors are checked against the
scene's own geometry."""
from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from PIL import Image

from mafr_ros.data.eyecandies import (EyecandiesDataset, EyecandiesSample, back_project,
                                      decode_depth, default_focal)
from mafr_ros.data.formats import detect_format, open_dataset
from mafr_ros.data.mvtec import Sample
from mafr_ros.data.preprocess import PreprocessConfig, preprocess_sample
from mafr_ros.errors import DatasetError

SIZE = 48
SPHERE_RADIUS = 0.15


def _rot_x(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


class Scene:
    """Geometry in the table frame A (table = plane y_A = 0, objects on the y_A < 0 side), placed in
    the world by a rotation about x and a translation (the published alignment assumes a table
    parallel to the world x axis)."""

    def __init__(self, tilt=0.3, shift=(0.0, 0.2, 1.0), sphere_z=0.5, sphere_lift=0.08):
        self.world_rot = _rot_x(tilt)
        self.world_shift = np.array(shift)
        self.sphere = np.array([0.0, -sphere_lift, sphere_z])
        position = np.array([0.0, -0.8, -0.6])
        forward = np.array([0.0, 0.8, 1.1]) / np.hypot(0.8, 1.1)
        down = np.array([0.0, 1.1, -0.8]) / np.hypot(0.8, 1.1)   # image rows go towards the camera
        right = np.cross(down, forward)
        self.cam_rot = np.stack([right, down, forward], axis=1)  # camera -> A
        self.cam_pos = position
        cam_to_world = np.eye(4)
        cam_to_world[:3, :3] = self.world_rot @ self.cam_rot
        cam_to_world[:3, 3] = self.world_rot @ position + self.world_shift
        self.pose = np.linalg.inv(cam_to_world)  # world -> camera, as Eyecandies stores it

    def render(self, size=SIZE):
        """z-depth (H, W), points in frame A (H, W, 3), sphere hit mask, camera-frame normals."""
        f = default_focal(size)
        v, u = np.mgrid[0:size, 0:size].astype(np.float64)
        rays_c = np.stack([(u - size / 2) / f, (v - size / 2) / f, np.ones_like(u)], -1)
        q = rays_c @ self.cam_rot.T                       # direction per unit z-depth, frame A
        z_table = -self.cam_pos[1] / q[..., 1]
        oc = self.cam_pos - self.sphere
        a = (q * q).sum(-1)
        b = 2 * (q * oc).sum(-1)
        c = oc @ oc - SPHERE_RADIUS ** 2
        disc = b * b - 4 * a * c
        z_sphere = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.inf)
        hit = (disc >= 0) & (z_sphere > 0) & (z_sphere < z_table)
        depth = np.where(hit, z_sphere, z_table)
        points_a = self.cam_pos + depth[..., None] * q
        normal_a = np.where(hit[..., None], (points_a - self.sphere) / SPHERE_RADIUS,
                            np.array([0.0, -1.0, 0.0]))
        normals_c = normal_a @ self.cam_rot                # A -> camera (transpose of cam_rot)
        return depth, points_a, hit, normals_c

    def to_world(self, points_a):
        return points_a @ self.world_rot.T + self.world_shift


def _write_sample(data_dir, idx, scene, colour=(200, 40, 40), mask=None, size=SIZE,
                  info=None, pose=None):
    depth, _, _, normals = scene.render(size)
    low, high = float(depth.min()) - 0.01, float(depth.max()) + 0.01
    raw = np.round((depth - low) / (high - low) * 65535).astype(np.uint16)
    stem = f"{idx:03d}"
    Image.fromarray(raw).save(data_dir / f"{stem}_depth.png")
    for k in range(6):  # a different colour per lighting so the chosen one is identifiable
        rgb = np.zeros((size, size, 3), np.uint8)
        rgb[...] = colour if k == 4 else (k * 10, k * 10, k * 10)
        Image.fromarray(rgb).save(data_dir / f"{stem}_image_{k}.png")
    Image.fromarray(np.round((normals + 1) / 2 * 255).astype(np.uint8)).save(
        data_dir / f"{stem}_normals.png")
    (data_dir / f"{stem}_info_depth.yaml").write_text(
        yaml.safe_dump(info if info is not None else {"normalization": {"min": low, "max": high}}))
    np.savetxt(data_dir / f"{stem}_pose.txt", scene.pose if pose is None else pose)
    if mask is not None:
        Image.fromarray(mask.astype(np.uint8) * 255).save(data_dir / f"{stem}_mask.png")
    return low, high


def _defect_mask(size=SIZE):
    mask = np.zeros((size, size), bool)
    mask[20:26, 22:28] = True
    return mask


@pytest.fixture(scope="module")
def eyecandies_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("eyecandies")
    cat = root / "CandyCane"
    scenes = [Scene(), Scene(tilt=0.25, sphere_z=0.45), Scene(tilt=0.35, sphere_lift=0.1)]
    for folder, count in (("train", 3), ("val", 2), ("test_public", 3)):
        data = cat / folder / "data"
        data.mkdir(parents=True)
        for i in range(count):
            mask = None
            if folder == "test_public":
                mask = _defect_mask() if i != 1 else np.zeros((SIZE, SIZE), bool)
            _write_sample(data, i, scenes[i % len(scenes)], mask=mask)
    return root


def test_back_projection_matches_the_scene():
    scene = Scene()
    depth, points_a, _, _ = scene.render()
    world = back_project(depth, scene.pose)
    np.testing.assert_allclose(world, scene.to_world(points_a), atol=1e-9)
    # Through the 16-bit PNG encoding: errors stay within the quantisation step along the ray.
    low, high = depth.min() - 0.01, depth.max() + 0.01
    raw = np.round((depth - low) / (high - low) * 65535).astype(np.uint16)
    decoded = decode_depth(raw, low, high)
    assert np.abs(decoded - depth).max() <= (high - low) / 65535
    np.testing.assert_allclose(back_project(decoded, scene.pose), scene.to_world(points_a), atol=1e-4)


def test_sample_cloud_is_the_object_in_the_reference_frame(eyecandies_root):
    dataset = EyecandiesDataset(eyecandies_root, "CandyCane", "train")
    sample = dataset[0]
    assert isinstance(sample, Sample) and isinstance(sample, EyecandiesSample)
    scene = Scene()
    _, points_a, hit, normals_c = scene.render()
    # Reader's table frame = A moved along z to the bottom-centre table point.
    aligned = points_a - np.array([0.0, 0.0, points_a[-1, SIZE // 2, 2]])
    kept = hit & (aligned[..., 1] < -0.02) & (aligned[..., 2] <= 1.8) & (np.abs(aligned[..., 0]) <= 1)
    border = np.abs(aligned[..., 1] + 0.02) < 1e-3  # quantisation can flip these pixels
    valid = sample.xyz.any(axis=2)
    assert kept.sum() > 40 and not (valid ^ kept)[~border].any()
    assert not valid[~hit].any()  # the whole table is gone
    expected = aligned[..., [0, 2, 1]] * np.array([0.1, -0.1, 0.1])
    np.testing.assert_allclose(sample.xyz[valid], expected[valid], atol=2e-5)
    assert sample.xyz.dtype == np.float32 and sample.xyz.shape == (SIZE, SIZE, 3)
    assert (sample.rgb == (200, 40, 40)).all()  # image_4.png, as the published preprocessing
    np.testing.assert_allclose(sample.normals, normals_c, atol=2 / 255 * 2)
    assert sample.label == 0 and not sample.gt.any() and sample.defect_type == "good"
    assert sample.meta["index"] == "000" and sample.meta["focal"] == pytest.approx(711.11 * SIZE / 512)


def test_world_frame_keeps_metric_coordinates(eyecandies_root):
    sample = EyecandiesDataset(eyecandies_root, "CandyCane", "train", frame="world")[0]
    scene = Scene()
    _, points_a, _, _ = scene.render()
    valid = sample.xyz.any(axis=2)
    np.testing.assert_allclose(sample.xyz[valid], scene.to_world(points_a)[valid], atol=1e-4)


def test_splits_labels_masks_and_shots(eyecandies_root):
    test = EyecandiesDataset(eyecandies_root, "CandyCane", "test")
    assert [f.label for f in test.files()] == [1, 0, 1]
    assert [f.defect_type for f in test.files()] == ["bad", "good", "bad"]
    first = test[0]
    assert np.array_equal(first.gt, _defect_mask()) and first.label == 1
    assert len(EyecandiesDataset(eyecandies_root, "CandyCane", "validation")) == 2
    picks = [[f.index for f in EyecandiesDataset(eyecandies_root, "CandyCane", "train", 2, s).files()]
             for s in (0, 0, 1, 2, 3)]
    assert picks[0] == picks[1] and all(len(p) == 2 and p == sorted(p) for p in picks)
    assert len({tuple(p) for p in picks}) > 1
    with pytest.raises(DatasetError, match="fewer than the 4 shots"):
        EyecandiesDataset(eyecandies_root, "CandyCane", "train", shots=4)


def test_format_is_detected_and_preprocessing_runs_unchanged(eyecandies_root, tmp_path):
    assert detect_format(eyecandies_root, "CandyCane") == "eyecandies"
    dataset = open_dataset(eyecandies_root, "CandyCane", "test")
    assert isinstance(dataset, EyecandiesDataset)
    item = preprocess_sample(dataset[0], PreprocessConfig(grid=32))
    assert item.valid.any() and item.xyz.shape == (3, 32, 32) and item.frame.height == SIZE
    mvtec = tmp_path / "mv"
    (mvtec / "part" / "train" / "good" / "rgb").mkdir(parents=True)
    assert detect_format(mvtec, "part") == "mvtec"
    with pytest.raises(DatasetError, match="unknown dataset format"):
        open_dataset(eyecandies_root, "CandyCane", "test", format="kitti")
    with pytest.raises(DatasetError, match="must contain rgb/ and xyz/"):
        open_dataset(eyecandies_root, "CandyCane", "train", format="mvtec")


def _single_sample_root(tmp_path, **kwargs):
    data = tmp_path / "Lollipop" / "train" / "data"
    data.mkdir(parents=True)
    _write_sample(data, 0, Scene(), **kwargs)
    return tmp_path, data


@pytest.mark.parametrize("info, message", [
    ({"min": 0.1, "max": 2.0}, "no normalization.min / normalization.max"),
    ({"normalization": {"min": "near", "max": 2.0}}, "must be numbers"),
    ({"normalization": {"min": 2.0, "max": 1.0}}, "need 0 <= min < max"),
])
def test_bad_depth_metadata_is_a_clear_error(tmp_path, info, message):
    root, _ = _single_sample_root(tmp_path, info=info)
    dataset = EyecandiesDataset(root, "Lollipop", "train")
    with pytest.raises(DatasetError, match=message) as err:
        dataset[0]
    assert "000_info_depth.yaml" in str(err.value)


def test_bad_or_missing_pose_and_files_are_clear_errors(tmp_path):
    root, data = _single_sample_root(tmp_path, pose=np.eye(4)[:3])
    with pytest.raises(DatasetError, match="expected a 4 x 4 matrix"):
        EyecandiesDataset(root, "Lollipop", "train")[0]
    (data / "000_pose.txt").unlink()
    with pytest.raises(DatasetError, match="no 000_pose.txt"):
        EyecandiesDataset(root, "Lollipop", "train")
    with pytest.raises(DatasetError, match="val/data is missing"):
        EyecandiesDataset(root, "Lollipop", "validation")
    test_data = tmp_path / "Lollipop" / "test_public" / "data"
    test_data.mkdir(parents=True)
    _write_sample(test_data, 0, Scene())  # no mask
    with pytest.raises(DatasetError, match="has no 000_mask.png"):
        EyecandiesDataset(root, "Lollipop", "test")


def test_training_and_evaluation_read_eyecandies_unchanged(eyecandies_root, tmp_path):
    from mafr_ros.evaluate import evaluate
    from mafr_ros.train import TrainConfig, train

    cfg = TrainConfig(profile="lite", epochs=1, batch_size=4, crop=32, progress=False,
                      cache_dir=str(tmp_path / "cache"), preprocess=PreprocessConfig(grid=64))
    meta = train(eyecandies_root, "CandyCane", tmp_path / "c.safetensors", cfg)
    assert meta["training"]["calibration"] == "validation" and len(meta["training"]["files"]) == 3
    assert all("/train/data/" in f for f in meta["training"]["files"])
    summary = evaluate(tmp_path / "c.safetensors", eyecandies_root, "CandyCane", progress=False,
                       cache_dir=tmp_path / "cache")
    assert summary["n_good"] == 1 and summary["n_defect"] == 2
    assert 0.0 <= summary["i_auroc"] <= 1.0 and 0.0 <= summary["p_auroc"] <= 1.0
