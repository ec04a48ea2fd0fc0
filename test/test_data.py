"""Dataset reader, shared preprocessing and synthetic generator, on the real cable_gland subset."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy.ndimage import binary_dilation

from mafr_ros.data.mvtec import MVTecDataset, list_categories
from mafr_ros.data.preprocess import (
    GridFrame, ModelInput, PreprocessCache, PreprocessConfig, clean_cloud, default_cache_dir,
    fit_background_plane, gt_to_grid, map_to_input, preprocess, preprocess_sample)
from mafr_ros.data.synthetic import CATEGORIES, DEFECT_TYPES, generate_dataset, render_sample
from mafr_ros.errors import DatasetError, InputError

MVTEC_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec3d"
DEFECTS = ("bent", "cut", "hole", "thread")


@pytest.fixture(scope="module")
def mvtec_root() -> Path:
    if not (MVTEC_ROOT / "cable_gland").is_dir():
        raise RuntimeError(f"the shared cable_gland data is missing: {MVTEC_ROOT}")
    return MVTEC_ROOT


@pytest.fixture(scope="module")
def bent_sample(mvtec_root):
    test = MVTecDataset(mvtec_root, "cable_gland", "test")
    index = next(i for i, f in enumerate(test.files()) if f.defect_type == "bent")
    return test[index]


def _border(h, w, b=10):
    mask = np.zeros((h, w), dtype=bool)
    mask[:b] = mask[-b:] = True
    mask[:, :b] = mask[:, -b:] = True
    return mask


def _valid(xyz):
    return (xyz != 0).any(axis=-1)


# ------------------------------------------------------------------------------------------
# Reader


def test_reader_counts_labels_and_masks_on_cable_gland(mvtec_root):
    assert "cable_gland" in list_categories(mvtec_root)
    train = MVTecDataset(mvtec_root, "cable_gland", "train")
    validation = MVTecDataset(mvtec_root, "cable_gland", "validation")
    test = MVTecDataset(mvtec_root, "cable_gland", "test")
    assert (len(train), len(validation), len(test)) == (60, 10, 15)
    types = [f.defect_type for f in test.files()]
    assert {t: types.count(t) for t in set(types)} == {t: 3 for t in ("good",) + DEFECTS}
    assert [f.label for f in test.files()] == [0 if t == "good" else 1 for t in types]
    assert all(f.label == 0 and f.gt_path is None for f in train.files())

    for entry, sample in zip(test.files(), test):
        assert sample.rgb.dtype == np.uint8 and sample.rgb.shape == (400, 400, 3)
        assert sample.xyz.dtype == np.float32 and sample.xyz.shape == (400, 400, 3)
        assert sample.gt.dtype == bool and sample.gt.shape == (400, 400)
        assert sample.label == entry.label and sample.defect_type == entry.defect_type
        if entry.defect_type == "good":
            assert not sample.gt.any()
        else:
            raw = np.asarray(Image.open(entry.gt_path))
            assert set(np.unique(raw)) - {0} <= {252, 253, 254, 255}  # class ids, not 255
            assert np.array_equal(sample.gt, raw > 0) and sample.gt.any()
        z = sample.xyz[..., 2][_valid(sample.xyz)]
        assert 0.55 < z.min() and z.max() < 0.75  # metres
    assert train[0].rgb_path.name == "000.png" and train[0].xyz_path.name == "000.tiff"


def test_files_lists_pairs_in_order_without_loading(mvtec_root):
    files = MVTecDataset(mvtec_root, "cable_gland", "train").files()
    assert [f.rgb_path.stem for f in files] == [f"{i:03d}" for i in range(60)]
    assert all(f.xyz_path.stem == f.rgb_path.stem and f.xyz_path.parent.name == "xyz" for f in files)


def test_shots_are_seeded_sorted_and_checked(mvtec_root):
    def pick(seed, shots=5):
        dataset = MVTecDataset(mvtec_root, "cable_gland", "train", shots, seed)
        return [f.rgb_path.name for f in dataset.files()]

    first = pick(0)
    assert len(first) == 5 and first == sorted(first)
    assert pick(0) == first
    assert pick(1) != first
    assert len(MVTecDataset(mvtec_root, "cable_gland", "train", shots=5, seed=3)) == 5
    with pytest.raises(DatasetError, match="fewer than the 61 shots"):
        MVTecDataset(mvtec_root, "cable_gland", "train", shots=61)
    with pytest.raises(DatasetError, match="positive integer"):
        MVTecDataset(mvtec_root, "cable_gland", "train", shots=0)


def _write_pair(type_dir: Path, name: str, rgb_shape=(12, 10), xyz_shape=(12, 10), gt=False, nan=False):
    for sub in ("rgb", "xyz") + (("gt",) if gt else ()):
        (type_dir / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(rgb_shape + (3,), 90, np.uint8)).save(type_dir / "rgb" / f"{name}.png")
    xyz = np.full(xyz_shape + (3,), 0.6, np.float32)
    if nan:
        xyz[0, 0] = np.nan
    tifffile.imwrite(type_dir / "xyz" / f"{name}.tiff", xyz, photometric="rgb")
    if gt:
        mask = np.zeros(rgb_shape, np.uint8)
        mask[2:4, 2:4] = 254
        Image.fromarray(mask).save(type_dir / "gt" / f"{name}.png")


def test_broken_layouts_raise_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        MVTecDataset(tmp_path / "nowhere", "part", "train")
    with pytest.raises(DatasetError, match="does not exist"):
        list_categories(tmp_path / "nowhere")
    root = tmp_path / "root"
    _write_pair(root / "part" / "train" / "good", "000", nan=True)
    with pytest.raises(DatasetError, match="category 'other' not found"):
        MVTecDataset(root, "other", "train")
    with pytest.raises(DatasetError, match="split folder .* is missing"):
        MVTecDataset(root, "part", "validation")
    with pytest.raises(DatasetError, match="unknown split"):
        MVTecDataset(root, "part", "val")
    sample = MVTecDataset(root, "part", "train")[0]
    assert np.array_equal(sample.xyz[0, 0], [0, 0, 0]) and _valid(sample.xyz).sum() == 12 * 10 - 1

    # rgb without a matching xyz
    orphan = root / "part" / "train" / "good" / "rgb" / "001.png"
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(orphan)
    with pytest.raises(DatasetError, match=r"without xyz: \['001'\]"):
        MVTecDataset(root, "part", "train")

    # empty split
    for sub in ("rgb", "xyz"):
        (root / "part" / "validation" / "good" / sub).mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no samples"):
        MVTecDataset(root, "part", "validation")

    # sizes that differ: found when the sample is read
    _write_pair(root / "part" / "test" / "good", "000", rgb_shape=(12, 10), xyz_shape=(12, 11))
    test = MVTecDataset(root, "part", "test")
    with pytest.raises(DatasetError, match="same pixel grid"):
        test[0]

    # a defect without its mask
    _write_pair(root / "part2" / "test" / "crack", "000")
    with pytest.raises(DatasetError, match="need a mask"):
        MVTecDataset(root, "part2", "test")
    assert list_categories(root) == ["part", "part2"]


# ------------------------------------------------------------------------------------------
# Point-cloud cleaning


def test_clean_cloud_removes_plane_keeps_part_and_is_deterministic(bent_sample):
    xyz = bent_sample.xyz
    before = xyz.copy()
    cleaned = clean_cloud(xyz)
    assert np.array_equal(xyz, before)  # input untouched
    assert np.array_equal(cleaned, clean_cloud(xyz))
    assert cleaned.dtype == np.float32 and cleaned.shape == xyz.shape

    valid, kept = _valid(xyz), _valid(cleaned)
    assert np.array_equal(cleaned[kept], xyz[kept])  # kept points are not moved
    assert np.all(cleaned[~kept] == 0)
    border = _border(*valid.shape)
    assert (kept & border).sum() <= 0.01 * (valid & border).sum()  # background plane gone
    assert kept.sum() < 0.4 * valid.sum()
    defect = bent_sample.gt & valid
    assert defect.sum() > 100 and kept[defect].mean() > 0.95  # the part (and its defect) stays

    plane = fit_background_plane(xyz)
    assert abs(np.linalg.norm(plane[:3]) - 1) < 1e-9 and plane[3] > 0  # unit normal, camera side
    residual = np.abs(xyz[valid & border].astype(np.float64) @ plane[:3] + plane[3])
    assert np.median(residual) < 0.001

    # NaN is the node's marker for missing depth: same result as zeros.
    with_nan = xyz.copy()
    with_nan[~valid] = np.nan
    assert np.array_equal(clean_cloud(with_nan), cleaned)


def test_cluster_filter_drops_a_floating_blob_and_matches_exact_dbscan(bent_sample):
    xyz = bent_sample.xyz[::2, ::2].copy()  # 200 x 200: small enough for exact DBSCAN
    # A 12 x 12 patch lifted 3 cm off the background, far from the part: a separate cluster.
    xyz[20:32, 20:32, 2] -= 0.03
    cfg = PreprocessConfig(border=5)
    approx = _valid(clean_cloud(xyz, cfg))
    exact = _valid(clean_cloud(xyz, PreprocessConfig(border=5, cluster_voxel_size=0.0)))
    assert not approx[20:32, 20:32].any() and not exact[20:32, 20:32].any()
    assert exact.sum() > 3000
    assert (approx ^ exact).sum() <= 0.005 * exact.sum()
    no_cluster = _valid(clean_cloud(xyz, PreprocessConfig(border=5, cluster=False)))
    assert no_cluster[20:32, 20:32].all()  # the plane cut alone keeps the blob


def test_config_round_trip_and_validation():
    cfg = PreprocessConfig(grid=112, plane_ransac_n=5, seed=3)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(InputError, match="unknown preprocessing parameters"):
        PreprocessConfig.from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(InputError, match="plane_ransac_n"):
        PreprocessConfig(plane_ransac_n=2)


# ------------------------------------------------------------------------------------------
# Square padding, resizing and the way back


def test_rgb_and_xyz_share_the_square_for_a_non_square_crop(bent_sample):
    # 300 x 350: padding above and below, and a side that is not a multiple of 100 (where the
    # reference's xyz padding and RGB padding disagree).
    crop = (slice(50, 350), slice(20, 370))
    rgb = bent_sample.rgb[crop].copy()
    h, w = rgb.shape[:2]
    rows, cols = np.mgrid[0:h, 0:w]
    # xyz encodes the source pixel of every point, so the grid says where each cell came from.
    xyz = np.stack([cols + 1.0, rows + 1.0, np.full((h, w), 0.65)], axis=-1).astype(np.float32)
    rgb[:] = 0
    rgb[180:204, 250:274] = 255  # a bright block, the "same content" in both modalities
    item = preprocess(rgb, xyz, PreprocessConfig(remove_plane=False, cluster=False))
    frame = item.frame
    assert frame == GridFrame(height=300, width=350, side=350, top=25, left=0, grid=224)
    assert item.rgb.shape == item.xyz.shape == (3, 224, 224) and item.rgb.dtype == np.float32

    src_col, src_row = item.xyz[0] - 1, item.xyz[1] - 1
    assert np.array_equal(item.valid, item.xyz[2] != 0)
    pad_rows = ~item.valid.any(axis=1)
    assert pad_rows[:16].all() and pad_rows[-16:].all() and pad_rows.sum() == 32  # 25 of 350 rows each
    in_block = item.valid & (src_row >= 180) & (src_row < 204) & (src_col >= 250) & (src_col < 274)
    xyz_centre = np.argwhere(in_block).mean(axis=0)
    luminance = item.rgb[0] * 0.229 + 0.485  # undo ImageNet normalisation of the red channel
    bright = luminance > 0.5
    rgb_centre = np.argwhere(bright).mean(axis=0)
    # Half a cell off (torch's legacy 'nearest') or a different square would fail here.
    assert np.abs(rgb_centre - xyz_centre).max() < 0.2
    assert (bright ^ in_block).sum() <= 8

    # Real content: the padding is edge-replicated RGB and empty xyz.
    real = preprocess(bent_sample.rgb[crop], bent_sample.xyz[crop])
    assert not real.valid[:16].any() and not real.valid[-16:].any() and real.valid.any()
    assert np.allclose(real.rgb[:, 0], real.rgb[:, 12], atol=0.05)


def test_map_to_input_inverts_the_geometry():
    frame = GridFrame.for_shape(300, 400, 224)
    grid_map = np.zeros((224, 224), np.float32)
    grid_map[60:100, 120:170] = 1.0
    back = map_to_input(grid_map, frame)
    assert back.shape == (300, 400)
    scale = frame.side / frame.grid
    expected = np.zeros((300, 400), bool)
    expected[int(round(60 * scale)) - frame.top:int(round(100 * scale)) - frame.top,
             int(round(120 * scale)) - frame.left:int(round(170 * scale)) - frame.left] = True
    got = back > 0.5
    assert (got & expected).sum() / (got | expected).sum() > 0.97
    assert np.abs(np.argwhere(got).mean(0) - np.argwhere(expected).mean(0)).max() < 1.0

    # The same as torch's bilinear upsampling of the square followed by the crop, for torch batches too.
    batch = torch.rand(2, 224, 224)
    reference = torch.nn.functional.interpolate(batch[:, None], size=(400, 400), mode="bilinear",
                                                align_corners=False)[:, 0, 50:350, :]
    out = map_to_input(batch, frame)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 300, 400)
    assert torch.allclose(out, reference, atol=1e-5)
    assert np.allclose(map_to_input(batch.numpy(), frame), reference.numpy(), atol=1e-5)
    with pytest.raises(InputError):
        map_to_input(np.zeros((100, 100)), frame)


def test_gt_to_grid_follows_the_xyz_sampling(bent_sample):
    gt = bent_sample.gt[50:350]
    frame = GridFrame.for_shape(300, 400, 224)
    grid_gt = gt_to_grid(gt, frame)
    assert grid_gt.dtype == bool and grid_gt.shape == (224, 224)
    assert not grid_gt[:28].any() and not grid_gt[-28:].any()
    # The cell's source pixel is the one xyz sampling picks (gt carried as a fourth "coordinate").
    marker = np.dstack([gt.astype(np.float32)] * 3)
    raw = PreprocessConfig(remove_plane=False, cluster=False)
    item = preprocess(bent_sample.rgb[50:350], marker + 1.0, raw)
    assert np.array_equal(grid_gt, item.xyz[0] > 1.5)
    assert np.array_equal(gt_to_grid(gt.astype(np.uint8) * 254, frame), grid_gt)
    assert abs(grid_gt.sum() * (400 / 224) ** 2 - gt.sum()) < 0.1 * gt.sum()


# ------------------------------------------------------------------------------------------
# Cache


def test_cache_hits_return_identical_arrays_and_write_only_to_the_cache(bent_sample, tmp_path, monkeypatch):
    monkeypatch.setenv("MAFR_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env" / "preprocess"
    dataset_dir = bent_sample.rgb_path.parents[2]
    listing = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in dataset_dir.rglob("*"))

    cache = PreprocessCache(tmp_path / "cache")
    cfg = PreprocessConfig()
    key = cache.key([bent_sample.rgb_path, bent_sample.xyz_path], cfg)
    assert cache.load(key) is None
    first = preprocess_sample(bent_sample, cfg, cache)
    entries = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert entries == [cache.path_for(key)]
    hit = cache.load(key)
    second = preprocess_sample(bent_sample, cfg, cache)
    for item in (hit, second):
        assert isinstance(item, ModelInput) and item.frame == first.frame
        for name in ("rgb", "xyz", "valid"):
            assert np.array_equal(getattr(item, name), getattr(first, name))
    direct = preprocess(bent_sample.rgb, bent_sample.xyz, cfg)
    assert np.array_equal(direct.xyz, first.xyz) and np.array_equal(direct.rgb, first.rgb)

    # Another configuration is another entry; nothing appears anywhere but in the cache folder.
    preprocess_sample(bent_sample, PreprocessConfig(grid=112), cache)
    assert len([p for p in (tmp_path / "cache").rglob("*") if p.is_file()]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in dataset_dir.rglob("*")) == listing


# ------------------------------------------------------------------------------------------
# Synthetic generator


def _digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


SMALL = dict(n_train=2, n_validation=1, n_test_good=1, n_test_per_defect=1)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    assert generate_dataset(root, seed=0, **SMALL) == [root / c for c in CATEGORIES]
    return root


def test_synthetic_dataset_is_seeded(synthetic_root, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, seed=0, **SMALL)
    assert _digests(again) == _digests(synthetic_root)
    other = tmp_path / "other"
    generate_dataset(other, seed=1, categories=["gland"], **SMALL)
    reference = _digests(synthetic_root / "gland")
    changed = _digests(other / "gland")
    assert changed.keys() == reference.keys()
    images = [k for k in reference if k.endswith((".png", ".tiff")) and "/gt/" not in k and "\\gt\\" not in k]
    assert all(changed[k] != reference[k] for k in images)
    # A re-run replaces its own earlier output, never a folder it did not write.
    generate_dataset(other, seed=0, categories=["gland"], **SMALL)
    assert _digests(other / "gland") == reference
    with pytest.raises(DatasetError, match="overwrite=True"):
        generate_dataset(other, seed=0, categories=["gland"], overwrite=False, **SMALL)
    foreign = tmp_path / "foreign"
    (foreign / "bracket").mkdir(parents=True)
    (foreign / "bracket" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="left alone"):
        generate_dataset(foreign, seed=0, categories=["bracket"], **SMALL)
    assert (foreign / "bracket" / "notes.txt").read_text() == "mine"


def test_synthetic_layout_is_readable(synthetic_root):
    assert list_categories(synthetic_root) == sorted(CATEGORIES)
    for category in CATEGORIES:
        assert len(MVTecDataset(synthetic_root, category, "train")) == 2
        assert len(MVTecDataset(synthetic_root, category, "validation")) == 1
        test = MVTecDataset(synthetic_root, category, "test")
        assert sorted(f.defect_type for f in test.files()) == sorted(("good",) + DEFECT_TYPES)
        intrinsics = json.loads((synthetic_root / category / "calibration" / "intrinsics.json").read_text())
        assert {k: intrinsics[k] for k in ("width", "height")} == {"width": 256, "height": 256}
        for entry, sample in zip(test.files(), test):
            raw = np.asarray(Image.open(entry.gt_path)) if entry.gt_path else None
            if entry.defect_type == "good":
                good_gt = entry.rgb_path.parents[1] / "gt" / entry.rgb_path.name
                assert not np.asarray(Image.open(good_gt)).any()
                assert not sample.gt.any()
            else:
                assert set(np.unique(raw)) == {0, 255} and sample.gt.sum() >= 20
            valid = _valid(sample.xyz)
            z = sample.xyz[..., 2][valid]
            assert 0.6 < z.min() and z.max() < 0.7 and 0.005 < 1 - valid.mean() < 0.15


@pytest.mark.parametrize("category", CATEGORIES)
def test_each_synthetic_defect_changes_what_it_should(category):
    seed = 11
    rgb_good, xyz_good, gt_good = render_sample(category, "good", seed)
    assert not gt_good.any()
    plane = fit_background_plane(xyz_good)
    height = xyz_good.astype(np.float64) @ plane[:3] + plane[3]
    valid_good = _valid(xyz_good)
    part = ~valid_good | (height > 0.002)  # on the part (or a missing point, e.g. a steep side)
    assert (valid_good & (height > 0.002)).mean() > 0.1

    for defect in DEFECT_TYPES:
        rgb, xyz, gt = render_sample(category, defect, seed)
        assert gt.sum() >= 20, defect
        assert part[gt].mean() > 0.95, defect  # located on the part
        near = binary_dilation(gt, iterations=10)
        changed_xyz = (xyz != xyz_good).any(axis=-1)
        changed_rgb = (rgb != rgb_good).any(axis=-1)
        assert not changed_xyz[~near].any() and not changed_rgb[~near].any(), defect
        both = gt & _valid(xyz) & valid_good
        dz = (xyz[..., 2] - xyz_good[..., 2])[both]  # + : farther from the camera
        grey = rgb.astype(np.float32).mean(-1) - rgb_good.astype(np.float32).mean(-1)
        if defect == "stain":
            assert np.array_equal(xyz, xyz_good)
            assert np.abs(grey[gt]).mean() > 20
        elif defect == "dent":
            assert dz.mean() > 0.0002
        elif defect == "bump":
            assert dz.mean() < -0.0002
        elif defect == "crack":
            assert dz.mean() > 0.0003 and grey[gt].mean() < -30
        elif defect == "missing":
            now = xyz.astype(np.float64) @ plane[:3] + plane[3]
            hole = gt & _valid(xyz)
            assert hole.mean() > 0 and np.all(now[hole] < 0.002)  # the background shows through

    # The preprocessing keeps the synthetic part and drops its background plane.
    cleaned = _valid(clean_cloud(xyz_good))
    border = _border(256, 256)
    assert not (cleaned & border).any()
    assert cleaned[valid_good & (height > 0.006)].mean() > 0.98
