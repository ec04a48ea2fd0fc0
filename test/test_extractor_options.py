"""Options of the weight-free extractors (``mafr train --extractor-option rgb.hog_bins=0``): the
reduced descriptors are exactly the full ones without the dropped channels, the default keeps its
hash (existing checkpoints stay valid), a checkpoint rebuilds the descriptors it was trained
with, and bad options are refused with a message that names them."""
import json

import pytest
import torch

from mafr_ros import cli
from mafr_ros.core.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from mafr_ros.core.detector import Detector
from mafr_ros.core.extractors.lite import LiteRGBExtractor, LiteXYZExtractor
from mafr_ros.data.formats import open_dataset
from mafr_ros.data.preprocess import PreprocessConfig, preprocess_sample
from mafr_ros.errors import CheckpointError
from mafr_ros.train import TrainConfig, train

OPTIONS = {"rgb": {"hog_bins": 0}, "xyz": {"quadric_slope": False}}


@pytest.fixture(scope="module")
def real_sample(cable_gland):
    data = open_dataset(cable_gland.parent, "cable_gland", "train")
    return preprocess_sample(data[0], PreprocessConfig())


def test_reduced_descriptors_are_the_full_ones_without_the_dropped_channels(real_sample):
    rgb = torch.from_numpy(real_sample.rgb)[None]
    xyz = torch.from_numpy(real_sample.xyz)[None]
    full_rgb, full_xyz = LiteRGBExtractor(), LiteXYZExtractor()
    # 35 = colour 6 + contrast 3 + 2 x (energy + 8 orientation bins) + census 8
    histograms = [*range(10, 18), *range(19, 27)]
    no_hist = LiteRGBExtractor(hog_bins=0)
    assert no_hist.out_dim == 35 - 16
    keep = [c for c in range(35) if c not in histograms]
    assert torch.allclose(no_hist.extract(rgb), full_rgb.extract(rgb)[:, keep], atol=1e-6)
    # 19 = plane variations 3 + crease 1 + 3 windows x (height, rms, mean, Gaussian, slope)
    no_slope = LiteXYZExtractor(quadric_slope=False)
    assert no_slope.out_dim == 16
    keep = [c for c in range(19) if c not in (8, 13, 18)]
    assert torch.allclose(no_slope.extract(xyz), full_xyz.extract(xyz)[:, keep], atol=1e-6)
    # the defaults hash as before the options existed (the embedded model's extractors);
    # another configuration hashes differently
    assert "quadric_slope" not in full_xyz.config
    assert no_slope.weights_hash() != full_xyz.weights_hash()
    assert no_hist.weights_hash() != full_rgb.weights_hash()
    with pytest.raises(ValueError, match="hog_bins must be 0"):
        LiteRGBExtractor(hog_bins=1)


def test_invariant_orientation_channels_do_not_change_when_the_texture_turns(real_sample):
    rgb = torch.from_numpy(real_sample.rgb)[None]
    turned = torch.rot90(rgb, 1, (2, 3))
    invariant, full = LiteRGBExtractor(hog_invariant=True), LiteRGBExtractor()
    # 8 bins -> |DFT| at frequencies 1..4 per window: 35 - 2 x 4 channels
    assert invariant.out_dim == 27 and "hog_invariant" not in full.config
    a = invariant.extract(rgb)
    b = torch.rot90(invariant.extract(turned), -1, (2, 3))
    inner = (slice(None), slice(None), slice(20, -20), slice(20, -20))  # away from the frame
    for c in (slice(10, 14), slice(15, 19)):  # the invariant channels of the two windows
        assert float((a[:, c] - b[:, c])[inner].abs().max()) < 1e-5
    assert float(a[:, 10:14].abs().max()) > 0.1  # not trivially zero
    # the raw histograms do change under the same turn; every other channel is shared
    g, h = full.extract(rgb), torch.rot90(full.extract(turned), -1, (2, 3))
    assert float((g[:, 10:18] - h[:, 10:18])[inner].abs().max()) > 0.05
    assert torch.allclose(a[:, :10], g[:, :10], atol=1e-6) and torch.allclose(a[:, -8:], g[:, -8:], atol=1e-6)
    assert invariant.weights_hash() != full.weights_hash()
    with pytest.raises(ValueError, match="hog_invariant needs hog_bins >= 4"):
        LiteRGBExtractor(hog_invariant=True, hog_bins=2)


def test_census_invariants_make_every_channel_turn_invariant(real_sample):
    rgb = torch.from_numpy(real_sample.rgb)[None]
    both = LiteRGBExtractor(hog_invariant=True, census_invariant=True)
    assert LiteRGBExtractor(census_invariant=True).out_dim == 32 and both.out_dim == 24
    a = both.extract(rgb)
    b = torch.rot90(both.extract(torch.rot90(rgb, 1, (2, 3))), -1, (2, 3))
    assert float((a - b)[:, :, 20:-20, 20:-20].abs().max()) < 1e-5
    full = LiteRGBExtractor()
    g = full.extract(rgb)
    # the ring's mean is the mean of the 8 census channels; its |DFT| is not trivially zero
    assert torch.allclose(a[:, 19], g[:, -8:].mean(1), atol=1e-6)
    assert float(a[:, 20:].abs().max()) > 1e-3
    assert "census_invariant" not in full.config and both.weights_hash() != full.weights_hash()


def test_3d_channels_turn_with_the_part_so_turned_bank_copies_add_nothing(real_sample):
    """lite_xyz is turn-invariant too (rigid quarter turn of grid and points, as the bank's turned
    copies are made): with both 2D invariants, --bank-rotations only repeats pixels (docs/real_parts.md)."""
    from mafr_ros.data.augment import quarter_turn

    finer = LiteXYZExtractor(quadric_windows=(7, 11, 21, 41))
    assert finer.out_dim == LiteXYZExtractor().out_dim + 5  # one more quadric window
    xyz = torch.from_numpy(real_sample.xyz)[None]
    a = finer.extract(xyz)
    valid = torch.from_numpy(real_sample.valid)
    for turns in (1, 2, 3):
        b = torch.rot90(finer.extract(torch.from_numpy(quarter_turn(real_sample, turns).xyz)[None]),
                        -turns, (2, 3))
        diff = (a - b).abs()[0][:, valid]  # (channels, valid pixels)
        others = [c for c in range(finer.out_dim) if c != 3]
        assert float(diff[others].max()) < 1e-5
        # the crease (1 - n_fine . n_coarse) differs only where a plane fit is degenerate
        assert int((diff[3] > 1e-4).sum()) <= 0.002 * valid.sum()
    assert float(a[0][:, valid].abs().amax(1).min()) > 0.1  # no channel trivially zero


def test_checkpoint_rebuilds_the_descriptors_it_was_trained_with(synthetic_dataset, tmp_path):
    root = synthetic_dataset(seed=4, n_train=4, n_validation=3, n_test_good=1,
                             n_test_per_defect=1, size=128)
    out = tmp_path / "opt.safetensors"
    cfg = TrainConfig(profile="lite", epochs=1, batch_size=4, crop=48, progress=False,
                      cache_dir=str(tmp_path / "cache"), memory_bank=200,
                      extractor_options=OPTIONS)
    train(root, "gland", out, cfg)
    meta = read_metadata(out)
    assert meta["extractors"]["rgb"]["config"]["hog_bins"] == 0
    assert meta["extractors"]["xyz"]["config"]["quadric_slope"] is False
    assert meta["heads"]["dim_2d"] == 19 and meta["heads"]["dim_3d"] == 16
    detector = Detector.from_checkpoint(out, device="cpu", precision="fp32")
    assert (detector.rgb_extractor.out_dim, detector.xyz_extractor.out_dim) == (19, 16)
    sample = preprocess_sample(open_dataset(root, "gland", "test")[0], detector.preprocess_cfg)
    maps, scores = detector.score_inputs([sample])
    assert torch.isfinite(scores).all() and maps.shape[-1] == detector.preprocess_cfg.grid
    # a recorded option this version does not know: a clear checkpoint error, not a TypeError
    state, meta = load_checkpoint(out)
    meta["extractors"]["xyz"]["config"]["frobnication"] = 3
    save_checkpoint(tmp_path / "future.safetensors", state, meta)
    with pytest.raises(CheckpointError, match="recorded lite_xyz configuration cannot be built"):
        Detector.from_checkpoint(tmp_path / "future.safetensors", device="cpu")


def test_cli_extractor_options_are_parsed_and_checked():
    base = ["train", "--dataset", "d", "--category", "c", "--out", "o"]

    def parse(*extra):
        return cli.train_config_from_args(cli.build_parser().parse_args(base + list(extra)))

    assert parse().extractor_options == {}
    cfg = parse("--extractor-option", "rgb.hog_bins=0", "--extractor-option",
                "xyz.quadric_slope=false", "--extractor-option", "rgb.hog_windows=[7]")
    assert cfg.extractor_options == {"rgb": {"hog_bins": 0, "hog_windows": [7]},
                                     "xyz": {"quadric_slope": False}}
    json.dumps(cfg.extractor_options)  # stored as JSON in the checkpoint
    cases = [(["--extractor-option", "hog_bins=0"], "expected rgb.KEY=VALUE"),
             (["--extractor-option", "depth.x=1"], "expected rgb.KEY=VALUE"),
             (["--extractor-option", "rgb.hog_bins=eight"], "must be JSON"),
             (["--extractor-option", "rgb.hogbins=0"], "lite_rgb has no option hogbins"),
             (["--profile", "paper", "--extractor-option", "rgb.hog_bins=0"],
              "only the weight-free extractors")]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            parse(*extra)
    assert parse("--extractor-option", "xyz.fpfh=true").extractor_options == {"xyz": {"fpfh": True}}
