"""Quarter-turn pose augmentation (data/augment.py) and the memory bank built with it
(``mafr train --memory-bank N --bank-rotations 4``)."""
import numpy as np
import pytest
import torch

from mafr_ros.core.detector import Detector
from mafr_ros.core.scoring import ScoringConfig
from mafr_ros.data.augment import quarter_turn
from mafr_ros.data.formats import open_dataset
from mafr_ros.data.preprocess import PreprocessConfig, preprocess_sample
from mafr_ros.train import TrainConfig, train


@pytest.fixture(scope="module")
def real_sample(cable_gland):
    data = open_dataset(cable_gland.parent, "cable_gland", "train")
    return preprocess_sample(data[0], PreprocessConfig())


def _slope(values, coords):
    """Least-squares slope of ``values`` against ``coords``."""
    return float(np.polyfit(coords.astype(np.float64), values.astype(np.float64), 1)[0])


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_a_turn_is_a_rigid_rotation_in_the_camera_frame(real_sample, turns):
    s = real_sample
    before = (s.rgb.copy(), s.xyz.copy(), s.valid.copy())
    t = quarter_turn(s, turns)
    # the input is untouched, the output is new memory
    for a, b in zip(before, (s.rgb, s.xyz, s.valid)):
        assert np.array_equal(a, b)
    assert not np.shares_memory(t.xyz, s.xyz) and t.xyz.dtype == np.float32
    assert t.valid.sum() == s.valid.sum() and np.all(t.xyz[:, ~t.valid] == 0)
    assert np.array_equal(t.valid, np.rot90(s.valid, turns))
    assert np.array_equal(t.rgb, np.rot90(s.rgb, turns, axes=(1, 2)))
    # as in any camera frame, x grows along the grid's columns and y along its rows
    rows, cols = np.nonzero(t.valid)
    assert _slope(t.xyz[0][t.valid], cols) > 0 and _slope(t.xyz[1][t.valid], rows) > 0
    # z is unchanged and distances between points are preserved (a rotation, not a mirror)
    assert np.array_equal(np.sort(t.xyz[2][t.valid]), np.sort(s.xyz[2][s.valid]))
    p, q = s.xyz[:, s.valid].T, np.rot90(t.xyz, -turns, axes=(1, 2))[:, s.valid].T
    rng = np.random.default_rng(0)
    i, j = rng.integers(len(p), size=(2, 500))
    np.testing.assert_allclose(np.linalg.norm(p[i] - p[j], axis=1),
                               np.linalg.norm(q[i] - q[j], axis=1), rtol=1e-5, atol=1e-7)
    # the turn of the points about the viewing axis has determinant +1
    centred_p, centred_q = p - p.mean(0), q - q.mean(0)
    rot, *_ = np.linalg.lstsq(centred_p[:, :2], centred_q[:, :2], rcond=None)
    assert np.linalg.det(rot) == pytest.approx(1.0, abs=1e-4)


def test_four_quarter_turns_are_the_identity(real_sample):
    t = real_sample
    for _ in range(4):
        t = quarter_turn(t, 1)
    assert np.array_equal(t.rgb, real_sample.rgb) and np.array_equal(t.valid, real_sample.valid)
    assert np.array_equal(t.xyz, real_sample.xyz)
    assert np.array_equal(quarter_turn(real_sample, 2).xyz, quarter_turn(quarter_turn(real_sample, 1), 1).xyz)


@pytest.fixture(scope="module")
def synth(synthetic_dataset):
    return synthetic_dataset(seed=6, n_train=4, n_validation=2, n_test_good=1,
                             n_test_per_defect=1, size=128)


def _train(root, out, rotations):
    cfg = TrainConfig(profile="lite", epochs=1, batch_size=4, crop=48, progress=False,
                      cache_dir=str(out.parent / "cache"), memory_bank=400,
                      bank_rotations=rotations, scoring=ScoringConfig(image_score="max"))
    return train(root, "gland", out, cfg)


def test_turned_bank_covers_turned_training_parts(synth, tmp_path):
    metas, detectors = {}, {}
    for n in (1, 4):
        path = tmp_path / f"rot{n}.safetensors"
        metas[n] = _train(synth, path, n)
        detectors[n] = Detector.from_checkpoint(path, device="cpu")
    one, four = metas[1]["memory_bank"], metas[4]["memory_bank"]
    assert one["rotations"] == 1 and four["rotations"] == 4
    # the turned copies' pixels entered the pool (the valid masks turn with the grids)
    assert four["source_pixels"] == pytest.approx(4 * one["source_pixels"], rel=0.02)
    assert four["n_2d"] == four["n_3d"] == 400
    # the training parts turned by a quarter, and as they were
    data = open_dataset(synth, "gland", "train")
    inputs = [preprocess_sample(data[i], PreprocessConfig.from_dict(metas[1]["preprocess"]))
              for i in range(len(data))]
    turned = [quarter_turn(i, 1) for i in inputs]

    def mean_distance(detector, items):
        """Mean nearest-bank distance of the valid pixels, 2D and 3D."""
        rgb = torch.from_numpy(np.stack([i.rgb for i in items]))
        xyz = torch.from_numpy(np.stack([i.xyz for i in items]))
        f2d, f3d, mask = detector.extract(rgb, xyz)
        r2d, r3d = detector.error_maps(f2d, f3d, mask)
        return float(r2d[mask].mean()), float(r3d[mask].mean())

    turned1, turned4 = mean_distance(detectors[1], turned), mean_distance(detectors[4], turned)
    plain1, plain4 = mean_distance(detectors[1], inputs), mean_distance(detectors[4], inputs)
    # plain bank: the turned parts' 2D descriptors (orientation histograms, census) lie farther
    # from it than the parts as they were; the turned bank treats both poses alike
    assert turned1[0] > 1.05 * plain1[0]
    assert turned4[0] < turned1[0]
    assert turned4[0] == pytest.approx(plain4[0], rel=0.02)
    # the 3D descriptors do not depend on the in-plane orientation of a rigidly turned cloud
    assert turned1[1] == pytest.approx(plain1[1], rel=0.01)
    # deterministic: the same configuration trains the same bank
    again = _train(synth, tmp_path / "again.safetensors", 4)
    assert again["model_id"] == metas[4]["model_id"]


def test_rotation_options_are_validated():
    with pytest.raises(ValueError, match="1, 2 or 4"):
        TrainConfig(memory_bank=100, bank_rotations=3)
    with pytest.raises(ValueError, match="needs a memory bank"):
        TrainConfig(bank_rotations=4)
    from mafr_ros import cli
    base = ["train", "--dataset", "d", "--category", "c", "--out", "o"]
    args = cli.build_parser().parse_args(base + ["--memory-bank", "50", "--bank-rotations", "4"])
    assert cli.train_config_from_args(args).bank_rotations == 4
    assert cli.train_config_from_args(cli.build_parser().parse_args(base)).bank_rotations == 1
    with pytest.raises(SystemExit, match="needs a memory bank"):
        cli.train_config_from_args(cli.build_parser().parse_args(base + ["--bank-rotations", "2"]))
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(base + ["--memory-bank", "50", "--bank-rotations", "3"])
