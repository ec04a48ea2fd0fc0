"""Optional nearest-neighbour memory bank scorer (``mafr train --memory-bank N``; off by default).

Why: on real MVTec 3D-AD cable_gland parts the lite restoration heads generalise worse to rare
normal structure (a part in a new pose) than a plain bank of their own standardised input
descriptors does: on pseudo-defects pasted into held-out good training/validation images the
bank ranks images better than the heads (see docs/real_parts.md). So, as an opt-in, the per-pixel
restoration errors r2d / r3d can be replaced by the distance of each valid pixel's standardised
descriptor to its nearest neighbour in a bank of training pixels, one bank per modality. The
distance maps then go through the unchanged fusion / erosion / smoothing / image score /
threshold path.

The banks are reduced to ``size`` entries per modality with a greedy k-center coreset: start
from one seeded random pixel and repeatedly add the pixel farthest from everything chosen so far,
so rare normal structure stays represented (a random subsample would drop it). The distances of
the greedy selection are computed in a seeded Gaussian random projection of the descriptors
(distances are roughly preserved, and the selection gets cheaper), and the selection runs on a
seeded random pool of at most ``pool`` training pixels. Scoring always uses the full descriptors.
Everything is seeded and deterministic on a given machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError

#: Prefix of the bank tensors in the checkpoint's safetensors state dict.
STATE_PREFIX = "memory_bank."
_KEYS = ("bank_2d", "bank_3d")

DEFAULT_PROJECTION = 32
DEFAULT_POOL = 200_000


def _projection(dim: int, out_dim: int, seed: int, device=None) -> torch.Tensor | None:
    """(dim, out_dim) Gaussian random projection, or None when it would not reduce ``dim``."""
    if out_dim <= 0 or out_dim >= dim:
        return None
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randn(dim, out_dim, generator=g) / out_dim ** 0.5).to(device)


@torch.no_grad()
def kcenter_coreset(points: torch.Tensor, size: int, seed: int = 0,
                    projection: int = DEFAULT_PROJECTION) -> torch.Tensor:
    """Indices (``size``,) of a greedy k-center selection of the rows of ``points`` (N, D).

    Each step adds the row whose (projected) Euclidean distance to the rows chosen so far is
    largest; the first row is drawn with ``seed``. All rows when ``size`` >= N."""
    n = points.shape[0]
    if size >= n:
        return torch.arange(n)
    if size <= 0:
        return torch.zeros(0, dtype=torch.long)
    x = points.float()
    proj = _projection(x.shape[1], projection, seed + 1, x.device)
    if proj is not None:
        x = x @ proj
    x = x.contiguous()
    sq = x.square().sum(1)
    g = torch.Generator().manual_seed(int(seed))
    first = int(torch.randint(n, (1,), generator=g))
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = first
    # squared distance of every row to its nearest chosen row
    mind = (sq - 2.0 * (x @ x[first]) + sq[first]).clamp_min_(0.0)
    for k in range(1, size):
        nxt = int(torch.argmax(mind))
        chosen[k] = nxt
        d = (sq - 2.0 * (x @ x[nxt]) + sq[nxt]).clamp_min_(0.0)
        torch.minimum(mind, d, out=mind)
    return chosen


@torch.no_grad()
def nearest_distance(queries: torch.Tensor, bank: torch.Tensor,
                     max_elements: int = 1 << 20) -> torch.Tensor:
    """Euclidean distance (Q,) of each query row (Q, D) to its nearest row of ``bank`` (N, D),
    in chunks of queries so that no distance block exceeds ``max_elements`` floats (the 4 MB
    default keeps a block in cache: 1.7x faster than 64 MB blocks on one CPU thread, measured)."""
    q = queries.float()
    b = bank.to(q.device, torch.float32)
    if q.shape[0] == 0:
        return q.new_zeros(0)
    bsq = b.square().sum(1)
    step = max(1, max_elements // max(1, b.shape[0]))
    out = []
    for start in range(0, q.shape[0], step):
        chunk = q[start:start + step]
        # |q - b|^2 = |q|^2 - 2 q.b + |b|^2; |q|^2 is constant per row: added after the min
        d = torch.addmm(bsq.unsqueeze(0), chunk, b.t(), beta=1.0, alpha=-2.0)
        out.append((d.amin(1) + chunk.square().sum(1)).clamp_min_(0.0).sqrt_())
    return torch.cat(out)


def valid_pixels(f: torch.Tensor, mask: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """(P, C) float32 descriptors of the valid pixels of (N, C, H, W) maps, image chunk by chunk."""
    rows = [f[s:s + chunk].permute(0, 2, 3, 1)[mask[s:s + chunk].to(f.device)].float()
            for s in range(0, f.shape[0], chunk)]
    return torch.cat(rows) if rows else f.new_zeros(0, f.shape[1])


@dataclass
class MemoryBank:
    """Per-modality banks (N2, C2) and (N3, C3) of standardised training descriptors."""

    bank_2d: torch.Tensor
    bank_3d: torch.Tensor
    options: dict

    @classmethod
    @torch.no_grad()
    def build(cls, f2d: torch.Tensor, f3d: torch.Tensor, mask: torch.Tensor, size: int,
              seed: int = 0, projection: int = DEFAULT_PROJECTION,
              pool: int = DEFAULT_POOL) -> "MemoryBank":
        """Banks from the valid pixels of (N, C, H, W) features (already standardised when the
        model standardises), each reduced to at most ``size`` rows by ``kcenter_coreset``."""
        if not bool(mask.any()):
            raise ValueError("memory bank: no valid pixel in the training features")
        return cls.from_pixels(valid_pixels(f2d, mask), valid_pixels(f3d, mask), size,
                               seed=seed, projection=projection, pool=pool)

    @classmethod
    @torch.no_grad()
    def from_pixels(cls, x2d: torch.Tensor, x3d: torch.Tensor, size: int, seed: int = 0,
                    projection: int = DEFAULT_PROJECTION, pool: int = DEFAULT_POOL,
                    **extra_options) -> "MemoryBank":
        """Banks from (P, C2) and (P, C3) descriptors of the same P training pixels (row i of both
        is one pixel), e.g. the valid pixels of several augmented copies of the training images.
        ``extra_options`` are recorded in the options (the checkpoint metadata)."""
        if size <= 0:
            raise ValueError(f"memory bank size must be > 0, got {size}")
        n_pixels = int(x2d.shape[0])
        if n_pixels == 0:
            raise ValueError("memory bank: no valid pixel in the training features")
        if int(x3d.shape[0]) != n_pixels:
            raise ValueError(f"memory bank: {n_pixels} 2D but {int(x3d.shape[0])} 3D pixel rows")
        banks = []
        g = torch.Generator().manual_seed(int(seed))
        keep = (torch.randperm(n_pixels, generator=g)[:pool].sort().values
                if n_pixels > pool else None)
        for offset, x in enumerate((x2d, x3d)):
            x = x.float()
            if keep is not None:
                x = x[keep]
            idx = kcenter_coreset(x, size, seed=seed + 17 * offset, projection=projection)
            banks.append(x[idx].contiguous().cpu())
        options = {"size": int(size), "method": "greedy_kcenter", "projection": int(projection),
                   "pool": int(pool), "seed": int(seed), "source_pixels": n_pixels,
                   "n_2d": int(banks[0].shape[0]), "n_3d": int(banks[1].shape[0]),
                   **extra_options}
        return cls(banks[0], banks[1], options)

    def to(self, device) -> "MemoryBank":
        return MemoryBank(self.bank_2d.to(device), self.bank_3d.to(device), dict(self.options))

    @torch.no_grad()
    def distance_maps(self, f2d: torch.Tensor, f3d: torch.Tensor, mask: torch.Tensor):
        """(B, H, W) nearest-bank-entry distances of the valid pixels of (B, C, H, W) features;
        0 outside ``mask``. They take the place of the restoration errors r2d / r3d."""
        out = []
        for f, bank in ((f2d, self.bank_2d), (f3d, self.bank_3d)):
            if f.shape[1] != bank.shape[1]:
                raise CheckpointError(f"memory bank has {bank.shape[1]}-d entries but the features "
                                      f"have {f.shape[1]} channels; the checkpoint belongs to "
                                      "other extractors")
            r = torch.zeros(mask.shape, dtype=torch.float32, device=f.device)
            r[mask] = nearest_distance(f.permute(0, 2, 3, 1)[mask], bank)
            out.append(r)
        return out[0], out[1]

    # -- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {STATE_PREFIX + "bank_2d": self.bank_2d.float().cpu().contiguous(),
                STATE_PREFIX + "bank_3d": self.bank_3d.float().cpu().contiguous()}

    @classmethod
    def from_checkpoint(cls, state: dict, options: dict | None, dims: tuple[int, int],
                        path) -> "MemoryBank | None":
        """The bank stored in a checkpoint's ``state`` (None when ``options`` is None: no bank),
        checked against its metadata; every problem is a CheckpointError naming ``path``."""
        present = sorted(k for k in state if k.startswith(STATE_PREFIX))
        if options is None:
            if present:
                raise CheckpointError(f"checkpoint {path}: memory bank tensors {present} but no "
                                      "memory_bank metadata; the file is inconsistent - retrain it")
            return None
        banks = []
        for key, dim, n_key in zip(_KEYS, dims, ("n_2d", "n_3d")):
            t = state.get(STATE_PREFIX + key)
            try:
                expected = (int(options[n_key]), int(dim))
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"checkpoint {path}: memory_bank metadata lacks {n_key!r}; "
                                      "retrain it") from None
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"checkpoint {path}: the memory bank tensor "
                                      f"{STATE_PREFIX + key} is missing; retrain it")
            if tuple(t.shape) != expected or not t.is_floating_point() or expected[0] <= 0:
                raise CheckpointError(
                    f"checkpoint {path}: memory bank tensor {STATE_PREFIX + key} is "
                    f"{t.dtype} {tuple(t.shape)}, expected float {expected}; the file is corrupt "
                    "or does not belong to these extractors - retrain it")
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"checkpoint {path}: memory bank tensor {STATE_PREFIX + key} "
                                      "holds non-finite values; the file is corrupt - retrain it")
            banks.append(t.float().contiguous())
        return cls(banks[0], banks[1], dict(options))


def split_state(state: dict) -> tuple[dict, dict]:
    """(heads state, memory bank state) of a checkpoint's state dict."""
    heads = {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}
    bank = {k: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
    return heads, bank
