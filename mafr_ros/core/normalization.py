"""Per-channel standardisation of the frozen features with statistics of the good training parts.

Why (a departure from the published code, option ``FeatureNorm``, recorded in the checkpoint):
MAFR restores raw backbone features and scores ||f_hat - f||. DINO and Point-MAE channels share
one scale, but the weight-free lite descriptors do not: a few wide channels (heights, gradient
energy) then dominate both the training loss and the L2 score, and the narrow channels that carry
most defects (normals, curvature, local colour) barely count. Measured on synthetic gland parts
(seed-0 training set, nearest-neighbour check of the descriptors alone and heads trained to
convergence), standardising every channel to zero mean and unit variance over the valid pixels of
the training images is what makes the restoration error separate good from defective parts.

The statistics are global constants of the model (one mean and one standard deviation per
channel), never per-image statistics, so a part that is globally off (wrong colour, rougher
surface) still shows as an error. The heads restore the standardised features and the errors are
measured in that same space. Invalid pixels (no 3D feature) stay exactly 0, so masks derived from
the features are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError

# A channel that is (nearly) constant on good parts (e.g. an FPFH bin that the part never fills)
# would turn any deviation into a huge value; its scale is floored at this fraction of the
# modality's median channel scale (on synthetic gland parts only such constant channels reach it).
_STD_FLOOR = 0.1


@dataclass
class FeatureNorm:
    """Per-channel mean and standard deviation of the 2D and the 3D features (lists of floats)."""

    mean_2d: list
    std_2d: list
    mean_3d: list
    std_3d: list

    @classmethod
    @torch.no_grad()
    def fit(cls, f2d: torch.Tensor, f3d: torch.Tensor, mask: torch.Tensor,
            chunk: int = 8) -> "FeatureNorm":
        """Statistics over the valid pixels of (N, C, H, W) feature maps, accumulated in float64
        image chunk by image chunk (the cached features can be large and float16)."""
        if not bool(mask.any()):
            raise ValueError("FeatureNorm.fit: no valid pixel in the training features")
        stats = []
        for f in (f2d, f3d):
            c = f.shape[1]
            total = torch.zeros(c, dtype=torch.float64)
            total_sq = torch.zeros(c, dtype=torch.float64)
            count = 0
            for start in range(0, f.shape[0], chunk):
                m = mask[start:start + chunk].to(f.device)
                values = f[start:start + chunk].permute(0, 2, 3, 1)[m].double().cpu()
                total += values.sum(0)
                total_sq += values.square().sum(0)
                count += values.shape[0]
            mean = total / count
            std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
            std = std.clamp_min(_STD_FLOOR * float(std.median()) + 1e-12)
            stats.append((mean.tolist(), std.tolist()))
        return cls(stats[0][0], stats[0][1], stats[1][0], stats[1][1])

    def apply(self, f2d: torch.Tensor, f3d: torch.Tensor, mask: torch.Tensor):
        """Standardised copies of (B, C, H, W) maps; pixels outside ``mask`` (B, H, W) are 0."""
        keep = mask.unsqueeze(1).to(f2d.dtype)
        out = []
        for f, mean, std in ((f2d, self.mean_2d, self.std_2d), (f3d, self.mean_3d, self.std_3d)):
            if f.shape[1] != len(mean):
                raise CheckpointError(f"feature normalisation has {len(mean)} channels but the "
                                      f"features have {f.shape[1]}; the checkpoint belongs to "
                                      "other extractors")
            m = torch.tensor(mean, dtype=f.dtype, device=f.device).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=f.dtype, device=f.device).view(1, -1, 1, 1)
            out.append((f - m) / s * keep.to(f.dtype))
        return out[0], out[1]

    def to_dict(self) -> dict:
        return {"mean_2d": list(self.mean_2d), "std_2d": list(self.std_2d),
                "mean_3d": list(self.mean_3d), "std_3d": list(self.std_3d)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "FeatureNorm | None":
        if d is None:
            return None
        try:
            norm = cls(list(d["mean_2d"]), list(d["std_2d"]), list(d["mean_3d"]), list(d["std_3d"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"feature_norm metadata is malformed ({exc})") from None
        if len(norm.mean_2d) != len(norm.std_2d) or len(norm.mean_3d) != len(norm.std_3d) \
                or min(norm.std_2d + norm.std_3d) <= 0:
            raise ValueError("feature_norm metadata is inconsistent (lengths differ or a scale <= 0)")
        return norm
