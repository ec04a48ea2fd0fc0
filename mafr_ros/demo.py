"""`make demo` / `mafr demo`: the main job, offline, on this machine, in a few minutes.

synthetic parts (seeded) -> the embedded lite model (or a freshly trained one) -> evaluation on
the synthetic test split -> a report (Markdown + JSON metrics, heatmap overlays, ROC/PRO curves).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .core.checkpoint import read_metadata
from .core.detector import default_model_path


def run_demo(out_dir, seed: int = 0, retrain: bool = False) -> dict:
    from .data.synthetic import generate_dataset
    from .evaluate import evaluate
    from .train import TrainConfig, train

    out_dir = Path(out_dir)
    started = time.time()
    checkpoint = default_model_path()
    if not retrain and not checkpoint.is_file():
        print(f"embedded model {checkpoint} not found: training a fresh one")
        retrain = True
    category = None if retrain else read_metadata(checkpoint)["category"]

    data_root = out_dir / "dataset"
    print(f"[1/3] synthetic parts (seed {seed}) -> {data_root}")
    generate_dataset(data_root, seed=seed, categories=[category] if category else None)
    if category is None:
        category = sorted(p.name for p in data_root.iterdir() if p.is_dir())[0]

    if retrain:
        checkpoint = out_dir / f"lite_{category}.safetensors"
        print(f"[2/3] training a lite model for {category} -> {checkpoint}")
        train(data_root, category, checkpoint,
              TrainConfig(profile="lite", cache_dir=str(out_dir / "cache")))
    else:
        print(f"[2/3] using the embedded default model {checkpoint}")

    report_dir = out_dir / "report"
    print(f"[3/3] evaluating on the synthetic test split -> {report_dir}")
    summary = evaluate(checkpoint, data_root, category, out_dir=report_dir,
                       json_path=report_dir / "metrics.json", cache_dir=out_dir / "cache")
    print(json.dumps({k: round(summary[k], 4) if isinstance(summary[k], float) else summary[k]
                      for k in ("category", "model_id", "i_auroc", "p_auroc", "aupro")}, indent=2))
    print(f"done in {time.time() - started:.0f} s. Look at {summary['report']} and the heatmap "
          f"overlays in {report_dir / 'overlays'}")
    return summary
