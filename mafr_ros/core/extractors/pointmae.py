"""Frozen Point-MAE encoder (ShapeNet pre-training), MAFR's 3D backbone, in plain PyTorch.

Same network as the Point-MAE release, without its custom CUDA ops: farthest-point sampling of 1024
centres and 128-nearest-neighbour grouping are done in torch (``core.align``), so it runs on CPU and
any CUDA device. Module names equal the release file's encoder keys after stripping ``module.`` and
``MAE_encoder.`` (docs/checkpoints.md), so the file loads with strict key and shape checks.

Always in eval mode: BatchNorm uses the pre-training running statistics and there is no stochastic
depth, so features are deterministic. The published MAFR/CFM/M3DM code runs this backbone in train
mode (DropPath active, BatchNorm on per-cloud statistics, reference §4.4); expect small differences
from their numbers.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, InputError
from ..align import farthest_point_sample, nearest_neighbours, spread_group_features
from .base import FeatureExtractor, register, valid_mask_from_xyz
from .dino import check_state_dict, load_checked_state, read_weight_file

POINTMAE_DOWNLOAD_HINT = (
    "download the Point-MAE ShapeNet pre-training file pretrain.pth "
    "(https://github.com/Pang-Yatian/Point-MAE/releases/download/main/pretrain.pth, also distributed as "
    "pointmae_pretrain.pth) on a machine with internet and point the configuration's pointmae weights "
    "at it")

# Keys of the pre-training decoder side of the release file; the extractor does not use them.
_DECODER_PREFIXES = ("MAE_decoder.", "mask_token", "decoder_pos_embed.", "increase_dim.")


class MiniPointNet(nn.Module):
    """Point-MAE's group encoder: (n_groups, K, 3) centred neighbourhoods -> (n_groups, 384) tokens.

    The modules are the release's Conv1d/BatchNorm1d stack (so the weights load by name), but the
    forward runs channels-last with the 1x1 convolutions as matrix products, and splits the
    512 -> 512 convolution of [pooled global feature, point feature]: the global half is constant over
    the K points of a group, so it is computed once per group instead of K times. Same result up to
    float rounding, about a quarter fewer multiply-adds for the whole encoder.
    """

    def __init__(self, out_dim: int = 384):
        super().__init__()
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512),
                                         nn.ReLU(inplace=True), nn.Conv1d(512, out_dim, 1))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        n, k, _ = groups.shape
        conv_a, norm_a, _, conv_b = self.first_conv
        conv_c, norm_c, _, conv_d = self.second_conv
        x = F.linear(groups.reshape(n * k, 3), conv_a.weight.flatten(1), conv_a.bias)
        x = norm_a(x).relu_()
        feature = F.linear(x, conv_b.weight.flatten(1), conv_b.bias).view(n, k, -1)  # (n, K, 256)
        pooled = feature.amax(dim=1)  # (n, 256)
        # The release concatenates [pooled (expanded over K), feature]: the global half comes first.
        weight_c = conv_c.weight.flatten(1)
        split = pooled.shape[1]
        x = F.linear(feature, weight_c[:, split:])
        x += F.linear(pooled, weight_c[:, :split], conv_c.bias).unsqueeze(1)
        x = norm_c(x.view(n * k, -1)).relu_()
        return F.linear(x, conv_d.weight.flatten(1), conv_d.bias).view(n, k, -1).amax(dim=1)

    def forward_reference(self, groups: torch.Tensor) -> torch.Tensor:
        """The release's formulation (concatenate, then Conv1d stack); kept to test ``forward``."""
        feature = self.first_conv(groups.transpose(1, 2))
        pooled = feature.amax(dim=2, keepdim=True)
        feature = torch.cat([pooled.expand(-1, -1, groups.shape[1]), feature], dim=1)
        return self.second_conv(feature).amax(dim=2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as released
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-5 as in Point-MAE; DropPath is identity in eval)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """12 blocks; the centre embedding is added to the input of every block, as in Point-MAE."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, fetch: tuple[int, ...]) -> list[torch.Tensor]:
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x + pos)
            if i in fetch:
                outputs.append(x)
        return outputs


def release_encoder_state(raw: dict) -> tuple[dict, dict]:
    """Split a Point-MAE release ``base_model`` dict into (encoder state, ignored decoder entries).

    Strips the ``module.`` (DistributedDataParallel) and ``MAE_encoder.`` prefixes.
    """
    encoder, ignored = {}, {}
    for key, value in raw.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith("MAE_encoder."):
            encoder[name[len("MAE_encoder."):]] = value
        elif name.startswith(_DECODER_PREFIXES):
            ignored[name] = value
        else:
            encoder[name] = value  # reported as unexpected by the strict check
    return encoder, ignored


@register("pointmae")
class PointMAEExtractor(FeatureExtractor):
    """Point-MAE features on the pixel grid: (B, 3, S, S) xyz -> (B, 1152, S, S).

    Per cloud: the valid points (any coordinate != 0), 1024 farthest-point centres, 128 nearest
    points per centre, mini-PointNet tokens + centre embedding, 12 transformer blocks; outputs of
    blocks 4, 8 and 12 through the final LayerNorm, concatenated (1152 per centre). Every valid pixel
    then takes the inverse squared-distance mix of its 3 nearest centres, followed by a same-size
    3 x 3 mean (``core.align``). Needs at least 1024 valid points per cloud.
    """

    name = "pointmae"
    modality = "xyz"
    out_dim = 1152
    width = 384
    fetch_blocks = (3, 7, 11)
    # Groups encoded per mini-PointNet pass: bounds the (groups x 128, 512) activations (~64 MiB).
    encoder_chunk = 256

    def __init__(self, weights: str | Path | None = None, random_init: bool = False,
                 n_groups: int = 1024, group_size: int = 128, grid: int | None = None):
        super().__init__()
        # ``grid`` is part of the common extractor interface (Detector.build passes it to every
        # extractor); the output is always on the grid of the input xyz, so it is not needed here.
        # The network does not depend on these two (MAFR uses 1024 x 128); smaller values only
        # serve quick tests and experiments.
        self.n_groups = int(n_groups)
        self.group_size = int(group_size)
        if weights is None and not random_init:
            raise CheckpointError(f"pointmae needs a weight file and none is configured: "
                                  f"{POINTMAE_DOWNLOAD_HINT} (or pass random_init=True for untrained "
                                  f"weights, for benchmarks only)")
        if weights is not None and random_init:
            raise CheckpointError("pointmae: both a weight file and random_init=True were given; choose one")
        if weights is not None:
            with torch.device("meta"):  # every tensor comes from the file: no random initialisation
                self._build_modules()
            self.load_release_file(weights)
            self._weights_source = str(Path(weights).expanduser())
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # reproducible untrained weights, caller's RNG untouched
                self._build_modules()
            self._weights_source = "random-init (seed 0)"
        self.freeze()

    def _build_modules(self) -> None:
        self.encoder = MiniPointNet(self.width)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, self.width))
        self.blocks = TransformerEncoder(self.width, depth=12, heads=6)
        self.norm = nn.LayerNorm(self.width)

    def load_release_file(self, path: str | Path) -> None:
        """Strictly load the encoder from a Point-MAE release file ({'base_model': state dict})."""
        content = read_weight_file(path, POINTMAE_DOWNLOAD_HINT)
        if not isinstance(content, dict) or not isinstance(content.get("base_model"), dict):
            found = sorted(content)[:8] if isinstance(content, dict) else type(content).__name__
            raise CheckpointError(f"weight file {path} is not a Point-MAE release file: no 'base_model' "
                                  f"state dict in it (found {found}); {POINTMAE_DOWNLOAD_HINT}")
        encoder_state, ignored = release_encoder_state(content["base_model"])
        check_state_dict(self.state_dict(), encoder_state, path, "Point-MAE pre-training",
                         POINTMAE_DOWNLOAD_HINT, ignored=ignored)
        load_checked_state(self, encoder_state)

    def _encode_groups(self, neighbourhoods: torch.Tensor) -> torch.Tensor:
        b, g, k, _ = neighbourhoods.shape
        flat = neighbourhoods.reshape(b * g, k, 3)
        tokens = torch.cat([self.encoder(flat[i:i + self.encoder_chunk])
                            for i in range(0, b * g, self.encoder_chunk)])
        return tokens.view(b, g, self.width)

    def group_features(self, points: torch.Tensor, points_valid: torch.Tensor, run_stage=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded clouds (B, N, 3) + validity (B, N) -> centres (B, 1024, 3), features (B, 1024, 1152).

        ``run_stage(name, fn)``, when given, runs the sampling ("FPS") and grouping ("KNN") steps
        so that a benchmark can time them inside this one implementation."""
        run = run_stage or (lambda _name, fn: fn())
        centre_index = run("FPS", lambda: farthest_point_sample(points, self.n_groups, points_valid))
        centres = torch.gather(points, 1, centre_index.unsqueeze(2).expand(-1, -1, 3))
        _, neighbour_index = run("KNN", lambda: nearest_neighbours(centres, points, self.group_size,
                                                                   points_valid))
        b, g, k = neighbour_index.shape
        neighbours = torch.gather(points, 1, neighbour_index.view(b, g * k, 1).expand(-1, -1, 3))
        neighbourhoods = neighbours.view(b, g, k, 3) - centres.unsqueeze(2)
        tokens = self._encode_groups(neighbourhoods)
        outputs = self.blocks(tokens, self.pos_embed(centres), self.fetch_blocks)
        return centres, torch.cat([self.norm(x) for x in outputs], dim=2)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.norm.weight.dtype
        xyz = x.to(dtype)
        if not torch.isfinite(xyz).all():
            raise InputError("pointmae: the xyz grid holds NaN or inf; invalid pixels must be exactly "
                             "(0, 0, 0) (the shared preprocessing does this)")
        valid = valid_mask_from_xyz(xyz).flatten(1)  # (B, S*S)
        counts = valid.sum(dim=1)
        too_few = (counts < self.n_groups).nonzero().flatten().tolist()
        if too_few:
            details = ", ".join(f"item {i}: {int(counts[i])}" for i in too_few)
            raise InputError(f"only {int(counts[too_few[0]])} valid 3D points ({details}), Point-MAE "
                             f"needs at least {self.n_groups}: check the depth/ROI")
        # Valid points first, in raster order (a stable sort), padded to the largest count.
        order = torch.sort(valid.logical_not().to(torch.uint8), dim=1, stable=True).indices
        n_max = int(counts.max())
        order = order[:, :n_max]
        points = torch.gather(xyz.flatten(2).transpose(1, 2), 1, order.unsqueeze(2).expand(-1, -1, 3))
        points_valid = torch.arange(n_max, device=xyz.device).unsqueeze(0) < counts.unsqueeze(1)
        centres, feats = self.group_features(points, points_valid)
        return spread_group_features(xyz, centres, feats, k=3, smooth=True).float()
