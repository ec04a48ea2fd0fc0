"""From restored features to anomaly maps, image scores, thresholds and normalised scores.

Pipeline (docs: mafr_reference.md section 8): per-pixel restoration errors of each modality ->
fusion (product by default) zeroed where the 3D feature is empty -> smoothing -> image score.
Thresholds are calibrated on good parts only, and scores are mapped through a logistic so that
0.5 is always the decision threshold, whatever the product or the model (the convention of
anomalib's post-processing): a score is anomalous iff it is strictly above the threshold, i.e.
iff its normalised value is > 0.5.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# "2d" / "3d": one modality's error alone (ablations: what each modality contributes).
FUSION_MODES = ("product", "sum", "max", "2d", "3d")
IMAGE_SCORE_MODES = ("reference", "max", "topk")
SMOOTHING_MODES = ("gaussian", "box_cascade", "none")
PADDING_MODES = ("reflect", "nearest", "constant")


def _dataclass_from_dict(cls, d: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; valid keys: {sorted(known)}")
    return cls(**d)


# -- maps ----------------------------------------------------------------------------------------
def restoration_errors(f: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
    """Per-pixel Euclidean restoration error over channels: (B, C, H, W) -> (B, H, W).

    Also works on tokens: (N, C) -> (N,). Plain L2, as in the reference (CFM normalises the
    vectors first; MAFR does not, so the score keeps the feature magnitude).
    """
    if f.shape != f_hat.shape or f.ndim not in (2, 4):
        raise ValueError(f"restoration_errors expects two (B, C, H, W) or (N, C) tensors of the same "
                         f"shape, got {tuple(f.shape)} and {tuple(f_hat.shape)}")
    return torch.linalg.vector_norm(f_hat - f, dim=1)


def nonempty_feature_mask(f3d: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W) bool: pixels whose 3D feature vector is not all zeros.

    The reference tests "feature sum == 0", which a non-empty vector can satisfy by accident.
    """
    return (f3d != 0).any(dim=1)


def fuse_maps(r2d: torch.Tensor, r3d: torch.Tensor, mode: str = "product",
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Combine the 2D and 3D error maps (B, H, W); pixels outside ``mask`` become exactly 0.

    product (the paper's): high only where both modalities fail to restore, which suppresses
    single-modality noise and is independent of each modality's scale up to a global factor.
    sum / max: flag defects visible in only one modality, but mix the two error scales, so they
    are only sensible when both maps are on comparable scales.
    2d / 3d: one modality's error alone (still zeroed where there is no 3D feature), for ablations.
    mask: the 3D feature validity (``nonempty_feature_mask``); without a 3D feature a pixel has
    no 3D error to fuse.
    """
    if r2d.shape != r3d.shape:
        raise ValueError(f"fuse_maps: map shapes differ: {tuple(r2d.shape)} vs {tuple(r3d.shape)}")
    if mode == "product":
        fused = r2d * r3d
    elif mode == "sum":
        fused = r2d + r3d
    elif mode == "max":
        fused = torch.maximum(r2d, r3d)
    elif mode == "2d":
        fused = r2d
    elif mode == "3d":
        fused = r3d
    else:
        raise ValueError(f"unknown fusion mode {mode!r}; choose one of {FUSION_MODES}")
    if mask is not None:
        fused = torch.where(mask, fused, fused.new_zeros(()))
    return fused


def erode_mask(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """(B, H, W) bool -> the pixels of ``mask`` farther than ``radius`` pixels (Euclidean) from
    every pixel outside it (pixels beyond the image count as outside). radius <= 0: unchanged.

    Scoring option ``ScoringConfig.erode``: on real parts (MVTec 3D-AD cable_gland) the 3D
    errors of good pixels 1-4 px from the silhouette are ~1.5x those of the interior, and the
    smoothing spreads that band inwards, where good parts then have their maxima.
    """
    if mask.ndim != 3:
        raise ValueError(f"erode_mask expects a (B, H, W) mask, got {tuple(mask.shape)}")
    if radius <= 0:
        return mask
    r = int(math.floor(radius))
    offsets = torch.arange(-r, r + 1, dtype=torch.float32)
    disc = ((offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2) <= radius ** 2).float()
    outside = F.pad((~mask).float().unsqueeze(1), (r, r, r, r), value=1.0)
    hits = F.conv2d(outside, disc.to(outside.device).view(1, 1, 2 * r + 1, 2 * r + 1))
    return mask & (hits.squeeze(1) < 0.5)


# -- smoothing -----------------------------------------------------------------------------------
def gaussian_kernel1d(sigma: float, truncate: float = 3.0, dtype=torch.float32, device=None):
    """Normalised 1D Gaussian with radius int(truncate * sigma + 0.5) (scipy.ndimage's rule)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _pad_index(n: int, radius: int, mode: str, device) -> torch.Tensor:
    """Source indices of a 1D signal of length n padded by ``radius`` on both sides.

    "reflect" is scipy's (d c b a | a b c d, edge sample repeated), "nearest" repeats the edge;
    computed with a modulo so that any radius works, also larger than the map.
    """
    i = torch.arange(-radius, n + radius, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    j = torch.remainder(i, 2 * n)
    return torch.where(j >= n, 2 * n - 1 - j, j)


def gaussian_smooth(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 3.0,
                    padding: str = "reflect") -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps (two 1D convolutions on the whole batch).

    padding: "reflect" (default; scipy.ndimage mode "reflect") keeps a defect at the image border
    at full strength, whereas "constant" (zeros, like the reference's box filters) halves it.
    "nearest" repeats the edge. Results equal scipy.ndimage.gaussian_filter(map, sigma,
    mode=padding, truncate=truncate) per image.
    """
    if maps.ndim != 3:
        raise ValueError(f"gaussian_smooth expects (B, H, W) maps, got {tuple(maps.shape)}")
    if padding not in PADDING_MODES:
        raise ValueError(f"unknown padding {padding!r}; choose one of {PADDING_MODES}")
    if sigma <= 0:
        return maps.clone()
    b, h, w = maps.shape
    kernel = gaussian_kernel1d(sigma, truncate, maps.dtype, maps.device)
    r = kernel.numel() // 2
    x = maps.unsqueeze(1)
    if padding == "constant":
        x = F.pad(x, (r, r, r, r))
    else:
        x = x.index_select(2, _pad_index(h, r, padding, maps.device))
        x = x.index_select(3, _pad_index(w, r, padding, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def box_cascade_smooth(maps: torch.Tensor) -> torch.Tensor:
    """The reference smoothing: five 5x5 then three 7x7 box filters, zero padding counted.

    Approximates a Gaussian with sigma = sqrt(5*2 + 3*4) ~ 4.69 px (support radius 19 px).
    """
    if maps.ndim != 3:
        raise ValueError(f"box_cascade_smooth expects (B, H, W) maps, got {tuple(maps.shape)}")
    x = maps.unsqueeze(1)
    for size, passes in ((5, 5), (7, 3)):
        for _ in range(passes):
            x = F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=True)
    return x.squeeze(1)


# -- image scores --------------------------------------------------------------------------------
def image_score(maps: torch.Tensor, mode: str = "reference", topk_fraction: float = 0.001
                ) -> torch.Tensor:
    """One score per (B, H, W) map -> (B,).

    reference: max / sqrt(mean of the non-zero pixels) (the CFM/MAFR per-image normalisation; 0
    for an all-zero map). max: the plain maximum. topk: mean of the ceil(fraction * H * W)
    highest pixels, less sensitive to a single hot pixel than the max.
    """
    if maps.ndim != 3:
        raise ValueError(f"image_score expects (B, H, W) maps, got {tuple(maps.shape)}")
    flat = maps.flatten(1)
    if mode == "max":
        return flat.amax(dim=1)
    if mode == "reference":
        nonzero = (flat != 0).sum(dim=1)
        mean_nonzero = flat.sum(dim=1) / nonzero.clamp_min(1).to(flat.dtype)
        peak = flat.amax(dim=1)
        score = peak / mean_nonzero.sqrt()
        return torch.where(nonzero > 0, score, score.new_zeros(()))
    if mode == "topk":
        if not 0 < topk_fraction <= 1:
            raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
        k = max(1, math.ceil(topk_fraction * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown image score mode {mode!r}; choose one of {IMAGE_SCORE_MODES}")


@dataclass
class ScoringConfig:
    """How restoration errors become anomaly maps and image scores.

    Defaults: the paper's product fusion and image score, but a true Gaussian (sigma 4 px at the
    224 grid) with reflect padding instead of the zero-padded box cascade
    (``smoothing="box_cascade"`` reproduces the reference).
    """

    fusion: str = "product"
    smoothing: str = "gaussian"
    sigma: float = 4.0
    truncate: float = 3.0
    padding: str = "reflect"
    image_score: str = "reference"
    topk_fraction: float = 0.001
    # The image score ignores the grid pixels of the 3D-feature mask within this distance of its
    # edge: it is taken from a second smoothed map in which they are 0, like pixels without a 3D
    # feature (``erode_mask``). The anomaly map itself keeps them (defects at the silhouette stay
    # visible). 0 = off (the reference).
    erode: float = 0.0
    # Image score only: the 3D error enters the fusion of the image-score map as
    # max(r3d, floor_3d), so that where the 3D error is at its noise level a 2D anomaly is not
    # damped further by a product with a below-typical 3D error (a softer AND than the plain
    # product). Absolute, in the 3D error's units: `mafr train --floor-3d P` sets it to the P-th
    # percentile of the calibration images' valid-pixel 3D errors. The anomaly map keeps the
    # plain fusion. 0 = off.
    floor_3d: float = 0.0

    def __post_init__(self):
        for name, allowed in (("fusion", FUSION_MODES), ("smoothing", SMOOTHING_MODES),
                              ("padding", PADDING_MODES), ("image_score", IMAGE_SCORE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ScoringConfig.{name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if self.sigma < 0:
            raise ValueError(f"ScoringConfig.sigma must be >= 0, got {self.sigma}")
        if not 0 < self.topk_fraction <= 1:
            raise ValueError(f"ScoringConfig.topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if not self.erode >= 0:
            raise ValueError(f"ScoringConfig.erode must be >= 0 pixels, got {self.erode}")
        if not (self.floor_3d >= 0 and math.isfinite(self.floor_3d)):
            raise ValueError(f"ScoringConfig.floor_3d must be a finite value >= 0 (0: off), got "
                             f"{self.floor_3d}")

    @classmethod
    def reference(cls) -> "ScoringConfig":
        return cls(fusion="product", smoothing="box_cascade", image_score="reference")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ScoringConfig":
        return _dataclass_from_dict(cls, d)


def smooth_maps(maps: torch.Tensor, cfg: ScoringConfig) -> torch.Tensor:
    if cfg.smoothing == "gaussian":
        return gaussian_smooth(maps, cfg.sigma, cfg.truncate, cfg.padding)
    if cfg.smoothing == "box_cascade":
        return box_cascade_smooth(maps)
    return maps


def anomaly_maps(f2d: torch.Tensor, f2d_hat: torch.Tensor, f3d: torch.Tensor, f3d_hat: torch.Tensor,
                 mask: torch.Tensor | None = None, cfg: ScoringConfig | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and restorations (B, C, H, W) -> (smoothed anomaly maps (B, H, W), scores (B,)).

    mask: pixels that have a 3D feature; default ``nonempty_feature_mask(f3d)``.
    """
    if mask is None:
        mask = nonempty_feature_mask(f3d)
    return score_errors(restoration_errors(f2d, f2d_hat), restoration_errors(f3d, f3d_hat), mask,
                        cfg)


def score_errors(r2d: torch.Tensor, r3d: torch.Tensor, mask: torch.Tensor,
                 cfg: ScoringConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-modality error maps (B, H, W) -> (smoothed fused maps (B, H, W), image scores (B,)).

    The one scoring path after the errors, whatever produced them (restoration heads or the
    memory bank): fusion with invalid pixels zeroed, smoothing, and the image score of
    ``score_map`` (the eroded variant when ``cfg.erode`` > 0)."""
    cfg = cfg or ScoringConfig()
    smoothed = smooth_maps(fuse_maps(r2d, r3d, cfg.fusion, mask), cfg)
    return smoothed, image_score(score_map(smoothed, r2d, r3d, mask, cfg), cfg.image_score,
                                 cfg.topk_fraction)


def score_map(smoothed: torch.Tensor, r2d: torch.Tensor, r3d: torch.Tensor, mask: torch.Tensor,
              cfg: ScoringConfig) -> torch.Tensor:
    """The map the image score is taken from: ``smoothed`` itself, or the smoothed fusion of the
    errors on the eroded mask (``cfg.erode`` > 0: the silhouette band left out) with the 3D error
    raised to ``cfg.floor_3d`` (> 0)."""
    if cfg.erode <= 0 and cfg.floor_3d <= 0:
        return smoothed
    if cfg.floor_3d > 0:
        r3d = r3d.clamp(min=cfg.floor_3d)
    return smooth_maps(fuse_maps(r2d, r3d, cfg.fusion, erode_mask(mask, cfg.erode)), cfg)


# -- thresholds ----------------------------------------------------------------------------------
def _as_flat_tensor(values) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    t = t.detach().flatten()
    if not t.is_floating_point():
        t = t.double()
    return t


def _order_statistic_threshold(values: torch.Tensor, target_fpr: float) -> float:
    """Threshold = the (k+1)-th largest value, k = floor(target_fpr * (n + 1)) - 1, at least 0.

    For a new score exchangeable with the n calibration scores (another good part), the chance
    to exceed the (k+1)-th largest of them is exactly (k+1)/(n+1) (ties aside), so this is the
    lowest order statistic whose expected false-positive rate on new good parts is <= target.
    With fewer than 1/target_fpr - 1 samples no order statistic qualifies and the maximum is
    returned; its expected FPR is then 1/(n+1) > target (collect more good parts).
    """
    if not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    n = values.numel()
    if n == 0:
        raise ValueError("cannot calibrate a threshold from zero good scores")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("good scores contain NaN or Inf; fix the scoring before calibrating")
    k = max(0, math.floor(target_fpr * (n + 1)) - 1)
    # kthvalue is 1-based k-th smallest: the (k+1)-th largest is the (n-k)-th smallest.
    return float(torch.kthvalue(values.cpu(), n - k).values)


def expected_false_positive_rate(num_good: int, target_fpr: float) -> float:
    """Expected FPR on new good parts of ``calibrate_threshold`` with ``num_good`` samples."""
    k = max(0, math.floor(target_fpr * (num_good + 1)) - 1)
    return (k + 1) / (num_good + 1)


def calibrate_threshold(good_scores, target_fpr: float = 0.01) -> float:
    """Image threshold from the scores of good parts (validation set, never the training images,
    whose restorations are optimistic). Decision: anomalous iff score > threshold. On the
    calibration scores themselves at most floor(target_fpr * (n + 1)) - 1 <= target_fpr * n lie
    above it (see ``_order_statistic_threshold`` for the rule)."""
    return _order_statistic_threshold(_as_flat_tensor(good_scores), target_fpr)


def calibrate_pixel_threshold(good_maps, target_fpr: float = 0.01, mask=None,
                              max_pixels: int = 4_000_000, seed: int = 0) -> float:
    """Pixel threshold from the anomaly maps of good parts (same rule as ``calibrate_threshold``).

    mask: optional bool array like good_maps selecting the pixels that count (e.g. the object):
    background pixels forced to 0 would otherwise dilute the rate and lower the threshold.
    max_pixels: above this many pixels a uniform random subsample (fixed seed) is used; the
    quantile's standard error at 4 M pixels is far below the image-to-image variation.
    """
    return _order_statistic_threshold(_pixel_sample(good_maps, mask, max_pixels, seed), target_fpr)


def _pixel_sample(maps, mask, max_pixels: int, seed: int) -> torch.Tensor:
    """The (masked) pixel values of ``maps`` as one flat tensor, randomly subsampled (fixed seed)
    to at most ``max_pixels`` values."""
    values = _as_flat_tensor(maps)
    if mask is not None:
        m = mask.flatten() if isinstance(mask, torch.Tensor) else torch.from_numpy(
            np.asarray(mask, dtype=bool).ravel())
        if m.numel() != values.numel():
            raise ValueError(f"pixel mask has {m.numel()} entries, the maps have {values.numel()}")
        values = values[m.to(device=values.device, dtype=torch.bool)]
    if values.numel() > max_pixels:
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(values.numel(), generator=generator)[:max_pixels]
        values = values[pick.to(values.device)]
    return values


def score_scale(good_scores, threshold: float) -> float:
    """Logistic scale that maps the median good score to 0.1 (and the threshold to 0.5).

    Ties the normalised value to the spread of good parts: a typical good part reads 0.1, the
    threshold 0.5, and a part as far above the threshold as the median is below it reads 0.9.
    Falls back to the interquartile range, then to a tiny fraction of |threshold|, when the good
    scores are degenerate (median at the threshold).
    """
    values = _as_flat_tensor(good_scores).double().cpu()
    gap = threshold - float(values.quantile(0.5))  # interpolated, like numpy.median
    if gap > 0:
        return gap / math.log(9.0)
    iqr = float(values.quantile(0.75) - values.quantile(0.25)) if values.numel() > 1 else 0.0
    if iqr > 0:
        return iqr / math.log(9.0)
    return max(abs(threshold), 1.0) * 1e-6


def normalize_score(score, threshold: float, scale: float):
    """Monotone map of raw scores (float, NumPy array or tensor) into [0, 1] with
    normalize(threshold) == 0.5 exactly: sigmoid((score - threshold) / scale)."""
    if not scale > 0:
        raise ValueError(f"normalisation scale must be > 0, got {scale}")
    if isinstance(score, torch.Tensor):
        return torch.sigmoid((score - threshold) / scale)
    z = (np.asarray(score, dtype=np.float64) - threshold) / scale
    # Two-branch logistic: exact 0.5 at z = 0 and no overflow warnings for large |z|.
    e = np.exp(-np.abs(z))
    out = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return float(out) if out.ndim == 0 else out


@dataclass
class Thresholds:
    """Calibrated decision thresholds and normalisation scales of one model (one product)."""

    image: float
    pixel: float
    image_scale: float
    pixel_scale: float
    target_fpr: float | None = None
    num_good_images: int = 0

    @classmethod
    def calibrate(cls, good_scores, good_maps, target_fpr: float = 0.01, pixel_mask=None,
                  pixel_target_fpr: float | None = None) -> "Thresholds":
        """Both thresholds from good parts' image scores (N,) and anomaly maps (N, H, W)."""
        image = calibrate_threshold(good_scores, target_fpr)
        pixel_fpr = target_fpr if pixel_target_fpr is None else pixel_target_fpr
        pixel = calibrate_pixel_threshold(good_maps, pixel_fpr, pixel_mask)
        pixels = _pixel_sample(good_maps, pixel_mask, 1_000_000, 0)  # enough for a median
        return cls(image=image, pixel=pixel, image_scale=score_scale(good_scores, image),
                   pixel_scale=score_scale(pixels, pixel), target_fpr=target_fpr,
                   num_good_images=int(_as_flat_tensor(good_scores).numel()))

    def normalize_image(self, score):
        return normalize_score(score, self.image, self.image_scale)

    def normalize_pixel(self, maps):
        return normalize_score(maps, self.pixel, self.pixel_scale)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Thresholds":
        return _dataclass_from_dict(cls, d)
