"""Named model profiles: which extractors feed the heads and how wide the heads are.

- ``paper``: MAFR as published - DINO ViT-B/8 (768-d) + Point-MAE (1152-d), latent 960. Needs the
  two pretrained weight files (see README, "Pretrained backbones").
- ``lite``: weight-free colour/texture + geometric descriptors with small heads; runs in real time on
  a CPU and is the profile of the embedded default model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    rgb_extractor: str
    xyz_extractor: str
    latent: int | None  # None: (dim_2d + dim_3d) // 2, as in the paper (960 = (768 + 1152) / 2)
    encoder_layers: int = 2
    decoder_layers: int = 3
    dropout: float = 0.1
    cbam_reduction: int = 16
    needs_weights: bool = False
    # Loss settings that differ from LossConfig's defaults for this profile.
    loss_overrides: tuple = ()

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES = {
    "paper": Profile("paper", "dino_vitb8", "pointmae", latent=960, needs_weights=True),
    # Soft census over 4 projections in a 5x5 window: 3.4x cheaper per step than 8 x 7x7 (measured,
    # 1 CPU thread) for the small lite features, which carry fewer independent directions anyway.
    "lite": Profile("lite", "lite_rgb", "lite_xyz", latent=None, cbam_reduction=4,
                    loss_overrides=(("census_projections", 4), ("census_window", 5))),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]
