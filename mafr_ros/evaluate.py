"""Evaluation of a checkpoint on the test split of an MVTec 3D-AD-layout dataset.

Metrics follow the field: image AUROC, pixel AUROC and AUPRO (integrated up to FPR 0.3, also at
0.1 / 0.05 / 0.01), computed at the original image resolution (the official MVTec 3D-AD protocol)
and, for comparison with the published code, on the model's 224 x 224 grid.

Every evaluation path shares the three steps below, so a dataset, a bag read directly and a bag
replayed through the live node (:mod:`mafr_ros.bag.evaluate`) are scored identically:

* :func:`score_samples` runs the detector over samples (anything with ``rgb``, ``gt``, ``label``;
  a ``prepare`` function turns each into the model input) and returns a *run* dict;
* :func:`compute_metrics` turns a run into :class:`~mafr_ros.metrics.ClassMetrics`;
* :func:`write_evaluation` builds the summary dict and writes the report, overlays, curves, JSON.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
from tqdm import tqdm

from .core.detector import Detector
from .data.formats import open_dataset
from .data.mvtec import MVTecDataset
from .data.preprocess import (ModelInput, PreprocessCache, gt_to_grid, map_to_input,
                              preprocess_sample)
from .metrics import ClassMetrics, aupro_at, image_auroc, pixel_auroc
from .report import plot_pro, plot_roc, save_overlays, write_report

log = logging.getLogger("mafr_ros.evaluate")

AUPRO_LIMITS = (0.3, 0.1, 0.05, 0.01)


def score_samples(detector: Detector, samples: Iterable, prepare: Callable[[object], ModelInput],
                  batch_size: int = 4, progress: bool = True, total: int | None = None) -> dict:
    """Run the detector over samples; ``prepare(sample)`` gives the preprocessed model input.

    Returns the run dict the other steps read: ``samples``, ``inputs``, ``grid_maps`` (N, S, S),
    ``scores`` (N,), ``labels`` (N,), ``full_maps`` (raw maps at each input's resolution) and
    ``seconds_per_image`` (model time only: preprocessing is cached for datasets).
    """
    inputs, kept = [], []
    for sample in tqdm(samples, desc="preprocess", total=total, disable=not progress, leave=False):
        inputs.append(prepare(sample))
        kept.append(sample)
    grid_maps, scores = [], []
    started = time.perf_counter()
    for start in tqdm(range(0, len(inputs), batch_size), desc="score", disable=not progress,
                      leave=False):
        maps, s = detector.score_inputs(inputs[start:start + batch_size])
        grid_maps.append(maps.float().cpu().numpy())
        scores.append(s.float().cpu().numpy())
    seconds = time.perf_counter() - started
    grid_maps = np.concatenate(grid_maps)
    return {
        "samples": kept,
        "inputs": inputs,
        "grid_maps": grid_maps,
        "scores": np.concatenate(scores),
        "labels": np.array([s.label for s in kept]),
        "full_maps": [map_to_input(m, i.frame).astype(np.float32) for m, i in zip(grid_maps, inputs)],
        "seconds_per_image": seconds / max(len(inputs), 1),
    }


def score_split(detector: Detector, dataset: MVTecDataset, cache: PreprocessCache | None = None,
                batch_size: int = 4, progress: bool = True):
    """Run the detector over a split (preprocessing cached on disk). See :func:`score_samples`."""
    cfg = detector.preprocess_cfg
    return score_samples(detector, (dataset[i] for i in range(len(dataset))),
                         lambda sample: preprocess_sample(sample, cfg, cache),
                         batch_size=batch_size, progress=progress, total=len(dataset))


def compute_metrics(category: str, run: dict) -> ClassMetrics:
    """Metrics of a run. The 224-grid comparison needs ``grid_maps`` and ``inputs`` (their grid
    frames); a run without them (the live node publishes input-resolution maps only) skips it."""
    gts_full = [s.gt for s in run["samples"]]
    labels = np.asarray(run["labels"])
    metrics = ClassMetrics(
        category=category,
        i_auroc=image_auroc(run["scores"], labels),
        p_auroc=pixel_auroc(run["full_maps"], gts_full),
        aupro=aupro_at(run["full_maps"], gts_full, AUPRO_LIMITS),
        n_good=int((labels == 0).sum()),
        n_defect=int((labels == 1).sum()),
    )
    metrics.extra = {"seconds_per_image": run["seconds_per_image"]}
    if run.get("grid_maps") is not None and run.get("inputs") is not None:
        grid = run["grid_maps"].shape[-1]
        gts_grid = [gt_to_grid(s.gt, i.frame, grid) for s, i in zip(run["samples"], run["inputs"])]
        metrics.extra["grid"] = {"p_auroc": pixel_auroc(list(run["grid_maps"]), gts_grid),
                                 "aupro": aupro_at(list(run["grid_maps"]), gts_grid, AUPRO_LIMITS)}
    return metrics


def write_evaluation(run: dict, metrics: ClassMetrics, *, checkpoint, model_id: str, device: str,
                     pixel_threshold: float | None, out_dir=None, json_path=None,
                     overlays: int = 12, extra: Mapping | None = None) -> dict:
    """The summary dict of an evaluation (``extra`` merged in); with ``out_dir`` also the Markdown
    + JSON report, heatmap overlays (``pixel_threshold`` outlined) and ROC/PRO curves; with
    ``json_path`` the summary as JSON."""
    category = metrics.category
    summary = {
        "category": category,
        "checkpoint": str(checkpoint),
        "model_id": model_id,
        "i_auroc": metrics.i_auroc,
        "p_auroc": metrics.p_auroc,
        "aupro": metrics.aupro[0.3],
        "aupro_limits": {str(k): v for k, v in metrics.aupro.items()},
        "n_good": metrics.n_good,
        "n_defect": metrics.n_defect,
        "seconds_per_image": run["seconds_per_image"],
        "device": device,
    }
    if "grid" in metrics.extra:
        summary["grid"] = {"p_auroc": metrics.extra["grid"]["p_auroc"],
                           "aupro": metrics.extra["grid"]["aupro"][0.3],
                           "aupro_limits": {str(k): v for k, v in
                                            metrics.extra["grid"]["aupro"].items()}}
    summary.update(extra or {})
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        run_info = {"checkpoint": str(checkpoint)}
        run_info.update({k: v for k, v in (extra or {}).items() if not isinstance(v, (list, dict))})
        md_path, _ = write_report([metrics], out_dir,
                                  title=f"MAFR evaluation - {category} ({model_id})",
                                  extra=run_info)
        summary["report"] = str(md_path)
        save_overlays(run["samples"], run["full_maps"], out_dir / "overlays",
                      threshold=pixel_threshold, scores=run["scores"], max_images=overlays)
        plot_roc(run["scores"], run["labels"], out_dir / "roc.png")
        plot_pro(run["full_maps"], [s.gt for s in run["samples"]], out_dir / "pro.png")
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2))
    return summary


#: Summary keys kept in a checkpoint's ``metrics`` by :func:`record_metrics`.
RECORDED_KEYS = ("i_auroc", "p_auroc", "aupro", "aupro_limits", "n_good", "n_defect", "grid",
                 "device", "mode", "n_frames", "n_missing")


def record_metrics(checkpoint, summary: Mapping, source: Mapping) -> dict:
    """Keep an evaluation in the checkpoint's metadata (``mafr eval --record``): its ``metrics``
    holds ``evaluations``, one entry per evaluated source (``source``: e.g. dataset, category,
    split, or bag), the latest evaluation of a source replacing the earlier one. The file is
    rewritten atomically with the same weights, so the model id does not change. Returns the
    entry."""
    from .core.checkpoint import read_metadata, update_metadata
    from .errors import CheckpointError
    meta = read_metadata(checkpoint)
    if summary.get("model_id") != meta.get("model_id"):
        raise CheckpointError(f"the evaluation is of model {summary.get('model_id')!r}, the "
                              f"checkpoint {checkpoint} holds {meta.get('model_id')!r}: not "
                              "recorded (was the file replaced during the evaluation?)")
    entry = {"source": dict(source), **{k: summary[k] for k in RECORDED_KEYS if k in summary},
             "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    metrics = dict(meta.get("metrics") or {})
    kept = [e for e in metrics.get("evaluations", []) if e.get("source") != entry["source"]]
    metrics["evaluations"] = kept + [entry]
    update_metadata(checkpoint, {"metrics": metrics})
    return entry


def evaluate(checkpoint, dataset_root, category: str, out_dir=None, json_path=None,
             device="auto", split="test", overlays: int = 12, progress: bool = True,
             cache_dir=None, backbone_weights=None, dataset_format: str = "auto") -> dict:
    """Evaluate a checkpoint on one class. Writes a Markdown + JSON report, heatmap overlays and
    ROC/PRO curves into out_dir when given, and the metrics JSON to json_path when given.
    ``dataset_format``: mvtec, eyecandies or auto (detected from the folder layout)."""
    detector = Detector.from_checkpoint(checkpoint, device=device, backbone_weights=backbone_weights)
    dataset = open_dataset(dataset_root, category, split, format=dataset_format)
    cache = PreprocessCache(cache_dir) if cache_dir is not None else PreprocessCache()
    run = score_split(detector, dataset, cache, progress=progress)
    metrics = compute_metrics(category, run)
    th = detector.thresholds
    return write_evaluation(run, metrics, checkpoint=checkpoint, model_id=detector.model_id,
                            device=str(detector.device), pixel_threshold=th.pixel if th else None,
                            out_dir=out_dir, json_path=json_path, overlays=overlays)
