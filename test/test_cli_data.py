"""`mafr synth` and `mafr preprocess` as a user runs them (the real command in its own process):
the MVTec 3D-AD layout, seeded output, and a preprocessing cache filled outside the dataset,
whose files stay untouched."""
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mafr_ros.data.formats import open_dataset
from mafr_ros.data.preprocess import PreprocessCache, PreprocessConfig, preprocess_sample


def _mafr(*args, timeout=600):
    out = subprocess.run([sys.executable, "-m", "mafr_ros.cli", *map(str, args)],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_then_preprocess(tmp_path):
    data = tmp_path / "synth"
    printed = _mafr("synth", "--out", data, "--seed", 1, "--categories", "gland", "--train", 2,
                    "--size", 96)
    assert "gland" in printed
    root = data / "gland"
    for split in ("train/good", "validation/good", "test/good"):
        rgb = sorted((root / split / "rgb").glob("*.png"))
        xyz = sorted((root / split / "xyz").glob("*.tiff"))
        assert rgb and [p.stem for p in rgb] == [p.stem for p in xyz], split
    assert len(list((root / "train/good/rgb").glob("*.png"))) == 2
    defects = [d.name for d in (root / "test").iterdir() if d.name != "good"]
    assert len(defects) >= 5
    for kind in defects:  # each defective test image has its ground-truth mask
        for png in (root / "test" / kind / "rgb").glob("*.png"):
            mask = np.array(Image.open(root / "test" / kind / "gt" / png.name))
            assert mask.shape == (96, 96) and mask.any(), (kind, png.name)
    image = np.array(Image.open(root / "train/good/rgb/000.png"))
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8

    before = _digests(data)
    again = tmp_path / "again"
    _mafr("synth", "--out", again, "--seed", 1, "--categories", "gland", "--train", 2, "--size", 96)
    assert _digests(again) == before  # same seed, same files
    _mafr("synth", "--out", tmp_path / "other", "--seed", 2, "--categories", "gland", "--train", 2,
          "--size", 96)
    assert _digests(tmp_path / "other") != before

    cache_dir = tmp_path / "cache"
    printed = _mafr("preprocess", "--dataset", data, "--cache-dir", cache_dir)
    n_samples = sum(len(open_dataset(data, "gland", split))
                    for split in ("train", "validation", "test"))
    assert f"preprocessed {n_samples} samples" in printed
    assert _digests(data) == before  # the dataset is never modified
    assert len([p for p in cache_dir.rglob("*") if p.is_file()]) >= n_samples
    # what the command cached is what training reads back: equal to a fresh computation
    cache = PreprocessCache(cache_dir)
    sample = open_dataset(data, "gland", "test")[0]
    assert cache.load(cache.key([sample.rgb_path, sample.xyz_path], PreprocessConfig())) is not None
    cached = preprocess_sample(sample, PreprocessConfig(), cache)
    fresh = preprocess_sample(sample, PreprocessConfig(), None)
    assert np.array_equal(cached.rgb, fresh.rgb) and np.array_equal(cached.xyz, fresh.xyz)
    assert np.array_equal(cached.valid, fresh.valid)
