"""Reader for the MVTec 3D-AD folder layout (also written by ``data.synthetic``).

ROOT/<category>/<train|validation|test>/<good|defect type>/{rgb/*.png, xyz/*.tiff, gt/*.png}

Samples are listed once, in sorted (defect type, file name) order, without decoding anything;
images are read on ``__getitem__``. Read-only: nothing is ever written into the dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from ..errors import DatasetError

SPLITS = ("train", "validation", "test")
GOOD = "good"


@dataclass
class Sample:
    """One registered RGB + organised point cloud pair with its ground truth."""

    rgb: np.ndarray      # (H, W, 3) uint8
    xyz: np.ndarray      # (H, W, 3) float32 metres, invalid = (0, 0, 0)
    gt: np.ndarray       # (H, W) bool, True on defect pixels (all False for good samples)
    label: int           # 0 good, 1 defective
    defect_type: str
    rgb_path: Path
    xyz_path: Path


@dataclass(frozen=True)
class SampleFiles:
    """Paths of one sample (gt_path is None for good samples and for splits without masks)."""

    rgb_path: Path
    xyz_path: Path
    gt_path: Path | None
    defect_type: str

    @property
    def label(self) -> int:
        return 0 if self.defect_type == GOOD else 1


def list_categories(root) -> list[str]:
    """Sorted names of the folders under ``root`` that hold at least one split folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder: point it at the "
                           "folder that holds the category folders (e.g. .../mvtec3d)")
    categories = sorted(p.name for p in root.iterdir()
                        if p.is_dir() and any((p / split).is_dir() for split in SPLITS))
    if not categories:
        raise DatasetError(f"dataset root {root} has no category folder with a train/validation/test "
                           "split inside: is this an MVTec 3D-AD root?")
    return categories


class MVTecDataset:
    """The samples of one category and split, optionally a seeded K-shot subset of them."""

    def __init__(self, root, category: str, split: str, shots: int | None = None, seed: int = 0):
        self.root = Path(root).expanduser()
        self.category = category
        self.split = split
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist or is not a folder")
        category_dir = self.root / category
        if not category_dir.is_dir():
            available = [p.name for p in sorted(self.root.iterdir()) if p.is_dir()]
            raise DatasetError(f"category {category!r} not found under {self.root} "
                               f"(folders there: {', '.join(available) or 'none'})")
        split_dir = category_dir / split
        if not split_dir.is_dir():
            raise DatasetError(f"{category}: split folder {split_dir} is missing; an MVTec 3D-AD "
                               "category has train/, validation/ and test/")
        self._files = _scan_split(split_dir, needs_gt=(split == "test"))
        if shots is not None:
            self._files = _pick_shots(self._files, shots, seed, split_dir)

    def files(self) -> list[SampleFiles]:
        """Paths of every sample, in dataset order, without reading any image."""
        return list(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> Sample:
        entry = self._files[index]
        rgb = _read_rgb(entry.rgb_path)
        xyz = _read_xyz(entry.xyz_path)
        if rgb.shape[:2] != xyz.shape[:2]:
            raise DatasetError(f"{entry.rgb_path} is {rgb.shape[1]}x{rgb.shape[0]} but its point cloud "
                               f"{entry.xyz_path} is {xyz.shape[1]}x{xyz.shape[0]}: RGB and xyz must "
                               "be registered on the same pixel grid")
        if entry.gt_path is None:
            gt = np.zeros(rgb.shape[:2], dtype=bool)
        else:
            gt = _read_gt(entry.gt_path)
            if gt.shape != rgb.shape[:2]:
                raise DatasetError(f"mask {entry.gt_path} is {gt.shape[1]}x{gt.shape[0]} but its image "
                                   f"is {rgb.shape[1]}x{rgb.shape[0]}")
        return Sample(rgb=rgb, xyz=xyz, gt=gt, label=entry.label, defect_type=entry.defect_type,
                      rgb_path=entry.rgb_path, xyz_path=entry.xyz_path)

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return f"MVTecDataset({str(self.root)!r}, {self.category!r}, {self.split!r}, n={len(self)})"


def _scan_split(split_dir: Path, needs_gt: bool) -> list[SampleFiles]:
    entries: list[SampleFiles] = []
    for type_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        defect_type = type_dir.name
        rgb_dir, xyz_dir = type_dir / "rgb", type_dir / "xyz"
        if not rgb_dir.is_dir() or not xyz_dir.is_dir():
            raise DatasetError(f"{type_dir} must contain rgb/ and xyz/ folders")
        rgbs = {p.stem: p for p in rgb_dir.iterdir() if p.suffix.lower() == ".png"}
        xyzs = {p.stem: p for p in xyz_dir.iterdir() if p.suffix.lower() in (".tiff", ".tif")}
        if rgbs.keys() != xyzs.keys():
            no_xyz = sorted(rgbs.keys() - xyzs.keys())
            no_rgb = sorted(xyzs.keys() - rgbs.keys())
            raise DatasetError(
                f"{type_dir}: every rgb/<name>.png needs an xyz/<name>.tiff and vice versa; "
                f"without xyz: {no_xyz[:5] or 'none'}, without rgb: {no_rgb[:5] or 'none'}")
        gts: dict[str, Path] = {}
        if defect_type != GOOD and needs_gt:
            gt_dir = type_dir / "gt"
            gts = {p.stem: p for p in gt_dir.glob("*.png")} if gt_dir.is_dir() else {}
            missing = sorted(rgbs.keys() - gts.keys())
            if missing:
                raise DatasetError(f"{type_dir}: defect samples need a mask gt/<name>.png; missing for "
                                   f"{missing[:5]}")
        for stem in sorted(rgbs):
            entries.append(SampleFiles(rgbs[stem], xyzs[stem], gts.get(stem), defect_type))
    if not entries:
        raise DatasetError(f"split {split_dir} holds no samples (expected <type>/rgb/*.png with "
                           "matching <type>/xyz/*.tiff)")
    return entries


def _pick_shots(entries: list[SampleFiles], shots: int, seed: int, split_dir: Path) -> list[SampleFiles]:
    """K samples drawn without replacement by a seeded generator, returned in dataset order."""
    if int(shots) != shots or shots < 1:
        raise DatasetError(f"shots must be a positive integer, got {shots!r}")
    if shots > len(entries):
        raise DatasetError(f"{split_dir} has {len(entries)} samples, fewer than the {shots} shots asked for")
    chosen = np.random.default_rng(seed).choice(len(entries), int(shots), replace=False)
    return [entries[i] for i in np.sort(chosen)]


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path} ({exc}); the file is corrupt") from None
    return rgb


def _read_xyz(path: Path) -> np.ndarray:
    try:
        xyz = tifffile.imread(path)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise DatasetError(f"cannot read point cloud {path} ({exc}); the file is corrupt") from None
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise DatasetError(f"point cloud {path} has shape {xyz.shape}; expected an organised "
                           "(H, W, 3) xyz image")
    xyz = np.asarray(xyz, dtype=np.float32)
    bad = ~np.isfinite(xyz).all(axis=2)
    if bad.any():  # the project's marker for a missing point is exactly (0, 0, 0)
        xyz = xyz.copy() if not xyz.flags.writeable else xyz
        xyz[bad] = 0.0
    return xyz


def _read_gt(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            mask = np.asarray(image)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read mask {path} ({exc}); the file is corrupt") from None
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask > 0  # MVTec masks hold class ids (252-255), not 255
