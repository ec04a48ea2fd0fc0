"""Point grouping and alignment of feature maps to the model's pixel grid.

Every extractor must hand back features on the same S x S grid as the RGB input, pixel for pixel,
because the fusion heads compare the two modalities location by location. This module holds the
geometry shared by all extractors to get there:

- ``upsample_patch_features``: ViT patch tokens (h x w) -> pixel grid (bilinear).
- ``farthest_point_sample`` / ``nearest_neighbours``: the grouping of a point cloud into local
  neighbourhoods (Point-MAE style), and the nearest-centre search used for spreading.
- ``spread_group_features``: per-group features -> every valid pixel by inverse squared-distance
  interpolation of its 3 nearest group centres, then ``mean3x3``.
- ``scatter_point_features``: for extractors that already have one feature per valid point.
- ``mean3x3`` and ``feature_valid_mask``.

Distances are always computed exactly (``torch.cdist`` without the matrix-product expansion): at a
working distance of ~0.65 m the expansion |a|^2 + |b|^2 - 2ab loses ~1e-8 m^2 in float32, which is
a sizeable fraction of the squared spacing of neighbouring points (~2.5e-7 m^2) and reorders
near neighbours. Searches are chunked over query rows so that memory stays at a fixed budget of
distance entries instead of growing as N x G (or N x G x C).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F

# Distance-matrix entries held at once by the chunked searches (2**23 float32 = 32 MiB).
_DISTANCE_BUDGET = 1 << 23
# Added to squared distances before inversion so that a pixel on a centre gets a finite weight.
_INVERSE_DISTANCE_EPS = 1e-8


def upsample_patch_features(feats: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) patch features -> (B, C, S, S), bilinear with align_corners=False.

    align_corners=False treats each patch token as the value at the centre of its 8x8 pixel cell,
    which is where a ViT patch actually looks, so token and pixel grids stay registered.
    """
    if isinstance(size, int):
        size = (size, size)
    if tuple(feats.shape[-2:]) == tuple(size):
        return feats
    return F.interpolate(feats, size=size, mode="bilinear", align_corners=False)


def mean3x3(grid: torch.Tensor) -> torch.Tensor:
    """Same-size 3x3 mean of a (B, C, H, W) grid (stride 1, zero padding 1, count_include_pad=False).

    Why this and not the reference's "3x3 average pooling without padding (S-2) then adaptive pooling
    back to S": that pair shifts features by a position-dependent 0..1 px relative to the RGB grid.
    A padded 3x3 mean keeps every output centred on its own pixel, so a single lit pixel stays where
    it was.

    count_include_pad=False: at the image border the mean is taken over the pixels that exist. Pixels
    without a point inside the image still count as zeros (that dilution of object edges is part of
    the method), but the image border is not an object edge: with ROI crops the part often touches
    the border, and counting the out-of-image padding would damp its features there by up to 5/9.

    Computed as two separable 3-tap box sums with slice additions and one division by the per-pixel
    window size: equal to ``F.avg_pool2d(grid, 3, 1, 1, count_include_pad=False)`` up to float
    rounding, and about twice as fast on CPU for the (1, 1152, 224, 224) Point-MAE grids.
    """
    h, w = grid.shape[-2:]
    rows = grid.clone()
    if w > 1:
        rows[..., 1:] += grid[..., :-1]
        rows[..., :-1] += grid[..., 1:]
    out = rows.clone()
    if h > 1:
        out[..., 1:, :] += rows[..., :-1, :]
        out[..., :-1, :] += rows[..., 1:, :]
    del rows
    count_h = grid.new_full((h,), 3.0 if h > 1 else 1.0)
    count_w = grid.new_full((w,), 3.0 if w > 1 else 1.0)
    if h > 1:
        count_h[[0, -1]] = 2.0
    if w > 1:
        count_w[[0, -1]] = 2.0
    return out.div_(count_h[:, None] * count_w[None, :])


def feature_valid_mask(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) -> (B, S, S) bool: pixels whose feature vector is non-empty.

    Tests "any channel != 0" rather than "sum == 0": features of mixed sign can sum to zero.
    """
    return (grid != 0).any(dim=1)


def _rows_per_chunk(n_columns: int, batch: int = 1, budget: int = _DISTANCE_BUDGET) -> int:
    return max(1, budget // max(1, n_columns * batch))


def nearest_neighbours(query: torch.Tensor, points: torch.Tensor, k: int,
                       points_valid: torch.Tensor | None = None,
                       chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest ``points`` of every ``query`` point by exact squared Euclidean distance.

    query (B, M, 3), points (B, N, 3), points_valid (B, N) bool (padding entries are never returned).
    Returns (squared distances (B, M, k) ascending, indices into N (B, M, k) long).

    Chunked over the M queries: memory is ``chunk`` x N distances, never M x N at once, and top-k
    selection replaces a full sort of each row.
    """
    b, m, _ = query.shape
    n = points.shape[1]
    if points_valid is not None:
        n_valid = int(points_valid.sum(dim=1).min())
    else:
        n_valid = n
    if k > n_valid:
        raise ValueError(f"nearest_neighbours: k={k} but only {n_valid} candidate points")
    chunk = chunk or _rows_per_chunk(n, b)
    dist2 = query.new_empty((b, m, k))
    index = torch.empty((b, m, k), dtype=torch.long, device=query.device)
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        d = torch.cdist(query[:, start:stop], points, compute_mode="donot_use_mm_for_euclid_dist")
        d.square_()
        if points_valid is not None:
            d.masked_fill_(~points_valid[:, None, :], float("inf"))
        values, indices = torch.topk(d, k, dim=2, largest=False, sorted=True)
        dist2[:, start:stop] = values
        index[:, start:stop] = indices
    return dist2, index


def farthest_point_sample(points: torch.Tensor, n_samples: int,
                          points_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (B, n_samples) of an iterative farthest-point sampling of points (B, N, 3).

    Starts at the first valid point (index 0 for compact inputs, as pointnet2_ops does) and then
    repeatedly takes the point farthest (squared distance) from all points chosen so far; ties go to
    the lowest index, so the result is deterministic on every device. The n_samples iterations are
    inherently sequential; each one is a vectorised O(B N) update working in preallocated buffers.
    Padding entries (points_valid False) are never chosen.
    """
    b, n, _ = points.shape
    if points_valid is None:
        start = torch.zeros(b, dtype=torch.long, device=points.device)
        n_valid = n
    else:
        start = points_valid.to(torch.uint8).argmax(dim=1)
        n_valid = int(points_valid.sum(dim=1).min())
    if n_samples > n_valid:
        raise ValueError(f"farthest_point_sample: {n_samples} samples from {n_valid} points")
    with _single_threaded_on_cpu(points):
        return _farthest_point_loop(points, n_samples, start, points_valid)


@contextmanager
def _single_threaded_on_cpu(tensor: torch.Tensor):
    """Run a loop of many tiny CPU kernels on one intra-op thread, then restore the setting.

    Each farthest-point iteration is ~10 kernels on ~50 k values (tens of microseconds each). ATen
    splits those over its threads, and the per-kernel synchronisation dominates: measured on the
    project's 2-core machine under load, 1024 samples of a 33 k-point cloud took 0.14-0.24 s with one
    thread and 3.5-18 s with two. The thread count is process-wide, so concurrent torch work in
    other threads runs single-threaded for these ~0.2 s (slower, never wrong).
    """
    threads = torch.get_num_threads()
    if tensor.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _farthest_point_loop(points: torch.Tensor, n_samples: int, start: torch.Tensor,
                         points_valid: torch.Tensor | None) -> torch.Tensor:
    b, n, _ = points.shape
    rows = torch.arange(b, device=points.device)
    chosen = torch.empty((b, n_samples), dtype=torch.long, device=points.device)
    # Padding starts at -1 so that min() keeps it below every real distance and argmax never picks it.
    min_dist = torch.full((b, n), float("inf"), dtype=points.dtype, device=points.device)
    if points_valid is not None:
        min_dist.masked_fill_(~points_valid, -1.0)
    # Planar (B, 3, N) coordinates: three fused (x - c)^2 updates over contiguous rows are several
    # times faster than squaring (B, N, 3) and reducing over its short last axis.
    planar = points.transpose(1, 2).contiguous()
    dist = torch.empty((b, n), dtype=points.dtype, device=points.device)
    delta = torch.empty_like(dist)
    current = start
    for i in range(n_samples):
        chosen[:, i] = current
        centre = planar[rows, :, current].unsqueeze(2)  # (B, 3, 1)
        torch.sub(planar[:, 0], centre[:, 0], out=dist)
        dist.square_()
        for axis in (1, 2):
            torch.sub(planar[:, axis], centre[:, axis], out=delta)
            dist.addcmul_(delta, delta)
        torch.minimum(min_dist, dist, out=min_dist)
        current = min_dist.argmax(dim=1)
    return chosen


def spread_group_features(xyz: torch.Tensor, centres: torch.Tensor, group_feats: torch.Tensor,
                          k: int = 3, chunk: int | None = None, smooth: bool = True) -> torch.Tensor:
    """Interpolate per-group features onto every valid pixel of an organised cloud.

    xyz (B, 3, S, S) with invalid pixels exactly 0, centres (B, G, 3), group_feats (B, G, C).
    Each valid pixel gets sum_i w_i f_i over its k nearest centres, with inverse squared-distance
    weights w_i = (1 / (d_i^2 + 1e-8)) / sum_j (1 / (d_j^2 + 1e-8)) (the MAFR/M3DM rule). Invalid
    pixels stay zero. With ``smooth`` (default) the grid then goes through ``mean3x3``.

    Memory: per chunk of pixels, chunk x G distances and chunk x C features for each of the k
    neighbours (accumulated in place), never N x G x C. The batch is processed item by item because
    items have different numbers of valid pixels.
    """
    b, _, h, w = xyz.shape
    g, c = group_feats.shape[1], group_feats.shape[2]
    if k > g:
        raise ValueError(f"spread_group_features: k={k} but only {g} centres")
    xyz = xyz.to(centres.dtype)
    out = group_feats.new_zeros((b, c, h * w))
    valid = (xyz != 0).any(dim=1).flatten(1)  # (B, S*S)
    points = xyz.flatten(2).transpose(1, 2)  # (B, S*S, 3), a view
    chunk = chunk or _rows_per_chunk(g)
    for item in range(b):
        pixel_index = valid[item].nonzero().squeeze(1)
        feats = group_feats[item]
        for start in range(0, pixel_index.numel(), chunk):
            pix = pixel_index[start:start + chunk]
            dist2, nearest = nearest_neighbours(points[item, pix][None], centres[item][None], k,
                                                chunk=pix.numel())
            weight = (dist2[0] + _INVERSE_DISTANCE_EPS).reciprocal_()
            weight /= weight.sum(dim=1, keepdim=True)
            acc = feats.index_select(0, nearest[0, :, 0]).mul_(weight[:, :1])
            for j in range(1, k):
                acc.addcmul_(feats.index_select(0, nearest[0, :, j]), weight[:, j:j + 1])
            out[item][:, pix] = acc.T
    grid = out.view(b, c, h, w)
    return mean3x3(grid) if smooth else grid


def scatter_point_features(valid_mask: torch.Tensor,
                           point_feats: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Put per-point features at their pixels: (B, S, S) mask + features -> (B, C, S, S).

    point_feats: a list with one (N_b, C) tensor per batch item, or a padded (B, N_max, C) tensor.
    Row j of item b belongs to the j-th valid pixel of ``valid_mask[b]`` in raster (row-major) order,
    which is the order ``xyz[:, mask]``-style gathering produces. Pixels outside the mask are zero.
    No smoothing is applied; call ``mean3x3`` when the method asks for it.
    """
    b, h, w = valid_mask.shape
    if len(point_feats) != b:
        raise ValueError(f"scatter_point_features: {len(point_feats)} feature sets for {b} masks")
    c = point_feats[0].shape[-1]
    out = point_feats[0].new_zeros((b, c, h * w))
    flat_mask = valid_mask.flatten(1)
    for item in range(b):
        pix = flat_mask[item].nonzero().squeeze(1)
        feats = point_feats[item]
        if feats.shape[0] < pix.numel() or (not isinstance(point_feats, torch.Tensor)
                                            and feats.shape[0] != pix.numel()):
            raise ValueError(f"scatter_point_features: item {item} has {pix.numel()} valid pixels "
                             f"but {feats.shape[0]} feature rows")
        out[item][:, pix] = feats[:pix.numel()].T
    return out.view(b, c, h, w)
