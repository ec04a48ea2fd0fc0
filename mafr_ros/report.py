"""Evaluation reports (Markdown + JSON), qualitative overlays and metric curves.

Figures are drawn with matplotlib's object API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``):
no pyplot global state, no display, safe to call from a worker thread or a headless robot.

:func:`colorize` and :func:`blend` are also meant for the ROS node's heat-map/overlay topics, so they
are allocation-light NumPy: a 256-entry colour look-up table and integer alpha blending.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import InputError
from .metrics import ClassMetrics, PROCurve, image_auroc, pro_curve, roc_curve_points

#: FPR limit whose AU-PRO is the headline ``aupro`` value (the literature's AUPRO@30 %).
PRIMARY_LIMIT = 0.3


# --------------------------------------------------------------------------------------------------
# Colourisation (hot path of the node's overlay topic)
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def colormap_lut(cmap: str = "jet") -> np.ndarray:
    """The (256, 3) uint8 colour table of a matplotlib colormap (cached: built once per name)."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise InputError(f"unknown matplotlib colormap {cmap!r}; use e.g. 'jet' or 'inferno'") from None
    # bytes=True: the same uint8 conversion as matplotlib's own images of this colormap.
    lut = np.ascontiguousarray(colormap(np.linspace(0.0, 1.0, 256), bytes=True)[:, :3])
    lut.setflags(write=False)  # shared by every caller through the cache
    return lut


def colorize(score_map, vmin: float | None = None, vmax: float | None = None, cmap: str = "jet",
             out: np.ndarray | None = None) -> np.ndarray:
    """Colour an (H, W) score map: ``vmin`` -> the colormap's first colour, ``vmax`` -> its last.

    ``vmin``/``vmax`` default to the map's own range; fix them (e.g. 0 and the deployment threshold
    times two) to make colours comparable between frames. NaN pixels get the lowest colour.
    ``out`` may be a preallocated (H, W, 3) uint8 array (a node can reuse one per frame).
    """
    values = np.asarray(score_map)
    if values.ndim != 2:
        raise InputError(f"colorize: expected an (H, W) score map, got shape {values.shape}")
    if vmin is None or vmax is None:
        finite = values[np.isfinite(values)] if not np.isfinite(values).all() else values
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        vmin = low if vmin is None else vmin
        vmax = high if vmax is None else vmax
    vmin, vmax = float(vmin), float(vmax)
    scale = 255.0 / (vmax - vmin) if vmax > vmin else 0.0
    if out is None:
        out = np.empty(values.shape + (3,), dtype=np.uint8)
    elif out.shape != values.shape + (3,) or out.dtype != np.uint8:
        raise InputError(f"colorize: out must be uint8 {values.shape + (3,)}, got {out.dtype} {out.shape}")
    index, index_u8 = _index_buffers(values.shape)
    # index = round((v - vmin) * scale), clamped to [0, 255]; fmax maps NaN to 0.
    np.multiply(values, np.float32(scale), out=index, casting="unsafe")
    index += np.float32(0.5 - vmin * scale)
    np.fmax(index, 0.0, out=index)
    np.minimum(index, 255.0, out=index)
    np.copyto(index_u8, index, casting="unsafe")  # truncation of the +0.5 values = rounding
    np.take(colormap_lut(cmap), index_u8, axis=0, out=out)
    return out


_scratch = threading.local()


def _index_buffers(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-thread scratch for colorize, reused while the frame size stays the same.

    Fresh multi-megabyte arrays cost page faults on every call (several milliseconds per VGA frame
    on the development VM, more than the arithmetic itself).
    """
    buffers = getattr(_scratch, "index", None)
    if buffers is None or buffers[0].shape != shape:
        buffers = (np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.uint8))
        _scratch.index = buffers
    return buffers


def blend(rgb, heat_rgb, alpha=0.5, out: np.ndarray | None = None) -> np.ndarray:
    """``(1 - alpha) * rgb + alpha * heat_rgb`` for uint8 (H, W, 3) images, rounded.

    ``alpha`` is a scalar or an (H, W) array in [0, 1] (e.g. zero on invalid pixels). Integer
    arithmetic in uint16 with an 8-bit alpha: exact to +-1 grey level and about twice as fast as
    float32.
    """
    rgb = np.asarray(rgb)
    heat_rgb = np.asarray(heat_rgb)
    if rgb.shape != heat_rgb.shape or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError(
            f"blend: need two (H, W, 3) images of one size, got {rgb.shape} and {heat_rgb.shape}")
    if rgb.dtype != np.uint8 or heat_rgb.dtype != np.uint8:
        raise InputError(f"blend: images must be uint8, got {rgb.dtype} and {heat_rgb.dtype}")
    if np.ndim(alpha) == 0:
        if not 0.0 <= float(alpha) <= 1.0:
            raise InputError(f"blend: alpha must be in [0, 1], got {alpha}")
        weight = np.uint16(round(float(alpha) * 256.0))
        acc = heat_rgb.astype(np.uint16)
        acc *= weight
        acc += rgb * (np.uint16(256) - weight)  # uint8 * uint16 scalar -> uint16
    else:
        alpha = np.asarray(alpha)
        if alpha.shape != rgb.shape[:2]:
            raise InputError(f"blend: alpha map must be {rgb.shape[:2]}, got {alpha.shape}")
        weight = np.rint(np.clip(alpha, 0.0, 1.0) * 256.0).astype(np.uint16)[..., None]
        acc = heat_rgb * weight
        acc += rgb * (np.uint16(256) - weight)
    acc += np.uint16(128)
    acc >>= 8
    if out is None:
        return acc.astype(np.uint8)
    np.copyto(out, acc, casting="unsafe")
    return out


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------
def _as_class_metrics(results) -> list[ClassMetrics]:
    if isinstance(results, ClassMetrics):
        return [results]
    if isinstance(results, Mapping):
        items: Iterable = [
            value if isinstance(value, ClassMetrics) else ClassMetrics.from_dict(value, category=str(key))
            for key, value in results.items()
        ]
    else:
        items = [r if isinstance(r, ClassMetrics) else ClassMetrics.from_dict(r) for r in results]
    items = list(items)
    if not items:
        raise InputError("write_report: no class results given")
    names = [m.category for m in items]
    if len(set(names)) != len(names):
        raise InputError(f"write_report: duplicate class names in {names}")
    return items


def _limit_key(limit: float) -> str:
    return f"{float(limit):g}"


def _limit_label(limit: float) -> str:
    return f"AUPRO@{float(limit) * 100:g}%"


def _mean(values: Sequence[float]) -> float:
    """Plain mean: a class without a value makes the mean NaN rather than silently optimistic."""
    return float(np.mean(values)) if len(values) else math.nan


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _json_default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, _dt.date)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _atomic_write(path: Path, text: str) -> None:
    """Readers (a dashboard, CI) never see a half-written report."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_report(results, out_dir, title: str, extra: Mapping | None = None,
                 stem: str = "report") -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` in ``out_dir``; returns their paths.

    ``results``: a list of :class:`ClassMetrics` (or their dicts), or ``{class: ClassMetrics|dict}``.
    Markdown: one table like the papers' (classes as columns, mean last when there are several,
    rows I-AUROC, P-AUROC, AUPRO@limit..., three decimals). JSON: the class means at top level
    (``i_auroc``, ``p_auroc``, ``aupro`` at 30 %, ``aupro_limits``; for one class these are its own
    values), ``per_class`` entries and ``meta`` (``extra`` plus the creation time). Non-finite
    values become ``null`` so the file is strict JSON.
    """
    classes = _as_class_metrics(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    limits = sorted({float(k) for m in classes for k in m.aupro}, reverse=True)
    primary = PRIMARY_LIMIT if any(abs(l - PRIMARY_LIMIT) < 1e-12 for l in limits) else (
        limits[0] if limits else math.nan)

    rows: list[tuple[str, list[float]]] = [
        ("I-AUROC", [m.i_auroc for m in classes]),
        ("P-AUROC", [m.p_auroc for m in classes]),
    ] + [(_limit_label(l), [m.aupro_value(l) for m in classes]) for l in limits]
    means = {label: _mean(values) for label, values in rows}

    # ---- Markdown ----
    with_mean = len(classes) > 1
    header = ["Metric"] + [m.category for m in classes] + (["Mean"] if with_mean else [])

    def cell(value: float) -> str:
        return f"{value:.3f}" if math.isfinite(value) else "–"

    lines = [f"# {title}", "", "| " + " | ".join(header) + " |",
             "|:--" + "|--:" * (len(header) - 1) + "|"]
    for label, values in rows:
        cells = [cell(v) for v in values] + ([cell(means[label])] if with_mean else [])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    counts = [f"{m.n_good} / {m.n_defect}" for m in classes]
    if with_mean:
        counts.append(f"{sum(m.n_good for m in classes)} / {sum(m.n_defect for m in classes)}")
    lines.append("| Images good / defective | " + " | ".join(counts) + " |")
    lines += ["", "I-AUROC: image scores; P-AUROC: every pixel of every test image; AUPRO@x%: "
              "normalised area under the per-region-overlap curve up to a false-positive rate of x%."]
    protocols = sorted({str(m.extra.get("pro_thresholds")) for m in classes if "pro_thresholds" in m.extra})
    if protocols:
        lines.append(f"PRO thresholds: {', '.join(protocols)}.")
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta = {"title": title, "created_utc": created, **(dict(extra) if extra else {})}
    if extra:
        lines += ["", "## Run", ""] + [f"- **{key}**: {value}" for key, value in extra.items()]
    md_path = out_dir / f"{stem}.md"
    _atomic_write(md_path, "\n".join(lines) + "\n")

    # ---- JSON ----
    per_class = {}
    for m in classes:
        entry = {
            "i_auroc": _json_number(m.i_auroc),
            "p_auroc": _json_number(m.p_auroc),
            "aupro": _json_number(m.aupro_value(primary)),
            "aupro_limits": {_limit_key(l): _json_number(m.aupro_value(l)) for l in limits},
            "n_good": int(m.n_good),
            "n_defect": int(m.n_defect),
            "n_regions": int(m.n_regions),
        }
        if m.extra:
            entry["extra"] = dict(m.extra)
        per_class[m.category] = entry
    document = {
        "title": title,
        "classes": [m.category for m in classes],
        "i_auroc": _json_number(means["I-AUROC"]),
        "p_auroc": _json_number(means["P-AUROC"]),
        "aupro": _json_number(means[_limit_label(primary)]) if limits else None,
        "aupro_limit": _json_number(primary),
        "aupro_limits": {_limit_key(l): _json_number(means[_limit_label(l)]) for l in limits},
        "per_class": per_class,
        "meta": meta,
    }
    json_path = out_dir / f"{stem}.json"
    _atomic_write(json_path, json.dumps(document, indent=2, allow_nan=False, default=_json_default) + "\n")
    return md_path, json_path


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
def _figure(width_in: float, height_in: float, dpi: int = 100, layout: str | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _field(sample, *names):
    """Attribute or key lookup, so dataset samples, dicts and small dataclasses all work."""
    for name in names:
        if isinstance(sample, Mapping):
            if name in sample and sample[name] is not None:
                return sample[name]
        elif getattr(sample, name, None) is not None:
            return getattr(sample, name)
    return None


def _resize(array: np.ndarray, size_hw: tuple[int, int], nearest: bool) -> np.ndarray:
    if array.shape[:2] == size_hw:
        return array
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(image.resize((size_hw[1], size_hw[0]), method))


def _sample_name(sample, index: int) -> str:
    """``name`` without its image suffix, else the last folders of ``path``/``rgb_path`` ("cut/rgb/000")."""
    if isinstance(sample, np.ndarray):
        return f"{index:03d}"
    name = _field(sample, "name")
    if name is not None:
        return re.sub(r"\.(png|jpe?g|tiff?)$", "", str(name), flags=re.IGNORECASE)
    path = _field(sample, "path", "rgb_path")
    if path is not None:
        return "/".join(Path(str(path)).with_suffix("").parts[-3:])
    return f"{index:03d}"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "image"


def save_overlays(samples: Sequence, maps: Sequence, out_dir, threshold: float | None = None,
                  max_images: int = 32, cmap: str = "jet", alpha: float = 0.5,
                  vmin: float | None = None, vmax: float | None = None, dpi: int = 100,
                  scores: Sequence[float] | None = None) -> list[Path]:
    """One PNG per image (1200 x 440 px at ``dpi=100``): RGB | heat-map overlay | ground truth.

    Each sample provides ``rgb`` (H, W, 3 uint8) and optionally ``gt`` (or ``mask``), ``name`` (or
    ``path``/``rgb_path``), ``score`` and ``label``, as attributes or mapping keys (a dataset
    ``Sample`` works as is); a bare array is taken as the
    RGB image. A map of another size (224 x 224) is resized bilinearly to the whole RGB image, which
    is right only if it covers the same field of view: crop any square padding off the map first.
    Colours share one scale over all written images (``vmin``/``vmax``, default their joint range)
    so panels are comparable. With ``threshold``, the third panel also outlines ``map >= threshold``.
    The title shows the image score: ``scores[i]``, else the sample's ``score``, else the map maximum.
    """
    if len(samples) != len(maps):
        raise InputError(f"save_overlays: {len(samples)} samples but {len(maps)} maps")
    if scores is not None and len(scores) != len(samples):
        raise InputError(f"save_overlays: {len(samples)} samples but {len(scores)} scores")
    count = min(len(samples), int(max_images))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = [np.asarray(maps[i], dtype=np.float32) for i in range(count)]
    if count and (vmin is None or vmax is None):
        lows = [float(np.nanmin(m)) for m in chosen]
        highs = [float(np.nanmax(m)) for m in chosen]
        vmin = min(lows) if vmin is None else vmin
        vmax = max(highs) if vmax is None else vmax

    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    paths = []
    for i in range(count):
        sample = samples[i]
        rgb = sample if isinstance(sample, np.ndarray) else _field(sample, "rgb")
        rgb = None if rgb is None else np.asarray(rgb)
        if rgb is None or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"save_overlays: sample {i} needs an (H, W, 3) uint8 'rgb' image")
        size = rgb.shape[:2]
        score_map = _resize(chosen[i], size, nearest=False)
        gt = None if isinstance(sample, np.ndarray) else _field(sample, "gt", "mask")
        gt = None if gt is None else _resize(np.asarray(gt) != 0, size, nearest=True) > 0.5
        name = _sample_name(sample, i)
        score = None if isinstance(sample, np.ndarray) else _field(sample, "score")
        score = scores[i] if scores is not None else score
        score = float(np.nanmax(chosen[i])) if score is None else float(score)
        label = None if isinstance(sample, np.ndarray) else _field(sample, "label")

        fig = _figure(12.0, 4.4, dpi)
        # Fixed margins: constrained layout would double the rendering time of each figure.
        axes = fig.subplots(1, 3, gridspec_kw=dict(left=0.01, right=0.97, bottom=0.02, top=0.86,
                                                   wspace=0.12))
        axes[0].imshow(rgb)
        axes[0].set_title("RGB")
        axes[1].imshow(blend(rgb, colorize(score_map, vmin, vmax, cmap), alpha))
        axes[1].set_title(f"anomaly map (max {float(np.nanmax(chosen[i])):.3g})")
        fig.colorbar(ScalarMappable(Normalize(vmin, vmax), matplotlib.colormaps[cmap]),
                     ax=axes[1], fraction=0.046, pad=0.02)
        axes[2].imshow(rgb)
        if gt is not None and gt.any():
            axes[2].contour(gt, levels=[0.5], colors=["lime"], linewidths=1.2)
        if threshold is not None and np.nanmax(score_map) >= threshold:
            axes[2].contour(score_map >= threshold, levels=[0.5], colors=["red"], linewidths=1.0)
        outline = "" if threshold is None else f", map >= {threshold:.3g} (red)"
        axes[2].set_title("ground truth (green)" + outline)
        for ax in axes:
            ax.set_axis_off()
        verdict = "" if label is None else f" - label {'defective' if int(label) else 'good'}"
        fig.suptitle(f"{name}: image score {score:.4g}{verdict}")
        path = out_dir / f"{i:03d}_{_safe_name(name)}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def plot_roc(scores, labels, path, title: str = "ROC") -> Path:
    """Image-level ROC curve with its AUROC, as a PNG."""
    fpr, tpr, _ = roc_curve_points(scores, labels)
    auc = image_auroc(scores, labels)
    fig = _figure(5.0, 5.0)
    ax = fig.subplots()
    ax.plot(fpr, tpr, drawstyle="default", lw=1.8, label=f"AUROC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate", ylabel="true-positive rate",
           title=title, aspect="equal")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_pro(maps, gts, path, fpr_limit: float = 0.3, num_thresholds: int | None = None,
             curve: PROCurve | None = None, title: str = "PRO curve") -> Path:
    """PRO curve over the whole FPR range and zoomed to ``[0, fpr_limit]``, with AU-PRO, as a PNG.

    Pass ``curve`` to reuse one already computed (``maps``/``gts`` are then ignored).
    """
    if curve is None:
        curve = pro_curve(maps, gts, num_thresholds=num_thresholds)
    value = curve.area(fpr_limit)
    # A real-valued map has ~10^5 corners; sampling the piecewise-linear curve on a fine grid draws
    # the same picture with a bounded number of vertices.
    fig = _figure(10.0, 4.6)
    axes = fig.subplots(1, 2)
    if curve.fpr.size <= 4000:
        x, y = curve.fpr, curve.pro
    else:
        x = np.union1d(np.linspace(0.0, 1.0, 2001), np.linspace(0.0, fpr_limit, 2001))
        y = np.interp(x, curve.fpr, curve.pro)
    inside = x <= fpr_limit
    for ax, upper in zip(axes, (1.0, fpr_limit)):
        ax.plot(x, y, lw=1.6, label=f"AUPRO@{fpr_limit * 100:g}% = {value:.3f}")
        ax.axvline(fpr_limit, ls="--", lw=0.8, color="grey")
        ax.fill_between(x[inside], 0, y[inside], alpha=0.15)
        ax.set(xlim=(0, upper), ylim=(0, 1.01), xlabel="false-positive rate (OK pixels)",
               ylabel="per-region overlap")
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[1].set_title(f"zoom to FPR <= {fpr_limit:g}")
    axes[1].legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------------
# Paper-style tables gathered from several evaluations
# --------------------------------------------------------------------------------------------------
#: Class orders of the papers' tables (MVTec 3D-AD and Eyecandies); other classes are sorted.
PAPER_CLASS_ORDERS = (
    ("bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire"),
    ("CandyCane", "ChocolateCookie", "ChocolatePraline", "Confetto", "GummyBear", "HazelnutTruffle",
     "LicoriceSandwich", "Lollipop", "Marshmallow", "PeppermintCandy"),
)
RESOLUTIONS = (("full", "original resolution"), ("grid", "model grid"))



def _limit_dict(values) -> dict[float, float]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        return {PRIMARY_LIMIT: float(values)}
    return {float(k): (math.nan if v is None else float(v)) for k, v in values.items()}


def _number(value) -> float:
    return math.nan if value is None else float(value)


def class_results_from_json(document: Mapping, source: str = "<json>") -> list[dict]:
    """Per-class results of one metrics document, normalised to
    ``{"category", "i_auroc", "full": {"p_auroc", "aupro": {limit: value}}, "grid": {...}, "n_good",
    "n_defect"}``. Accepts the summary of ``mafr eval --json`` and the ``report.json`` that
    :func:`write_report` (``mafr eval --report``) writes; anything else is an InputError."""
    if not isinstance(document, Mapping):
        raise InputError(f"{source}: expected a JSON object with evaluation metrics")
    if isinstance(document.get("per_class"), Mapping):  # report.json
        out = []
        for category, entry in document["per_class"].items():
            grid = (entry.get("extra") or {}).get("grid") or {}
            out.append({"category": str(category), "i_auroc": _number(entry.get("i_auroc")),
                        "full": {"p_auroc": _number(entry.get("p_auroc")),
                                 "aupro": _limit_dict(entry.get("aupro_limits") or entry.get("aupro"))},
                        "grid": {"p_auroc": _number(grid.get("p_auroc")),
                                 "aupro": _limit_dict(grid.get("aupro"))},
                        "n_good": int(entry.get("n_good", 0)), "n_defect": int(entry.get("n_defect", 0))})
        return out
    missing = [k for k in ("category", "i_auroc", "p_auroc") if k not in document]
    if missing:
        raise InputError(f"{source} is not a metrics file of `mafr eval --json` or `--report` "
                         f"(missing {missing}; keys found: {sorted(document)[:10]})")
    grid = document.get("grid") or {}
    return [{"category": str(document["category"]), "i_auroc": _number(document["i_auroc"]),
             "full": {"p_auroc": _number(document["p_auroc"]),
                      "aupro": _limit_dict(document.get("aupro_limits") or document.get("aupro"))},
             "grid": {"p_auroc": _number(grid.get("p_auroc")),
                      "aupro": _limit_dict(grid.get("aupro_limits") or grid.get("aupro"))},
             "n_good": int(document.get("n_good", 0)), "n_defect": int(document.get("n_defect", 0))}]


def load_run(path) -> list[dict]:
    """The per-class results of one run: a metrics JSON file, or a folder whose ``*.json`` files
    (searched recursively, in sorted order) are metrics files. A class may appear only once."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.json"))
        if not files:
            raise InputError(f"{path} holds no .json metrics files (write them with `mafr eval --json`)")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"{path} does not exist: give metrics JSON files or folders holding them")
    results: dict[str, dict] = {}
    for file in files:
        try:
            document = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read metrics file {file} ({exc})") from None
        for result in class_results_from_json(document, str(file)):
            result["source"] = str(file)
            previous = results.get(result["category"])
            if previous is not None:
                raise InputError(f"class {result['category']!r} appears twice in run {path}: "
                                 f"{previous['source']} and {file}; give each run its own folder")
            results[result["category"]] = result
    return list(results.values())


def order_classes(names: Iterable[str]) -> list[str]:
    """The papers' class order when every class belongs to one dataset's list, else sorted."""
    names = list(dict.fromkeys(names))
    for order in PAPER_CLASS_ORDERS:
        if set(names) <= set(order):
            return [c for c in order if c in names]
    return sorted(names)


def _table_rows(limits: Sequence[float]) -> list[tuple[str, str, str | None, float | None]]:
    """(label, key, resolution, limit) of every table, in the papers' order."""
    rows = [("I-AUROC", "i_auroc", None, None)]
    for resolution, _ in RESOLUTIONS:
        rows.append(("P-AUROC", "p_auroc", resolution, None))
    for limit in limits:
        for resolution, _ in RESOLUTIONS:
            rows.append((_limit_label(limit), "aupro", resolution, limit))
    return rows


def _cell_value(result: Mapping | None, key: str, resolution: str | None, limit: float | None) -> float:
    if result is None:
        return math.nan
    if key == "i_auroc":
        return result["i_auroc"]
    part = result[resolution]
    if key == "p_auroc":
        return part["p_auroc"]
    for k, v in part["aupro"].items():
        if abs(k - limit) < 1e-12:
            return v
    return math.nan


def write_tables(runs: Sequence[tuple[str, Sequence[Mapping]]], out_path, title: str = "MAFR results",
                 limits: Sequence[float] = (0.3, 0.1, 0.05, 0.01), extra: Mapping | None = None,
                 digits: int = 3) -> tuple[Path, Path]:
    """Paper-style tables of several runs: one table per metric (I-AUROC; P-AUROC and AUPRO@limit at
    the original resolution and on the model grid), runs as rows, classes as columns and their
    mean last. ``runs``: ``[(name, per-class results from load_run), ...]``. Writes ``out_path``
    (Markdown) and the same numbers as JSON next to it (``.json``). A class missing from a run
    shows "–" and makes that run's mean "–" (a mean over fewer classes is not comparable)."""
    if not runs:
        raise InputError("write_tables: no runs given")
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise InputError(f"write_tables: duplicate run names {names}; name each run")
    classes = order_classes(r["category"] for _, results in runs for r in results)
    by_run = [{r["category"]: r for r in results} for _, results in runs]
    rows = _table_rows(limits)

    def cell(value: float) -> str:
        return f"{value:.{digits}f}" if math.isfinite(value) else "–"

    lines = [f"# {title}", "",
             "One table per metric as in the papers: classes as columns, their mean last. "
             "*original resolution*: maps and ground truth at the input image size (the official "
             "MVTec 3D-AD protocol); *model grid*: on the 224 x 224 grid, as the published code "
             "computes them. AUPRO@x%: normalised area under the PRO curve up to FPR x%.", ""]
    tables = []
    header = "| Method | " + " | ".join(classes) + " | Mean |"
    align = "|:--" + "|--:" * (len(classes) + 1) + "|"
    for label, key, resolution, limit in rows:
        heading = label if resolution is None else f"{label}, {dict(RESOLUTIONS)[resolution]}"
        lines += [f"## {heading}", "", header, align]
        entry = {"metric": label, "key": key, "resolution": resolution, "limit": limit, "rows": []}
        for (name, _), results in zip(runs, by_run):
            values = [_cell_value(results.get(c), key, resolution, limit) for c in classes]
            mean = _mean(values)
            lines.append(f"| {name} | " + " | ".join(cell(v) for v in values) + f" | {cell(mean)} |")
            entry["rows"].append({"run": name, "values": {c: _json_number(v) for c, v in zip(classes, values)},
                                  "mean": _json_number(mean)})
        lines.append("")
        tables.append(entry)
    counts = [", ".join(f"{results[c]['n_good']}+{results[c]['n_defect']}" if c in results else "–"
                        for c in classes) for results in by_run]
    lines.append("Test images (good + defective) per class: " + "; ".join(
        f"{name}: {count}" for name, count in zip(names, counts)) + ".")
    if extra:
        lines += ["", "## Run", ""] + [f"- **{k}**: {v}" for k, v in extra.items()]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_path, "\n".join(lines) + "\n")
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    document = {"title": title, "classes": classes, "runs": names, "tables": tables,
                "sources": {name: sorted({r.get("source", "") for r in results}) for name, results in runs},
                "meta": {"created_utc": created, **(dict(extra) if extra else {})}}
    json_path = out_path.with_suffix(".json")
    _atomic_write(json_path, json.dumps(document, indent=2, allow_nan=False, default=_json_default) + "\n")
    return out_path, json_path


def table_from_paths(paths: Sequence, out_path, names: Sequence[str] | None = None,
                     title: str = "MAFR results", limits: Sequence[float] = (0.3, 0.1, 0.05, 0.01)
                     ) -> tuple[Path, Path]:
    """``mafr table``: every path is one run (a metrics JSON file or a folder of them); runs are
    named by ``names`` or by the file/folder name."""
    paths = [Path(p) for p in paths]
    if names is not None and len(names) != len(paths):
        raise InputError(f"{len(names)} names for {len(paths)} runs: give one --name per run")
    runs = [(names[i] if names else (p.stem if p.is_file() else p.name or str(p)), load_run(p))
            for i, p in enumerate(paths)]
    return write_tables(runs, out_path, title=title, limits=limits)
