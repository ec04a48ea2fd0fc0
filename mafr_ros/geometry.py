"""Pinhole camera geometry: depth image -> organised point cloud, and points -> pixel grid.

NumPy only (no ROS, no torch). Conventions follow depth_image_proc: camera optical frame
(x right, y down, z forward), metres, invalid depth (0 for integer depth, any non-finite value for
float depth) becomes a NaN point, and organised clouds keep the image's height x width.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

#: Depth scale of integer depth images (16UC1 / mono16): millimetres -> metres.
MILLIMETRES = 0.001


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics of an image of ``width`` x ``height`` pixels.

    ``fx, fy, cx, cy`` are in pixels. ``distortion`` is informational: the projection functions here
    assume a rectified image (as depth_image_proc does).
    """

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    distortion: tuple = field(default=())

    def __post_init__(self):
        for name in ("fx", "fy", "cx", "cy"):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise InputError(f"camera intrinsics: {name} is {value}; calibrate the camera")
        if self.fx <= 0 or self.fy <= 0:
            raise InputError(
                f"camera intrinsics: focal length fx={self.fx}, fy={self.fy} must be > 0 "
                "(a zero K or P means the camera is not calibrated; publish a calibrated camera_info)"
            )
        if self.width <= 0 or self.height <= 0:
            raise InputError(
                f"camera intrinsics: image size {self.width}x{self.height} must be positive"
            )

    @classmethod
    def from_matrix(cls, K, width: int, height: int, distortion=()) -> "CameraIntrinsics":
        """Build from a 3x3 (or 3x4 projection) matrix, as a nested sequence or flat row-major."""
        K = np.asarray(K, dtype=np.float64)
        if K.size == 9:
            K = K.reshape(3, 3)
        elif K.size == 12:
            K = K.reshape(3, 4)
        else:
            raise InputError(f"camera matrix must have 9 (K) or 12 (P) entries, got {K.size}")
        return cls(float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]),
                   int(width), int(height), tuple(float(d) for d in distortion))

    @property
    def matrix(self) -> np.ndarray:
        """The 3x3 camera matrix K."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def cropped(self, x: int, y: int, width: int, height: int) -> "CameraIntrinsics":
        """Intrinsics of the sub-image starting at pixel (x, y)."""
        return CameraIntrinsics(self.fx, self.fy, self.cx - x, self.cy - y, width, height,
                                self.distortion)

    def scaled(self, width: int, height: int) -> "CameraIntrinsics":
        """Intrinsics of the same view resampled to ``width`` x ``height`` (pixel-centre model)."""
        sx, sy = width / self.width, height / self.height
        return CameraIntrinsics(self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5,
                                (self.cy + 0.5) * sy - 0.5, width, height, self.distortion)


def _as_intrinsics(K, shape) -> CameraIntrinsics:
    if isinstance(K, CameraIntrinsics):
        return K
    return CameraIntrinsics.from_matrix(K, width=shape[1], height=shape[0])


_RAY_CACHE: dict = {}


def _pixel_rays(intr: CameraIntrinsics, height: int, width: int):
    """Per-column (u - cx) / fx and per-row (v - cy) / fy, cached: they only depend on intrinsics."""
    key = (intr.fx, intr.fy, intr.cx, intr.cy, height, width)
    rays = _RAY_CACHE.get(key)
    if rays is None:
        # float32 like the OpenNI driver and depth_image_proc: same rounding as the reference clouds.
        ru = ((np.arange(width, dtype=np.float32) - np.float32(intr.cx))
              * np.float32(1.0 / intr.fx)).astype(np.float32)
        rv = ((np.arange(height, dtype=np.float32) - np.float32(intr.cy))
              * np.float32(1.0 / intr.fy)).astype(np.float32)
        if len(_RAY_CACHE) > 16:
            _RAY_CACHE.clear()
        rays = _RAY_CACHE[key] = (ru, rv)
    return rays


def depth_to_xyz(depth: np.ndarray, K, depth_scale: float | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Organised (H, W, 3) float32 point cloud of a depth image, NaN where the depth is invalid.

    depth: (H, W) array. Integer depth (16UC1 / mono16) is millimetres and scaled by 0.001 unless
        ``depth_scale`` says otherwise; float depth (32FC1) is metres (scale 1).
    K: CameraIntrinsics, or a 3x3 K / 3x4 P matrix (nested or flat).
    depth_scale: metres per depth unit, overriding the automatic choice.
    out: optional preallocated (H, W, 3) float32 array to write into (no allocation per frame).

    Invalid depth is 0 for integer images and 0, NaN or +-inf for float images; those pixels get
    (NaN, NaN, NaN), as depth_image_proc does.
    """
    depth = np.asarray(depth)
    if depth.ndim != 2 or depth.shape[0] == 0 or depth.shape[1] == 0:
        raise InputError(f"depth image must be a non-empty 2-D array, got shape {depth.shape}")
    height, width = depth.shape
    intr = _as_intrinsics(K, depth.shape)
    if (intr.width, intr.height) != (width, height):
        raise InputError(
            f"depth image is {width}x{height} but the intrinsics are for "
            f"{intr.width}x{intr.height}: use the camera_info of this depth image "
            "(registered depth must have the colour image's size)"
        )
    if depth_scale is None:
        if np.issubdtype(depth.dtype, np.integer):
            depth_scale = MILLIMETRES
        elif np.issubdtype(depth.dtype, np.floating):
            depth_scale = 1.0
        else:
            raise InputError(f"depth image dtype {depth.dtype} is neither integer nor float")
    if not np.isfinite(depth_scale) or depth_scale <= 0:
        raise InputError(f"depth_scale must be a positive number of metres per unit, got {depth_scale}")

    if out is None:
        out = np.empty((height, width, 3), dtype=np.float32)
    elif out.shape != (height, width, 3) or out.dtype != np.float32:
        raise InputError(f"out must be a float32 array of shape {(height, width, 3)}")

    z = out[..., 2]
    if depth.dtype == np.float32 and depth_scale == 1.0:
        z[...] = depth
    else:
        np.multiply(depth, np.float32(depth_scale), out=z, casting="unsafe")
    # The invalid mask comes from the compact input image (cheaper than from the strided z view),
    # and copyto(where=) avoids boolean fancy indexing into that view.
    if np.issubdtype(depth.dtype, np.integer):
        invalid = depth == 0
    else:
        invalid = ~np.isfinite(depth)
        invalid |= depth == 0
    np.copyto(z, np.float32(np.nan), where=invalid)
    ru, rv = _pixel_rays(intr, height, width)
    np.multiply(z, ru[None, :], out=out[..., 0])
    np.multiply(z, rv[:, None], out=out[..., 1])
    return out


def project_points_to_grid(points: np.ndarray, K, width: int | None = None,
                           height: int | None = None):
    """Project an unorganised cloud onto the pixel grid of a ``width`` x ``height`` image.

    points: (N, 3) xyz in the camera optical frame (metres). Non-finite points and points with
        z <= 0 are ignored.
    K: CameraIntrinsics (its size is used unless width/height are given) or a 3x3 / 3x4 matrix.
    Returns (xyz, valid): an organised (H, W, 3) float32 grid holding, per pixel, the nearest point
    (smallest z) that projects into it, NaN elsewhere, and the (H, W) bool mask of filled pixels.
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise InputError(f"points must be an (N, 3) array, got shape {points.shape}")
    if isinstance(K, CameraIntrinsics):
        intr = K
        width = intr.width if width is None else int(width)
        height = intr.height if height is None else int(height)
    else:
        if width is None or height is None:
            raise InputError("width and height are required when K is a matrix")
        intr = CameraIntrinsics.from_matrix(K, width=width, height=height)
    if width <= 0 or height <= 0:
        raise InputError(f"image size {width}x{height} must be positive")

    pts = points.astype(np.float32, copy=False)
    z = pts[:, 2]
    keep = np.isfinite(pts).all(axis=1) & (z > 0)
    pts = pts[keep]
    z = pts[:, 2]
    u = np.floor(pts[:, 0] / z * intr.fx + intr.cx + 0.5).astype(np.int64)
    v = np.floor(pts[:, 1] / z * intr.fy + intr.cy + 0.5).astype(np.int64)
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    pts, z, pixel = pts[inside], z[inside], (v[inside] * width + u[inside])

    # Nearest point wins: sort by (pixel, z) and keep the first point of every pixel.
    order = np.lexsort((z, pixel))
    pixel_sorted = pixel[order]
    first = np.ones(pixel_sorted.shape[0], dtype=bool)
    first[1:] = pixel_sorted[1:] != pixel_sorted[:-1]
    winners = order[first]

    xyz = np.full((height * width, 3), np.nan, dtype=np.float32)
    xyz[pixel[winners]] = pts[winners]
    valid = np.zeros(height * width, dtype=bool)
    valid[pixel[winners]] = True
    return xyz.reshape(height, width, 3), valid.reshape(height, width)


def valid_mask(xyz: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose point is finite and not the (0, 0, 0) 'missing' marker.

    Channel by channel: NumPy reductions over a length-3 last axis (``.all(axis=-1)``) are ~20x
    slower than three element-wise passes, and this runs per frame (preprocessing, regions)."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    valid = np.isfinite(x)
    valid &= np.isfinite(y)
    valid &= np.isfinite(z)
    nonzero = x != 0
    nonzero |= y != 0
    nonzero |= z != 0
    valid &= nonzero
    return valid


@dataclass(frozen=True)
class PinholeFit:
    """A pinhole model fitted to organised clouds, with its reprojection residual in pixels.

    ``rms_px`` and ``max_px`` are the RMS and largest distance between each valid pixel's centre
    (u = column, v = row) and the projection of its point; ``num_points`` valid pixels were used.
    """

    intrinsics: CameraIntrinsics
    rms_px: float
    max_px: float
    num_points: int


def _normalised_coordinates(xyz: np.ndarray):
    """(x/z, y/z, u, v) of the valid pixels of one organised (H, W, 3) cloud, float64."""
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise InputError(f"an organised cloud must be (H, W, 3), got shape {xyz.shape}")
    valid = valid_mask(xyz) & (xyz[..., 2] > 0)
    rows, cols = np.nonzero(valid)
    points = xyz[rows, cols].astype(np.float64)
    return points[:, 0] / points[:, 2], points[:, 1] / points[:, 2], cols.astype(np.float64), \
        rows.astype(np.float64)


def fit_pinhole(clouds) -> PinholeFit:
    """Pinhole intrinsics of organised clouds whose pixel (u, v) holds the point seen there.

    ``clouds``: one (H, W, 3) cloud or an iterable of clouds of the same size (metres, camera
    optical frame; invalid points are NaN or (0, 0, 0)). Linear least squares of
    u = fx * x/z + cx and v = fy * y/z + cy over every valid pixel: the two axes are independent
    2-parameter problems, solved from running sums so that any number of clouds costs one pass
    and no concatenation. A second pass measures the residual; an iterable that can only be
    walked once (a generator) is materialised first. For clouds too large to hold, accumulate
    with :class:`PinholeFitter` and measure with :func:`pinhole_residuals`.
    """
    if isinstance(clouds, np.ndarray) and clouds.ndim == 3:
        clouds = [clouds]
    elif not isinstance(clouds, (list, tuple)):
        clouds = list(clouds)
    fitter = PinholeFitter()
    for xyz in clouds:
        fitter.add(xyz)
    intr = fitter.solve()
    squares, largest, count = 0.0, 0.0, 0
    for xyz in clouds:
        residual = pinhole_residuals(xyz, intr)
        residual = residual[np.isfinite(residual)]
        squares += float(np.dot(residual, residual))
        largest = max(largest, float(residual.max(initial=0.0)))
        count += residual.size
    return PinholeFit(intr, float(np.sqrt(squares / count)), largest, count)


class PinholeFitter:
    """Running normal equations of the pinhole fit (see :func:`fit_pinhole`)."""

    def __init__(self):
        # Per axis: n, sum a, sum a^2, sum p, sum a*p for p = fx * a + cx (a = x/z, p = u).
        self._sums = np.zeros((2, 5))
        self._shape: tuple[int, int] | None = None

    def add(self, xyz: np.ndarray) -> int:
        """Add one organised cloud; returns its number of valid pixels."""
        shape = tuple(np.shape(xyz)[:2])
        if self._shape is not None and shape != self._shape:
            raise InputError(f"cloud of {shape[1]}x{shape[0]} pixels in a fit of "
                             f"{self._shape[1]}x{self._shape[0]} clouds: one camera, one size")
        self._shape = shape
        a_x, a_y, u, v = _normalised_coordinates(xyz)
        for axis, (a, p) in enumerate(((a_x, u), (a_y, v))):
            self._sums[axis] += (a.size, a.sum(), np.dot(a, a), p.sum(), np.dot(a, p))
        return int(u.size)

    def solve(self) -> CameraIntrinsics:
        if self._shape is None:
            raise InputError("no cloud was added to the pinhole fit")
        params = []
        for axis, name in enumerate("xy"):
            n, sa, saa, sp, sap = self._sums[axis]
            # Centred form: the determinant is n^2 var(a), zero when the points span no angle.
            det = n * saa - sa * sa
            if n < 2 or not det > 1e-12 * max(n * n, 1.0):
                raise InputError(
                    f"cannot fit the camera's {name} focal length: the clouds have {int(n)} valid "
                    f"points spanning no viewing angle along {name}; a fit needs valid points in "
                    "many pixel columns and rows")
            focal = (n * sap - sa * sp) / det
            params.append((focal, (sp - focal * sa) / n))
        (fx, cx), (fy, cy) = params
        if not (fx > 0 and fy > 0):
            raise InputError(f"the pinhole fit gives focal lengths fx={fx:.4g}, fy={fy:.4g}: the "
                             "clouds are not in a camera optical frame (x right, y down, z forward) "
                             "registered to their pixel grid")
        height, width = self._shape
        return CameraIntrinsics(float(fx), float(fy), float(cx), float(cy), int(width), int(height))


def pinhole_residuals(xyz: np.ndarray, intrinsics: CameraIntrinsics) -> np.ndarray:
    """(H, W) pixel distance between each pixel's centre and its point's projection; NaN if invalid."""
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise InputError(f"an organised cloud must be (H, W, 3), got shape {xyz.shape}")
    height, width = xyz.shape[:2]
    valid = valid_mask(xyz) & (xyz[..., 2] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = xyz[..., 2].astype(np.float64)
        du = intrinsics.fx * xyz[..., 0] / z + intrinsics.cx - np.arange(width)[None, :]
        dv = intrinsics.fy * xyz[..., 1] / z + intrinsics.cy - np.arange(height)[:, None]
        residual = np.hypot(du, dv)
    residual[~valid] = np.nan
    return residual
