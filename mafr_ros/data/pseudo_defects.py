"""Pseudo-defects pasted into real good samples on the model grid, with their masks.

Why: a real product usually comes with good parts only, and a handful of real defects that must
stay an untouched test set. To choose scoring or training options without looking at those, a
validation set of *pseudo*-defects is made from held-out good parts: local geometric and colour
changes of the kind real defects show (dents, bumps, holes, cuts, stains), written into the
preprocessed ``ModelInput`` (the organised cloud and the ImageNet-normalised RGB on the grid)
so that the extractors and heads see them exactly as they would see a real one. Sizes are given
in millimetres on the part and converted with the local point spacing, so that the same settings
mean the same on any grid.

The changes are deliberately simple and self-consistent, not photo-realistic:
- dent / bump: the surface moved along the viewing axis (z) by a smooth cap, the colour shaded by
  the slope of the displacement towards a random light direction (a dent without any shading
  would be invisible to the colour descriptors, unlike a real one);
- hole: a steep, deep pit whose inside is darkened;
- cut: a narrow groove along a random segment, darkened;
- stain: colour only, a soft blob blended towards a random colour (no 3D signal);
- scratches (opt-in, ``ALL_KINDS``): a round patch crossed by several parallel thin lines at a
  random angle, each a shallow groove (0.1-0.4 mm) that is darker than its surroundings: an
  oriented-texture defect (scratched or damaged threads) with a weak 3D signal, the kind the
  five defaults lack (choosing descriptor options on those five alone dropped the lite
  orientation histograms, which the real cable_gland test split needed; see docs/real_parts.md).
By default every defect lies on valid pixels away from the silhouette (``margin_mm``);
``inside=False`` centres it on any valid pixel (border defects). The valid mask of the sample is
never changed, and the mask of the defect is where something was changed by more than a small
fraction of the defect's own amplitude.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ModelInput

DEFECT_KINDS = ("dent", "bump", "hole", "cut", "stain")
#: Every kind ``add_pseudo_defect`` makes: the defaults and the opt-in oriented-texture kind.
ALL_KINDS = DEFECT_KINDS + ("scratches",)


@dataclass
class PseudoDefectConfig:
    """Size ranges (uniformly drawn) of the pseudo-defects, in millimetres on the part."""

    # Defaults: on MVTec 3D-AD cable_gland, dents/bumps under ~1.2 mm deep and 4 mm wide fall
    # inside the normal geometric variation of the part (their lite 3D descriptors are no
    # farther from the good training pixels than the 99th percentile of good held-out pixels),
    # so such defects say nothing about the scoring; these sizes are outside it.
    radius_mm: tuple = (2.5, 5.0)       # dent / bump / stain radius
    depth_mm: tuple = (1.0, 2.5)        # dent / bump amplitude
    hole_radius_mm: tuple = (1.0, 3.0)
    hole_depth_mm: tuple = (1.5, 4.0)
    cut_length_mm: tuple = (4.0, 10.0)
    cut_width_mm: tuple = (0.8, 2.0)
    cut_depth_mm: tuple = (1.0, 2.5)
    shading: float = 0.6                # brightness change per unit slope of the displacement
    darken: tuple = (0.3, 0.7)          # brightness factor inside holes and cuts
    stain_alpha: tuple = (0.3, 0.7)
    margin_mm: float = 2.0              # defects stay this far inside the silhouette ...
    inside: bool = True                 # ... or (False) are centred on any valid pixel and may
                                        # reach the silhouette (border defects: bites, bent edges)
    mask_fraction: float = 0.1          # mask = pixels changed by > this fraction of the peak
    scratch_count: tuple = (3, 7)       # scratches: parallel lines per patch (integers, lo..hi-1)
    scratch_pitch_mm: tuple = (1.0, 2.0)  # distance between neighbouring lines
    scratch_width_mm: tuple = (0.15, 0.4)
    scratch_depth_mm: tuple = (0.1, 0.4)


def _spacing_mm(xyz: np.ndarray, valid: np.ndarray) -> float:
    """Median distance between horizontally and vertically adjacent valid points (mm)."""
    d = []
    for axis in (1, 2):
        a = np.take(xyz, range(0, xyz.shape[axis] - 1), axis=axis)
        b = np.take(xyz, range(1, xyz.shape[axis]), axis=axis)
        va = np.take(valid, range(0, valid.shape[axis - 1] - 1), axis=axis - 1)
        vb = np.take(valid, range(1, valid.shape[axis - 1]), axis=axis - 1)
        both = va & vb
        if both.any():
            d.append(np.linalg.norm((a - b)[:, both], axis=0))
    if not d:
        raise ValueError("pseudo-defect: the sample has no adjacent valid points")
    return float(np.median(np.concatenate(d))) * 1000.0


def _centre(valid: np.ndarray, margin_px: float, rng: np.random.Generator) -> tuple[int, int]:
    iterations = int(math.ceil(margin_px))
    inner = ndimage.binary_erosion(valid, iterations=iterations) if iterations > 0 else valid
    ys, xs = np.nonzero(inner if inner.any() else valid)
    if ys.size == 0:
        raise ValueError("pseudo-defect: the sample has no valid pixel")
    k = int(rng.integers(ys.size))
    return int(ys[k]), int(xs[k])


def _to_unit_rgb(rgb: np.ndarray) -> np.ndarray:
    return rgb * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]


def _from_unit_rgb(rgb01: np.ndarray) -> np.ndarray:
    rgb01 = np.clip(rgb01, 0.0, 1.0)
    return ((rgb01 - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]).astype(np.float32)


def _smooth_cap(dist: np.ndarray, radius: float) -> np.ndarray:
    """1 at the centre, 0 from ``radius`` on, smooth (C1) in between."""
    t = np.clip(1.0 - (dist / radius) ** 2, 0.0, 1.0)
    return t * t


def _segment_distance(yy, xx, p0, p1) -> np.ndarray:
    d = np.asarray(p1, float) - np.asarray(p0, float)
    length2 = max(float(d @ d), 1e-12)
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / length2, 0.0, 1.0)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def add_pseudo_defect(sample: ModelInput, kind: str, rng: np.random.Generator,
                      cfg: PseudoDefectConfig | None = None) -> tuple[ModelInput, np.ndarray]:
    """A copy of ``sample`` with one pseudo-defect of ``kind`` and its (S, S) bool mask."""
    cfg = cfg or PseudoDefectConfig()
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown pseudo-defect kind {kind!r}; choose one of {ALL_KINDS}")
    valid = np.asarray(sample.valid, bool)
    xyz = np.array(sample.xyz, dtype=np.float32, copy=True)
    rgb01 = _to_unit_rgb(np.asarray(sample.rgb, np.float32))
    px = _spacing_mm(xyz, valid)  # mm per grid pixel
    u = lambda lo_hi: float(rng.uniform(*lo_hi))  # noqa: E731
    s = valid.shape[0]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)

    # Sizes first (in grid pixels), then a centre far enough inside the silhouette for them.
    if kind == "cut":
        extent = u(cfg.cut_length_mm) / px
        reach = extent / 2
    elif kind == "hole":
        extent = u(cfg.hole_radius_mm) / px
        reach = extent
    else:
        extent = u(cfg.radius_mm) / px
        reach = extent
    cy, cx = _centre(valid, cfg.margin_mm / px + reach if cfg.inside else 0.0, rng)

    if kind in ("dent", "bump", "hole", "cut", "scratches"):
        if kind == "scratches":
            # distance of every pixel to the nearest of n parallel lines (pitch apart, through
            # the patch centre's neighbourhood), limited to a round patch of radius ``extent``
            n = int(rng.integers(*cfg.scratch_count))
            half_width = u(cfg.scratch_width_mm) / px / 2 + 0.5
            # lines stay apart on the grid (a gap of >= 1 px): finer pitches would merge them
            pitch = max(u(cfg.scratch_pitch_mm) / px, 2 * half_width + 1.0)
            angle = rng.uniform(0, math.pi)
            across = (yy - cy) * math.cos(angle) - (xx - cx) * math.sin(angle)  # normal offset
            offsets = (np.arange(n) - (n - 1) / 2) * pitch
            dist = np.min(np.abs(across[None] - offsets[:, None, None]), axis=0)
            patch = np.hypot(yy - cy, xx - cx) < extent
            profile = _smooth_cap(dist, half_width) * patch
            amplitude = u(cfg.scratch_depth_mm)
        elif kind == "cut":
            angle = rng.uniform(0, math.pi)
            half = np.array([math.sin(angle), math.cos(angle)]) * extent / 2
            dist = _segment_distance(yy, xx, (cy - half[0], cx - half[1]),
                                     (cy + half[0], cx + half[1]))
            profile = _smooth_cap(dist, u(cfg.cut_width_mm) / px / 2 + 0.75)
            amplitude = u(cfg.cut_depth_mm)
        elif kind == "hole":
            dist = np.hypot(yy - cy, xx - cx)
            profile = np.clip(1.5 * (1.0 - dist / (extent + 0.75)), 0.0, 1.0)  # steep walls
            amplitude = u(cfg.hole_depth_mm)
        else:
            profile = _smooth_cap(np.hypot(yy - cy, xx - cx), extent)
            amplitude = u(cfg.depth_mm)
        # +z is away from the camera: dents, holes and cuts go in, bumps come out.
        sign = -1.0 if kind == "bump" else 1.0
        displacement = sign * amplitude * profile  # mm
        xyz[2] = np.where(valid, xyz[2] + displacement.astype(np.float32) / 1000.0, 0.0)
        light = rng.uniform(0, 2 * math.pi)
        gy, gx = np.gradient(displacement / px)  # slope (mm per mm)
        shade = 1.0 + cfg.shading * (gy * math.sin(light) + gx * math.cos(light))
        if kind in ("hole", "cut", "scratches"):
            shade = shade * (1.0 - (1.0 - u(cfg.darken)) * np.clip(profile * 2, 0, 1))
        rgb01 = rgb01 * np.clip(shade, 0.2, 2.0)[None]
        changed = np.abs(displacement) > cfg.mask_fraction * amplitude
    else:  # stain
        weight = _smooth_cap(np.hypot(yy - cy, xx - cx), extent) * u(cfg.stain_alpha)
        colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)[:, None, None]
        rgb01 = rgb01 * (1 - weight[None]) + colour * weight[None]
        changed = weight > cfg.mask_fraction * weight.max()
    mask = changed & valid
    out = dataclasses.replace(sample, rgb=_from_unit_rgb(rgb01.astype(np.float32)), xyz=xyz,
                              valid=valid.copy())
    return out, mask
