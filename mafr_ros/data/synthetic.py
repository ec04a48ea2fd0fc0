"""Seeded synthetic parts written in the MVTec 3D-AD layout, for tests, demos and bags.

Each sample is rendered with a pinhole camera looking down at a part that lies on a flat background
plane about 0.65 m away (MVTec 3D-AD's geometry): an organised xyz cloud in the camera optical
frame (metres, float32, missing = (0, 0, 0)) and an RGB image shaded from the surface normals.

Model of the scene, kept simple so that a 256 x 256 sample costs ~20-40 ms of CPU:
- a part is a height field over the background plane, h(a, b) in the part's own frame (metres),
  plus a material id per location; every pixel ray is intersected with that height field by a
  short fixed-point iteration (exact on the plane, sub-pixel parallax error on the part);
- nuisances per sample: plane distance and tilt, in-plane position and rotation of the part,
  light direction and strength, albedo gain, texture noise, depth and RGB sensor noise;
- missing depth like a structured-light sensor: surfaces seen at a grazing angle (the part's
  steep sides), the projector's cast shadow, and a few random dropouts;
- defects, each with its pixel mask (test/<type>/gt, 255 on defect pixels): dent (a smooth
  depression; its colour changes only through shading), bump (a smooth protrusion), crack (thin
  dark groove), stain (colour only, xyz bit-identical), missing (a bite out of the part: the
  background shows through). Masks cover exactly the locations whose surface or colour changed.

Every sample draws from its own generators, seeded by (seed, category, split, type, index), so a
sample does not change when the requested counts change, and the same seed always writes
byte-identical files. The scene and the defect use separate streams: ``render_sample`` of a defect
is the good sample of the same seed plus the defect.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import tifffile
from PIL import Image

from ..errors import DatasetError

CATEGORIES = ("gland", "bracket")
DEFECT_TYPES = ("dent", "bump", "crack", "stain", "missing")
_TYPES = ("good",) + DEFECT_TYPES
_SPLITS = ("train", "validation", "test")
_MARKER = "synthetic.json"

# Camera: ~0.27 mm per pixel at 0.65 m for every image size (MVTec 3D-AD: ~0.25 mm).
_FOCAL_PER_PIXEL = 2400.0 / 256.0
_MM = 1e-3
_FARTHEST_DISTANCE = 0.67  # metres: far end of the camera-to-plane range (largest pixel footprint)
_MIN_CRACK_PIXELS = 1.5   # narrowest crack, in pixel footprints, that the sensor resolves


# --------------------------------------------------------------------------------------------
# Parts: height fields with materials


@dataclass(frozen=True)
class _Material:
    albedo: tuple[float, float, float]
    specular: float
    shininess: float
    noise: float          # relative albedo noise
    noise_cell: float     # metres
    rings: float = 0.0    # relative amplitude of concentric turning marks (machined metal)


_BACKGROUND = _Material((0.30, 0.29, 0.27), 0.02, 4.0, 0.08, 4.0 * _MM)


@dataclass(frozen=True)
class _Part:
    height: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    materials: tuple[_Material, ...]   # index = material id; 0 is the background
    extent: float                       # radius that contains the part (metres)
    rotation_jitter: float              # radians, +- around the nominal pose


# Part surfaces are connected in 3D (slopes instead of tall vertical steps): seen from above, a
# vertical wall has no pixels, and a gap wider than DBSCAN's eps would split a part into clusters.

def _gland_height(a, b):
    """Cable-gland-like part: hexagon nut, a domed cap with a cosine shoulder, a rubber seal with a
    conical bore."""
    rho = np.hypot(a, b)
    # Distance to the hexagon's centre measured along its three face normals.
    hexd = np.maximum(np.abs(a), np.abs(0.5 * a + 0.8660254 * b))
    hexd = np.maximum(hexd, np.abs(0.5 * a - 0.8660254 * b))
    h = np.where(hexd < 17 * _MM, 7 * _MM - np.clip(hexd - 15.5 * _MM, 0.0, None), 0.0)  # 45 deg chamfer
    material = np.where(h > 0, 1, 0)
    # Cap: flat top (15 mm) to radius 9 mm, cosine shoulder down to the nut (7 mm) at 14 mm.
    shoulder = np.clip((rho - 9 * _MM) / (5 * _MM), 0.0, 1.0)
    on_cap = rho < 14 * _MM
    h = np.where(on_cap, 7 * _MM + 4 * _MM * (1.0 + np.cos(np.pi * shoulder)), h)
    material = np.where(rho < 13 * _MM, 2, material)
    seal = rho < 5 * _MM
    h = np.where(seal, 13.5 * _MM - 4 * _MM * np.clip(1.0 - rho / (2.5 * _MM), 0.0, 1.0), h)
    material = np.where(seal, 3, material)
    return h, material


def _bracket_height(a, b):
    """Rectangular bracket: rounded plate with two through holes and a chamfered stiffening rib."""
    half_a, half_b, corner = 23 * _MM, 15 * _MM, 3 * _MM
    qa = np.maximum(np.abs(a) - (half_a - corner), 0.0)
    qb = np.maximum(np.abs(b) - (half_b - corner), 0.0)
    plate = (np.abs(a) < half_a) & (np.abs(b) < half_b) & (np.hypot(qa, qb) < corner)
    # Rib along the long side: 3 mm flat top 4 mm above the plate, 58 degree flanks.
    rib = 4 * _MM * np.clip((4 * _MM - np.abs(b - 9 * _MM)) / (2.5 * _MM), 0.0, 1.0)
    rib = np.where(np.abs(a) < half_a - 4 * _MM, rib, 0.0)
    h = np.where(plate, 7 * _MM + rib, 0.0)
    holes = (np.hypot(a - 14 * _MM, b + 5 * _MM) < 3 * _MM) | (np.hypot(a + 14 * _MM, b + 5 * _MM) < 3 * _MM)
    h = np.where(holes, 0.0, h)
    material = np.where(h > 0, np.where(rib > 0, 2, 1), 0)
    return h, material


_PARTS = {
    "gland": _Part(
        _gland_height,
        (_BACKGROUND,
         _Material((0.78, 0.62, 0.32), 0.45, 40.0, 0.04, 1.0 * _MM, rings=0.06),   # brass nut
         _Material((0.62, 0.63, 0.66), 0.40, 30.0, 0.03, 0.6 * _MM, rings=0.04),   # nickel cap
         _Material((0.07, 0.07, 0.08), 0.06, 8.0, 0.10, 0.4 * _MM)),               # rubber seal
        extent=20 * _MM, rotation_jitter=np.pi / 6),
    "bracket": _Part(
        _bracket_height,
        (_BACKGROUND,
         _Material((0.16, 0.32, 0.66), 0.12, 12.0, 0.06, 0.3 * _MM),               # powder coat
         _Material((0.18, 0.34, 0.68), 0.12, 12.0, 0.06, 0.3 * _MM)),
        extent=28 * _MM, rotation_jitter=np.deg2rad(6.0)),
}


# --------------------------------------------------------------------------------------------
# Defects in the part frame


@dataclass
class _Defect:
    kind: str
    centre: np.ndarray            # (2,) part frame, metres
    radius: float = 0.0
    amplitude: float = 0.0        # height change (metres)
    polyline: np.ndarray | None = None
    width: float = 0.0
    colour: tuple = (0.0, 0.0, 0.0)
    alpha: float = 0.0
    wobble: np.ndarray | None = None  # stain outline: (2, K) amplitudes and phases of K harmonics

    def support(self, a, b) -> np.ndarray:
        """(...) bool: locations the defect changes (its ground truth before visibility).

        Only locations inside the defect's bounding box are evaluated: crack distances to every
        polyline segment for every pixel would dominate the rendering time.
        """
        out = np.zeros(a.shape, dtype=bool)
        lo, hi = self._bounds()
        near = (a > lo[0]) & (a < hi[0]) & (b > lo[1]) & (b < hi[1])
        if not near.any():
            return out
        na, nb = a[near], b[near]
        da, db = na - self.centre[0], nb - self.centre[1]
        if self.kind == "crack":
            out[near] = self._crack_distance(na, nb) <= self.width / 2
        elif self.kind == "stain":
            angle = np.arctan2(db, da)[..., None]
            amplitude, phase = self.wobble
            k = np.arange(1, amplitude.size + 1)
            edge = self.radius * (1.0 + (amplitude * np.cos(k * angle + phase)).sum(-1))
            out[near] = np.hypot(da, db) < edge
        else:
            out[near] = np.hypot(da, db) < self.radius
        return out

    def _bounds(self):
        if self.kind == "crack":
            return self.polyline.min(axis=0) - self.width, self.polyline.max(axis=0) + self.width
        reach = self.radius * (1.0 + (np.abs(self.wobble[0]).sum() if self.kind == "stain" else 0.0))
        return self.centre - reach, self.centre + reach

    def height_change(self, a, b, support=None) -> np.ndarray:
        if self.kind in ("dent", "bump"):
            # Smooth (C1) and compactly supported: the surface changes exactly inside the mask.
            r2 = (a - self.centre[0]) ** 2 + (b - self.centre[1]) ** 2
            q = np.clip(1.0 - r2 / self.radius ** 2, 0.0, None)
            return self.amplitude * q * q
        if self.kind == "crack":
            return np.where(self.support(a, b) if support is None else support, self.amplitude, 0.0)
        return np.zeros_like(a)

    def _crack_distance(self, a, b) -> np.ndarray:
        p = np.stack([a, b], axis=1)
        start, end = self.polyline[:-1], self.polyline[1:]
        seg = end - start
        t = ((p[:, None, :] - start[None]) * seg[None]).sum(-1) / (seg * seg).sum(-1)[None]
        closest = start[None] + np.clip(t, 0.0, 1.0)[..., None] * seg[None]
        return np.sqrt(((p[:, None, :] - closest) ** 2).sum(-1)).min(axis=1)


def _sample_defect(kind: str, part: _Part, rng: np.random.Generator) -> _Defect:
    if kind == "missing":
        # A bite centred on the part's outline, found by marching outwards along a random ray.
        angle = rng.uniform(0, 2 * np.pi)
        radii = np.linspace(0.0, part.extent, 400)
        h, _ = part.height(radii * np.cos(angle), radii * np.sin(angle))
        edge = radii[np.flatnonzero(h > 0).max()]
        centre = (edge - 1 * _MM) * np.array([np.cos(angle), np.sin(angle)])
        return _Defect(kind, centre, radius=rng.uniform(4.5, 7.0) * _MM)
    radius = {"dent": (3.0, 5.0), "bump": (3.0, 5.0), "crack": (0.0, 0.0), "stain": (2.5, 4.5)}[kind]
    radius = rng.uniform(*radius) * _MM
    # Centre on the part, with the defect's whole footprint on the part.
    cand = rng.uniform(-part.extent, part.extent, (512, 2))
    ring = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    reach = max(radius, 3 * _MM)
    ha, _ = part.height(cand[:, 0], cand[:, 1])
    ok = ha > 2 * _MM
    for angle in ring:
        hr, _ = part.height(cand[:, 0] + reach * np.cos(angle), cand[:, 1] + reach * np.sin(angle))
        ok &= hr > 0
    centre = cand[int(np.argmax(ok))]
    if kind == "dent":
        return _Defect(kind, centre, radius=radius, amplitude=-rng.uniform(0.8, 1.5) * _MM)
    if kind == "bump":
        return _Defect(kind, centre, radius=radius, amplitude=rng.uniform(0.8, 1.5) * _MM)
    if kind == "stain":
        colours = ((0.25, 0.13, 0.05), (0.05, 0.05, 0.04), (0.45, 0.25, 0.08))
        return _Defect(kind, centre, radius=radius, colour=colours[rng.integers(len(colours))],
                       alpha=rng.uniform(0.6, 0.85),
                       wobble=np.stack([rng.uniform(0.0, 0.12, 4), rng.uniform(0, 2 * np.pi, 4)]))
    # crack: a short random-walk polyline
    steps = rng.uniform(2.0, 3.5, 3) * _MM
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.5, 3))
    points = np.vstack([centre, centre + np.cumsum(steps[:, None] * np.stack(
        [np.cos(heading), np.sin(heading)], axis=1), axis=0)])
    return _Defect(kind, centre, polyline=points, width=rng.uniform(0.5, 0.8) * _MM,
                   amplitude=-rng.uniform(0.6, 1.2) * _MM)


# --------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=8)
def _camera(size: int):
    """Per-column (u - cx) / fx, per-row (v - cy) / fy, and the (3, S, S) float32 unit vectors from
    the surface towards the camera (they depend on the pixel only)."""
    intr = intrinsics(size)
    ru = (np.arange(size) - intr["cx"]) / intr["fx"]
    rv = (np.arange(size) - intr["cy"]) / intr["fy"]
    ray_len = np.sqrt(ru[None, :] ** 2 + rv[:, None] ** 2 + 1.0)
    view = -np.stack(np.broadcast_arrays(ru[None, :] / ray_len, rv[:, None] / ray_len, 1.0 / ray_len))
    view = view.astype(np.float32)
    for array in (ru, rv, view):
        array.setflags(write=False)
    return ru, rv, view


def intrinsics(size: int) -> dict:
    """Pinhole intrinsics of a size x size synthetic image (what calibration/intrinsics.json holds)."""
    f = _FOCAL_PER_PIXEL * size
    c = (size - 1) / 2.0
    return {"fx": f, "fy": f, "cx": c, "cy": c, "width": size, "height": size}


def _texture_noise(rng: np.random.Generator, size: int, cell_px: float) -> np.ndarray:
    """(S, S) float32 smooth noise (unit-variance lattice every ``cell_px`` pixels, bilinear).

    Drawn in image space: every sample gets a fresh texture, so attaching it to the part's frame
    would not change its statistics, and a small lattice upsampled by PIL costs well under 1 ms.
    """
    cells = max(2, int(np.ceil(size / max(cell_px, 1.0))) + 1)
    lattice = rng.standard_normal((cells, cells), dtype=np.float32)
    return np.array(Image.fromarray(lattice, mode="F").resize((size, size), Image.BILINEAR))


def _rotation(rx: float, ry: float) -> np.ndarray:
    cx, sx, cy, sy = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rot_y @ rot_x


def _cast_shadow(height: np.ndarray, direction: np.ndarray, slope: float, pixel: float,
                 max_height: float, stride: int = 2) -> np.ndarray:
    """(S, S) bool: pixels hidden from a distant source by the height field.

    direction: unit image-plane direction (du, dv) towards the source; slope: source elevation as
    rise per metre of lateral travel. A pixel is shadowed when some pixel k steps towards the source
    is higher than the ray from the pixel to the source at that distance.
    """
    size = height.shape[0]
    length = min(int(np.ceil(max_height / slope / pixel)), size)
    pad = length + 1
    padded = np.pad(height, pad, mode="edge")
    shadow = np.zeros(height.shape, dtype=bool)
    for k in range(stride, length + 1, stride):
        du, dv = np.rint(direction * k).astype(int)
        shifted = padded[pad + dv:pad + dv + size, pad + du:pad + du + size]
        shadow |= shifted > height + k * pixel * slope
    return shadow


@dataclass
class _Rendered:
    rgb: np.ndarray
    xyz: np.ndarray
    gt: np.ndarray


class _Scene:
    """One sample's pose: a tilted background plane and the part's placement on it."""

    def __init__(self, part: _Part, defect: _Defect | None, size: int, rng: np.random.Generator):
        self.part, self.defect = part, defect
        self.distance = rng.uniform(0.63, 0.67)
        rot = _rotation(*np.deg2rad(rng.normal(0.0, 1.2, 2)).clip(-0.05, 0.05))
        normal, e1, e2 = rot @ np.array([0.0, 0.0, -1.0]), rot[:, 0], rot[:, 1]  # normal: to the camera
        shift = rng.normal(0, 1.5 * _MM, 2).clip(-4 * _MM, 4 * _MM)
        centre = np.array([0.0, 0.0, self.distance]) + shift[0] * e1 + shift[1] * e2
        theta = rng.uniform(-part.rotation_jitter, part.rotation_jitter)
        ru, rv, _ = _camera(size)
        # Ray (ru, rv, 1) dotted with the plane axes, and the axes' offsets at the part centre.
        # float32 is ample (0.1 um at 0.65 m) and keeps the transcendental functions vectorised.
        dots = [(axis[0] * ru[None, :] + axis[1] * rv[:, None] + axis[2]).astype(np.float32)
                for axis in (normal, e1, e2)]
        self.n_d, self.e1_d, self.e2_d = dots
        # Plain Python floats: NumPy scalars would promote the float32 maps to float64.
        self.n_c, self.e1_c, self.e2_c = (float(axis @ centre) for axis in (normal, e1, e2))
        self.cos_t, self.sin_t = float(np.cos(theta)), float(np.sin(theta))

    def on_ray(self, h):
        """Depth t along each pixel ray (z = t) of the point at height h, and its part-frame (a, b)."""
        t = (h + self.n_c) / self.n_d
        a_plane, b_plane = t * self.e1_d - self.e1_c, t * self.e2_d - self.e2_c
        return t, self.cos_t * a_plane + self.sin_t * b_plane, -self.sin_t * a_plane + self.cos_t * b_plane

    def height(self, a, b):
        """Height (metres), material id and defect mask at part-frame locations (a, b).

        The part function only runs inside the part's bounding circle (~30 % of the pixels).
        """
        h = np.zeros(a.shape, dtype=np.float32)
        material = np.zeros(a.shape, dtype=np.intp)
        mask = np.zeros(a.shape, dtype=bool)
        near = a * a + b * b < self.part.extent ** 2
        an, bn = a[near], b[near]
        hn, mn = self.part.height(an, bn)
        present = hn > 0
        if self.defect is not None:
            support = self.defect.support(an, bn)
            mask[near] = support & present
            kind = self.defect.kind
            if kind == "missing":
                hn = np.where(support, 0.0, hn)
                mn = np.where(support, 0, mn)
            elif kind in ("dent", "bump", "crack"):
                change = self.defect.height_change(an, bn, support)
                hn = np.where(present, np.maximum(hn + change, 0.2 * _MM), hn)
        h[near], material[near] = hn, mn
        return h, material, mask


def _normals(x, y, z):
    """(3, S, S) unit normals of an organised surface from central differences (float32)."""
    dxu, dyu, dzu = (np.gradient(c, axis=1) for c in (x, y, z))
    dxv, dyv, dzv = (np.gradient(c, axis=0) for c in (x, y, z))
    n = np.stack([dyu * dzv - dzu * dyv, dzu * dxv - dxu * dzv, dxu * dyv - dyu * dxv])
    n /= np.sqrt((n * n).sum(axis=0)) + np.float32(1e-20)
    return n


def _render(part: _Part, defect: _Defect | None, size: int, rng: np.random.Generator) -> _Rendered:
    intr = intrinsics(size)
    ru, rv, view = _camera(size)
    scene = _Scene(part, defect, size, rng)

    h = np.zeros((size, size), dtype=np.float32)
    for _ in range(2):  # fixed point: the ray's height decides where on the part it lands
        t, a, b = scene.on_ray(h)
        h, material, mask = scene.height(a, b)
    t, a, b = scene.on_ray(h)

    # Geometry (float32 like the dataset), normals, visibility.
    z = t
    x, y = z * ru[None, :].astype(np.float32), z * rv[:, None].astype(np.float32)
    n = _normals(x, y, z)
    facing = (n * view).sum(axis=0)
    n *= np.sign(facing)
    grazing = np.abs(facing) < 0.25  # structured light fails beyond ~75 degrees of incidence
    pixel = scene.distance / intr["fx"]
    projector = np.array([0.9, 0.15]) / np.hypot(0.9, 0.15)  # the projector sits beside the camera
    missing = grazing | _cast_shadow(h, projector, 1.0 / 0.28, pixel, 16 * _MM)
    missing |= rng.random(h.shape, dtype=np.float32) < 0.002
    z_noisy = z + rng.standard_normal(z.shape, dtype=np.float32) * np.float32(0.08 * _MM)
    xyz = np.stack([z_noisy * ru[None, :].astype(np.float32), z_noisy * rv[:, None].astype(np.float32),
                    z_noisy], axis=-1)
    xyz[missing] = 0.0

    # Albedo from per-material tables: colour x (1 + noise) (+ turning marks on machined metal).
    # Channel-first (3, S, S) so that per-channel work runs on contiguous planes.
    mats = part.materials
    colour = np.array([m.albedo for m in mats], dtype=np.float32)
    colour *= rng.uniform(0.96, 1.04, 3).astype(np.float32)
    shade = np.ones((size, size), dtype=np.float32)
    for index, mat in enumerate(mats):
        sel = material == index
        field = _texture_noise(rng, size, mat.noise_cell / pixel)
        field *= np.float32(mat.noise)
        if mat.rings:
            phase = _texture_noise(rng, size, 3 * _MM / pixel)
            field += np.float32(mat.rings) * np.sin(np.hypot(a, b) * np.float32(2 * np.pi / (1.1 * _MM))
                                                    + np.float32(0.8) * phase)
        shade[sel] += field[sel]
    albedo = np.stack([np.take(colour[:, c], material) for c in range(3)])
    albedo *= shade
    specular = np.take(np.array([m.specular for m in mats], dtype=np.float32), material)
    shininess = np.take(np.array([m.shininess for m in mats], dtype=np.float32), material)
    if defect is not None and defect.kind == "crack":
        albedo[:, mask] *= 0.18
    elif defect is not None and defect.kind == "stain":
        stain = np.asarray(defect.colour, dtype=np.float32)[:, None]
        albedo[:, mask] = (1 - defect.alpha) * albedo[:, mask] + defect.alpha * stain
        specular[mask] *= 0.3

    # Shading: ambient + Lambert + Blinn-Phong, light from above the camera with jitter.
    light = np.array([rng.normal(0, 0.25), rng.normal(-0.2, 0.25), -1.0])
    light /= np.linalg.norm(light)
    lateral = max(np.hypot(light[0], light[1]), 1e-6)  # straight above: zero-length shadow march
    light_shadow = _cast_shadow(h, light[:2] / lateral, -light[2] / lateral, pixel, 16 * _MM)
    light32 = light.astype(np.float32)
    lambert = np.clip(np.tensordot(light32, n, axes=1), 0.0, None)
    lambert[light_shadow] *= 0.25
    half = view + light32[:, None, None]
    half /= np.sqrt((half * half).sum(axis=0))
    highlight = specular * np.clip((n * half).sum(axis=0), 0.0, None) ** shininess
    highlight[light_shadow] = 0.0
    ambient, diffuse = float(rng.uniform(0.25, 0.35)), float(rng.uniform(0.75, 0.9))
    radiance = albedo * (ambient + diffuse * lambert)
    radiance += highlight
    radiance *= 255.0
    radiance += rng.standard_normal(radiance.shape, dtype=np.float32) * np.float32(2.0)
    rgb = np.ascontiguousarray(np.clip(np.rint(radiance), 0, 255).astype(np.uint8).transpose(1, 2, 0))
    return _Rendered(rgb=rgb, xyz=xyz, gt=mask)


# --------------------------------------------------------------------------------------------
# Dataset writer


def render_sample(category: str, defect_type: str = "good", seed: int = 0, size: int = 256):
    """(rgb uint8 (S, S, 3), xyz float32 (S, S, 3), gt bool (S, S)) of one sample; no files written.

    The scene (pose, light, textures, sensor noise) depends only on (category, seed) and the defect
    only on (defect_type, seed): ``render_sample(c, "stain", k)`` is ``render_sample(c, "good", k)``
    with a stain added, which is what makes each defect's effect testable in isolation.
    """
    if category not in _PARTS:
        raise ValueError(f"unknown synthetic category {category!r}; choose from {', '.join(CATEGORIES)}")
    if defect_type not in _TYPES:
        raise ValueError(f"unknown defect type {defect_type!r}; choose from {', '.join(_TYPES)}")
    rendered = _render_with_defect(category, defect_type, np.random.SeedSequence(seed), size)
    return rendered.rgb, rendered.xyz, rendered.gt


def _render_with_defect(category: str, defect_type: str, seeds: np.random.SeedSequence,
                        size: int) -> _Rendered:
    part = _PARTS[category]

    def stream(index: int) -> np.random.Generator:
        child = np.random.SeedSequence(seeds.entropy, spawn_key=seeds.spawn_key + (index,))
        return np.random.default_rng(child)

    def scene_rng():  # a fresh generator per attempt: every attempt renders the same scene
        return stream(0)

    if defect_type == "good":
        return _render(part, None, size, scene_rng())
    defect_rng = stream(1)
    min_pixels = max(12, size * size // 3000)
    # A crack narrower than the pixel footprint on the part falls between pixel centres and
    # cannot be seen at all: at low resolutions (below ~190 px at the nominal distance) it is
    # drawn _MIN_CRACK_PIXELS footprints wide instead. Larger images are unaffected.
    min_crack_width = _MIN_CRACK_PIXELS * _FARTHEST_DISTANCE / intrinsics(size)["fx"]
    for _ in range(20):  # a defect hidden by pose/visibility is redrawn (seeded, so reproducible)
        defect = _sample_defect(defect_type, part, defect_rng)
        if defect.kind == "crack" and defect.width < min_crack_width:
            defect.width = min_crack_width
        rendered = _render(part, defect, size, scene_rng())
        if rendered.gt.sum() >= min_pixels:
            return rendered
    raise RuntimeError(f"could not place a visible {defect_type} defect on {category} at size {size}")


def _sample_seeds(seed: int, category: str, split: str, defect_type: str,
                  index: int) -> np.random.SeedSequence:
    key = (CATEGORIES.index(category), _SPLITS.index(split), _TYPES.index(defect_type), index)
    return np.random.SeedSequence(seed, spawn_key=key)


def _write_sample(type_dir: Path, index: int, rendered: _Rendered, with_gt: bool) -> None:
    name = f"{index:03d}"
    # Fast zlib level: the default level spends ~10x longer on sensor noise that hardly compresses.
    Image.fromarray(rendered.rgb).save(type_dir / "rgb" / f"{name}.png", compress_level=1)
    tifffile.imwrite(type_dir / "xyz" / f"{name}.tiff", rendered.xyz, photometric="rgb")
    if with_gt:
        Image.fromarray((rendered.gt * 255).astype(np.uint8)).save(type_dir / "gt" / f"{name}.png",
                                                                  compress_level=1)


def generate_dataset(out_root, seed: int = 0, categories=None, n_train: int = 30,
                     n_validation: int = 5, n_test_good: int = 10, n_test_per_defect: int = 4,
                     size: int = 256, overwrite: bool = True) -> list[Path]:
    """Write ``out_root/<category>/{train,validation,test,calibration}``; returns the category folders.

    overwrite: replace category folders written earlier by this generator (recognised by their
    synthetic.json), so that a re-run never mixes old and new samples; a non-empty folder that
    is not one is never touched (DatasetError).
    """
    categories = list(CATEGORIES if categories is None else categories)
    unknown = [c for c in categories if c not in _PARTS]
    if unknown:
        raise ValueError(f"unknown synthetic categories {unknown}; choose from {', '.join(CATEGORIES)}")
    counts = {"n_train": n_train, "n_validation": n_validation, "n_test_good": n_test_good,
              "n_test_per_defect": n_test_per_defect}
    for name, value in counts.items():
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")

    out_root = Path(out_root).expanduser()
    written = []
    for category in categories:
        category_dir = out_root / category
        if category_dir.exists() and any(category_dir.iterdir()):
            if not (overwrite and (category_dir / _MARKER).is_file()):
                raise DatasetError(
                    f"{category_dir} already exists and is not empty; choose another output folder"
                    + (" (it was not written by this generator, so it is left alone)" if overwrite
                       else " or pass overwrite=True to replace this synthetic dataset"))
            shutil.rmtree(category_dir)
        plan = [("train", "good", n_train), ("validation", "good", n_validation),
                ("test", "good", n_test_good)] + [("test", d, n_test_per_defect) for d in DEFECT_TYPES]
        for split, defect_type, count in plan:
            if count == 0:
                continue
            type_dir = category_dir / split / defect_type
            with_gt = split == "test"
            for sub in ("rgb", "xyz") + (("gt",) if with_gt else ()):
                (type_dir / sub).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                seeds = _sample_seeds(seed, category, split, defect_type, index)
                rendered = _render_with_defect(category, defect_type, seeds, size)
                _write_sample(type_dir, index, rendered, with_gt)
        (category_dir / "calibration").mkdir(parents=True, exist_ok=True)
        (category_dir / "calibration" / "intrinsics.json").write_text(
            json.dumps(intrinsics(size), indent=2, sort_keys=True) + "\n")
        (category_dir / _MARKER).write_text(json.dumps(
            {"generator": "mafr_ros.data.synthetic", "seed": seed, "category": category, "size": size,
             **counts}, indent=2, sort_keys=True) + "\n")
        written.append(category_dir)
    return written
