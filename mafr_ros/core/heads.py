"""MAFR's trainable heads: a shared fusion encoder and two gated restoration decoders.

The published model applies every layer to each pixel token independently (the 224x224 pixels are
the batch axis; its CBAM sees 1x1 maps). The heads are therefore written here as what they compute,
per-pixel MLPs on (N, C) tokens, which gives three things the reference lacks:

- batches of several images are just more tokens (the reference crashes with batch size > 1);
- inference can run on the valid pixels only and scatter back, with the same output on those
  pixels, because no layer mixes pixels;
- the gate is written as the per-pixel gating it really is, not as a 7x7 convolution on a 1x1 map.

Shapes and layer order follow the reference exactly (docs: mafr_reference.md section 5), so with
the default widths the parameter count is the published 13,383,676.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


class PixelGate(nn.Module):
    """CBAM (channel then spatial attention) as it behaves on a single pixel.

    On a 1x1 map CBAM's average- and max-pooling both return the pixel itself, so the channel gate
    is x * sigmoid(2 * MLP(x)) (an SE-style gate), and the 7x7 spatial convolution over
    [mean_c(x), max_c(x)] only ever touches its centre taps a and b: x * sigmoid(a*mean_c + b*max_c).

    ``spatial_kernel`` keeps the reference's (1, 2, k, k) kernel tensor so that the parameter count
    matches the published figure and reference weights can be mapped one to one; only the two
    centre taps are used and receive gradient. ``spatial_kernel=1`` stores just the two scalars.
    """

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        if spatial_kernel < 1 or spatial_kernel % 2 == 0:
            raise ValueError(f"spatial_kernel must be a positive odd number, got {spatial_kernel}")
        hidden = max(1, channels // reduction)
        self.channel_fc1 = nn.Linear(channels, hidden)
        self.channel_fc2 = nn.Linear(hidden, channels)
        self.spatial_weight = nn.Parameter(torch.empty(1, 2, spatial_kernel, spatial_kernel))
        # Same initialisation as the reference's bias-free Conv2d(2, 1, k): U(-1/sqrt(fan_in), +).
        bound = 1.0 / math.sqrt(2 * spatial_kernel * spatial_kernel)
        nn.init.uniform_(self.spatial_weight, -bound, bound)
        self._centre = spatial_kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.sigmoid(2.0 * self.channel_fc2(F.relu(self.channel_fc1(x))))
        taps = self.spatial_weight[0, :, self._centre, self._centre]
        logit = taps[0] * x.mean(dim=-1, keepdim=True) + taps[1] * x.amax(dim=-1, keepdim=True)
        return x * torch.sigmoid(logit)


class FusionEncoder(nn.Module):
    """Concatenated (2D, 3D) token -> latent.

    ``num_layers`` activated layers (Linear -> GELU -> LayerNorm -> Dropout, the LayerNorm shared
    by all of them as in the reference), then a plain output Linear.
    """

    def __init__(self, in_dim: int, latent: int, num_layers: int = 2, dropout: float = 0.1):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"encoder num_layers must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(
            [nn.Linear(in_dim, latent)] + [nn.Linear(latent, latent) for _ in range(num_layers - 1)])
        self.norm = nn.LayerNorm(latent)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(latent, latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.dropout(self.norm(F.gelu(layer(x))))
        return self.output(x)


class RestorationDecoder(nn.Module):
    """Latent -> one modality's features, with a gate before the output layer and a linear skip.

    ``num_layers`` activated layers (Linear -> shared LayerNorm -> GELU -> Dropout; note the
    LayerNorm/GELU order differs from the encoder, as in the reference), PixelGate, output Linear;
    result = main path + Linear skip from the latent.
    """

    def __init__(self, latent: int, out_dim: int, num_layers: int = 3, dropout: float = 0.1,
                 reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"decoder num_layers must be >= 1, got {num_layers}")
        self.skip = nn.Linear(latent, out_dim)
        self.layers = nn.ModuleList(
            [nn.Linear(latent, out_dim)] + [nn.Linear(out_dim, out_dim) for _ in range(num_layers - 1)])
        self.norm = nn.LayerNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.gate = PixelGate(out_dim, reduction, spatial_kernel)
        self.output = nn.Linear(out_dim, out_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z
        for layer in self.layers:
            x = self.dropout(F.gelu(self.norm(layer(x))))
        return self.output(self.gate(x)) + self.skip(z)


class FusionRestorationHeads(nn.Module):
    """The MAFR heads: fuse a 2D and a 3D feature token, restore both from the shared latent.

    ``forward`` works on tokens (N, C); ``forward_grid`` on (B, C, H, W) feature maps, optionally
    only on the pixels of a mask. Widths are constructor arguments because the weight-free
    extractors produce far narrower features than DINO (768) and Point-MAE (1152).
    """

    def __init__(self, dim_2d: int = 768, dim_3d: int = 1152, latent: int = 960,
                 encoder_layers: int = 2, decoder_layers: int = 3, dropout: float = 0.1,
                 cbam_reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        for name, value in (("dim_2d", dim_2d), ("dim_3d", dim_3d), ("latent", latent)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self._config = dict(dim_2d=dim_2d, dim_3d=dim_3d, latent=latent,
                            encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                            dropout=dropout, cbam_reduction=cbam_reduction,
                            spatial_kernel=spatial_kernel)
        self.dim_2d, self.dim_3d, self.latent = dim_2d, dim_3d, latent
        self.fusion_encoder = FusionEncoder(dim_2d + dim_3d, latent, encoder_layers, dropout)
        self.decoder_2d = RestorationDecoder(latent, dim_2d, decoder_layers, dropout,
                                             cbam_reduction, spatial_kernel)
        self.decoder_3d = RestorationDecoder(latent, dim_3d, decoder_layers, dropout,
                                             cbam_reduction, spatial_kernel)

    # -- configuration -------------------------------------------------------------------------
    def config(self) -> dict:
        """Constructor arguments (stored in checkpoints; ``FusionRestorationHeads(**config)``)."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict) -> "FusionRestorationHeads":
        return cls(**config)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, f2d: torch.Tensor, f3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, dim_2d), (N, dim_3d) tokens -> restored (N, dim_2d), (N, dim_3d)."""
        if f2d.ndim != 2 or f3d.ndim != 2 or f2d.shape[0] != f3d.shape[0]:
            raise InputError(f"heads expect (N, {self.dim_2d}) and (N, {self.dim_3d}) tokens with the "
                             f"same N, got {tuple(f2d.shape)} and {tuple(f3d.shape)}; use forward_grid "
                             "for (B, C, H, W) feature maps")
        if f2d.shape[1] != self.dim_2d or f3d.shape[1] != self.dim_3d:
            raise InputError(f"feature widths {f2d.shape[1]} (2D) and {f3d.shape[1]} (3D) do not match "
                             f"the heads ({self.dim_2d}, {self.dim_3d}); the extractors and the "
                             "checkpoint belong to different profiles")
        z = self.fusion_encoder(torch.cat((f2d, f3d), dim=1))
        return self.decoder_2d(z), self.decoder_3d(z)

    def forward_grid(self, f2d: torch.Tensor, f3d: torch.Tensor, mask: torch.Tensor | None = None,
                     max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, dim_2d, H, W), (B, dim_3d, H, W) maps -> restored maps of the same shapes.

        mask: optional (B, H, W) bool; only its pixels go through the heads and every other pixel of
        the output is 0. Since no layer mixes pixels, masked pixels get the same values as on the
        full grid (up to matrix-multiply blocking, ~1e-7) at a fraction of the cost: the heads cost
        about 13.4 M MAC per pixel, and objects usually cover a minority of the frame.
        max_tokens: optional cap on the tokens per head call, to bound activation memory at
        inference (the result does not depend on it beyond float rounding).
        Without a mask the outputs are (B, C, H, W) views in channels-last memory layout (no copy);
        conv/pool ops accept that layout directly.
        """
        if f2d.ndim != 4 or f3d.ndim != 4 or f2d.shape[0] != f3d.shape[0] \
                or f2d.shape[2:] != f3d.shape[2:]:
            raise InputError(f"forward_grid expects (B, C, H, W) maps on the same grid, got "
                             f"{tuple(f2d.shape)} and {tuple(f3d.shape)}")
        b, _, h, w = f2d.shape
        tokens_2d = f2d.permute(0, 2, 3, 1)  # views; gathering below copies only what is used
        tokens_3d = f3d.permute(0, 2, 3, 1)
        if mask is None:
            tokens_2d = tokens_2d.reshape(b * h * w, self.dim_2d)
            tokens_3d = tokens_3d.reshape(b * h * w, self.dim_3d)
        else:
            if mask.shape != (b, h, w) or mask.dtype != torch.bool:
                raise InputError(f"mask must be a (B, H, W) = {(b, h, w)} bool tensor, got "
                                 f"{tuple(mask.shape)} {mask.dtype}")
            mask = mask.to(f2d.device)
            tokens_2d, tokens_3d = tokens_2d[mask], tokens_3d[mask]
        rec_2d, rec_3d = self._run_tokens(tokens_2d, tokens_3d, max_tokens)
        if mask is None:
            return (rec_2d.reshape(b, h, w, self.dim_2d).permute(0, 3, 1, 2),
                    rec_3d.reshape(b, h, w, self.dim_3d).permute(0, 3, 1, 2))
        out_2d = rec_2d.new_zeros(b, self.dim_2d, h, w)
        out_3d = rec_3d.new_zeros(b, self.dim_3d, h, w)
        # Scatter through channels-last views: the outputs stay contiguous (B, C, H, W).
        out_2d.permute(0, 2, 3, 1)[mask] = rec_2d
        out_3d.permute(0, 2, 3, 1)[mask] = rec_3d
        return out_2d, out_3d

    def _run_tokens(self, t2d, t3d, max_tokens):
        n = t2d.shape[0]
        if max_tokens is None or n <= max_tokens:
            return self(t2d, t3d)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        parts = [self(t2d[i:i + max_tokens], t3d[i:i + max_tokens]) for i in range(0, n, max_tokens)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    # -- introspection -------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (the gates are counted inside their decoders as well)."""
        def count(module):
            return sum(p.numel() for p in module.parameters())
        counts = {
            "fusion_encoder": count(self.fusion_encoder),
            "decoder_2d": count(self.decoder_2d),
            "decoder_2d.gate": count(self.decoder_2d.gate),
            "decoder_3d": count(self.decoder_3d),
            "decoder_3d.gate": count(self.decoder_3d.gate),
        }
        counts["total"] = count(self)
        return counts

    def macs_per_pixel(self) -> int:
        """Multiply-accumulates of the Linear layers for one pixel token (norms and gates are noise)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def parameter_summary(self) -> str:
        """Human-readable table of ``parameter_counts`` plus the per-pixel cost."""
        counts = self.parameter_counts()
        lines = [f"{'part':<20}{'parameters':>14}"]
        for name, value in counts.items():
            label = "  of which gate" if name.endswith(".gate") else name
            lines.append(f"{label:<20}{value:>14,}")
        lines.append(f"{'MAC per pixel':<20}{self.macs_per_pixel():>14,}")
        return "\n".join(lines)
