"""`mafr train --preset NAME` (cli.TRAIN_PRESETS): a preset is exactly its flags, flags given on
the command line override it wherever they stand, and a real training run records it."""
import dataclasses
import shlex

import pytest

from mafr_ros import cli
from mafr_ros.core.checkpoint import read_metadata

BASE = ["train", "--dataset", "d", "--category", "c", "--out", "o"]


def _config(*extra):
    return cli.train_config_from_args(cli.build_parser().parse_args(BASE + list(extra)))


def _fields(cfg):
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "preset"}


@pytest.mark.parametrize("name", sorted(cli.TRAIN_PRESETS))
def test_a_preset_is_exactly_its_flags(name):
    preset = cli.TRAIN_PRESETS[name]
    with_preset = _config("--preset", name)
    spelled_out = _config("--profile", preset["profile"], *shlex.split(preset["flags"]))
    assert with_preset.preset == name and spelled_out.preset is None
    assert _fields(with_preset) == _fields(spelled_out)
    assert _fields(with_preset) != _fields(_config())  # it changes something


def test_real_parts_is_the_documented_recipe():
    cfg = _config("--preset", "real-parts")
    assert cfg.profile == "lite" and cfg.memory_bank == 10000 and cfg.epochs == 1
    assert cfg.scoring.erode == 4.0 and cfg.scoring.image_score == "reference"
    assert cfg.extractor_options == {"rgb": {"hog_invariant": True, "census_invariant": True}}
    assert cfg.scoring.fusion == "product" and cfg.bank_rotations == 1


@pytest.mark.parametrize("before", [True, False])
def test_command_line_flags_override_the_preset_wherever_they_stand(before):
    mine = ["--memory-bank", "5000", "--extractor-option", "rgb.census_invariant=false",
            "--erode", "0", "--seed", "7", "--image-score", "max"]
    args = mine + ["--preset", "real-parts"] if before else ["--preset", "real-parts"] + mine
    cfg = _config(*args)
    assert cfg.memory_bank == 5000 and cfg.seed == 7 and cfg.scoring.image_score == "max"
    assert cfg.scoring.erode == 0.0  # given explicitly, even though 0 is the plain default
    assert cfg.extractor_options == {"rgb": {"hog_invariant": True, "census_invariant": False}}
    assert cfg.epochs == 1 and cfg.bank_rotations == 1  # the rest from the preset


def test_without_a_preset_nothing_changes():
    cfg = _config()
    assert cfg.preset is None and cfg.memory_bank == 0 and cfg.epochs is None
    assert cfg.extractor_options == {} and cfg.scoring.erode == 0.0


def test_a_preset_of_another_profile_is_refused():
    with pytest.raises(SystemExit, match="--preset real-parts is a recipe of the lite profile"):
        _config("--profile", "paper", "--preset", "real-parts")
    with pytest.raises(SystemExit):  # argparse: unknown preset name
        cli.build_parser().parse_args(BASE + ["--preset", "fast"])


def test_the_help_lists_each_preset_with_its_flags(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for name, preset in cli.TRAIN_PRESETS.items():
        expected = f"{name} ({preset['profile']} profile): {preset['flags']}"
        assert "".join(expected.split()) in text


def test_mafr_train_with_the_preset_trains_and_records_it(synthetic_dataset, tmp_path, caplog):
    caplog.set_level("INFO", logger="mafr_ros.train")
    root = synthetic_dataset(seed=4, n_train=4, n_validation=3, n_test_good=1,
                             n_test_per_defect=1, size=128)
    out = tmp_path / "preset.safetensors"
    code = cli.main(["train", "--dataset", str(root), "--category", "gland", "--out", str(out),
                     "--preset", "real-parts", "--memory-bank", "500", "--cache-dir",
                     str(tmp_path / "cache")])
    assert code == 0
    meta = read_metadata(out)
    assert meta["training"]["preset"] == "real-parts" and meta["training"]["epochs"] == 1
    assert meta["memory_bank"]["size"] == 500 and meta["memory_bank"]["n_2d"] == 500
    assert meta["scoring"]["erode"] == 4.0 and meta["scoring"]["image_score"] == "reference"
    rgb = meta["extractors"]["rgb"]["config"]
    assert rgb["hog_invariant"] is True and rgb["census_invariant"] is True
    # the model summary is printed when training starts, with the counts the checkpoint records
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("model:"))
    assert "lite_rgb (24-d) + lite_xyz (19-d)" in summary
    assert f"{meta['parameters']['total']:,}" in summary and "MAC per pixel" in summary
