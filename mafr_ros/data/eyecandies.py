"""Reader for the Eyecandies layout (Bonfiglioli et al., ACCV 2022), read in place.

ROOT/<Category>/<train|val|test_public>/data/ holds, per sample NNN (zero-padded index):

    NNN_image_0.png ... NNN_image_5.png   RGB under six lighting conditions (``image_index``, default 4
                                          as in the published preprocessing)
    NNN_depth.png                         16-bit depth, normalised per sample
    NNN_info_depth.yaml                   ``normalization: {min: ..., max: ...}``: depth in metres =
                                          v / 65535 * (max - min) + min
    NNN_pose.txt                          4 x 4 world-to-camera pose of the sample
    NNN_normals.png                       surface normals, (n + 1) / 2 scaled to the PNG range (optional)
    NNN_mask.png                          defect mask, test_public only (all zero: a good sample)

Each sample becomes the same :class:`~mafr_ros.data.mvtec.Sample` as an MVTec 3D-AD one (with the
normals and the metadata added, see :class:`EyecandiesSample`), so preprocessing, training and
evaluation run unchanged. The organised cloud is computed on reading, as the published offline step
does (docs: mafr_reference.md section 3.2), without writing anything:

1. depth from the PNG and the yaml min/max;
2. pin-hole back-projection, focal 711.11 px for the 512 x 512 frame and principal point at
   (W/2, H/2) in pixel-index coordinates (the published convention), composed with the inverse pose:
   ``world = inv(pose) @ [(u - cx) d / f, (v - cy) d / f, d, 1]`` (the published
   ``d * inv(K4 @ pose) @ [u, v, 1, 1/d]``, written without the per-pixel loop);
3. background removal: a rotation about x takes the line from the top-centre to the bottom-centre
   pixel (the table; flat indices 256 and -256 of a 512-wide frame) onto the +z axis through the
   bottom-centre point; points with y > -0.02, z > 1.8 or |x| > 1 in that frame are removed
   (set to exactly (0, 0, 0), the project's marker of a missing point);
4. ``frame="reference"`` (default): the rotated cloud with axes reordered (x, z, y) and scaled by
   (0.1, -0.1, 0.1), the coordinates the published models were trained on; ``frame="world"``: the
   back-projected world coordinates in metres (background removed the same way).

Test samples whose mask has any non-zero pixel are labelled defective (defect type "bad"), the
others good, as the published script sorts them into test/bad and test/good. The split names of
this project map onto Eyecandies folders: train -> train, validation -> val, test -> test_public.
Unlike the published script, sub-paths are joined relative to the root (that script joined them with
a leading slash, which makes them absolute, '/train/data', and fails unless patched).

The preprocessing cache keys a sample on its RGB and depth files; the yaml and the pose are read
alongside the depth and are assumed to change only with it (as in the released dataset).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError
from .mvtec import GOOD, SPLITS, Sample, _pick_shots

#: Project split name -> Eyecandies folder.
SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test_public"}
DEFECT = "bad"
#: Focal length of the Eyecandies camera in pixels, for its 512 x 512 frames.
FOCAL_512 = 711.11
FRAMES = ("reference", "world")
# Background box of the published script, in the table-aligned frame (dataset units, metres).
_ABOVE_TABLE = -0.02
_MAX_ALONG_TABLE = 1.8
_MAX_ACROSS = 1.0
_REFERENCE_AXES = (0, 2, 1)
_REFERENCE_SCALE = np.array([0.1, -0.1, 0.1], dtype=np.float64)

_DEPTH_RE = re.compile(r"^(\d+)_depth\.png$")


@dataclass
class EyecandiesSample(Sample):
    """An MVTec-style :class:`Sample` plus what Eyecandies adds."""

    normals: np.ndarray | None = None   # (H, W, 3) float32 unit vectors as stored (camera frame), or None
    depth: np.ndarray | None = None     # (H, W) float32 metres, as decoded
    meta: dict = field(default_factory=dict)  # index, depth range, pose, focal, paths


@dataclass(frozen=True)
class EyecandiesFiles:
    """Paths of one Eyecandies sample (no image decoded)."""

    index: str
    rgb_path: Path
    xyz_path: Path          # the depth PNG: the file the point cloud is computed from
    depth_info_path: Path
    pose_path: Path
    normals_path: Path | None
    gt_path: Path | None
    defect_type: str

    @property
    def label(self) -> int:
        return 0 if self.defect_type == GOOD else 1


# --------------------------------------------------------------------------------------------------
# Geometry (pure functions: tested against analytic scenes)
# --------------------------------------------------------------------------------------------------
def decode_depth(raw: np.ndarray, depth_min: float, depth_max: float) -> np.ndarray:
    """16-bit normalised depth -> metres: raw / 65535 * (max - min) + min (float64)."""
    return np.asarray(raw, dtype=np.float64) / 65535.0 * (depth_max - depth_min) + depth_min


def default_focal(width: int) -> float:
    """711.11 px at 512 px width; other widths keep the same field of view (fixtures, resized data)."""
    return FOCAL_512 * width / 512.0


def back_project(depth: np.ndarray, pose: np.ndarray, focal: float | None = None) -> np.ndarray:
    """(H, W) z-depth in metres + 4 x 4 world-to-camera pose -> (H, W, 3) float64 world points.

    Pixel (row v, column u) looks along ((u - W/2) / f, (v - H/2) / f, 1) in the camera frame.
    """
    depth = np.asarray(depth, dtype=np.float64)
    h, w = depth.shape
    f = default_focal(w) if focal is None else float(focal)
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    camera = np.stack([(u - w / 2.0) * depth / f, (v - h / 2.0) * depth / f, depth], axis=-1)
    camera_to_world = np.linalg.inv(np.asarray(pose, dtype=np.float64))
    return camera @ camera_to_world[:3, :3].T + camera_to_world[:3, 3]


def table_frame(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R about x and origin o such that R @ (p - o) puts the table line (top-centre ->
    bottom-centre pixel) on the +z axis through the bottom-centre point (the published rule)."""
    h, w, _ = points.shape
    top, bottom = points[0, w // 2], points[h - 1, w // 2]
    dy, dz = top[1] - bottom[1], top[2] - bottom[2]  # the published "dz", "dy" use axes 1 and 2
    norm = math.hypot(dy, dz)
    if not norm > 0:
        raise DatasetError("the top-centre and bottom-centre pixels back-project to the same point: "
                           "cannot align the table (is the depth map constant or the pose degenerate?)")
    cos_t, sin_t = dz / norm, dy / norm
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, cos_t, -sin_t], [0.0, sin_t, cos_t]])
    origin = np.array([0.0, bottom[1], bottom[2]])
    return rotation, origin


def remove_background(points: np.ndarray, frame: str = "reference") -> np.ndarray:
    """(H, W, 3) world points -> (H, W, 3) float32 cloud with the table and far points at (0, 0, 0)."""
    if frame not in FRAMES:
        raise DatasetError(f"unknown Eyecandies frame {frame!r}; choose one of {FRAMES}")
    rotation, origin = table_frame(points)
    aligned = (points - origin) @ rotation.T
    background = ((aligned[..., 1] > _ABOVE_TABLE) | (aligned[..., 2] > _MAX_ALONG_TABLE)
                  | (np.abs(aligned[..., 0]) > _MAX_ACROSS) | ~np.isfinite(aligned).all(axis=-1))
    out = aligned[..., _REFERENCE_AXES] * _REFERENCE_SCALE if frame == "reference" else points
    out = out.astype(np.float32)
    out[background] = 0.0
    # A kept point that lands exactly on (0, 0, 0) would read as missing: nudge it (never happens
    # on real data, where the origin is the bottom-centre table point, itself background).
    on_origin = ~background & ~out.any(axis=-1)
    out[on_origin, 2] = np.float32(1e-9)
    return out


def decode_normals(raw: np.ndarray) -> np.ndarray:
    """PNG normals (n + 1) / 2 in [0, max] -> (H, W, 3) float32 unit vectors; zero-length stays 0."""
    raw = np.asarray(raw)
    if raw.ndim != 3 or raw.shape[2] < 3:
        raise DatasetError(f"normals image has shape {raw.shape}; expected (H, W, 3)")
    top = 65535.0 if raw.dtype == np.uint16 else 255.0
    n = raw[..., :3].astype(np.float32) / top * 2.0 - 1.0
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    return np.where(length > 1e-3, n / np.maximum(length, 1e-12), 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------
def read_depth_range(path: Path) -> tuple[float, float]:
    import yaml

    try:
        content = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"depth metadata {path} is missing: every NNN_depth.png needs its "
                           "NNN_info_depth.yaml with normalization: {min: ..., max: ...}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(f"cannot parse depth metadata {path} ({exc}); it must be YAML with "
                           "normalization: {min: ..., max: ...}") from None
    norm = content.get("normalization") if isinstance(content, dict) else None
    if not isinstance(norm, dict) or "min" not in norm or "max" not in norm:
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DatasetError(f"depth metadata {path} has no normalization.min / normalization.max "
                           f"(found {found}); the depth PNG cannot be converted to metres without them")
    try:
        low, high = float(norm["min"]), float(norm["max"])
    except (TypeError, ValueError):
        raise DatasetError(f"depth metadata {path}: normalization min/max must be numbers, got "
                           f"{norm['min']!r} / {norm['max']!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and high > low >= 0):
        raise DatasetError(f"depth metadata {path}: need 0 <= min < max (metres), got min {low}, "
                           f"max {high}")
    return low, high


def read_pose(path: Path) -> np.ndarray:
    try:
        pose = np.loadtxt(path, dtype=np.float64)
    except FileNotFoundError:
        raise DatasetError(f"pose {path} is missing: every Eyecandies sample needs NNN_pose.txt "
                           "(a 4 x 4 world-to-camera matrix)") from None
    except ValueError as exc:
        raise DatasetError(f"cannot parse pose {path} ({exc}); expected 4 rows of 4 numbers") from None
    if pose.shape != (4, 4):
        raise DatasetError(f"pose {path} has shape {pose.shape}; expected a 4 x 4 matrix")
    if not np.isfinite(pose).all() or not np.allclose(pose[3], [0, 0, 0, 1]) \
            or abs(np.linalg.det(pose[:3, :3])) < 1e-9:
        raise DatasetError(f"pose {path} is not a rigid transform (last row must be 0 0 0 1 and the "
                           "3 x 3 part invertible)")
    return pose


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------
def is_eyecandies_category(category_dir: Path) -> bool:
    """True when the folder looks like an Eyecandies category (a split with a data/ folder)."""
    return any((Path(category_dir) / folder / "data").is_dir() for folder in SPLIT_FOLDERS.values())


class EyecandiesDataset:
    """The samples of one Eyecandies category and split, optionally a seeded K-shot subset.

    Same interface as :class:`~mafr_ros.data.mvtec.MVTecDataset` (``files``, ``len``, indexing,
    iteration); K-shot subsets use the same seeded draw.
    """

    def __init__(self, root, category: str, split: str, shots: int | None = None, seed: int = 0,
                 image_index: int = 4, frame: str = "reference", focal: float | None = None):
        self.root = Path(root).expanduser()
        self.category = category
        self.split = split
        self.image_index = int(image_index)
        self.frame = frame
        self.focal = focal
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if frame not in FRAMES:
            raise DatasetError(f"unknown Eyecandies frame {frame!r}; choose one of {FRAMES}")
        if not 0 <= self.image_index <= 5:
            raise DatasetError(f"Eyecandies has lighting images 0-5, got image_index {image_index}")
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist or is not a folder")
        category_dir = self.root / category
        if not category_dir.is_dir():
            available = [p.name for p in sorted(self.root.iterdir()) if p.is_dir()]
            raise DatasetError(f"category {category!r} not found under {self.root} "
                               f"(folders there: {', '.join(available) or 'none'})")
        data_dir = category_dir / SPLIT_FOLDERS[split] / "data"  # relative join (see module doc)
        if not data_dir.is_dir():
            raise DatasetError(f"{category}: {data_dir} is missing; an Eyecandies category has "
                               "train/data, val/data and test_public/data")
        self.data_dir = data_dir
        self._files = self._scan(data_dir, with_masks=(split == "test"))
        if shots is not None:
            self._files = _pick_shots(self._files, shots, seed, data_dir)

    def _scan(self, data_dir: Path, with_masks: bool) -> list[EyecandiesFiles]:
        indices = sorted(m.group(1) for p in data_dir.iterdir() if (m := _DEPTH_RE.match(p.name)))
        if not indices:
            raise DatasetError(f"{data_dir} holds no samples (expected NNN_depth.png with "
                               f"NNN_image_{self.image_index}.png, NNN_info_depth.yaml, NNN_pose.txt)")
        entries = []
        for idx in indices:
            path = lambda suffix: data_dir / f"{idx}_{suffix}"  # noqa: E731
            rgb = path(f"image_{self.image_index}.png")
            missing = [p.name for p in (rgb, path("info_depth.yaml"), path("pose.txt")) if not p.is_file()]
            if missing:
                raise DatasetError(f"{data_dir}: sample {idx} has a depth map but no {', '.join(missing)}")
            gt_path, defect = None, GOOD
            if with_masks:
                gt_path = path("mask.png")
                if not gt_path.is_file():
                    raise DatasetError(f"{data_dir}: test sample {idx} has no {gt_path.name}; "
                                       "test_public samples need a mask (all zero for good ones)")
                defect = DEFECT if _read_mask(gt_path).any() else GOOD
            normals = path("normals.png")
            entries.append(EyecandiesFiles(idx, rgb, path("depth.png"), path("info_depth.yaml"),
                                           path("pose.txt"), normals if normals.is_file() else None,
                                           gt_path, defect))
        return entries

    def files(self) -> list[EyecandiesFiles]:
        return list(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> EyecandiesSample:
        entry = self._files[index]
        rgb = _read_rgb(entry.rgb_path)
        raw = _read_png(entry.xyz_path, "depth map")
        if raw.ndim != 2 or raw.dtype != np.uint16:
            raise DatasetError(f"depth map {entry.xyz_path} is {raw.dtype} {raw.shape}; Eyecandies "
                               "depth is a single-channel 16-bit PNG")
        if raw.shape != rgb.shape[:2]:
            raise DatasetError(f"depth map {entry.xyz_path} is {raw.shape[1]}x{raw.shape[0]} but its "
                               f"image {entry.rgb_path} is {rgb.shape[1]}x{rgb.shape[0]}")
        low, high = read_depth_range(entry.depth_info_path)
        pose = read_pose(entry.pose_path)
        depth = decode_depth(raw, low, high)
        focal = self.focal if self.focal is not None else default_focal(raw.shape[1])
        xyz = remove_background(back_project(depth, pose, focal), self.frame)
        normals = None
        if entry.normals_path is not None:
            normals = decode_normals(_read_png(entry.normals_path, "normals image"))
            if normals.shape[:2] != rgb.shape[:2]:
                raise DatasetError(f"normals {entry.normals_path} are {normals.shape[1]}x"
                                   f"{normals.shape[0]}, the image {rgb.shape[1]}x{rgb.shape[0]}")
        gt = np.zeros(rgb.shape[:2], dtype=bool) if entry.gt_path is None else _read_mask(entry.gt_path)
        if gt.shape != rgb.shape[:2]:
            raise DatasetError(f"mask {entry.gt_path} is {gt.shape[1]}x{gt.shape[0]} but its image is "
                               f"{rgb.shape[1]}x{rgb.shape[0]}")
        meta = {"index": entry.index, "depth_min": low, "depth_max": high, "pose": pose.tolist(),
                "focal": focal, "frame": self.frame, "depth_path": str(entry.xyz_path)}
        return EyecandiesSample(rgb=rgb, xyz=xyz, gt=gt, label=entry.label,
                                defect_type=entry.defect_type, rgb_path=entry.rgb_path,
                                xyz_path=entry.xyz_path, normals=normals,
                                depth=depth.astype(np.float32), meta=meta)

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return (f"EyecandiesDataset({str(self.root)!r}, {self.category!r}, {self.split!r}, "
                f"n={len(self)})")


def _read_png(path: Path, what: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {what} {path} ({exc}); the file is corrupt") from None


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path} ({exc}); the file is corrupt") from None


def _read_mask(path: Path) -> np.ndarray:
    mask = _read_png(path, "mask")
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask > 0
