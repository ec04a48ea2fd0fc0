"""Anomaly-detection metrics: I-AUROC, P-AUROC and AU-PRO (reference §9), computed exactly.

Why our own implementations rather than sklearn or the published scripts:

* AUROC is the Mann-Whitney statistic. Counting, for each positive, the negatives strictly below it
  plus half of those tied with it needs two sorts and integer sums only — no ``int64`` permutation
  of all pixels and no float accumulation, so 100 maps of 400x400 stay cheap and the value is exact.
* AU-PRO in the reference (CFM/MAFR code) samples 99 thresholds and derives the FPR from a rank
  (``1 - (rank+1)/#OK``), which is wrong when scores tie (a constant map gets AU-PRO 0 instead of the
  diagonal's ``limit/2``) and coarse below FPR 1 %. Here the curve is exact: every distinct score is
  an operating point, found with sorts and cumulative counts, never a loop over thresholds. The
  reference's variant is still available (``num_thresholds=99``) to compare with published numbers.

Conventions shared by every function:

* ``maps`` and ``gts`` are a stacked ``(N, H, W)`` array, a single ``(H, W)`` array, or sequences of
  ``(H, W)`` arrays whose sizes may differ between images (each map must match its own mask).
* A ground-truth pixel is defective when it is non-zero (MVTec masks store class ids 252-255).
* A pixel (or image) is called anomalous at threshold ``t`` when its score is ``>= t``; sweeping ``t``
  over the distinct scores visits every achievable operating point exactly once.
* Malformed input raises :class:`~mafr_ros.errors.InputError`, a ``ValueError``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError

#: Integration limits reported by the reference (§9); 0.3 ("AUPRO@30 %") is the standard one.
DEFAULT_LIMITS = (0.3, 0.1, 0.05, 0.01)

# 8-connectivity for ground-truth regions, as in the MVTec evaluation and the reference code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------------
def _float_scores(values: np.ndarray, what: str) -> np.ndarray:
    """Scores as a float array (float32 is kept: it halves the memory of the sorts)."""
    values = np.asarray(values)
    if values.dtype != bool and not np.issubdtype(values.dtype, np.number):
        raise InputError(f"{what}: scores must be numeric, got dtype {values.dtype}")
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    return values


def _check_finite(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise InputError(
            f"{what}: {bad} scores are NaN or infinite; replace invalid pixels by a finite value "
            "(e.g. 0) before evaluating"
        )


def _binary_labels(labels, n: int, what: str) -> np.ndarray:
    """Image labels as bool; only 0/1 or bool are accepted (a 2 is probably a defect-type index)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size != n:
        raise InputError(f"{what}: expected {n} labels in a 1-D array, got shape {labels.shape}")
    if labels.dtype == bool:
        return labels
    if not np.issubdtype(labels.dtype, np.number) or not np.isin(labels, (0, 1)).all():
        raise InputError(
            f"{what}: labels must be 0 (good) or 1 (defective); got values "
            f"{np.unique(labels)[:10].tolist()}; binarise them first (e.g. labels != 0)"
        )
    return labels.astype(bool)


def _map_list(arrays, what: str) -> list[np.ndarray]:
    """One 2-D array per image, without copying stacked input."""
    if isinstance(arrays, np.ndarray):
        if arrays.ndim == 2:
            return [arrays]
        if arrays.ndim == 3:
            return list(arrays)
        raise InputError(f"{what}: expected (H, W) or (N, H, W), got shape {arrays.shape}")
    out = [np.asarray(a) for a in arrays]
    for i, a in enumerate(out):
        if a.ndim != 2:
            raise InputError(f"{what}[{i}]: expected a 2-D (H, W) array, got shape {a.shape}")
    return out


def _pixels(maps, gts) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Flatten maps and masks to two 1-D arrays (scores, defective) and keep the per-image views."""
    map_list = _map_list(maps, "maps")
    gt_list = _map_list(gts, "gts")
    if len(map_list) != len(gt_list):
        raise InputError(f"got {len(map_list)} anomaly maps but {len(gt_list)} ground-truth masks")
    if not map_list:
        raise InputError("no anomaly maps given; evaluate at least one test image")
    for i, (m, g) in enumerate(zip(map_list, gt_list)):
        if m.shape != g.shape:
            raise InputError(
                f"image {i}: anomaly map {m.shape} and ground truth {g.shape} differ in size; "
                "resize the mask (nearest) or the map (bilinear) to one resolution first"
            )
    if isinstance(maps, np.ndarray) and maps.ndim in (2, 3):
        scores = maps.reshape(-1)  # a view when contiguous: no copy of a stacked batch
    else:
        scores = np.concatenate([m.reshape(-1) for m in map_list])
    scores = _float_scores(scores, "maps")
    _check_finite(scores, "maps")
    if isinstance(gts, np.ndarray) and gts.ndim in (2, 3):
        defective = gts.reshape(-1) != 0
    else:
        defective = np.concatenate([g.reshape(-1) != 0 for g in gt_list])
    return scores, defective, map_list, gt_list


# --------------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------------
def _mann_whitney_auc(positive: np.ndarray, negative: np.ndarray, what: str) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), from two sorts and integer counts (exact)."""
    if positive.size == 0 or negative.size == 0:
        missing = "defective" if positive.size == 0 else "good"
        raise InputError(
            f"{what}: AUROC needs both classes but there are no {missing} samples "
            f"({positive.size} defective, {negative.size} good); evaluate on a test set with both"
        )
    negative = np.sort(negative)
    # Sorted keys let searchsorted reuse its previous position: cache-friendly on millions of pixels.
    positive = np.sort(positive)
    below = np.searchsorted(negative, positive, side="left")
    below_or_tied = np.searchsorted(negative, positive, side="right")
    # below + below_or_tied = 2 * (#neg < p) + #neg == p: twice the Mann-Whitney U, in integers.
    twice_u = int(below.sum(dtype=np.int64)) + int(below_or_tied.sum(dtype=np.int64))
    return twice_u / (2.0 * positive.size * negative.size)


def image_auroc(scores, labels) -> float:
    """Image-level AUROC (I-AUROC) of ``scores`` against 0/1 ``labels`` (1 = defective)."""
    scores = _float_scores(scores, "image_auroc").reshape(-1)
    _check_finite(scores, "image_auroc")
    labels = _binary_labels(labels, scores.size, "image_auroc")
    return _mann_whitney_auc(scores[labels], scores[~labels], "image_auroc")


def pixel_auroc(maps, gts) -> float:
    """Pixel-level AUROC (P-AUROC) over every pixel of every image, background included (§9)."""
    scores, defective, _, _ = _pixels(maps, gts)
    return _mann_whitney_auc(scores[defective], scores[~defective], "pixel_auroc")


def roc_curve_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC operating points ``(fpr, tpr, thresholds)`` for plotting, one per distinct score.

    Thresholds decrease; the first point is (0, 0) at threshold ``+inf`` (as sklearn's
    ``roc_curve(..., drop_intermediate=False)``).
    """
    scores = _float_scores(scores, "roc_curve_points").reshape(-1)
    _check_finite(scores, "roc_curve_points")
    labels = _binary_labels(labels, scores.size, "roc_curve_points")
    n_pos = int(np.count_nonzero(labels))
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InputError(
            f"roc_curve_points: needs both classes, got {n_pos} defective and {n_neg} good samples"
        )
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    # Last index of each run of equal scores: every tied sample switches at the same threshold.
    last = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), scores.size - 1)
    true_pos = np.cumsum(labels[order], dtype=np.int64)[last]
    false_pos = last + 1 - true_pos
    fpr = np.concatenate(([0.0], false_pos / n_neg))
    tpr = np.concatenate(([0.0], true_pos / n_pos))
    thresholds = np.concatenate(([np.inf], sorted_scores[last].astype(np.float64)))
    return fpr, tpr, thresholds


# --------------------------------------------------------------------------------------------------
# PRO curve and AU-PRO
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PROCurve:
    """Per-region-overlap curve: ``pro`` against ``fpr`` (both non-decreasing) at ``thresholds``.

    ``thresholds`` decrease along the curve (``+inf`` for the exact curve's (0, 0) start, ``-inf``
    for the reference's (1, 1) anchor). ``exact`` is False for the reference's sampled variant.
    """

    fpr: np.ndarray
    pro: np.ndarray
    thresholds: np.ndarray
    n_regions: int
    n_ok_pixels: int
    exact: bool

    def area(self, fpr_limit: float = 0.3) -> float:
        """Normalised area under the curve up to ``fpr_limit`` (1.0 is perfect)."""
        return normalised_area(self.fpr, self.pro, fpr_limit)


def normalised_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area of ``pro(fpr)`` on ``[0, fpr_limit]``, divided by ``fpr_limit``.

    The curve value at the limit is linearly interpolated between its neighbours (§9), so the
    result does not depend on where the sampled points happen to fall. ``fpr`` must be
    non-decreasing and start at 0.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise InputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr = np.asarray(fpr, dtype=np.float64)
    pro = np.asarray(pro, dtype=np.float64)
    if fpr.size == 0 or fpr[0] > 0.0:
        raise InputError("the PRO curve must start at FPR 0; build it with pro_curve()")
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:inside], pro[:inside]
    area = 0.5 * float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])))
    if inside < fpr.size:  # partial segment from the last inside point to the limit
        x0, y0, x1, y1 = fpr[inside - 1], pro[inside - 1], fpr[inside], pro[inside]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)  # x1 > limit >= x0
        area += 0.5 * (y0 + y_limit) * (fpr_limit - x0)
    return float(area / fpr_limit)


def _region_ids(gt_list: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Region id (1..K) of every defective pixel, in the flattened order of ``_pixels``, and K.

    Only defective pixels get an id, so no full-size label image is kept. Regions are labelled per
    image: a defect touching one image's border never merges with another image's defect.
    """
    ids = []
    offset = 0
    for gt in gt_list:
        mask = gt != 0
        if not mask.any():  # good images only contribute OK pixels
            continue
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        ids.append(labelled[mask].astype(np.int64) + offset)
        offset += count
    if not ids:
        raise InputError(
            "AU-PRO needs at least one defect region in the ground truth; all masks are empty "
            "(evaluate on a test set that contains defective images)"
        )
    return np.concatenate(ids), offset


def pro_curve(maps, gts, num_thresholds: int | None = None, all_points: bool = False) -> PROCurve:
    """PRO curve over all images of one class (§9).

    PRO at a threshold is the mean, over all ground-truth regions (8-connected, per image), of the
    fraction of the region's pixels flagged anomalous; FPR is the fraction of OK pixels (every pixel
    outside a region, good images included) flagged anomalous.

    ``num_thresholds=None`` (default) gives the exact curve, i.e. the piecewise-linear curve through
    the operating points of every distinct score, from (0, 0) to (1, 1):

    * ``all_points=False``: only its corners. Between two consecutive distinct *region* scores only
      OK pixels change state, so PRO is constant there and the curve is a horizontal segment; two
      points per distinct region score describe it exactly. Cost: one sort of the OK scores and
      searches for the (few) region scores, no per-pixel arrays beyond that.
    * ``all_points=True``: one point per distinct score (millions for real-valued maps), e.g. to pick
      the threshold of a given operating point. One sort of all scores plus cumulative counts.

    ``num_thresholds=n`` reproduces the reference's approximation: ``n`` thresholds at equally spaced
    ranks of the sorted OK scores, FPR taken as ``1 - (rank + 1) / #OK``, a pixel counted when its
    score is strictly above the threshold, and an extra (1, 1) anchor.
    """
    if num_thresholds is not None and int(num_thresholds) < 1:
        raise InputError(f"num_thresholds must be >= 1 (or None for the exact curve), got {num_thresholds}")
    scores, defective, _, gt_list = _pixels(maps, gts)
    region_ids, n_regions = _region_ids(gt_list)
    n_ok = scores.size - region_ids.size
    if n_ok == 0:
        raise InputError(
            "AU-PRO needs defect-free (OK) pixels to measure false positives; every pixel is "
            "marked defective - check that the masks are binarised correctly"
        )
    # Region pixels sorted by score, each weighted 1 / (its region's size * number of regions), so
    # the weight of the flagged ones is the mean per-region overlap.
    region_scores = scores[defective]
    order = np.argsort(region_scores, kind="stable")
    region_scores = region_scores[order]
    sizes = np.bincount(region_ids, minlength=n_regions + 1)
    weights = 1.0 / (sizes[region_ids[order]] * float(n_regions))
    del order
    # weight_above[i] = weight of the region pixels from sorted position i on; exactly 0 past the end.
    weight_above = np.concatenate((np.cumsum(weights[::-1])[::-1], [0.0]))
    weight_above /= weight_above[0]  # exactly 1 once every region pixel is flagged (sum is 1 +- 1e-15)

    if num_thresholds is None and all_points:
        return _all_points_curve(scores, region_scores, weight_above, n_regions, n_ok)
    ok_sorted = scores[~defective]  # a copy: sorting it in place leaves the caller's maps alone
    ok_sorted.sort()
    if num_thresholds is None:
        return _corner_curve(ok_sorted, region_scores, weight_above, n_regions)

    ranks = np.floor(np.linspace(0, n_ok - 1, num=int(num_thresholds))).astype(np.int64)
    thresholds = ok_sorted[ranks].astype(np.float64)
    fpr = 1.0 - (ranks + 1) / n_ok
    pro = weight_above[np.searchsorted(region_scores, thresholds, side="right")]  # strictly above
    fpr = np.concatenate((fpr[::-1], [1.0]))
    pro = np.concatenate((pro[::-1], [1.0]))
    thresholds = np.concatenate((thresholds[::-1], [-np.inf]))
    return PROCurve(fpr, pro, thresholds, n_regions, n_ok, exact=False)


def _corner_curve(ok_sorted, region_scores, weight_above, n_regions) -> PROCurve:
    """Exact curve as its corner points (see :func:`pro_curve`)."""
    n_ok = ok_sorted.size
    is_first = np.empty(region_scores.size, dtype=bool)
    is_first[0] = True
    np.not_equal(region_scores[1:], region_scores[:-1], out=is_first[1:])
    first = np.flatnonzero(is_first)                    # start of each distinct region score
    end = np.append(first[1:], region_scores.size)      # one past its last occurrence
    values = region_scores[first].astype(np.float64)    # ascending
    ok_above = n_ok - np.searchsorted(ok_sorted, values, side="right")
    ok_at_or_above = n_ok - np.searchsorted(ok_sorted, values, side="left")
    # For each value r, from the highest down: corner A flags score > r (the end of the horizontal
    # segment that only OK pixels built), corner B flags score >= r (after r's pixels switch).
    fpr_a, pro_a = ok_above / n_ok, weight_above[end]
    fpr_b, pro_b = ok_at_or_above / n_ok, weight_above[first]
    # Threshold of A: the next distinct score above r, among region and OK scores.
    next_region = np.append(values[1:], np.inf)
    next_ok = np.full(values.size, np.inf)
    has_ok_above = ok_above > 0
    next_ok[has_ok_above] = ok_sorted[n_ok - ok_above[has_ok_above]]
    thr_a = np.minimum(next_region, next_ok)

    fpr = np.concatenate(([0.0], np.column_stack((fpr_a, fpr_b))[::-1].ravel(), [1.0]))
    pro = np.concatenate(([0.0], np.column_stack((pro_a, pro_b))[::-1].ravel(), [1.0]))
    lowest = min(float(ok_sorted[0]), float(values[0]))
    thresholds = np.concatenate(([np.inf], np.column_stack((thr_a, values))[::-1].ravel(), [lowest]))
    # Corners reached twice (no OK score between two region scores, ...) are kept once.
    keep = np.ones(fpr.size, dtype=bool)
    keep[1:] = (fpr[1:] != fpr[:-1]) | (pro[1:] != pro[:-1])
    return PROCurve(fpr[keep], pro[keep], thresholds[keep], n_regions, n_ok, exact=True)


def _all_points_curve(scores, region_scores, weight_above, n_regions, n_ok) -> PROCurve:
    """Exact curve with one point per distinct score (see :func:`pro_curve`)."""
    # np.sort is several times faster than an argsort; runs of equal scores are operating points.
    sorted_scores = np.sort(scores)
    is_first = np.empty(sorted_scores.size, dtype=bool)
    is_first[0] = True
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=is_first[1:])
    run_start = np.flatnonzero(is_first)
    del is_first
    thresholds = sorted_scores[run_start].astype(np.float64)
    del sorted_scores
    # Flagged = pixels >= the run's value; region pixels among them found by searching the
    # (short) sorted region scores.
    region_below = np.searchsorted(region_scores, thresholds, side="left")
    false_pos = (scores.size - run_start) - (region_scores.size - region_below)
    # Descending thresholds = increasing FPR; start at (0, 0) where nothing is flagged.
    fpr = np.concatenate(([0.0], false_pos[::-1] / n_ok))
    pro = np.concatenate(([0.0], weight_above[region_below[::-1]]))
    thresholds = np.concatenate(([np.inf], thresholds[::-1]))
    return PROCurve(fpr, pro, thresholds, n_regions, n_ok, exact=True)


def aupro(maps, gts, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (AUPRO@30 % by default)."""
    return pro_curve(maps, gts, num_thresholds=num_thresholds).area(fpr_limit)


def aupro_at(maps, gts, limits: Sequence[float] = DEFAULT_LIMITS,
             num_thresholds: int | None = None) -> dict[float, float]:
    """AU-PRO at several integration limits from one curve: ``{limit: value}``."""
    curve = pro_curve(maps, gts, num_thresholds=num_thresholds)
    return {float(limit): curve.area(float(limit)) for limit in limits}


# --------------------------------------------------------------------------------------------------
# Per-class summary
# --------------------------------------------------------------------------------------------------
@dataclass
class ClassMetrics:
    """Test-set metrics of one object class; ``aupro`` maps an FPR limit to its normalised AU-PRO."""

    category: str
    i_auroc: float
    p_auroc: float
    aupro: dict[float, float]
    n_good: int
    n_defect: int
    n_regions: int = 0
    extra: dict = field(default_factory=dict)

    def aupro_value(self, limit: float = 0.3) -> float:
        """AU-PRO at ``limit`` (NaN when it was not computed)."""
        for key, value in self.aupro.items():
            if abs(float(key) - limit) < 1e-12:
                return float(value)
        return float("nan")

    def to_dict(self) -> dict:
        """Plain-Python form (limits as strings such as "0.3", so it round-trips through JSON)."""
        return {
            "category": self.category,
            "i_auroc": float(self.i_auroc),
            "p_auroc": float(self.p_auroc),
            "aupro": {f"{float(k):g}": float(v) for k, v in self.aupro.items()},
            "n_good": int(self.n_good),
            "n_defect": int(self.n_defect),
            "n_regions": int(self.n_regions),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping, category: str | None = None) -> "ClassMetrics":
        """Inverse of :meth:`to_dict`; ``aupro`` may also be a single number (taken as @0.3)."""
        missing = [k for k in ("i_auroc", "p_auroc", "aupro") if k not in data]
        if missing:
            raise InputError(f"class metrics are missing the keys {missing}; got {sorted(data)}")
        aupro_values = data["aupro"]
        if not isinstance(aupro_values, Mapping):
            aupro_values = {0.3: aupro_values}
        return cls(
            category=str(data.get("category", category if category is not None else "")),
            i_auroc=float(data["i_auroc"]),
            p_auroc=float(data["p_auroc"]),
            aupro={float(k): float(v) for k, v in aupro_values.items()},
            n_good=int(data.get("n_good", 0)),
            n_defect=int(data.get("n_defect", 0)),
            n_regions=int(data.get("n_regions", 0)),
            extra=dict(data.get("extra", {})),
        )


def compute_class_metrics(category: str, image_scores, image_labels, maps, gts,
                          limits: Sequence[float] = DEFAULT_LIMITS,
                          num_thresholds: int | None = None, pro_maps=None) -> ClassMetrics:
    """All metrics of one class.

    ``maps`` feed P-AUROC and ``pro_maps`` (default: ``maps``) feed AU-PRO; the reference normalises
    the two differently per image (§8.5), which only matters for AU-PRO because it pools pixels of
    all images under one threshold.
    """
    labels = _binary_labels(image_labels, np.asarray(image_labels).size, "image_labels")
    curve = pro_curve(maps if pro_maps is None else pro_maps, gts, num_thresholds=num_thresholds)
    return ClassMetrics(
        category=category,
        i_auroc=image_auroc(image_scores, labels),
        p_auroc=pixel_auroc(maps, gts),
        aupro={float(limit): curve.area(float(limit)) for limit in limits},
        n_good=int(np.count_nonzero(~labels)),
        n_defect=int(np.count_nonzero(labels)),
        n_regions=curve.n_regions,
        extra={"pro_thresholds": "exact" if num_thresholds is None else int(num_thresholds)},
    )
