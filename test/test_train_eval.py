"""Training, checkpoint, Detector and evaluation end to end on small synthetic data (lite profile),
and the accuracy of the embedded default model on held-out synthetic parts."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mafr_ros.core.checkpoint import load_checkpoint, read_metadata
from mafr_ros.core.detector import Detector, default_model_path
from mafr_ros.data.synthetic import generate_dataset
from mafr_ros.errors import CheckpointError
from mafr_ros.train import TrainConfig, train


@pytest.fixture(scope="module")
def synth(synthetic_dataset):
    return synthetic_dataset(seed=3, n_train=6, n_validation=3, n_test_good=3,
                             n_test_per_defect=1, size=160)


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    cfg = TrainConfig(profile="lite", epochs=2, batch_size=4, crop=48, progress=False,
                      cache_dir=str(out / "cache"))
    path = out / "a.safetensors"
    meta = train(synth, "gland", path, cfg)
    return path, meta, cfg


def test_checkpoint_records_what_rebuilds_the_detector(trained, synth):
    path, meta, _ = trained
    on_disk = read_metadata(path)
    assert on_disk["model_id"] == meta["model_id"] and meta["model_id"].startswith("lite-gland-")
    assert on_disk["profile"] == "lite"
    assert set(on_disk["extractors"]) == {"rgb", "xyz"}
    assert on_disk["extractors"]["rgb"]["weights_hash"]
    assert on_disk["preprocess"]["grid"] == 224
    assert on_disk["loss"]["mask_invalid"] is True
    assert on_disk["training"]["calibration"] == "validation"
    assert len(on_disk["training"]["files"]) == 6
    assert all(str(synth) in f for f in on_disk["training"]["files"])
    th = on_disk["thresholds"]
    assert th["image"] > 0 and th["pixel"] > 0 and th["image_scale"] > 0
    history = on_disk["training"]["loss_history"]
    assert len(history) == 2 and all(np.isfinite(history))
    # The bf16 check behind `precision: auto` ran on the calibration images.
    inference = on_disk["inference"]
    assert inference["checked_dtype"] == "bf16" and inference["images"] == 3
    assert isinstance(inference["half_precision"], bool)
    assert 0 <= inference["max_score_shift_of_threshold"] < 1
    # the model summary's parameter counts, as the loaded heads have them
    heads = Detector.from_checkpoint(path, device="cpu").heads
    assert on_disk["parameters"] == {**heads.parameter_counts(),
                                     "mac_per_pixel": heads.macs_per_pixel()}
    assert on_disk["parameters"]["total"] == sum(p.numel() for p in heads.parameters())


def test_feature_norm_is_recorded_and_checkpoints_without_it_still_load(trained, synth, tmp_path):
    from mafr_ros.core.checkpoint import save_checkpoint
    path, meta, _ = trained
    on_disk = read_metadata(path)
    norm = on_disk["feature_norm"]  # the lite profile standardises its features
    assert len(norm["mean_2d"]) == on_disk["heads"]["dim_2d"]
    assert len(norm["std_3d"]) == on_disk["heads"]["dim_3d"] and min(norm["std_3d"]) > 0
    assert on_disk["loss"]["w_restoration"] > 0 and on_disk["training"]["lr_schedule"] == "cosine"
    detector = Detector.from_checkpoint(path, device="cpu")
    assert detector.feature_norm is not None
    # A checkpoint written before the option existed has no feature_norm: raw features, as before.
    state, old_meta = load_checkpoint(path)
    del old_meta["feature_norm"]
    save_checkpoint(tmp_path / "old.safetensors", state, old_meta)
    old = Detector.from_checkpoint(tmp_path / "old.safetensors", device="cpu")
    assert old.feature_norm is None
    f2d = torch.rand(1, len(norm["mean_2d"]), 8, 8)
    f3d = torch.rand(1, len(norm["mean_3d"]), 8, 8)
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    raw, _ = old.normalize_features(f2d, f3d, mask)
    assert torch.equal(raw, f2d)
    standardised, _ = detector.normalize_features(f2d, f3d, mask)
    assert not torch.allclose(standardised, f2d)


def test_training_is_reproducible(trained, synth, tmp_path):
    path, _, cfg = trained
    again = tmp_path / "b.safetensors"
    train(synth, "gland", again, cfg)
    first, _ = load_checkpoint(path)
    second, _ = load_checkpoint(again)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_detector_answers_a_frame_at_input_resolution(trained, synth):
    path, meta, _ = trained
    detector = Detector.from_checkpoint(path, device="cpu")
    from mafr_ros.data.mvtec import MVTecDataset
    sample = MVTecDataset(synth, "gland", "test")[0]
    result = detector.detect(sample.rgb, sample.xyz)
    assert result.anomaly_map.shape == sample.rgb.shape[:2]
    assert result.normalized_map.shape == sample.rgb.shape[:2]
    assert result.is_anomalous == (result.score > meta["thresholds"]["image"])
    assert 0.0 <= result.normalized_score <= 1.0
    assert 0.0 < result.valid_fraction < 1.0
    assert set(result.timings_ms) >= {"preprocess", "model", "total"}
    # the same frame twice gives the same answer (frozen, eval-mode extractors)
    again = detector.detect(sample.rgb, sample.xyz)
    assert again.score == result.score


def test_incompatible_extractor_is_refused(trained, tmp_path):
    path, _, _ = trained
    from mafr_ros.core.checkpoint import save_checkpoint
    state, meta = load_checkpoint(path)
    meta["extractors"]["xyz"]["weights_hash"] = "0" * 16
    bad = save_checkpoint(tmp_path / "bad.safetensors", state, meta)
    with pytest.raises(CheckpointError, match="differs from the one the heads were trained with"):
        Detector.from_checkpoint(bad, device="cpu")


def test_cli_eval_writes_metrics_json_and_report(trained, synth, tmp_path):
    path, _, _ = trained
    out = subprocess.run(
        [sys.executable, "-m", "mafr_ros.cli", "eval", "--dataset", str(synth), "--category", "gland",
         "--checkpoint", str(path), "--json", str(tmp_path / "m.json"),
         "--report", str(tmp_path / "rep"), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in ("i_auroc", "p_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    assert (tmp_path / "rep" / "report.md").is_file()
    assert (tmp_path / "rep" / "roc.png").is_file() and (tmp_path / "rep" / "pro.png").is_file()
    assert list((tmp_path / "rep" / "overlays").glob("*.png"))


def test_cli_eval_record_keeps_the_metrics_in_the_checkpoint(trained, synth, tmp_path, capsys):
    import shutil

    from mafr_ros import cli
    path = shutil.copy(trained[0], tmp_path / "rec.safetensors")
    state_before, meta_before = load_checkpoint(path)
    assert meta_before["metrics"] == {}  # training records none: it sees no defect
    base = ["eval", "--dataset", str(synth), "--category", "gland", "--checkpoint", str(path),
            "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(base + ["--json", str(tmp_path / "t.json")]) == 0
    assert read_metadata(path)["metrics"] == {}  # only with --record
    assert cli.main(base + ["--json", str(tmp_path / "t.json"), "--record"]) == 0
    other = tmp_path / "other_root"  # a second source: the same parts under another root
    other.symlink_to(synth, target_is_directory=True)
    assert cli.main(base[:2] + [str(other)] + base[3:] + ["--record"]) == 0
    assert cli.main(base + ["--json", str(tmp_path / "t2.json"), "--record"]) == 0  # replaces
    state, meta = load_checkpoint(path)
    entries = meta["metrics"]["evaluations"]
    assert [e["source"] for e in entries] == [
        {"dataset": str(other), "category": "gland", "split": "test"},
        {"dataset": str(synth), "category": "gland", "split": "test"}]
    measured = json.loads((tmp_path / "t2.json").read_text())
    for entry in entries:
        for key in ("i_auroc", "p_auroc", "aupro", "n_good", "n_defect"):
            assert entry[key] == measured[key], key
    # the weights, the model id and everything else are unchanged
    assert state.keys() == state_before.keys()
    assert all(torch.equal(state[k], state_before[k]) for k in state)
    assert {k: v for k, v in meta.items() if k != "metrics"} == \
        {k: v for k, v in meta_before.items() if k != "metrics"}
    # an evaluation of another model is not written into this checkpoint
    from mafr_ros.evaluate import record_metrics
    with pytest.raises(CheckpointError, match="the checkpoint .* holds"):
        record_metrics(path, {**measured, "model_id": "lite-gland-00000000"}, {"split": "x"})
    # a checkpoint that cannot be rewritten (here: its temporary file's name is taken by a
    # folder, which fails for root too): a clear error from the command, the file unchanged
    (tmp_path / "rec.safetensors.tmp").mkdir()
    assert cli.main(base + ["--record"]) == 1
    assert read_metadata(path) == meta
    assert "cannot write it" in capsys.readouterr().err


def test_cli_reports_a_missing_checkpoint_clearly(synth, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mafr_ros.cli", "eval", "--dataset", str(synth), "--category", "gland",
         "--checkpoint", str(tmp_path / "nope.safetensors")],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "nope.safetensors does not exist" in out.stderr


@pytest.mark.slow
def test_embedded_model_detects_held_out_synthetic_defects(tmp_path):
    """Regression guard on the embedded lite model, on parts from a seed it never saw.

    Measured when the model was trained (models/lite_synthetic.md): image AUROC 1.000, pixel AUROC
    0.940, AUPRO@30% 0.879 on this split (the project's lite target, image AUROC >= 0.95 on
    synthetic data, is met here and on the seed-0 split, 0.955). The bounds sit just under the
    measured values and only catch a regression. (The previous model, descriptor version 1,
    scored 0.840 / 0.925 / 0.836 here.)"""
    from mafr_ros.evaluate import evaluate
    checkpoint = default_model_path()
    category = read_metadata(checkpoint)["category"]
    generate_dataset(tmp_path / "data", seed=12345, categories=[category], n_train=1,
                     n_validation=1, n_test_good=10, n_test_per_defect=4)
    summary = evaluate(checkpoint, tmp_path / "data", category, device="cpu", progress=False,
                       cache_dir=tmp_path / "cache")
    assert summary["i_auroc"] >= 0.97, summary
    assert summary["p_auroc"] >= 0.93, summary
    assert summary["aupro"] >= 0.86, summary


@pytest.mark.slow
def test_the_lite_recipe_trains_to_the_synthetic_target(tmp_path):
    """The training side of the lite target (image AUROC >= 0.95 on synthetic parts): the
    recipe of the embedded model (`make model`: 30 synthetic gland parts of seed 0, lite defaults,
    training seed 115) trained afresh, then evaluated on the seed-0 test split (10 good, 20
    defective). The embedded model scores 0.955 / 0.943 / 0.876 there; a retraining on another
    machine of this kind gave other weight bits but the same metrics to 1e-6 (2026-12-07)."""
    from mafr_ros.evaluate import evaluate
    generate_dataset(tmp_path / "data", seed=0, categories=["gland"])
    out = tmp_path / "lite.safetensors"
    meta = train(tmp_path / "data", "gland", out,
                 TrainConfig(profile="lite", seed=115, progress=False,
                             cache_dir=str(tmp_path / "cache")))
    assert meta["training"]["epochs"] == 50 and len(meta["training"]["files"]) == 30
    summary = evaluate(out, tmp_path / "data", "gland", device="cpu", progress=False,
                       cache_dir=tmp_path / "cache")
    assert summary["n_good"] == 10 and summary["n_defect"] == 20
    assert summary["i_auroc"] >= 0.95, summary
    assert summary["p_auroc"] >= 0.93 and summary["aupro"] >= 0.86, summary


def test_backbone_weights_resolution_when_loading():
    from mafr_ros.core.detector import resolve_backbone_weights
    # weight-free extractors never get a file
    assert resolve_backbone_weights("none (weight-free)", "x.pth", needs_weights=False) is None
    # the user's file wins, then the one recorded at training time
    assert resolve_backbone_weights("/train/dino.pth", "/here/dino.pth", True) == "/here/dino.pth"
    assert resolve_backbone_weights("/train/dino.pth", None, True) == "/train/dino.pth"
    # heads trained on randomly initialised backbones rebuild them (the hash check then applies)
    assert resolve_backbone_weights("random-init (seed 0)", None, True) is None
