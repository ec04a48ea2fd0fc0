#!/usr/bin/env python3
"""Ablation of MAFR's design choices, as one table, on synthetic parts and on the real MVTec 3D-AD
cable_gland subset (smoke test: its 60 training and 15 test images).

    python scripts/ablation.py --out runs/ablation [--datasets synthetic cable_gland]
                               [--epochs-synthetic 50] [--epochs-real 50] [--profile lite]

Variants, and what each costs:

- scoring only (one trained model, the same restored features scored differently, no training):
  fused product (the paper) / 2D error only / 3D error only / sum / max;
- training (one model each, same seed, same epochs): the package default (the profile's recipe; for
  lite: standardised features, per-pixel MSE only) / all losses (the published ZNSSD + soft census +
  local-mean anchor + smoothness, plus the MSE; invalid pixels masked) / similarity only / soft
  census only / all losses with the reference's local-mean "census" instead of the true soft census /
  all losses with invalid-pixel masking off. The scoring variants use the package-default model.

Each trained variant is a real ``train.train`` run (what ``mafr train`` does, with the profile's
options; only the loss settings differ) and is scored through ``Detector.extract`` /
``anomaly_maps`` and ``evaluate.compute_metrics`` (I-AUROC, P-AUROC, AUPRO at the original image
resolution), as ``mafr eval`` does; the scoring variants re-fuse the same two error maps.
Epochs default to 50, the lite profile's default schedule (the README table: 16 min synthetic +
22 min cable_gland on one thread of the 2-core dev machine); lower them for a quick look. They are
stated in the output. Results: OUT/ablation.md and OUT/ablation.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CABLE_GLAND_ROOT = REPO.parent / "shared" / "data" / "mvtec3d"

SCORING_VARIANTS = (("fused: product (paper)", "product"), ("2D only", "2d"), ("3D only", "3d"),
                    ("fused: sum", "sum"), ("fused: max", "max"))
# Every published term plus the per-pixel MSE ("restoration"), invalid pixels masked, true soft census.
_ALL = {"w_similarity": 1.0, "w_census": 1.0, "w_local_mean": 1.0, "w_smoothness": 1.0,
        "w_restoration": 1.0, "census": "soft", "mask_invalid": True}
_NONE = {k: 0.0 for k in _ALL if k.startswith("w_")}
LOSS_VARIANTS = (
    ("package default (the profile's recipe)", {}),
    ("all losses (ZNSSD + soft census + local mean + smoothness + MSE)", _ALL),
    ("similarity (ZNSSD) only", {**_ALL, **_NONE, "w_similarity": 1.0}),
    ("soft census only", {**_ALL, **_NONE, "w_census": 1.0}),
    ("all losses, reference local-mean 'census' instead of soft census", {**_ALL, "census": "reference"}),
    ("all losses, invalid-pixel masking off", {**_ALL, "mask_invalid": False}),
)


def _score(detector, inputs, samples, modes, category, batch=4):
    """Metrics of a trained detector on preprocessed test inputs, for every fusion mode in
    ``modes``: the restored features are computed once (``Detector.extract`` + ``error_maps``,
    the path of ``mafr eval``) and only the fusion of the two error maps differs."""
    import dataclasses

    from mafr_ros.core.scoring import score_errors
    from mafr_ros.data.preprocess import map_to_input
    from mafr_ros.evaluate import compute_metrics

    errors = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        rgb = torch.from_numpy(np.stack([i.rgb for i in chunk]))
        xyz = torch.from_numpy(np.stack([i.xyz for i in chunk]))
        with torch.no_grad():
            f2d, f3d, mask = detector.extract(rgb, xyz)
            r2d, r3d = detector.error_maps(f2d, f3d, mask)
        errors.append((r2d, r3d, mask))
    run_base = {"samples": samples, "inputs": inputs, "labels": np.array([s.label for s in samples])}
    out = {}
    for mode in modes:
        maps, scores = [], []
        cfg = dataclasses.replace(detector.scoring_cfg, fusion=mode)
        for r2d, r3d, mask in errors:
            smoothed, image_scores = score_errors(r2d, r3d, mask, cfg)
            maps.append(smoothed.float().cpu().numpy())
            scores.append(image_scores.float().cpu().numpy())
        grid_maps = np.concatenate(maps)
        run = dict(run_base, grid_maps=grid_maps, scores=np.concatenate(scores),
                   full_maps=[map_to_input(m, i.frame).astype(np.float32)
                              for m, i in zip(grid_maps, inputs)],
                   seconds_per_image=float("nan"))
        metrics = compute_metrics(category, run)
        out[mode] = {"i_auroc": metrics.i_auroc, "p_auroc": metrics.p_auroc,
                     "aupro": metrics.aupro[0.3], "aupro_0.01": metrics.aupro[0.01],
                     "grid_p_auroc": metrics.extra["grid"]["p_auroc"],
                     "grid_aupro": metrics.extra["grid"]["aupro"][0.3]}
    return out, run_base["labels"]


def run_dataset(name, root, category, epochs, profile, out_dir, train_shots=None, log=print) -> dict:
    """Every variant of one dataset: each training variant is a real ``train.train`` run (the code of
    ``mafr train``, including the profile's options and calibration), scored on the test split."""
    from mafr_ros.core.detector import Detector
    from mafr_ros.core.losses import LossConfig
    from mafr_ros.data.formats import open_dataset
    from mafr_ros.data.preprocess import PreprocessCache, preprocess_sample
    from mafr_ros.train import TrainConfig, profile_loss, train

    started = time.time()
    cache_dir = out_dir / "cache"
    cache = PreprocessCache(cache_dir)
    test_set = open_dataset(root, category, "test")
    test_samples = [test_set[i] for i in range(len(test_set))]
    results = {"scoring": {}, "training": {}}
    n_train, labels = None, None
    for index, (label, overrides) in enumerate(LOSS_VARIANTS):
        # The whole loss is given explicitly (the profile's, then the variant's settings), so the
        # profile cannot override a variant.
        loss = LossConfig.from_dict({**profile_loss(profile).to_dict(), **overrides})
        cfg = TrainConfig(profile=profile, epochs=epochs, progress=False, shots=train_shots,
                          cache_dir=str(cache_dir), loss=loss, loss_from_profile=False)
        checkpoint = out_dir / "models" / f"{name}_{index}.safetensors"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        meta = train(root, category, checkpoint, cfg)
        seconds = time.time() - t0
        n_train = len(meta["training"]["files"])
        detector = Detector.from_checkpoint(checkpoint, device="auto")
        test_inputs = [preprocess_sample(s, detector.preprocess_cfg, cache) for s in test_samples]
        modes = [m for _, m in SCORING_VARIANTS] if not overrides else ["product"]
        scored, labels = _score(detector, test_inputs, test_samples, modes, category)
        results["training"][label] = dict(scored["product"], train_seconds=seconds,
                                          final_loss=meta["training"]["loss_history"][-1],
                                          loss=meta["loss"])
        if not overrides:
            results["scoring"] = {lab: scored[mode] for lab, mode in SCORING_VARIANTS}
        log(f"{name} / {label}: I-AUROC {scored['product']['i_auroc']:.3f} P-AUROC "
            f"{scored['product']['p_auroc']:.3f} AUPRO {scored['product']['aupro']:.3f} "
            f"(trained in {seconds:.0f} s)")
    return {"name": name, "root": str(root), "category": category, "epochs": epochs,
            "n_train": n_train, "n_test": len(test_samples),
            "n_good": int((labels == 0).sum()), "n_defect": int((labels == 1).sum()),
            "seconds": time.time() - started, "results": results}


def table(datasets: list[dict]) -> str:
    metrics = (("I-AUROC", "i_auroc"), ("P-AUROC", "p_auroc"), ("AUPRO@30%", "aupro"))
    header = ["group", "variant"] + [f"{d['name']} {m}" for d in datasets for m, _ in metrics]
    lines = ["| " + " | ".join(header) + " |", "|:--|:--|" + "--:|" * (len(header) - 2)]
    groups = [("scoring (one model)", [lab for lab, _ in SCORING_VARIANTS], "scoring"),
              ("training", [lab for lab, _ in LOSS_VARIANTS], "training")]
    for group, labels, key in groups:
        for lab in labels:
            cells = []
            for d in datasets:
                entry = d["results"][key].get(lab, {})
                cells += [f"{entry[k]:.3f}" if k in entry else "–" for _, k in metrics]
            lines.append(f"| {group} | {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "cable_gland"],
                        choices=["synthetic", "cable_gland"])
    parser.add_argument("--profile", default="lite", choices=["lite", "paper"])
    parser.add_argument("--epochs-synthetic", type=int, default=50)
    parser.add_argument("--epochs-real", type=int, default=50)
    parser.add_argument("--synthetic-train", type=int, default=30)
    parser.add_argument("--mvtec-root", type=Path, default=CABLE_GLAND_ROOT,
                        help="MVTec 3D-AD root holding cable_gland (default ../shared/data/mvtec3d)")
    parser.add_argument("--train-shots", type=int, default=None,
                        help="only this many training images (development runs)")
    args = parser.parse_args(argv)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    done = []
    for name in args.datasets:
        if name == "synthetic":
            from mafr_ros.data.synthetic import generate_dataset

            root, category, epochs = out / "data", "gland", args.epochs_synthetic
            if not (root / category).is_dir():
                generate_dataset(root, seed=0, categories=[category], n_train=args.synthetic_train)
        else:
            root, category, epochs = args.mvtec_root, "cable_gland", args.epochs_real
        done.append(run_dataset(name, root, category, epochs, args.profile, out, args.train_shots,
                                log=lambda m: print(m, flush=True)))
    from mafr_ros.machine import cpu_model, gpu_name

    cpu = cpu_model()
    gpu = gpu_name()
    settings = [f"{d['name']}: {d['root']} / {d['category']}, {d['n_train']} training images, "
                f"{d['n_test']} test images ({d['n_good']} good, {d['n_defect']} defective), "
                f"{d['epochs']} epochs per trained variant, {d['seconds']:.0f} s" for d in done]
    machine = (f"profile {args.profile}; machine {cpu}, {os.cpu_count()} cores, GPU {gpu}, torch "
               f"{torch.__version__}, Python {platform.python_version()}, OMP_NUM_THREADS="
               f"{os.environ.get('OMP_NUM_THREADS', '-')}; total {time.time() - started:.0f} s")
    text = (table(done) + "\n\n" + "\n".join(f"- {s}" for s in settings) + f"\n- {machine}\n")
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps({"datasets": done, "machine": machine}, indent=2,
                                                  default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
