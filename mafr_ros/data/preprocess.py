"""The one preprocessing path shared by training, evaluation and the ROS node.

(rgb uint8 (H, W, 3), organised xyz float (H, W, 3) metres) ->
    ``clean_cloud``   background-plane removal + largest-cluster filter (reference §3.1, online),
    square padding    the SAME centred square for both modalities (the reference pads xyz to
                      multiples of 100 but RGB to the exact square, which misaligns them),
    resize            RGB bicubic (PIL, as the reference loader) + ImageNet normalisation,
                      xyz nearest with pixel-centre sampling (the same geometry as the RGB resize;
                      torch's legacy 'nearest' is shifted by half a source pixel),
-> ``ModelInput`` on the S x S model grid, plus the ``GridFrame`` that maps grid maps back.

Deviations from the published code, on purpose:
- The background plane is fitted with a seeded NumPy RANSAC (MSAC scoring, minimal 3-point
  samples, least-squares refit on the inliers) instead of Open3D's ``segment_plane``: Open3D draws
  its samples from one shared generator inside an OpenMP loop, so which hypothesis wins (and its
  early stop) depends on thread scheduling. ``ransac_n`` defaults to 3, not the reference's 50: a
  50-point sample on a border strip that contains part/clutter points is almost never outlier-free,
  which defeats RANSAC; the final refit on all inliers gives the noise averaging 50 was meant for.
- DBSCAN runs on a voxel grid (``cluster_voxel_size``, default 1.5 mm = eps / 4) with every voxel
  weighted by its point count (a voxel is core when the weighted count of points within ``eps`` of
  its centroid reaches ``min_points``). MVTec clouds have ~0.25 mm point spacing, so eps = 6 mm holds
  ~2000 neighbours per point and exact DBSCAN on ~25k points takes seconds (Open3D: 4.2 s on 2 cores).
  Labels are mapped back to every point. ``cluster_voxel_size = 0`` runs exact DBSCAN (validation
  only: memory grows with the number of neighbour pairs).
- Inputs are never modified and nothing is written next to the dataset (the reference overwrites
  the .tiff files); ``PreprocessCache`` stores results in a separate folder.

``preprocess(..., method="reference")`` runs the original implementation of the cleaning; the
default ``method="fast"`` returns bit-identical arrays faster (see "Point-cloud cleaning" below and
bench/preprocess.py), so PREPROCESS_VERSION and every cache key are unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ..errors import InputError
from ..geometry import valid_mask

#: Bumped whenever the numbers ``preprocess`` produces change: part of every cache key.
PREPROCESS_VERSION = 1

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Fewer valid border points than this: no plane is fitted (the part fills the view or the
# border has no depth); the frame is then only cluster-filtered.
_MIN_PLANE_POINTS = 100
# Hypotheses are scored on at most this many border points (a random, seeded subset).
_MAX_SCORING_POINTS = 2048
_RANSAC_CHUNK = 64
_RANSAC_CONFIDENCE = 0.999


@dataclass
class PreprocessConfig:
    """Every parameter that changes the model input; stored in checkpoints (``to_dict``)."""

    grid: int = 224
    remove_plane: bool = True
    border: int = 10                         # pixels of each image border used to fit the plane
    plane_distance_threshold: float = 0.004  # RANSAC inlier band (metres)
    plane_ransac_n: int = 3                  # points per hypothesis (reference: 50, see module doc)
    plane_iterations: int = 1000
    plane_cut: float = 0.005                 # points closer than this to the plane are removed (m)
    cluster: bool = True
    dbscan_eps: float = 0.006
    dbscan_min_points: int = 30
    cluster_voxel_size: float = 0.0015       # 0 = exact DBSCAN (slow; see module doc)
    seed: int = 0                            # RANSAC seed: the same frame always gives the same plane

    def __post_init__(self):
        if self.grid < 8:
            raise InputError(f"preprocess grid must be >= 8 pixels, got {self.grid}")
        if self.border < 1:
            raise InputError(f"preprocess border must be >= 1 pixel, got {self.border}")
        if self.plane_ransac_n < 3:
            raise InputError(f"plane_ransac_n must be >= 3 (a plane needs 3 points), got "
                             f"{self.plane_ransac_n}")
        if self.plane_iterations < 1:
            raise InputError(f"plane_iterations must be >= 1, got {self.plane_iterations}")
        for name in ("plane_distance_threshold", "plane_cut", "dbscan_eps"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0 metres, got {getattr(self, name)}")
        if self.dbscan_min_points < 1:
            raise InputError(f"dbscan_min_points must be >= 1, got {self.dbscan_min_points}")
        if not self.cluster_voxel_size >= 0:
            raise InputError(f"cluster_voxel_size must be >= 0 metres, got {self.cluster_voxel_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PreprocessConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown preprocessing parameters {unknown}; this checkpoint or "
                             "configuration was written by a different mafr_ros version")
        return cls(**values)


@dataclass(frozen=True)
class GridFrame:
    """Where an H x W input sits in the centred side x side square that is resized to grid x grid."""

    height: int
    width: int
    side: int
    top: int
    left: int
    grid: int

    @classmethod
    def for_shape(cls, height: int, width: int, grid: int) -> "GridFrame":
        side = max(height, width)
        return cls(height, width, side, (side - height) // 2, (side - width) // 2, grid)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ModelInput:
    """One sample on the model grid (NumPy; the model side batches and moves it to a device)."""

    rgb: np.ndarray    # (3, S, S) float32, ImageNet-normalised
    xyz: np.ndarray    # (3, S, S) float32, metres, invalid = 0
    valid: np.ndarray  # (S, S) bool, xyz is a point
    frame: GridFrame


# --------------------------------------------------------------------------------------------
# Point-cloud cleaning
#
# Two implementations of one computation. "fast" (the default everywhere) and "reference" (the
# PREPROCESS_VERSION 1 code, kept verbatim for the equality tests and bench/preprocess.py). The
# fast path changes only how the numbers are reached, never which operations produce them:
# - validity is tested per channel (NumPy reductions over a length-3 last axis are ~20x slower
#   than three elementwise passes), the border strip is gathered through a cached pixel index in
#   the same row-major order (so the seeded RANSAC draws the same points);
# - the plane cut reuses its float64 copy of the points for the clustering;
# - DBSCAN: a k-d tree split at midpoints instead of medians (balanced_tree=False: on the Kinect
#   frame ~1.6x faster to build, ~1.3x to search); the pair SET within eps is the same (the same
#   squared-distance test), only its order differs, and
#   nothing downstream depends on that order: counts are sums of integers, connected components
#   are labelled by their smallest unit, border ties are broken by a total lexicographic order),
#   connected components of the core units only (the reference's graph also holds every non-core
#   unit as an isolated node), no duplicate summing for pairs that are unique by construction;
# - ``preprocess`` samples the model grid from the kept-pixel mask instead of materialising the
#   cleaned full-size cloud first.
# test/test_preprocess_speed.py checks bit-identical outputs on the real Kinect frame and every
# cable_gland frame.

METHODS = ("fast", "reference")


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"preprocessing method must be one of {METHODS}, got {method!r}")
    return method


def _lap(timings: dict | None, name: str, start: float) -> float:
    """Adds the time since ``start`` to timings[name] (when timing) and returns now."""
    now = time.perf_counter()
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + now - start
    return now


def _check_xyz(xyz) -> np.ndarray:
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[2] != 3 or xyz.shape[0] == 0 or xyz.shape[1] == 0:
        raise InputError(f"xyz must be an organised (H, W, 3) point cloud, got shape {xyz.shape}")
    if not np.issubdtype(xyz.dtype, np.floating):
        raise InputError(f"xyz must be floating point metres, got dtype {xyz.dtype}")
    return xyz


def _valid_points_reference(xyz: np.ndarray) -> np.ndarray:
    return np.isfinite(xyz).all(axis=2) & (xyz != 0).any(axis=2)


def _border_mask(height: int, width: int, border: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[:border] = True
    mask[-border:] = True
    mask[:, :border] = True
    mask[:, -border:] = True
    return mask


@lru_cache(maxsize=16)
def _border_pixels(height: int, width: int, border: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the border-strip pixels in row-major order, the order of ``xyz[mask]``."""
    rows, cols = np.nonzero(_border_mask(height, width, border))
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def _planes_from_samples(samples: np.ndarray) -> np.ndarray:
    """(K, n, 3) point samples -> (K, 4) unit planes (a, b, c, d); degenerate samples get NaN."""
    if samples.shape[1] == 3:
        normal = np.cross(samples[:, 1] - samples[:, 0], samples[:, 2] - samples[:, 0])
        centre = samples[:, 0]
    else:
        centre = samples.mean(axis=1)
        # Least-squares plane of each sample: the right singular vector of the smallest value.
        normal = np.linalg.svd(samples - centre[:, None], full_matrices=False)[2][:, 2]
    norm = np.linalg.norm(normal, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normal = np.where(norm > 1e-12, normal / norm, np.nan)
    return np.concatenate([normal, -(normal * centre).sum(axis=1, keepdims=True)], axis=1)


def _refit(points: np.ndarray) -> np.ndarray:
    centre = points.mean(axis=0)
    normal = np.linalg.svd(points - centre, full_matrices=False)[2][2]
    return np.append(normal, -normal @ centre)


def fit_background_plane(xyz: np.ndarray, cfg: PreprocessConfig | None = None) -> np.ndarray | None:
    """Plane (a, b, c, d), unit normal towards the camera, of the valid points in the border strips.

    None when fewer than 100 border points are valid (no reliable plane). Deterministic: the
    hypotheses come from ``np.random.default_rng(cfg.seed)``.
    """
    cfg = cfg or PreprocessConfig()
    xyz = _check_xyz(xyz)
    return _fit_border_plane(xyz, valid_mask(xyz), cfg)


def _fit_border_plane(xyz: np.ndarray, valid: np.ndarray, cfg: PreprocessConfig) -> np.ndarray | None:
    rows, cols = _border_pixels(valid.shape[0], valid.shape[1], cfg.border)
    inside = valid[rows, cols]
    return _ransac_plane(xyz[rows[inside], cols[inside]].astype(np.float64), cfg)


def _fit_border_plane_reference(xyz: np.ndarray, valid: np.ndarray,
                                cfg: PreprocessConfig) -> np.ndarray | None:
    height, width = valid.shape
    points = xyz[_border_mask(height, width, cfg.border) & valid].astype(np.float64)
    return _ransac_plane(points, cfg)


def _ransac_plane(points: np.ndarray, cfg: PreprocessConfig) -> np.ndarray | None:
    """Seeded MSAC plane of (N, 3) float64 border points, refitted on its inliers (both methods)."""
    if len(points) < max(_MIN_PLANE_POINTS, cfg.plane_ransac_n):
        return None
    rng = np.random.default_rng(cfg.seed)
    scoring = points
    if len(points) > _MAX_SCORING_POINTS:
        scoring = points[np.sort(rng.choice(len(points), _MAX_SCORING_POINTS, replace=False))]
    # Samples that repeat a point are degenerate (NaN plane) and simply lose.
    picks = rng.integers(0, len(points), (cfg.plane_iterations, cfg.plane_ransac_n))
    # Hypotheses are scored in fixed-order chunks with the standard adaptive stop (enough
    # iterations for 99.9 % confidence at the best inlier ratio so far): a clean background plane
    # stops after the first chunk, a cluttered border uses up to plane_iterations. The order is
    # fixed, so the result is still a pure function of (points, seed).
    t = cfg.plane_distance_threshold
    best, best_cost, needed, done = None, np.inf, cfg.plane_iterations, 0
    while done < needed:
        planes = _planes_from_samples(points[picks[done:done + _RANSAC_CHUNK]])
        done += len(planes)
        dist = np.minimum(np.abs(planes[:, :3] @ scoring.T + planes[:, 3:]), t)
        # MSAC cost: truncated squared distance; unlike the plain inlier count it rarely ties.
        cost = np.einsum("ij,ij->i", dist, dist)
        cost[np.isnan(cost)] = np.inf
        k = int(np.argmin(cost))
        if cost[k] < best_cost:
            best, best_cost = planes[k], cost[k]
            inlier_ratio = float((dist[k] < t).mean())
            needed = min(cfg.plane_iterations,
                         _ransac_iterations(inlier_ratio, cfg.plane_ransac_n, cfg.plane_iterations))
    if best is None:
        return None
    inliers = np.abs(points @ best[:3] + best[3]) < t
    plane = _refit(points[inliers]) if inliers.sum() >= 3 else best
    if plane[3] < 0:  # the camera (origin) lies on the positive side
        plane = -plane
    return plane


def _ransac_iterations(inlier_ratio: float, sample_size: int, cap: int) -> int:
    """Hypotheses needed to draw one all-inlier sample with probability _RANSAC_CONFIDENCE."""
    all_inlier = inlier_ratio ** sample_size
    if all_inlier >= 1.0:
        return 1
    if all_inlier <= 0.0:
        return cap
    return int(np.ceil(np.log(1.0 - _RANSAC_CONFIDENCE) / np.log1p(-all_inlier)))


def _cluster_units(points: np.ndarray, cfg: PreprocessConfig):
    """(inverse (N,), weight (U,), centres (U, 3)): the voxels (or points) DBSCAN runs on.

    Units are in voxel-key order and every centre is the bincount mean of its points in input
    order; the tie-breaking and the eps decisions of both methods rest on exactly these numbers.
    """
    n = len(points)
    if cfg.cluster_voxel_size > 0:
        cells = np.floor(points / cfg.cluster_voxel_size)
        cells -= cells.min(axis=0)
        dims = cells.max(axis=0) + 1
        if dims.prod() < 2.0 ** 62:  # one int64 key per voxel: a 1-D unique is much faster
            c = cells.astype(np.int64)
            keys = (c[:, 0] * int(dims[1]) + c[:, 1]) * int(dims[2]) + c[:, 2]
            _, inverse, weight = np.unique(keys, return_inverse=True, return_counts=True)
        else:  # absurd spans (corrupt far-away points): compare voxel rows instead
            _, inverse, weight = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
            inverse = inverse.ravel()
        centres = np.stack([np.bincount(inverse, points[:, k], minlength=len(weight))
                            for k in range(3)], axis=1) / weight[:, None]
    else:
        inverse = np.arange(n)
        weight = np.ones(n, dtype=np.int64)
        centres = points
    return inverse, weight, centres


def _cluster_units_fast(points: np.ndarray, cfg: PreprocessConfig):
    """``_cluster_units`` with the same numbers, computed column by column.

    Reductions over the length-3 axis of an (N, 3) array are strided and slow; per column the
    floor, min and max are contiguous passes. The unique keys come from one argsort (what
    np.unique does inside) without np.unique's extra passes; units stay in ascending key order.
    """
    if cfg.cluster_voxel_size <= 0:
        return _cluster_units(points, cfg)
    cells, dims = [], []
    for k in range(3):
        column = np.floor(points[:, k] / cfg.cluster_voxel_size)
        column -= column.min()
        dims.append(column.max() + 1)
        cells.append(column.astype(np.int64))
    if dims[0] * dims[1] * dims[2] >= 2.0 ** 62:  # the reference's fallback for absurd spans
        return _cluster_units(points, cfg)
    keys = cells[0] * int(dims[1])
    keys += cells[1]
    keys *= int(dims[2])
    keys += cells[2]
    order = np.argsort(keys)
    sorted_keys = keys[order]
    first = np.empty(len(keys), dtype=bool)
    first[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
    inverse = np.empty(len(keys), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    weight = np.diff(np.append(starts, len(keys)))
    centres = np.stack([np.bincount(inverse, points[:, k], minlength=len(weight))
                        for k in range(3)], axis=1) / weight[:, None]
    return inverse, weight, centres


def _largest_cluster(points: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(N,) bool: points of the largest DBSCAN cluster (counted in original points).

    The same result as ``_largest_cluster_reference`` (see there for the definition), faster.
    """
    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=bool)
    inverse, weight, centres = _cluster_units_fast(points, cfg)
    units = len(weight)
    pairs = cKDTree(centres, balanced_tree=False).query_pairs(cfg.dbscan_eps, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    w = weight.astype(np.float64)
    count = w + np.bincount(i, w[j], minlength=units) + np.bincount(j, w[i], minlength=units)
    core = count >= cfg.dbscan_min_points
    if not core.any():
        return np.zeros(n, dtype=bool)

    # Components of the core units alone, renumbered 0..C-1 in unit order: the numbering is
    # monotone, so components are still labelled in the order of their smallest unit, and the
    # reference's tie-break (argmax takes the first label) picks the same cluster.
    core_i, core_j = core[i], core[j]
    both = core_i & core_j
    compact = np.cumsum(core) - 1
    n_core = int(compact[-1]) + 1
    graph = coo_matrix((np.ones(int(both.sum())), (compact[i[both]], compact[j[both]])),
                       shape=(n_core, n_core))
    # query_pairs lists each pair once: no duplicates to sum (tocsr would otherwise also sort every
    # row, 2/3 of the conversion; connected_components does not need sorted rows).
    graph.has_canonical_format = True
    _, component = connected_components(graph.tocsr(), directed=False)
    label = np.full(units, -1, dtype=np.int64)
    label[core] = component

    # Border units: nearest core neighbour decides, ties to the smaller unit index.
    mixed = core_i != core_j
    i_core = core_i[mixed]
    src = np.where(i_core, j[mixed], i[mixed])  # the non-core end
    dst = np.where(i_core, i[mixed], j[mixed])  # the core end
    if len(src):
        d2 = ((centres[src] - centres[dst]) ** 2).sum(axis=1)
        order = np.lexsort((dst, d2, src))
        src, dst = src[order], dst[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = src[1:] != src[:-1]
        label[src[first]] = label[dst[first]]

    labelled = label >= 0
    sizes = np.bincount(label[labelled], w[labelled])
    return label[inverse] == int(np.argmax(sizes))


def _largest_cluster_reference(points: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(N,) bool: points of the largest DBSCAN cluster (counted in original points).

    Core units (voxels, or points when cluster_voxel_size = 0) have a weighted neighbour count
    (including themselves) >= min_points; clusters are the connected components of core units
    closer than eps; a border unit joins the cluster of its nearest core neighbour. Ties between
    equally large clusters go to the one whose first unit comes first (voxel-key order, or pixel
    order when exact), so the result depends only on the input.
    """
    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=bool)
    inverse, weight, centres = _cluster_units(points, cfg)
    units = len(weight)
    pairs = cKDTree(centres).query_pairs(cfg.dbscan_eps, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    count = weight + np.bincount(i, weight[j], minlength=units) + np.bincount(j, weight[i], minlength=units)
    core = count >= cfg.dbscan_min_points
    if not core.any():
        return np.zeros(n, dtype=bool)

    both = core[i] & core[j]
    graph = coo_matrix((np.ones(both.sum(), dtype=np.int8), (i[both], j[both])), shape=(units, units))
    _, component = connected_components(graph, directed=False)
    label = np.where(core, component, -1)

    # Border units: nearest core neighbour decides (pairs listed in both directions).
    src = np.concatenate([i, j])
    dst = np.concatenate([j, i])
    attach = ~core[src] & core[dst]
    if attach.any():
        src, dst = src[attach], dst[attach]
        d2 = ((centres[src] - centres[dst]) ** 2).sum(axis=1)
        order = np.lexsort((dst, d2, src))
        first = np.ones(len(order), dtype=bool)
        first[1:] = src[order][1:] != src[order][:-1]
        label[src[order][first]] = component[dst[order][first]]

    labelled = label >= 0
    sizes = np.bincount(label[labelled], weight[labelled])
    return label[inverse] == int(np.argmax(sizes))


def _kept_pixels(xyz: np.ndarray, cfg: PreprocessConfig, timings: dict | None = None) -> np.ndarray:
    """Flat (row-major) indices of the pixels whose points survive the cleaning, ascending."""
    start = time.perf_counter()
    valid = valid_mask(xyz)
    kept = np.flatnonzero(valid)
    points = None  # float64 copies of the float32 points, as the reference computes them
    if len(kept) and (cfg.remove_plane or cfg.cluster):
        points = xyz.reshape(-1, 3)[kept].astype(np.float32, copy=False).astype(np.float64)
    if cfg.remove_plane and len(kept):
        plane = _fit_border_plane(xyz, valid, cfg)
        if plane is not None:
            off_plane = np.abs(points @ plane[:3] + plane[3]) >= cfg.plane_cut
            kept, points = kept[off_plane], points[off_plane]
    start = _lap(timings, "plane", start)
    if cfg.cluster and len(kept):
        kept = kept[_largest_cluster(points, cfg)]
    _lap(timings, "cluster", start)
    return kept


def _clean_cloud_reference(xyz: np.ndarray, cfg: PreprocessConfig, timings: dict | None = None) -> np.ndarray:
    start = time.perf_counter()
    keep = _valid_points_reference(xyz)
    points = xyz[keep].astype(np.float32, copy=False)
    if cfg.remove_plane and len(points):
        plane = _fit_border_plane_reference(xyz, keep, cfg)
        if plane is not None:
            off_plane = np.abs(points.astype(np.float64) @ plane[:3] + plane[3]) >= cfg.plane_cut
            keep[keep] = off_plane
            points = points[off_plane]
    start = _lap(timings, "plane", start)
    if cfg.cluster and len(points):
        in_cluster = _largest_cluster_reference(points.astype(np.float64), cfg)
        keep[keep] = in_cluster
        points = points[in_cluster]
    out = np.zeros(xyz.shape, dtype=np.float32)
    out[keep] = points
    _lap(timings, "cluster", start)
    return out


def clean_cloud(xyz: np.ndarray, cfg: PreprocessConfig | None = None, *, method: str = "fast") -> np.ndarray:
    """New (H, W, 3) float32 cloud without the background plane and the outliers; invalid = 0.

    NaN/inf and (0, 0, 0) input points are missing. The input is not modified. ``method``:
    "fast" (default) or "reference" (the original implementation; the same result, slower).
    """
    cfg = cfg or PreprocessConfig()
    xyz = _check_xyz(xyz)
    if _check_method(method) == "reference":
        return _clean_cloud_reference(xyz, cfg)
    kept = _kept_pixels(xyz, cfg)
    out = np.zeros((xyz.shape[0] * xyz.shape[1], 3), dtype=np.float32)
    out[kept] = xyz.reshape(-1, 3)[kept]
    return out.reshape(xyz.shape)


# --------------------------------------------------------------------------------------------
# Square padding and resizing


@lru_cache(maxsize=64)
def _nearest_source(side: int, grid: int) -> np.ndarray:
    """Source index in [0, side) of every grid cell, sampling at the cell centre."""
    src = np.floor((np.arange(grid) + 0.5) * (side / grid)).astype(np.int64)
    src.setflags(write=False)
    return np.minimum(src, side - 1)


def _sample_nearest(image: np.ndarray, frame: GridFrame, fill=0) -> np.ndarray:
    """Nearest grid sampling of an (H, W, ...) image placed in the frame's square; padding = fill.

    Indexes the original image directly, so the padded square is never allocated.
    """
    src = _nearest_source(frame.side, frame.grid)
    rows = src - frame.top
    cols = src - frame.left
    row_in = (rows >= 0) & (rows < frame.height)
    col_in = (cols >= 0) & (cols < frame.width)
    out = image[np.clip(rows, 0, frame.height - 1)[:, None], np.clip(cols, 0, frame.width - 1)[None, :]]
    outside = ~(row_in[:, None] & col_in[None, :])
    if outside.any():
        out[outside] = fill
    return out


def square_rgb(rgb: np.ndarray, frame: GridFrame) -> np.ndarray:
    """RGB padded to the frame's square by edge replication (as the reference loader)."""
    pad_h = (frame.top, frame.side - frame.height - frame.top)
    pad_w = (frame.left, frame.side - frame.width - frame.left)
    if pad_h == (0, 0) and pad_w == (0, 0):
        return rgb
    return np.pad(rgb, (pad_h, pad_w, (0, 0)), mode="edge")


def rgb_to_grid(rgb: np.ndarray, frame: GridFrame) -> np.ndarray:
    """(3, S, S) float32 ImageNet-normalised: edge-padded square, PIL bicubic resize."""
    square = np.ascontiguousarray(square_rgb(rgb, frame))
    resized = Image.fromarray(square).resize((frame.grid, frame.grid), Image.BICUBIC)
    arr = np.asarray(resized, dtype=np.float32)
    arr *= np.float32(1.0 / 255.0)
    arr -= IMAGENET_MEAN
    arr /= IMAGENET_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def xyz_to_grid(xyz: np.ndarray, frame: GridFrame) -> np.ndarray:
    """(3, S, S) float32: zero-padded square, nearest (cell-centre) resize; NaN stays as given."""
    grid = _sample_nearest(np.asarray(xyz, dtype=np.float32), frame, fill=0.0)
    return np.ascontiguousarray(grid.transpose(2, 0, 1))


def _kept_to_grid(xyz: np.ndarray, kept: np.ndarray, frame: GridFrame) -> np.ndarray:
    """``xyz_to_grid`` of the cleaned cloud, sampled from xyz and the kept flat pixel indices.

    Only the S x S sampled pixels are read and cast to float32 (exactly as the cleaned cloud's
    ``astype(float32)`` did), so the cleaned full-size cloud is never built.
    """
    src = _nearest_source(frame.side, frame.grid)
    rows, cols = src - frame.top, src - frame.left
    row_in = (rows >= 0) & (rows < frame.height)
    col_in = (cols >= 0) & (cols < frame.width)
    rows, cols = np.clip(rows, 0, frame.height - 1), np.clip(cols, 0, frame.width - 1)
    keep = np.zeros(frame.height * frame.width, dtype=bool)
    keep[kept] = True
    take = keep.reshape(frame.height, frame.width)[rows[:, None], cols[None, :]]
    take &= row_in[:, None] & col_in[None, :]  # padding stays 0
    grid_rows, grid_cols = np.nonzero(take)
    grid = np.zeros((3, frame.grid, frame.grid), dtype=np.float32)
    grid[:, grid_rows, grid_cols] = xyz[rows[grid_rows], cols[grid_cols]].T
    return grid


def gt_to_grid(gt: np.ndarray, frame: GridFrame, grid: int | None = None) -> np.ndarray:
    """(S, S) bool ground truth on the model grid: zero padding, nearest resize, binarised at 0.5.

    Padding is not part of the scene, so it is never a defect (the reference edge-pads masks,
    which copies border defects into the padding).
    """
    gt = np.asarray(gt)
    if gt.shape != (frame.height, frame.width):
        raise InputError(f"gt mask has shape {gt.shape}, expected {(frame.height, frame.width)} "
                         "(the input image's size)")
    if grid is not None and grid != frame.grid:
        frame = dataclasses.replace(frame, grid=int(grid))
    return _sample_nearest(gt > 0.5, frame, fill=False)


def _check_rgb(rgb, xyz_shape) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"rgb must be an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    if rgb.shape[:2] != tuple(xyz_shape[:2]):
        raise InputError(f"rgb is {rgb.shape[1]}x{rgb.shape[0]} but xyz is {xyz_shape[1]}x{xyz_shape[0]}: "
                         "the point cloud must be registered to the colour image (same pixel grid)")
    return rgb


def preprocess(rgb: np.ndarray, xyz: np.ndarray, cfg: PreprocessConfig | None = None, *,
               method: str = "fast", timings: dict | None = None) -> ModelInput:
    """clean_cloud + the same centred square for both modalities + resize to the model grid.

    ``method``: "fast" (default) or "reference" (the original implementation: the same arrays,
    slower; kept for tests and bench/preprocess.py). ``timings``: a dict that receives the seconds
    spent per stage ("plane": validity + border RANSAC + plane cut, "cluster": DBSCAN filter,
    "grid": square padding + resizing of both modalities); values are added to what is there.
    """
    cfg = cfg or PreprocessConfig()
    xyz = _check_xyz(xyz)
    rgb = _check_rgb(rgb, xyz.shape)
    frame = GridFrame.for_shape(xyz.shape[0], xyz.shape[1], cfg.grid)
    if _check_method(method) == "reference":
        cleaned = _clean_cloud_reference(xyz, cfg, timings)
        start = time.perf_counter()
        grid_xyz = xyz_to_grid(cleaned, frame)
        grid_rgb = rgb_to_grid(rgb, frame)
    else:
        kept = _kept_pixels(xyz, cfg, timings)
        start = time.perf_counter()
        grid_xyz = _kept_to_grid(xyz, kept, frame)
        grid_rgb = rgb_to_grid(rgb, frame)
    valid = (grid_xyz != 0).any(axis=0)
    _lap(timings, "grid", start)
    return ModelInput(rgb=grid_rgb, xyz=grid_xyz, valid=valid, frame=frame)


@lru_cache(maxsize=64)
def _bilinear_matrix(out_size: int, in_size: int, start: int, count: int) -> np.ndarray:
    """(count, in_size) weights of rows start..start+count of a bilinear in->out resize.

    Same sampling as torch's interpolate(mode='bilinear', align_corners=False).
    """
    dst = np.arange(start, start + count, dtype=np.float64)
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    matrix = np.zeros((count, in_size), dtype=np.float32)
    rows = np.arange(count)
    np.add.at(matrix, (rows, i0), (1.0 - w1).astype(np.float32))
    np.add.at(matrix, (rows, i1), w1.astype(np.float32))
    matrix.setflags(write=False)
    return matrix


def map_to_input(score_map, frame: GridFrame):
    """A grid map (S, S) or (B, S, S), NumPy or torch, back to the input's (H, W) / (B, H, W).

    Bilinear upsampling to the padded square followed by cropping the padding, computed as
    rows @ map @ cols.T with only the kept rows/columns (the square is never materialised).
    Returns the input's array type (torch stays on its device, float32).
    """
    s = frame.grid
    if tuple(score_map.shape[-2:]) != (s, s) or score_map.ndim not in (2, 3):
        raise InputError(f"score map must be ({s}, {s}) or (B, {s}, {s}), got {tuple(score_map.shape)}")
    rows = _bilinear_matrix(frame.side, s, frame.top, frame.height)
    cols = _bilinear_matrix(frame.side, s, frame.left, frame.width)
    if isinstance(score_map, np.ndarray):
        return rows @ score_map.astype(np.float32, copy=False) @ cols.T
    import torch  # only for torch inputs: NumPy users do not pay the import

    if not isinstance(score_map, torch.Tensor):
        raise InputError(f"score map must be a NumPy array or a torch tensor, got {type(score_map)}")
    r = torch.tensor(rows, device=score_map.device)  # small copies; the cached arrays are read-only
    c = torch.tensor(cols, device=score_map.device)
    return r @ score_map.to(torch.float32) @ c.T


# --------------------------------------------------------------------------------------------
# On-disk cache


def default_cache_dir() -> Path:
    """$MAFR_CACHE_DIR/preprocess, else ~/.cache/mafr_ros/preprocess."""
    root = os.environ.get("MAFR_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "mafr_ros"
    return base / "preprocess"


class PreprocessCache:
    """Preprocessed samples keyed by SHA-256(input file bytes, config, PREPROCESS_VERSION).

    Content-addressed, so a changed file or parameter can never return a stale result; writes go
    through a temporary file and an atomic rename, so concurrent data-loader workers and crashes
    never leave a half-written entry. Files are only ever created under ``cache_dir``.
    """

    def __init__(self, cache_dir=None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    @staticmethod
    def key(paths, cfg: PreprocessConfig) -> str:
        digest = hashlib.sha256()
        digest.update(f"mafr_ros.preprocess.v{PREPROCESS_VERSION}\n".encode())
        digest.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
        for path in paths:
            digest.update(b"\0file\0")
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.hexdigest()

    def path_for(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.npz"

    def load(self, key: str) -> ModelInput | None:
        path = self.path_for(key)
        try:
            with np.load(path, allow_pickle=False) as data:
                frame = GridFrame(*(int(v) for v in data["frame"]))
                return ModelInput(rgb=data["rgb"], xyz=data["xyz"], valid=data["valid"], frame=frame)
        except FileNotFoundError:
            return None
        except (OSError, KeyError, ValueError, TypeError):
            return None  # unreadable entry (e.g. an interrupted copy): recomputed and replaced

    def store(self, key: str, item: ModelInput) -> Path:
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        f = item.frame
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, rgb=item.rgb, xyz=item.xyz, valid=item.valid,
                         frame=np.array([f.height, f.width, f.side, f.top, f.left, f.grid], dtype=np.int64))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def preprocess_sample(sample, cfg: PreprocessConfig | None = None,
                      cache: PreprocessCache | None = None) -> ModelInput:
    """``preprocess`` of a dataset sample (anything with rgb, xyz, rgb_path, xyz_path), cached."""
    cfg = cfg or PreprocessConfig()
    if cache is None:
        return preprocess(sample.rgb, sample.xyz, cfg)
    key = cache.key([sample.rgb_path, sample.xyz_path], cfg)
    item = cache.load(key)
    if item is None:
        item = preprocess(sample.rgb, sample.xyz, cfg)
        cache.store(key, item)
    return item
