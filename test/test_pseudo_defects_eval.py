"""scripts/pseudo_defects_eval.py: k-fold pseudo-defect cross-validation on good images, with
`mafr train` flags after `--` (run on a small synthetic dataset)."""
import importlib.util
import json
from pathlib import Path

import pytest

from mafr_ros.core.checkpoint import read_metadata


@pytest.fixture(scope="module")
def script(repo_root):
    spec = importlib.util.spec_from_file_location(
        "pseudo_defects_eval", repo_root / "scripts" / "pseudo_defects_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synth(synthetic_dataset):
    return synthetic_dataset(seed=9, n_train=6, n_validation=2, n_test_good=1,
                             n_test_per_defect=1, size=128)


TRAIN_FLAGS = ["--", "--epochs", "1", "--crop", "48", "--memory-bank", "300", "--erode", "2",
               "--image-score", "max", "--cache-dir"]


def _run(script, synth, out, extra=(), train_flags=TRAIN_FLAGS):
    argv = ["--dataset", str(synth), "--category", "gland", "--out", str(out), "--folds", "2",
            "--holdout", "2", *extra, *train_flags, str(out.parent / "cache")]
    assert script.main(argv) == 0
    return json.loads((out / "pseudo_defects.json").read_text())


def _numbers(doc):
    return json.dumps({"mean": doc["mean"], "sets": [f["sets"] for f in doc["folds"]],
                       "good": [f["good_scores"] for f in doc["folds"]]}, sort_keys=True)


def test_folds_hold_out_their_images_and_give_seeded_metrics(script, synth, tmp_path):
    doc = _run(script, synth, tmp_path / "a")
    assert set(doc) >= {"config", "folds", "mean", "machine"}
    assert [f["fold"] for f in doc["folds"]] == [0, 1]
    train_files = sorted((synth / "gland" / "train" / "good" / "rgb").iterdir())
    for fold in doc["folds"]:
        k = fold["fold"]
        # 6 training images, 2 held out per fold: 4 train the fold's model, 2 + 2 validation score
        assert fold["n_train"] == 4 and fold["leak_check"]["held_out_in_training"] == 0
        meta = read_metadata(fold["checkpoint"])
        assert meta["training"]["calibration"] == "train"  # no validation split in the fold
        assert meta["memory_bank"]["size"] == 300 and meta["scoring"]["erode"] == 2.0
        used = {p for entry in meta["training"]["files"] for p in script.recorded_paths(entry)}
        held = {str(p.resolve()) for p in train_files[2 * k:2 * k + 2]}
        assert not {str(Path(p).resolve()) for p in used} & held
        assert fold["held_out"]["validation_images"] == 2
        assert fold["good_scores"]["max"] >= fold["good_scores"]["mean"] > 0
        for name in ("inside", "edge"):
            result = fold["sets"][name]
            assert result["n_good"] == 4 and result["n_defective"] == 4 * 5
            assert 0.0 <= result["image_auroc"] <= 1.0 and 0.0 <= result["pixel_auroc"] <= 1.0
            assert set(result["per_kind"]) == {"dent", "bump", "hole", "cut", "stain"}
    assert (tmp_path / "a" / "pseudo_defects.md").read_text().count("**mean**") == 2
    # resuming reuses the fold models and gives the same numbers; a fresh run retrains, the same.
    # Scoring variants share the fold's error maps: one equal to the checkpoint's own scoring gives
    # its numbers, another gives what training with those scoring flags gives.
    again = _run(script, synth, tmp_path / "a",
                 extra=("--variant", "same:erode=2", "--variant", "ref:erode=0,image_score=reference"))
    assert all(f["reused_checkpoint"] for f in again["folds"])
    assert _numbers(again) == _numbers(doc)
    assert again["config"]["variants"] == {"same": {"erode": 2.0},
                                           "ref": {"erode": 0.0, "image_score": "reference"}}

    def variant_numbers(d, name):
        return _numbers({"mean": d["variant_means"][name],
                         "folds": [f["variants"][name] for f in d["folds"]]})

    assert variant_numbers(again, "same") == _numbers(doc)
    assert variant_numbers(again, "ref") != _numbers(doc)
    flags = [f for f in TRAIN_FLAGS if f not in ("--erode", "2", "--image-score", "max")]
    retrained = _run(script, synth, tmp_path / "c", train_flags=flags)
    assert variant_numbers(again, "ref") == _numbers(retrained)
    table = (tmp_path / "a" / "pseudo_defects.md").read_text()
    assert "| ref (erode=0.0, image_score=reference) | inside |" in table
    fresh = _run(script, synth, tmp_path / "b")
    assert not any(f["reused_checkpoint"] for f in fresh["folds"])
    assert _numbers(fresh) == _numbers(doc)
    # another pseudo-defect seed draws other defects
    other = _run(script, synth, tmp_path / "a", extra=("--seed", "1"))
    assert _numbers(other) != _numbers(doc)
    # --kinds: a kind draws the same defects whatever else is run; the texture kind is opt-in
    kinds = _run(script, synth, tmp_path / "a", extra=("--kinds", "stain", "scratches"))
    assert kinds["config"]["kinds"] == ["stain", "scratches"]
    for fold, ref in zip(kinds["folds"], doc["folds"]):
        for name in ("inside", "edge"):
            assert set(fold["sets"][name]["per_kind"]) == {"stain", "scratches"}
            assert fold["sets"][name]["n_defective"] == 4 * 2
            assert fold["sets"][name]["per_kind"]["stain"] == ref["sets"][name]["per_kind"]["stain"]


def test_bad_train_flags_are_refused_clearly(script, synth, tmp_path, capsys):
    base = ["--dataset", str(synth), "--category", "gland", "--out", str(tmp_path / "x")]
    cases = [(["--no-such-flag"], "were refused"),  # argparse's message, then this line
             (["--memory-bank", "-3"], "memory_bank must be >= 0"),  # the training config's
             (["--out", "elsewhere.safetensors"], "supplies --dataset, --category and --out"),
             (["--bank-rotations", "4"], "needs a memory bank")]
    for flags, message in cases:
        assert script.main(base + ["--", *flags]) == 2
        err = capsys.readouterr().err
        assert "pseudo_defects_eval.py: error:" in err and message in err, (flags, err)
    variants = [(["nocolon"], "expected NAME:KEY=VALUE"),
                (["x:frobnicate=1"], "'frobnicate' is not a scoring field"),
                (["x:erode=wide"], "erode takes a number"),
                (["x:sigma=-1"], "sigma must be >= 0"),
                (["x:fusion=mean"], "fusion must be one of"),
                (["x:erode=1", "x:erode=2"], "given twice"),
                (["checkpoint:erode=1"], "reserved")]
    for specs, message in variants:
        argv = base + [a for spec in specs for a in ("--variant", spec)] + ["--", "--epochs", "1"]
        assert script.main(argv) == 2
        err = capsys.readouterr().err
        assert "pseudo_defects_eval.py: error:" in err and message in err, (specs, err)
    assert script.main(base + ["--kinds", "dent", "scratchy", "--", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "--kinds scratchy: unknown; choose from dent bump hole cut stain scratches" in err
    assert not (tmp_path / "x" / "pseudo_defects.json").exists()
