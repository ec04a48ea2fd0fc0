#!/usr/bin/env python3
"""Few-shot experiment: train on K good images (K in {5, 10, 50, all}) with three seeds each, evaluate
every model on the full test split, and tabulate mean and spread per K.

    python scripts/fewshot.py --out runs/fewshot [--dataset ROOT --category NAME] [--shots 5 10 50 all]
                              [--seeds 0 1 2] [--epochs N] [--profile lite]

Without --dataset a seeded synthetic dataset is written under OUT/data (60 training images, so that
"all" differs from 50). Run s of a given K uses ``--shots K --shots-seed s`` (which K images:
``MVTecDataset``'s seeded draw, reproducible) and training seed 115 + s (so that "all" also has a
spread, from the heads' initialisation and crop order). Every run's metrics are written as
OUT/runs/K<k>_s<s>/metrics.json (the format of `mafr eval --json`; `mafr table` reads them) and
runs already there are skipped, so an interrupted experiment resumes. The summary is written to
OUT/fewshot.md and OUT/fewshot.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

METRICS = (("I-AUROC", ("i_auroc",)), ("P-AUROC", ("p_auroc",)), ("AUPRO@30%", ("aupro",)),
           ("AUPRO@1%", ("aupro_limits", "0.01")), ("P-AUROC grid", ("grid", "p_auroc")),
           ("AUPRO@30% grid", ("grid", "aupro")))


def _get(doc, path):
    for key in path:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return math.nan if doc is None else float(doc)


def spread(values) -> dict:
    a = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if a.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def summarise(runs: list[dict], shots_order: list[str]) -> tuple[str, dict]:
    rows, doc = [], {}
    for k in shots_order:
        group = [r for r in runs if r["shots"] == k]
        if not group:
            continue
        entry = {label: spread([_get(r["metrics"], path) for r in group]) for label, path in METRICS}
        entry["train_seconds"] = spread([r["train_seconds"] for r in group])
        entry["n_train_images"] = sorted({r["n_train_images"] for r in group})
        doc[k] = entry
        cells = [f"{entry[label]['mean']:.3f} ± {entry[label]['std']:.3f} "
                 f"({entry[label]['min']:.3f}–{entry[label]['max']:.3f})" for label, _ in METRICS]
        rows.append(f"| {k} | {len(group)} | " + " | ".join(cells)
                    + f" | {entry['train_seconds']['mean']:.0f} |")
    header = ("| shots K | runs | " + " | ".join(label for label, _ in METRICS) + " | train s (mean) |\n"
              "|--:|--:|" + "--:|" * len(METRICS) + "--:|")
    return header + "\n" + "\n".join(rows), doc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, default=None, help="dataset ROOT (default: synthetic)")
    parser.add_argument("--category", default="gland")
    parser.add_argument("--shots", nargs="+", default=["5", "10", "50", "all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the profile's")
    parser.add_argument("--profile", default="lite", choices=["lite", "paper"])
    parser.add_argument("--synthetic-train", type=int, default=60)
    args = parser.parse_args(argv)

    from mafr_ros.evaluate import evaluate
    from mafr_ros.train import TrainConfig, train

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    root = args.dataset
    if root is None:
        from mafr_ros.data.synthetic import generate_dataset

        root = out / "data"
        if not (root / args.category).is_dir():
            generate_dataset(root, seed=0, categories=[args.category], n_train=args.synthetic_train)
    cache = out / "cache"
    runs = []
    started = time.time()
    for k in args.shots:
        for s in args.seeds:
            run_dir = out / "runs" / f"K{k}_s{s}"
            metrics_path = run_dir / "metrics.json"
            record_path = run_dir / "run.json"
            if metrics_path.is_file() and record_path.is_file():
                runs.append(json.loads(record_path.read_text()))
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg = TrainConfig(profile=args.profile, epochs=args.epochs, seed=115 + s,
                              shots=None if k == "all" else int(k), shots_seed=s, progress=False,
                              cache_dir=str(cache))
            t0 = time.time()
            meta = train(root, args.category, run_dir / "model.safetensors", cfg)
            train_seconds = time.time() - t0
            metrics = evaluate(run_dir / "model.safetensors", root, args.category, json_path=metrics_path,
                               progress=False, cache_dir=cache)
            record = {"shots": k, "seed": s, "train_seconds": train_seconds,
                      "n_train_images": len(meta["training"]["files"]),
                      "epochs": meta["training"]["epochs"], "metrics": metrics}
            record_path.write_text(json.dumps(record, indent=2))
            runs.append(record)
            print(f"K={k} seed={s}: I-AUROC {metrics['i_auroc']:.3f} P-AUROC {metrics['p_auroc']:.3f} "
                  f"AUPRO {metrics['aupro']:.3f} ({train_seconds:.0f} s)", flush=True)
    table, doc = summarise(runs, args.shots)
    epochs = sorted({r["epochs"] for r in runs})
    from mafr_ros.machine import cpu_model, gpu_name

    cpu = cpu_model()
    import torch

    gpu = gpu_name()
    settings = (f"profile {args.profile}, dataset {root} category {args.category}, epochs {epochs}, "
                f"seeds {args.seeds} (shots seed s, training seed 115 + s), test split evaluated in full; "
                f"machine {cpu}, {os.cpu_count()} cores, GPU {gpu}, torch {torch.__version__}, "
                f"Python {platform.python_version()}; wall time {time.time() - started:.0f} s")
    text = ("mean ± std (min–max) over the seeds; metrics at the original resolution unless "
            "marked grid\n\n" + table + "\n\n" + settings + "\n")
    (out / "fewshot.md").write_text(text)
    (out / "fewshot.json").write_text(json.dumps({"summary": doc, "settings": settings,
                                                  "runs": runs}, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
