"""Scoring option ``floor_3d`` (`mafr train --floor-3d P`): the image score fuses the 2D error with
max(3D error, floor), the anomaly map keeps the plain fusion, and training sets the floor to the
P-th percentile of the calibration images' 3D errors and stores it in the checkpoint."""
import math

import numpy as np
import pytest
import torch

from mafr_ros import cli
from mafr_ros.core.checkpoint import read_metadata
from mafr_ros.core.detector import Detector
from mafr_ros.core.scoring import ScoringConfig, erode_mask, fuse_maps, score_errors, smooth_maps
from mafr_ros.data.formats import open_dataset
from mafr_ros.data.preprocess import PreprocessConfig, preprocess_sample
from mafr_ros.train import TrainConfig, floor_from_errors, train


def _errors(seed=0, b=3, s=40):
    g = torch.Generator().manual_seed(seed)
    r2d = torch.rand(b, s, s, generator=g) * 2
    r3d = torch.rand(b, s, s, generator=g) * 2
    mask = torch.zeros(b, s, s, dtype=torch.bool)
    mask[:, 5:35, 6:34] = True
    return r2d, r3d, mask


def test_floor_changes_the_image_score_only_and_matches_its_definition():
    r2d, r3d, mask = _errors()
    plain = ScoringConfig(image_score="max", erode=2)
    floored = ScoringConfig(image_score="max", erode=2, floor_3d=1.2)
    m0, s0 = score_errors(r2d, r3d, mask, plain)
    m1, s1 = score_errors(r2d, r3d, mask, floored)
    assert torch.equal(m0, m1)  # the anomaly map keeps the plain product
    by_hand = smooth_maps(fuse_maps(r2d, r3d.clamp(min=1.2), "product", erode_mask(mask, 2)),
                          floored).flatten(1).amax(1)
    assert torch.allclose(s1, by_hand)
    assert bool((s1 >= s0 - 1e-6).all()) and not torch.allclose(s1, s0)
    # without erosion the floor alone still enters the score map; floor 0 is exactly the old path
    assert torch.equal(score_errors(r2d, r3d, mask, ScoringConfig(image_score="max", floor_3d=0.0))[1],
                       score_errors(r2d, r3d, mask, ScoringConfig(image_score="max"))[1])
    no_erode = score_errors(r2d, r3d, mask, ScoringConfig(image_score="max", floor_3d=1.2))[1]
    assert torch.allclose(no_erode, smooth_maps(fuse_maps(r2d, r3d.clamp(min=1.2), "product", mask),
                                                plain).flatten(1).amax(1))


def test_a_floor_above_every_3d_error_ranks_images_by_the_2d_error_alone():
    r2d, r3d, mask = _errors(seed=3, b=6)
    r2d[2, 16:25, 16:25] += 3.0  # one image with a strong 2D-only anomaly
    top = float(r3d.max()) + 1.0
    floored = score_errors(r2d, r3d, mask, ScoringConfig(image_score="max", floor_3d=top))[1]
    only_2d = score_errors(r2d, r3d, mask, ScoringConfig(image_score="max", fusion="2d"))[1]
    assert torch.allclose(floored, only_2d * top, rtol=1e-5)
    assert int(floored.argmax()) == 2


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_invalid_floors_are_refused(bad):
    with pytest.raises(ValueError, match="floor_3d"):
        ScoringConfig(floor_3d=bad)


def test_floor_percentile_is_validated_and_reaches_the_config():
    base = ["train", "--dataset", "d", "--category", "c", "--out", "o"]
    parse = lambda extra: cli.train_config_from_args(cli.build_parser().parse_args(base + extra))  # noqa: E731
    assert parse([]).floor_3d_percentile == 0.0
    assert parse(["--floor-3d", "50"]).floor_3d_percentile == 50.0
    for bad in ("100", "-5"):
        with pytest.raises(SystemExit, match=r"floor_3d_percentile must be in \[0, 100\)"):
            parse(["--floor-3d", bad])


def test_floor_from_errors_is_the_percentile_of_the_valid_3d_errors():
    r2d, r3d, mask = _errors(seed=5)
    r3d[~mask] = 100.0  # invalid pixels must not count
    batches = [(r2d[:2], r3d[:2], mask[:2]), (r2d[2:], r3d[2:], mask[2:])]
    assert floor_from_errors(batches, 50) == pytest.approx(float(np.median(r3d[mask].numpy())))
    with pytest.raises(ValueError, match="no valid pixel"):
        floor_from_errors([(r2d, r3d, torch.zeros_like(mask))], 50)


def test_training_calibrates_the_floor_and_the_checkpoint_scores_with_it(synthetic_dataset, tmp_path):
    root = synthetic_dataset(seed=4, n_train=4, n_validation=3, n_test_good=1, n_test_per_defect=1,
                             size=128)
    common = dict(profile="lite", epochs=1, batch_size=4, crop=48, progress=False,
                  cache_dir=str(tmp_path / "cache"), memory_bank=300,
                  scoring=ScoringConfig(image_score="max", erode=2))
    out = tmp_path / "floor.safetensors"
    meta = train(root, "gland", out, TrainConfig(floor_3d_percentile=50, **common))
    assert meta["training"]["floor_3d_percentile"] == 50
    floor = read_metadata(out)["scoring"]["floor_3d"]
    detector = Detector.from_checkpoint(out, device="cpu")
    assert detector.scoring_cfg.floor_3d == floor > 0
    data = open_dataset(root, "gland", "validation")  # the calibration images
    inputs = [preprocess_sample(data[i], PreprocessConfig.from_dict(meta["preprocess"]))
              for i in range(len(data))]
    r2d, r3d, mask = detector.input_errors(inputs)
    assert floor == pytest.approx(float(np.percentile(r3d[mask].numpy(), 50)), rel=1e-6)
    maps, scores = detector.score_inputs(inputs)
    assert float(scores.max()) == pytest.approx(meta["calibration_scores"]["good_max"], rel=1e-5)
    # the same bank without the floor: same maps, other image scores, floor recorded as off
    plain = tmp_path / "plain.safetensors"
    train(root, "gland", plain, TrainConfig(**common))
    assert read_metadata(plain)["scoring"]["floor_3d"] == 0.0
    plain_maps, plain_scores = Detector.from_checkpoint(plain, device="cpu").score_inputs(inputs)
    assert torch.equal(maps, plain_maps)
    assert not torch.allclose(scores, plain_scores)
