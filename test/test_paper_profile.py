"""The ``paper`` profile (DINO ViT-B/8 + Point-MAE, heads of latent 960) through the users' path,
and the layers Point-MAE's 1152-d features come from.

- ``mafr train --profile paper --rgb-weights F --xyz-weights F`` and ``mafr eval --json`` run in
  this process on a tiny synthetic dataset, with weight files of the official layouts filled with
  random values (the helpers of test_extractors_pretrained.py; real weights are not on this
  machine). The checkpoint must name both backbones with their weight hashes and the paper's head
  widths, the evaluation must give finite metrics, a detector loaded from the checkpoint must be
  deterministic and reproduce the calibration scores training recorded, and backbone files other
  than the ones the heads were trained with must be refused.
- Point-MAE's per-group features must be the outputs of transformer blocks 4, 8 and 12, each
  through the final LayerNorm, concatenated: checked with forward hooks against a LayerNorm
  computed here from the file's tensors.

CPU cost: every image is a ViT-B/8 pass at 224, a 1024 x 128 Point-MAE pass and the 960-wide
heads on every valid pixel (~13 s with one thread); the file scores seven.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mafr_ros.cli import main
from mafr_ros.core.checkpoint import read_metadata
from mafr_ros.core.detector import Detector
from mafr_ros.core.extractors import build_extractor
from mafr_ros.data.formats import open_dataset
from mafr_ros.data.preprocess import PreprocessCache, preprocess_sample
from mafr_ros.errors import CheckpointError

# Weight files of the official layouts with random values, shared with the extractor tests (the
# fixtures are imported so that pytest finds them in this module too).
from test_extractors_pretrained import (  # noqa: F401
    dino_files, dino_state, dino_vitb8_layout, pointmae_encoder_layout, pointmae_file,
    pointmae_release, pointmae_state, random_tensors)

CATEGORY = "gland"


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """Backbone files of the layouts of ``dino_files``/``pointmae_file``, other random values."""
    folder = tmp_path_factory.mktemp("other_backbones")
    files = {"rgb": folder / "model.safetensors", "xyz": folder / "pretrain.pth"}
    save_file(random_tensors(dino_vitb8_layout(), seed=80), str(files["rgb"]))
    torch.save(pointmae_release(random_tensors(pointmae_encoder_layout(), seed=30)), files["xyz"])
    yield files
    for path in files.values():  # ~350 MB: not left in pytest's kept tmp dirs
        path.unlink()


@pytest.fixture(scope="module")
def dataset(synthetic_dataset, tmp_path_factory):
    """1 training, 1 validation, 1 good and 1 dented test part. Every image costs ~13 s of one CPU
    thread in this profile (mostly the heads: 13 M multiply-adds per valid pixel), so the test
    split keeps one of the synthetic defect types (the layout is read from the folders)."""
    source = synthetic_dataset(seed=21, n_train=1, n_validation=1, n_test_good=1,
                               n_test_per_defect=1, size=128)
    root = tmp_path_factory.mktemp("paper_data")
    shutil.copytree(source / CATEGORY, root / CATEGORY, ignore=lambda folder, names: [
        n for n in names if Path(folder).name == "test" and n not in ("good", "dent")])
    assert sorted(p.name for p in (root / CATEGORY / "test").iterdir()) == ["dent", "good"]
    return root


@pytest.fixture(scope="module")
def paper_run(dataset, dino_files, pointmae_file, tmp_path_factory):
    """`mafr train --profile paper` then `mafr eval --json`, both through ``mafr_ros.cli.main``."""
    out = tmp_path_factory.mktemp("paper_run")
    checkpoint, metrics = out / "paper.safetensors", out / "m.json"
    weights = {"rgb": str(dino_files["safetensors"]), "xyz": str(pointmae_file)}
    weight_args = ["--rgb-weights", weights["rgb"], "--xyz-weights", weights["xyz"]]
    common = ["--dataset", str(dataset), "--category", CATEGORY, "--device", "cpu",
              "--cache-dir", str(out / "cache")]
    assert main(["train", *common, "--profile", "paper", *weight_args, "--epochs", "1",
                 "--out", str(checkpoint)]) == 0
    assert main(["eval", *common, "--checkpoint", str(checkpoint), *weight_args,
                 "--json", str(metrics)]) == 0
    return {"root": dataset, "checkpoint": checkpoint, "json": metrics, "weights": weights,
            "cache": out / "cache"}


def test_paper_checkpoint_names_backbones_hashes_and_head_widths(paper_run):
    meta = read_metadata(paper_run["checkpoint"])
    assert meta["profile"] == "paper" and meta["model_id"].startswith(f"paper-{CATEGORY}-")
    rgb, xyz = meta["extractors"]["rgb"], meta["extractors"]["xyz"]
    weights = paper_run["weights"]
    assert (rgb["name"], rgb["out_dim"], rgb["weights"]) == ("dino_vitb8", 768, weights["rgb"])
    assert (xyz["name"], xyz["out_dim"], xyz["weights"]) == ("pointmae", 1152, weights["xyz"])
    for recorded in (rgb, xyz):
        assert re.fullmatch(r"[0-9a-f]{16}", recorded["weights_hash"])
    assert rgb["weights_hash"] != xyz["weights_hash"]
    heads = meta["heads"]
    assert (heads["dim_2d"], heads["dim_3d"], heads["latent"]) == (768, 1152, 960)
    training = meta["training"]
    assert training["epochs"] == 1 and len(training["files"]) == 1
    assert training["calibration"] == "validation" and training["n_calibration"] == 1
    assert len(training["loss_history"]) == 1 and math.isfinite(training["loss_history"][0])
    assert meta["feature_norm"] is None  # the paper profile restores raw features


def test_paper_eval_writes_finite_metrics(paper_run):
    summary = json.loads(paper_run["json"].read_text())
    assert summary["model_id"] == read_metadata(paper_run["checkpoint"])["model_id"]
    assert (summary["n_good"], summary["n_defect"]) == (1, 1)
    for key in ("i_auroc", "p_auroc", "aupro"):
        assert math.isfinite(summary[key]) and 0.0 <= summary[key] <= 1.0, (key, summary[key])


def test_loaded_paper_detector_is_deterministic_and_reproduces_calibration(paper_run):
    meta = read_metadata(paper_run["checkpoint"])
    detector = Detector.from_checkpoint(paper_run["checkpoint"], device="cpu",
                                        backbone_weights=paper_run["weights"])
    assert detector.rgb_extractor.weights_hash() == meta["extractors"]["rgb"]["weights_hash"]
    assert detector.xyz_extractor.weights_hash() == meta["extractors"]["xyz"]["weights_hash"]
    validation = open_dataset(paper_run["root"], CATEGORY, "validation")
    assert len(validation) == meta["training"]["n_calibration"] == 1
    item = preprocess_sample(validation[0], detector.preprocess_cfg,
                             PreprocessCache(paper_run["cache"]))

    first_map, first_score = detector.score_inputs([item])
    score = float(first_score[0])
    assert math.isfinite(score) and score > 0
    # Training scored this image with the detector it had built from the same files: the loaded
    # one reproduces the recorded calibration score (one image: its mean and its max).
    recorded = meta["calibration_scores"]
    assert score == pytest.approx(recorded["good_mean"], rel=1e-6, abs=0)
    assert score == pytest.approx(recorded["good_max"], rel=1e-6, abs=0)
    # At a 1 % false-positive target no calibration image lies above the image threshold.
    assert score <= detector.thresholds.image

    again_map, again_score = detector.score_inputs([item])
    assert torch.equal(again_score, first_score) and torch.equal(again_map, first_map)


@pytest.mark.parametrize("modality, name", [("rgb", "dino_vitb8"), ("xyz", "pointmae")])
def test_other_backbone_file_of_same_layout_is_refused(modality, name, paper_run, other_weights):
    recorded = read_metadata(paper_run["checkpoint"])["extractors"][modality]["weights_hash"]
    weights = {**paper_run["weights"], modality: str(other_weights[modality])}
    with pytest.raises(CheckpointError) as error:
        Detector.from_checkpoint(paper_run["checkpoint"], device="cpu", backbone_weights=weights)
    message = str(error.value)
    found = re.search(
        rf"checkpoint {re.escape(str(paper_run['checkpoint']))}: the {modality} extractor {name} "
        rf"differs from the one the heads were trained with \(weights hash ([0-9a-f]{{16}}) != "
        rf"{recorded}\)", message)
    assert found, message
    assert found.group(1) != recorded


# ----------------------------------------------------------------------------------------------
# Point-MAE: which layers the 1152 channels are
# ----------------------------------------------------------------------------------------------
def test_pointmae_features_are_blocks_4_8_12_through_final_norm(pointmae_file, pointmae_state):
    # 64 groups of 16 points: the same network and code path as MAFR's 1024 x 128, quicker.
    extractor = build_extractor("pointmae", weights=str(pointmae_file), n_groups=64, group_size=16)
    blocks = extractor.blocks.blocks
    assert len(blocks) == 12
    block_out: dict[int, torch.Tensor] = {}
    block_calls: list[int] = []
    norm_calls: list[torch.Tensor] = []

    def keep_block_output(i):
        def hook(_module, _args, out):
            block_calls.append(i)
            block_out[i] = out.detach().clone()
        return hook

    handles = [block.register_forward_hook(keep_block_output(i)) for i, block in enumerate(blocks)]
    handles.append(extractor.norm.register_forward_hook(
        lambda _m, args, _out: norm_calls.append(args[0].detach().clone())))
    try:
        gen = torch.Generator().manual_seed(7)
        points = 0.05 * torch.randn(1, 300, 3, generator=gen)
        points_valid = torch.ones(1, 300, dtype=torch.bool)
        points_valid[:, 260:] = False  # padding, as in a batch of clouds of different sizes
        with torch.no_grad():
            centres, features = extractor.group_features(points, points_valid)
    finally:
        for handle in handles:
            handle.remove()

    assert centres.shape == (1, 64, 3) and features.shape == (1, 64, 1152)
    assert block_calls == list(range(12))  # every block ran once, in order
    # The final norm saw exactly the outputs of blocks 4, 8 and 12 (1-based), in that order ...
    assert len(norm_calls) == 3
    for seen, block in zip(norm_calls, (3, 7, 11)):
        assert torch.equal(seen, block_out[block])
    # ... and the features are their LayerNorms (computed here from the file's tensors),
    # concatenated.
    weight, bias = pointmae_state["norm.weight"], pointmae_state["norm.bias"]
    expected = torch.cat([F.layer_norm(block_out[b], (384,), weight, bias, eps=1e-5)
                          for b in (3, 7, 11)], dim=2)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    # The check can tell the layers apart: neighbouring blocks or un-normalised outputs differ.
    for wrong in ([2, 6, 10], [4, 8, 11]):
        other = torch.cat([F.layer_norm(block_out[b], (384,), weight, bias, eps=1e-5)
                           for b in wrong], dim=2)
        assert not torch.allclose(features, other, rtol=1e-3, atol=1e-3)
    raw = torch.cat([block_out[b] for b in (3, 7, 11)], dim=2)
    assert not torch.allclose(features, raw, rtol=1e-3, atol=1e-3)
