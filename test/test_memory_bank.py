"""The opt-in memory-bank scorer (core/memory_bank.py, ``mafr train --memory-bank N``): greedy
k-center coreset, nearest-neighbour distances, checkpoint round trip and its failures, and that a
checkpoint without a bank is unchanged."""
import itertools

import numpy as np
import pytest
import torch

from mafr_ros.core.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from mafr_ros.core.detector import Detector
from mafr_ros.core.memory_bank import (STATE_PREFIX, MemoryBank, kcenter_coreset,
                                       nearest_distance)
from mafr_ros.core.scoring import Thresholds
from mafr_ros.data.formats import open_dataset
from mafr_ros.data.preprocess import PreprocessConfig, preprocess_sample
from mafr_ros.errors import CheckpointError
from mafr_ros.train import TrainConfig, train

BANK = 300


def _radius(points, idx):
    """Covering radius: the largest distance of a point to its nearest selected point."""
    return float(torch.cdist(points, points[idx]).min(1).values.max())


def test_coreset_is_deterministic_and_within_twice_the_optimal_radius():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(14, 3, generator=g)
    a = kcenter_coreset(points, 4, seed=5, projection=0)
    assert torch.equal(a, kcenter_coreset(points, 4, seed=5, projection=0))
    assert len(set(a.tolist())) == 4
    best = min(_radius(points, torch.tensor(c)) for c in itertools.combinations(range(14), 4))
    assert _radius(points, a) <= 2 * best + 1e-6  # the greedy k-center guarantee
    # more spread out than random subsets of the same size
    randoms = [_radius(points, torch.randperm(14, generator=g)[:4]) for _ in range(50)]
    assert _radius(points, a) <= np.median(randoms)


def test_coreset_with_projection_covers_every_cluster():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(40)[:5] * 50.0  # 5 far-apart clusters in 40-d
    points = torch.cat([c + torch.randn(200, 40, generator=g) for c in centres])
    idx = kcenter_coreset(points, 5, seed=3, projection=8)
    assert torch.equal(idx, kcenter_coreset(points, 5, seed=3, projection=8))
    assert sorted((idx // 200).tolist()) == [0, 1, 2, 3, 4]
    assert torch.equal(kcenter_coreset(points, 5000), torch.arange(1000))  # size >= N: all rows


def test_pool_bounds_the_selection_and_is_recorded():
    g = torch.Generator().manual_seed(4)
    common = torch.randn(4000, 6, generator=g)
    rare = torch.eye(6)[:3] * 40.0  # three pixels of rare normal structure, far apart
    x = torch.cat([common, rare])
    full = MemoryBank.from_pixels(x, x, 50, seed=0, projection=0, pool=len(x))
    assert full.options["pool"] == len(x) and full.options["source_pixels"] == len(x)
    # the whole pool: the farthest-point selection reaches every rare pixel
    assert float(nearest_distance(rare, full.bank_2d).max()) == pytest.approx(0.0, abs=1e-2)
    small = MemoryBank.from_pixels(x, x, 50, seed=0, projection=0, pool=200)
    assert small.options["pool"] == 200
    # every entry is a row of the input; with a 200-row pool most rows were never candidates
    assert float(nearest_distance(small.bank_2d, x).max()) == pytest.approx(0.0, abs=1e-2)
    assert not torch.equal(small.bank_2d, full.bank_2d)


def test_bank_pool_option_is_validated_and_reaches_the_config(capsys):
    from mafr_ros import cli
    from mafr_ros.core.memory_bank import DEFAULT_POOL
    base = ["train", "--dataset", "d", "--category", "c", "--out", "o"]
    parse = lambda extra: cli.train_config_from_args(cli.build_parser().parse_args(base + extra))  # noqa: E731
    assert parse([]).bank_pool == DEFAULT_POOL
    with pytest.raises(SystemExit) as exit_info:  # what `mafr train --help` prints
        cli.build_parser().parse_args(["train", "--help"])
    assert exit_info.value.code == 0
    assert f"(default {DEFAULT_POOL})" in " ".join(capsys.readouterr().out.split())
    assert parse(["--memory-bank", "100", "--bank-pool", "800000"]).bank_pool == 800000
    with pytest.raises(SystemExit, match="needs a memory bank"):
        parse(["--bank-pool", "800000"])
    with pytest.raises(SystemExit, match="bank_pool must be >= the memory bank size"):
        parse(["--memory-bank", "100", "--bank-pool", "50"])


def test_nearest_distance_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    q, b = torch.randn(500, 7, generator=g), torch.randn(300, 7, generator=g)
    brute = torch.cdist(q.double(), b.double()).min(1).values.float()
    for max_elements in (1 << 24, 1000):  # one block, and many small chunks
        assert torch.allclose(nearest_distance(q, b, max_elements), brute, atol=1e-4)
    assert torch.allclose(nearest_distance(b[:10], b), torch.zeros(10), atol=2e-3)


def test_distance_maps_only_on_valid_pixels():
    g = torch.Generator().manual_seed(3)
    f2d, f3d = torch.randn(2, 5, 6, 6, generator=g), torch.randn(2, 3, 6, 6, generator=g)
    mask = torch.rand(2, 6, 6, generator=g) > 0.4
    bank = MemoryBank(torch.randn(20, 5, generator=g), torch.randn(30, 3, generator=g), {})
    r2, r3 = bank.distance_maps(f2d, f3d, mask)
    assert r2.shape == mask.shape and torch.all(r2[~mask] == 0) and torch.all(r3[~mask] == 0)
    b, y, x = mask.nonzero()[0].tolist()
    assert r2[b, y, x] == pytest.approx(float((bank.bank_2d - f2d[b, :, y, x]).norm(dim=1).min()),
                                        abs=1e-4)
    with pytest.raises(CheckpointError, match="channels"):
        bank.distance_maps(f3d, f3d, mask)


@pytest.fixture(scope="module")
def synth(synthetic_dataset):
    return synthetic_dataset(seed=4, n_train=4, n_validation=3, n_test_good=1,
                             n_test_per_defect=1, size=128)


def _train(root, out, bank):
    cfg = TrainConfig(profile="lite", epochs=1, batch_size=4, crop=48, progress=False,
                      cache_dir=str(out.parent / "cache"), memory_bank=bank)
    return train(root, "gland", out, cfg)


@pytest.fixture(scope="module")
def checkpoints(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt_mb")
    on = out / "bank.safetensors"
    off = out / "plain.safetensors"
    return on, _train(synth, on, BANK), off, _train(synth, off, 0)


def _validation_inputs(root, meta):
    cfg = PreprocessConfig.from_dict(meta["preprocess"])
    data = open_dataset(root, "gland", "validation")
    return [preprocess_sample(data[i], cfg) for i in range(len(data))]


def test_bank_checkpoint_round_trip(checkpoints, synth):
    on, meta, off, _ = checkpoints
    opts = read_metadata(on)["memory_bank"]
    assert opts["size"] == BANK and opts["n_2d"] == BANK and opts["n_3d"] == BANK
    assert opts["method"] == "greedy_kcenter" and opts["source_pixels"] > BANK
    state, _ = load_checkpoint(on)
    assert state[STATE_PREFIX + "bank_2d"].shape == (BANK, meta["heads"]["dim_2d"])
    assert state[STATE_PREFIX + "bank_3d"].shape == (BANK, meta["heads"]["dim_3d"])
    detector = Detector.from_checkpoint(on, device="cpu")
    assert detector.memory_bank is not None
    assert torch.equal(detector.memory_bank.bank_2d, state[STATE_PREFIX + "bank_2d"])
    inputs = _validation_inputs(synth, meta)
    maps, scores = detector.score_inputs(inputs)
    again = Detector.from_checkpoint(on, device="cpu").score_inputs(inputs)
    assert torch.equal(maps, again[0]) and torch.equal(scores, again[1])
    # the scores the thresholds were calibrated on come back from the loaded checkpoint
    assert float(scores.mean()) == pytest.approx(meta["calibration_scores"]["good_mean"], rel=1e-5)
    assert float(scores.max()) == pytest.approx(meta["calibration_scores"]["good_max"], rel=1e-5)
    valid = np.stack([i.valid for i in inputs])
    th = Thresholds.calibrate(scores.numpy(), maps.numpy(), 0.01, pixel_mask=valid,
                              pixel_target_fpr=0.001)
    assert th.image == pytest.approx(meta["thresholds"]["image"], rel=1e-5)
    # the bank, not the heads, scores: without it the same detector gives other scores
    detector.memory_bank = None
    assert not torch.allclose(detector.score_inputs(inputs)[1], scores)


def test_bank_off_checkpoint_is_unchanged(checkpoints, synth):
    on, meta_on, off, meta_off = checkpoints
    assert meta_off["memory_bank"] is None and "memory_bank" not in meta_off["training"]["seconds"]
    state_off, _ = load_checkpoint(off)
    assert not [k for k in state_off if k.startswith(STATE_PREFIX)]
    plain = Detector.from_checkpoint(off, device="cpu")
    assert plain.memory_bank is None
    # the bank leaves the heads' training alone (same seed: identical heads), only the id differs
    state_on, _ = load_checkpoint(on)
    for key, value in state_off.items():
        assert torch.equal(state_on[key], value)
    assert meta_on["model_id"] != meta_off["model_id"]
    # a checkpoint without the key at all (written before the option existed) loads the same way
    state, old_meta = load_checkpoint(off)
    del old_meta["memory_bank"]
    save_checkpoint(off.parent / "old.safetensors", state, old_meta)
    old = Detector.from_checkpoint(off.parent / "old.safetensors", device="cpu")
    inputs = _validation_inputs(synth, meta_off)
    assert old.memory_bank is None
    assert torch.equal(old.score_inputs(inputs)[1], plain.score_inputs(inputs)[1])


@pytest.mark.parametrize("damage, match", [
    (lambda s, m: s.__setitem__(STATE_PREFIX + "bank_2d", s[STATE_PREFIX + "bank_2d"][:-1]),
     "expected float"),
    (lambda s, m: s.__setitem__(STATE_PREFIX + "bank_3d", s[STATE_PREFIX + "bank_3d"][:, :-1]),
     "expected float"),
    (lambda s, m: s[STATE_PREFIX + "bank_2d"].__setitem__((0, 0), float("nan")), "non-finite"),
    (lambda s, m: s.pop(STATE_PREFIX + "bank_3d"), "missing"),
    (lambda s, m: m.__setitem__("memory_bank", None), "no memory_bank metadata"),
    (lambda s, m: m["memory_bank"].pop("n_2d"), "lacks 'n_2d'"),
])
def test_corrupt_bank_is_a_checkpoint_error(checkpoints, tmp_path, damage, match):
    on = checkpoints[0]
    state, meta = load_checkpoint(on)
    damage(state, meta)
    bad = save_checkpoint(tmp_path / "bad.safetensors", state, meta)
    with pytest.raises(CheckpointError, match=match) as info:
        Detector.from_checkpoint(bad, device="cpu")
    assert "bad.safetensors" in str(info.value)


def test_cli_memory_bank_flag(monkeypatch):
    from mafr_ros import cli
    base = ["train", "--dataset", "d", "--category", "c", "--out", "o"]
    assert cli.train_config_from_args(cli.build_parser().parse_args(base)).memory_bank == 0  # off

    class Stop(Exception):
        pass

    def fake_train(root, category, out, cfg):
        raise Stop(cfg)

    monkeypatch.setattr("mafr_ros.train.train", fake_train)
    with pytest.raises(SystemExit, match="must be >= 0"):
        cli._cmd_train(cli.build_parser().parse_args(base + ["--memory-bank", "-1"]))
    with pytest.raises(Stop) as info:
        cli._cmd_train(cli.build_parser().parse_args(base + ["--memory-bank", "5000"]))
    assert info.value.args[0].memory_bank == 5000
    with pytest.raises(Stop) as info:
        cli._cmd_train(cli.build_parser().parse_args(base))
    assert info.value.args[0].memory_bank == 0
    with pytest.raises(ValueError, match="memory_bank must be >= 0"):
        TrainConfig(memory_bank=-1)


def test_bank_checkpoint_in_the_detector_process_detects_as_in_process(checkpoints, synth):
    """The node's path: a bank checkpoint loaded by the detector child process (frames in shared
    memory) gives exactly the in-process detection, and the bank (not the heads) scores there."""
    from mafr_ros.core.detector_process import DetectorProcess

    on, _, _, _ = checkpoints
    sample = open_dataset(synth, "gland", "test")[0]
    rgb, xyz = sample.rgb, sample.xyz.astype(np.float32)
    local = Detector.from_checkpoint(on, device="cpu").detect(rgb, xyz)
    with DetectorProcess(on, device="cpu") as child:
        assert child.metadata["memory_bank"]["size"] == BANK
        remote = child.detect(rgb, xyz)
        for name in ("anomaly_map", "normalized_map", "grid_map"):
            assert np.array_equal(getattr(remote, name), getattr(local, name)), name
        assert (remote.score, remote.is_anomalous) == (local.score, local.is_anomalous)
    headless = Detector.from_checkpoint(on, device="cpu")
    headless.memory_bank = None
    assert headless.detect(rgb, xyz).score != local.score
