"""MAFR's training losses on (B, C, H, W) feature maps, with optional masking of invalid pixels.

The reference code (docs: mafr_reference.md section 6) trains on every pixel, including background
and pixels without any 3D point, whose 3D features are all zero. Here every term takes an optional
(B, H, W) bool ``mask`` and ignores invalid pixels completely: changing the features of an invalid
pixel never changes a loss. Terms:

- ``znssd_loss``: per-pixel zero-normalised SSD across channels (= 2(1 - Pearson rho)), as in the
  reference; blind to a per-pixel gain and offset.
- ``census_loss_reference``: what the reference calls "census": L1 between 7x7 local means. It is
  no census transform, but it is the only reference term that anchors absolute feature levels.
- ``soft_census_loss``: a true (soft) census transform: per pixel, the soft sign of every
  neighbour-minus-centre difference in the window, compared Hamming-style.
- ``smoothness_loss``: edge-aware first-difference penalty on the residual.
- ``restoration_loss``: per-pixel mean squared error, the training counterpart of the test-time
  score ||f_hat - f|| (not in the published loss; weight ``w_restoration``, 0 by default).
- ``mafr_loss``: the weighted sum over both modalities, with a NaN/Inf guard.

A masked mean over zero valid pixels is 0 (the sample contributes nothing) rather than NaN.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_CENSUS_MODES = ("soft", "reference")


# -- helpers -------------------------------------------------------------------------------------
def _check_maps(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None, what: str):
    if x.ndim != 4 or x.shape != x_hat.shape:
        raise ValueError(f"{what}: expected two (B, C, H, W) maps of the same shape, got "
                         f"{tuple(x.shape)} and {tuple(x_hat.shape)}")
    if mask is not None and (mask.shape != (x.shape[0],) + tuple(x.shape[2:]) or mask.dtype != torch.bool):
        raise ValueError(f"{what}: mask must be a (B, H, W) = {(x.shape[0],) + tuple(x.shape[2:])} "
                         f"bool tensor, got {tuple(mask.shape)} {mask.dtype}")


def _masked_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``weight`` (same shape, 0/1) is 1; 0 if none."""
    if weight is None:
        return values.mean()
    weight = weight.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def _zero_invalid(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask.unsqueeze(1).to(x.dtype)


# -- similarity ----------------------------------------------------------------------------------
def znssd_loss(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None = None,
               eps: float = 1e-8) -> torch.Tensor:
    """Per-pixel zero-normalised SSD across channels, averaged over (valid) pixels.

    Each pixel's C-vector is standardised with sigma = sqrt(var + eps) (population variance), and
    the loss is the mean squared difference of the standardised vectors, ~ 2(1 - rho). It is
    computed from centred moments, which is algebraically identical to standardising first:
    var_x/(var_x+eps) + var_y/(var_y+eps) - 2 cov/sqrt((var_x+eps)(var_y+eps)), and avoids
    materialising two more (B, C, H, W) tensors.
    """
    _check_maps(x, x_hat, mask, "znssd_loss")
    xc = x - x.mean(dim=1, keepdim=True)
    yc = x_hat - x_hat.mean(dim=1, keepdim=True)
    var_x = xc.square().mean(dim=1)
    var_y = yc.square().mean(dim=1)
    cov = (xc * yc).mean(dim=1)
    per_pixel = (var_x / (var_x + eps) + var_y / (var_y + eps)
                 - 2.0 * cov * torch.rsqrt((var_x + eps) * (var_y + eps)))
    return _masked_mean(per_pixel.clamp_min(0.0), mask)


# -- census --------------------------------------------------------------------------------------
def census_loss_reference(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None = None,
                          window: int = 7) -> torch.Tensor:
    """The reference "census": mean |box(x) - box(x_hat)| with a window x window box filter.

    Zero padding is counted in the box average, as in the reference. With a mask, invalid pixels
    are set to 0 in both maps first (treated like padding, so their content cannot leak into
    valid neighbours) and the mean runs over valid pixels. The box filter is linear, so it is
    applied once to the difference.
    """
    _check_maps(x, x_hat, mask, "census_loss_reference")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"census window must be a positive odd number, got {window}")
    diff = _zero_invalid(x - x_hat, mask)
    local = F.avg_pool2d(diff, window, stride=1, padding=window // 2, count_include_pad=True)
    return _masked_mean(local.abs().mean(dim=1), mask)


def census_projections(channels: int, count: int = 8, seed: int = 0,
                       device=None, dtype=torch.float32) -> torch.Tensor:
    """(count, channels) fixed channel projections for the soft census: the channel mean, then
    seeded Gaussian directions (unit norm). Fixed so that x and x_hat are always compared on the
    same directions and the loss is reproducible across runs and devices."""
    if count < 1:
        raise ValueError(f"census projection count must be >= 1, got {count}")
    generator = torch.Generator().manual_seed(seed)
    proj = torch.randn(count, channels, generator=generator, dtype=torch.float64)
    proj[0] = 1.0
    proj = proj / proj.norm(dim=1, keepdim=True)
    return proj.to(device=device, dtype=dtype)


def soft_census(y: torch.Tensor, mask: torch.Tensor | None, window: int = 7,
                temperature: float = 0.5, floor: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft census transform of (B, K, H, W) maps.

    For every pixel p and offset o of the window (centre excluded): s = tanh(d / (T * (r_p + f)))
    with d = y(p+o) - y(p), r_p the mean |d| over p's valid neighbours (the local contrast) and
    f = ``floor`` * the image's mean local contrast. Dividing by the local contrast makes the
    transform exactly invariant to a positive gain and offset and, because any smooth monotone
    intensity change is locally affine, nearly invariant to those too, the defining property of a
    census transform; T sets how close the tanh is to a hard sign. The floor keeps flat regions
    (e.g. zeroed background) from amplifying noise. Returns (signs (B, K, W*W, H, W),
    pair (B, 1, W*W, H, W) of 0/1): a pair counts only if both pixels are valid, the neighbour lies
    inside the image and is not the centre itself.
    """
    b, k, h, w = y.shape
    radius = window // 2
    taps = window * window
    # unfold gathers all neighbours at once: (B, K*W*W, H*W) -> (B, K, W*W, H, W). The centre tap
    # (d = 0) and the zero padding outside the image are excluded through ``pair``.
    d = F.unfold(y, window, padding=radius).view(b, k, taps, h, w) - y.unsqueeze(2)
    valid = y.new_ones(b, 1, h, w) if mask is None else mask.unsqueeze(1).to(y.dtype)
    pair = F.unfold(valid, window, padding=radius).view(b, 1, taps, h, w) * valid.unsqueeze(2)
    pair[:, :, taps // 2] = 0.0
    n_pairs = pair.sum(dim=2).clamp_min(1.0)                         # (B, 1, H, W)
    contrast = (d.abs() * pair).sum(dim=2) / n_pairs                 # (B, K, H, W)
    image_contrast = ((contrast * valid).sum(dim=(2, 3), keepdim=True)
                      / valid.sum(dim=(2, 3), keepdim=True).clamp_min(1.0))
    scale = temperature * (contrast + floor * image_contrast.detach() + 1e-12)
    signs = torch.tanh(d / scale.unsqueeze(2))
    return signs, pair


def soft_census_loss(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None = None,
                     window: int = 7, temperature: float = 0.5, projections: int = 8,
                     seed: int = 0) -> torch.Tensor:
    """Hamming-like distance between the soft census transforms of x and x_hat, in [0, 1].

    A per-channel census of DINO/Point-MAE maps would hold C * (W*W-1) values per pixel
    (1152 * 48 * 224^2 * 4 B = 11 GB for one 3D map), so both maps are first projected onto
    ``projections`` fixed directions (channel mean + seeded random unit directions, see
    ``census_projections``): a census of K views of the feature space, K/C of the memory.
    The loss is mean |s(x) - s(x_hat)| / 2 over valid pixel pairs and projections, i.e. in the
    hard-sign limit the fraction of neighbour orderings that the restoration gets wrong.
    It is blind to absolute levels by design; pair it with an anchoring term (``LossConfig``).
    """
    _check_maps(x, x_hat, mask, "soft_census_loss")
    if window < 3 or window % 2 == 0:
        raise ValueError(f"census window must be an odd number >= 3, got {window}")
    if temperature <= 0:
        raise ValueError(f"census temperature must be > 0, got {temperature}")
    proj = census_projections(x.shape[1], projections, seed, device=x.device, dtype=x.dtype)
    y = torch.einsum("kc,bchw->bkhw", proj, x)
    y_hat = torch.einsum("kc,bchw->bkhw", proj, x_hat)
    s, pair = soft_census(y, mask, window, temperature)
    s_hat, _ = soft_census(y_hat, mask, window, temperature)
    per_pair = (s - s_hat).abs().mean(dim=1, keepdim=True) * 0.5   # (B, 1, P, H, W)
    return (per_pair * pair).sum() / pair.sum().clamp_min(1.0)


# -- restoration ---------------------------------------------------------------------------------
def restoration_loss(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Mean over (valid) pixels and channels of (x_hat - x)^2.

    The anomaly score is the per-pixel L2 restoration error, but none of the published terms
    minimises it: ZNSSD is blind to a per-pixel gain and offset, the census to absolute levels, the
    local mean to anything that averages out over 7x7, and the smoothness term favours a constant
    residual. On the weight-free lite features the heads then leave a moderate, spatially varying
    error on every good pixel that masks the defects; this term anchors the restored features
    pixel by pixel in the space the score measures.
    """
    _check_maps(x, x_hat, mask, "restoration_loss")
    per_pixel = (x_hat - x).square().mean(dim=1)
    return _masked_mean(per_pixel, mask)


# -- smoothness ----------------------------------------------------------------------------------
def smoothness_loss(residual: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None = None,
                    channels: tuple[int, ...] | None = None) -> torch.Tensor:
    """Edge-aware first-difference penalty |dx r| e^-|dx I| + |dy r| e^-|dy I| on the residual.

    residual: (B, C, H, W) = x_hat - x. image: (B, H, W) guide, or (B, C', H, W) whose channel
    mean is used (the reference's I). Differences are forward differences cropped to the common
    (H-1, W-1) grid, as in the reference.

    channels: residual channels to penalise, averaged. The reference uses only channels 0 and 1
    (a leftover of the optical-flow code it came from, where they were u and v) and sums them,
    which equals 2x this function with ``channels=(0, 1)``. Default: all channels, because
    feature channels carry no privileged order; two of 768/1152 channels make the term vestigial.
    With a mask a difference counts only if both of its pixels are valid.
    """
    if residual.ndim != 4:
        raise ValueError(f"smoothness_loss: residual must be (B, C, H, W), got {tuple(residual.shape)}")
    if image.ndim == 4:
        image = image.mean(dim=1)
    b, _, h, w = residual.shape
    if image.shape != (b, h, w):
        raise ValueError(f"smoothness_loss: image must be (B, H, W) = {(b, h, w)} or (B, C, H, W) "
                         f"on the same grid, got {tuple(image.shape)}")
    if h < 2 or w < 2:
        raise ValueError(f"smoothness_loss needs maps of at least 2x2 pixels, got {h}x{w}")
    if channels is not None:
        residual = residual[:, list(channels)]
    base = residual[:, :, :-1, :-1]
    dx_r = (residual[:, :, :-1, 1:] - base).abs().mean(dim=1)
    dy_r = (residual[:, :, 1:, :-1] - base).abs().mean(dim=1)
    i_base = image[:, :-1, :-1]
    wx = torch.exp(-(image[:, :-1, 1:] - i_base).abs())
    wy = torch.exp(-(image[:, 1:, :-1] - i_base).abs())
    if mask is None:
        return (dx_r * wx + dy_r * wy).mean()
    m = mask.to(residual.dtype)
    m_base = m[:, :-1, :-1]
    mx = m_base * m[:, :-1, 1:]
    my = m_base * m[:, 1:, :-1]
    return (dx_r * wx * mx + dy_r * wy * my).sum() / m_base.sum().clamp_min(1.0)


# -- total ---------------------------------------------------------------------------------------
@dataclass
class LossConfig:
    """Weights and options of ``mafr_loss``.

    Defaults differ from the reference on purpose: invalid pixels are masked, the census term is a
    true soft census, the smoothness term covers every channel, and because a census is blind to
    absolute levels (and ZNSSD to per-pixel gain/offset) the reference's local-mean L1 stays in as
    ``local_mean``, the term that makes restored features match in absolute value, which the
    test-time score ||x_hat - x|| relies on. ``LossConfig.reference()`` reproduces the code of the
    paper exactly.
    """

    w_similarity: float = 1.0
    w_census: float = 1.0
    w_smoothness: float = 1.0
    # Local-mean L1 anchor; only added with census="soft" (with "reference" the census term is
    # already exactly this quantity).
    w_local_mean: float = 1.0
    # Per-pixel MSE (``restoration_loss``); not in the published loss, so 0 unless a profile or the
    # user sets it (the lite profile does).
    w_restoration: float = 0.0
    census: str = "soft"
    mask_invalid: bool = True
    census_window: int = 7
    census_temperature: float = 0.5
    census_projections: int = 8
    local_mean_window: int = 7
    smoothness_channels: tuple[int, ...] | None = None
    znssd_eps: float = 1e-8

    def __post_init__(self):
        if self.census not in _CENSUS_MODES:
            raise ValueError(f"LossConfig.census must be one of {_CENSUS_MODES}, got {self.census!r}")
        for name in ("w_similarity", "w_census", "w_smoothness", "w_local_mean", "w_restoration"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("census_window", "local_mean_window"):
            value = getattr(self, name)
            if value < 1 or value % 2 == 0:
                raise ValueError(f"LossConfig.{name} must be a positive odd number, got {value}")
        if self.census_temperature <= 0:
            raise ValueError(f"LossConfig.census_temperature must be > 0, got {self.census_temperature}")
        if self.smoothness_channels is not None:
            self.smoothness_channels = tuple(int(c) for c in self.smoothness_channels)

    @classmethod
    def reference(cls) -> "LossConfig":
        """The published code's loss: all weights 1, local-mean "census", residual channels 0 and 1
        summed (= 2 x their mean), no masking."""
        return cls(w_similarity=1.0, w_census=1.0, w_smoothness=2.0, w_local_mean=0.0,
                   census="reference", mask_invalid=False, smoothness_channels=(0, 1))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["smoothness_channels"] is not None:
            d["smoothness_channels"] = list(d["smoothness_channels"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LossConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LossConfig keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)


def _modality_terms(x, x_hat, mask, cfg: LossConfig) -> dict[str, torch.Tensor]:
    terms = {}
    if cfg.w_similarity > 0:
        terms["similarity"] = (cfg.w_similarity, znssd_loss(x, x_hat, mask, cfg.znssd_eps))
    if cfg.w_census > 0:
        if cfg.census == "soft":
            value = soft_census_loss(x, x_hat, mask, cfg.census_window, cfg.census_temperature,
                                     cfg.census_projections)
        else:
            value = census_loss_reference(x, x_hat, mask, cfg.census_window)
        terms["census"] = (cfg.w_census, value)
    if cfg.w_local_mean > 0 and cfg.census == "soft":
        terms["local_mean"] = (cfg.w_local_mean,
                               census_loss_reference(x, x_hat, mask, cfg.local_mean_window))
    if cfg.w_restoration > 0:
        terms["restoration"] = (cfg.w_restoration, restoration_loss(x, x_hat, mask))
    if cfg.w_smoothness > 0:
        terms["smoothness"] = (cfg.w_smoothness,
                               smoothness_loss(x_hat - x, x, mask, cfg.smoothness_channels))
    return terms


def mafr_loss(f2d: torch.Tensor, f2d_hat: torch.Tensor, f3d: torch.Tensor, f3d_hat: torch.Tensor,
              mask: torch.Tensor | None = None, cfg: LossConfig | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the loss terms of both modalities.

    Returns (total, terms): ``terms`` maps "similarity_2d", "census_3d", ... to the detached,
    unweighted value of each term, for logging. Raises FloatingPointError naming the first
    non-finite term instead of letting NaN/Inf reach the optimiser (the reference exits silently).
    Only one device sync per call: the terms are inspected only when the total is not finite.
    """
    cfg = cfg or LossConfig()
    mask = mask if cfg.mask_invalid else None
    weighted = []
    terms: dict[str, torch.Tensor] = {}
    for suffix, x, x_hat in (("2d", f2d, f2d_hat), ("3d", f3d, f3d_hat)):
        for name, (weight, value) in _modality_terms(x, x_hat, mask, cfg).items():
            terms[f"{name}_{suffix}"] = value
            weighted.append(weight * value)
    if not weighted:
        raise ValueError("LossConfig has every weight at 0: nothing to optimise")
    total = torch.stack(weighted).sum()
    if not bool(torch.isfinite(total)):
        bad = [name for name, value in terms.items() if not bool(torch.isfinite(value))]
        culprit = bad[0] if bad else "total"
        raise FloatingPointError(
            f"MAFR loss term {culprit!r} is not finite (non-finite terms: {bad or ['total']}); "
            "check the input features for NaN/Inf and lower the learning rate if the heads diverged")
    return total, {name: value.detach() for name, value in terms.items()}
