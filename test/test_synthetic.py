"""Synthetic generator at image sizes other than the default 256 px."""
from __future__ import annotations

import numpy as np
import pytest

from mafr_ros.data import synthetic
from mafr_ros.data.mvtec import MVTecDataset
from mafr_ros.data.synthetic import CATEGORIES, DEFECT_TYPES, generate_dataset, render_sample


@pytest.mark.parametrize("size", [64, 80])
def test_small_images_get_a_visible_defect_of_every_type(size, tmp_path):
    # At 64-80 px a 0.5-0.8 mm crack is narrower than one pixel footprint and used to fall
    # between pixel centres on every redraw ("could not place a visible crack defect").
    generate_dataset(tmp_path, seed=0, categories=CATEGORIES, n_train=0, n_validation=0,
                     n_test_good=0, n_test_per_defect=2, size=size)
    min_pixels = max(12, size * size // 3000)
    for category in CATEGORIES:
        test = MVTecDataset(tmp_path, category, "test")
        kinds = sorted({f.defect_type for f in test.files()})
        assert kinds == sorted(DEFECT_TYPES)
        for sample in test:
            assert sample.rgb.shape[:2] == (size, size)
            assert sample.gt.sum() >= min_pixels, (category, sample.defect_type)


def test_crack_widening_leaves_the_default_size_unchanged(monkeypatch):
    # The minimum width only applies where a crack would be sub-pixel: at 256 px every drawn
    # width (>= 0.5 mm) is already wider, so the samples are exactly those without the rule.
    widened = [render_sample("gland", "crack", seed, 256) for seed in range(3)]
    monkeypatch.setattr(synthetic, "_MIN_CRACK_PIXELS", 0.0)
    plain = [render_sample("gland", "crack", seed, 256) for seed in range(3)]
    for a, b in zip(widened, plain):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # ... while at 64 px the rule is what makes a crack visible at all.
    with pytest.raises(RuntimeError, match="could not place a visible crack"):
        render_sample("gland", "crack", 0, 64)
