#!/usr/bin/env python3
"""Choose scoring/training options for a real object class without its test images: k-fold
cross-validation on good images with pasted pseudo-defects.

Why: a real product comes with good parts and, at best, a handful of real defects that must stay
an untouched test set. Options such as ``--erode``, ``--image-score`` or ``--memory-bank`` are
therefore compared here on *pseudo*-defects (``mafr_ros/data/pseudo_defects.py``: dents, bumps,
holes, cuts and stains written into the preprocessed model input) pasted into good images the
model of that fold never saw. The numbers are a proxy for real defects, good for ranking options,
not a replacement for the final test.

Protocol (everything is seeded: the same arguments give the same numbers):

1. The training images of ``--dataset/--category`` are taken in the dataset's sorted order.
   Fold k (k = 0 .. folds-1) holds out training images [k*H, (k+1)*H) (H = ``--holdout``) and
   every validation image.
2. The model of fold k is trained by ``mafr_ros.train.train`` (exactly what `mafr train` does,
   with the `mafr train` flags given after ``--``) on the remaining training images only. They
   are presented as a folder of symlinks in the MVTec 3D-AD layout, ``OUT/fold<k>/data/<category>/
   train/good/{rgb,xyz}/``, with no validation split, so the training calibrates its thresholds on
   its own images and never reads a held-out one (checked in the checkpoint's ``training.files``).
   The preprocessing cache is keyed by file content, so the symlinks reuse it.
3. Every held-out good image is preprocessed as in training. For each of them, each pseudo-defect
   kind, each set (``inside``: defects away from the silhouette; ``edge``: centred on any valid
   pixel, so they may reach the border) and each of ``--defects-per-kind`` repeats, one
   pseudo-defective copy is made with its own generator
   ``np.random.default_rng([seed, fold, sample index, kind index, set index, repeat])`` (kind
   index in ``pseudo_defects.ALL_KINDS``, so a kind draws the same defects whatever ``--kinds``
   lists; default kinds: the five of ``DEFECT_KINDS``, ``--kinds ... scratches`` adds the
   oriented-texture kind).
4. The fold's checkpoint scores everything (``Detector.from_checkpoint(...).score_inputs``).
   Per fold and set: image AUROC (held-out good vs pseudo-defective), image AUROC per kind (good
   vs that kind), pixel AUROC over the valid grid pixels of the good and pseudo-defective samples
   (defect masks as ground truth), and the same per kind. Then the mean over the folds.
   Each ``--variant NAME:KEY=VALUE,...`` scores the same samples again with the checkpoint's
   scoring configuration changed as given (erode, sigma, image_score, fusion, ...). The error
   maps are computed once per sample and shared (``Detector.input_errors``, then
   ``scoring.score_errors`` per configuration), so a variant gives exactly what training with
   those scoring flags would give (the bank or heads do not depend on them; a test checks it),
   without the training.
5. OUT/pseudo_defects.json (configuration including the train flags and variants, every fold,
   the means, ``variant_means``, machine and timings) and OUT/pseudo_defects.md (the tables, also
   printed). A fold whose
   checkpoint exists, trained with the same train flags on the same images (OUT/fold<k>/fold.json),
   is reused, so an interrupted run resumes; otherwise it is retrained.

Example (cable_gland, memory-bank scoring; with a bank the heads do not score, so 1 epoch):

    python scripts/pseudo_defects_eval.py --dataset /data/mvtec3d --category cable_gland \\
        --out /tmp/pde/bank10k --folds 2 -- --memory-bank 10000 --erode 4 --image-score max --epochs 1

Everything after ``--`` is parsed by the real `mafr train` parser (see `mafr train --help`);
--dataset, --category and --out are supplied by this script and must not be repeated there.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "pseudo_defects_eval.py"
SETS = ("inside", "edge")
RESULT_JSON = "pseudo_defects.json"
RESULT_MD = "pseudo_defects.md"
FOLD_RECORD = "fold.json"
# Placeholders for the flags `mafr train` requires and this script supplies itself.
_SENTINEL_DATASET = "\0pseudo-defects-dataset"
_SENTINEL_OUT = "\0pseudo-defects-out"


class UsageError(Exception):
    """Bad arguments: reported as `pseudo_defects_eval.py: error: ...`, exit status 2."""


# --------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} --dataset ROOT --category NAME --out DIR [options] [-- MAFR_TRAIN_FLAGS ...]",
        description=doc[0] + "\n\n" + doc[1],
        epilog="Everything after `--` goes to the `mafr train` parser (see `mafr train --help`), "
               "e.g. `-- --memory-bank 10000 --erode 4 --image-score max --epochs 1`; do not repeat "
               "--dataset, --category or --out there. Without `--` the `mafr train` defaults are "
               "used. Protocol and outputs: see the module docstring of this script.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, type=Path,
                        help="dataset ROOT in the MVTec 3D-AD layout")
    parser.add_argument("--category", required=True, help="object class (folder under ROOT)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder (fold models, symlinked fold datasets, results); keep it "
                             "outside the repository")
    parser.add_argument("--folds", type=int, default=2, help="number of folds (default 2)")
    parser.add_argument("--holdout", type=int, default=15,
                        help="training images held out per fold (default 15): fold k holds out "
                             "[k*H, (k+1)*H) of the sorted training images")
    parser.add_argument("--defects-per-kind", type=int, default=1,
                        help="pseudo-defective copies per held-out image, kind and set (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pseudo-defects (default 0)")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS),
                        help="pseudo-defect sets: inside (away from the silhouette), edge (centred "
                             "on any valid pixel); default both")
    parser.add_argument("--score-device", default="cpu",
                        help="torch device that scores the held-out samples (default cpu: "
                             "deterministic; training uses the train flag --device)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per scoring batch")
    parser.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                        help="pseudo-defect kinds (default: dent bump hole cut stain; also "
                             "scratches, an oriented-texture defect with a shallow 3D groove)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,...]",
                        help="also score every fold with the checkpoint's scoring configuration "
                             "changed as given (fields of mafr_ros.core.scoring.ScoringConfig, "
                             "e.g. `e6:erode=6` or `top:image_score=topk,topk_fraction=0.01`); "
                             "repeatable. The error maps are computed once and shared, so variants "
                             "of the scoring cost no training and little time")
    return parser


def parse_variants(specs: list[str]) -> dict:
    """{name: {field: value}} of ``--variant`` specs, each checked against ScoringConfig."""
    from mafr_ros.core.scoring import ScoringConfig

    fields = {f.name: f for f in dataclasses.fields(ScoringConfig)}
    variants = {}
    for spec in specs:
        name, sep, body = spec.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or not body:
            raise UsageError(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...] with a "
                             "name of letters, digits and _.+-, e.g. e6:erode=6")
        if name in variants or name == "checkpoint":
            raise UsageError(f"--variant {spec!r}: the name {name!r} is "
                             + ("reserved for the checkpoint's own scoring" if name == "checkpoint"
                                else "given twice"))
        overrides = {}
        for item in body.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in fields:
                raise UsageError(f"--variant {spec!r}: {key!r} is not a scoring field; use "
                                 f"KEY=VALUE with KEY one of {', '.join(fields)}")
            default = getattr(ScoringConfig(), key)
            try:
                overrides[key] = type(default)(value) if isinstance(default, float) else value
            except ValueError:
                raise UsageError(f"--variant {spec!r}: {key} takes a number, got {value!r}") from None
        try:
            ScoringConfig(**overrides)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--variant {spec!r}: {exc}") from None
        variants[name] = overrides
    return variants


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, the `mafr train` flags after the first `--`)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def parse_train_flags(train_argv: list[str], category: str):
    """The TrainConfig `mafr train` would build from ``train_argv`` (the real parser, so flags
    added to `mafr train` later work here unchanged). Returns (config, parsed namespace)."""
    from mafr_ros.cli import build_parser as mafr_parser, train_config_from_args

    base = ["train", "--dataset", _SENTINEL_DATASET, "--category", category, "--out", _SENTINEL_OUT]
    try:
        args = mafr_parser().parse_args(base + list(train_argv))
    except SystemExit as exc:
        if exc.code in (0, None):  # `-- --help`: the help was printed
            raise
        raise UsageError(f"the `mafr train` flags after -- were refused (message above): "
                         f"{' '.join(train_argv) or '(none)'}") from None
    given = [flag for flag, value, mine in (("--dataset", str(args.dataset), _SENTINEL_DATASET),
                                            ("--category", args.category, category),
                                            ("--out", str(args.out), _SENTINEL_OUT))
             if value != mine]
    if given:
        raise UsageError(f"{', '.join(given)} after -- : this script supplies --dataset, --category "
                         "and --out of every fold's training; give them before the -- only")
    if args.format == "eyecandies":
        raise UsageError("--format eyecandies after --: the folds are symlinked MVTec 3D-AD folders; "
                         "this script reads MVTec 3D-AD datasets only")
    try:
        cfg = train_config_from_args(args)
    except SystemExit as exc:
        raise UsageError(f"{exc.code} (a `mafr train` flag after --)") from None
    cfg.dataset_format = "mvtec"  # the fold folders
    cfg.progress = False
    return cfg, args


def check_script_args(args) -> None:
    if args.folds < 1:
        raise UsageError(f"--folds must be >= 1, got {args.folds}")
    if args.holdout < 1:
        raise UsageError(f"--holdout must be >= 1, got {args.holdout}")
    if args.defects_per_kind < 1:
        raise UsageError(f"--defects-per-kind must be >= 1, got {args.defects_per_kind}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0 (it seeds numpy generators), got {args.seed}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    args.sets = [s for s in SETS if s in args.sets]  # fixed order, no duplicates
    args.variants = parse_variants(args.variant)
    from mafr_ros.data.pseudo_defects import ALL_KINDS, DEFECT_KINDS
    kinds = list(DEFECT_KINDS) if args.kinds is None else list(dict.fromkeys(args.kinds))
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown:
        raise UsageError(f"--kinds {' '.join(unknown)}: unknown; choose from {' '.join(ALL_KINDS)}")
    args.kinds = kinds


# --------------------------------------------------------------------------------------------
# Folds


def source_splits(root: Path, category: str):
    """(training files, validation files) of the source dataset, in the reader's sorted order."""
    from mafr_ros.data.formats import detect_format
    from mafr_ros.data.mvtec import MVTecDataset
    from mafr_ros.errors import DatasetError

    if detect_format(root, category) != "mvtec":
        raise UsageError(f"{root}/{category} is not in the MVTec 3D-AD layout; this script builds its "
                         "folds as symlinked MVTec 3D-AD folders and reads that layout only")
    train_files = MVTecDataset(root, category, "train").files()
    try:
        val_files = MVTecDataset(root, category, "validation").files()
    except DatasetError:
        val_files = []
    return train_files, val_files


def fold_split(n_train: int, fold: int, holdout: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out training indices) of ``fold``."""
    held = list(range(fold * holdout, (fold + 1) * holdout))
    if held[-1] >= n_train:
        raise UsageError(f"fold {fold} holds out training images {held[0]}..{held[-1]} but the "
                         f"category has {n_train} training images; lower --folds or --holdout "
                         f"(folds x holdout <= {n_train})")
    keep = [i for i in range(n_train) if i < held[0] or i > held[-1]]
    if not keep:
        raise UsageError(f"fold {fold} leaves no training image ({n_train} in all, --holdout "
                         f"{holdout}); lower --holdout")
    return keep, held


def _clear_symlink_tree(path: Path) -> None:
    """Remove a fold dataset this script wrote: folders and symlinks only, never a real file."""
    if not path.exists() and not path.is_symlink():
        return
    for p in path.rglob("*"):
        if not p.is_symlink() and not p.is_dir():
            raise UsageError(f"{path} holds a real file ({p}), not only the symlinks this script "
                             "writes; choose another --out")
    shutil.rmtree(path)


def build_fold_dataset(fold_root: Path, category: str, files) -> Path:
    """``fold_root/<category>/train/<type>/{rgb,xyz}/<name>`` symlinks to ``files`` (absolute),
    no validation or test split. Returns fold_root (the dataset ROOT)."""
    _clear_symlink_tree(fold_root)
    for f in files:
        for kind, src in (("rgb", f.rgb_path), ("xyz", f.xyz_path)):
            dst = fold_root / category / "train" / f.defect_type / kind / Path(src).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(src).resolve(), dst)
    return fold_root


def files_signature(files) -> str:
    """Digest of the paths, sizes and modification times of the rgb and xyz files: a rewritten
    dataset at the same paths (say a regenerated synthetic one) does not reuse old checkpoints."""
    digest = hashlib.sha256()
    for f in files:
        for p in (f.rgb_path, f.xyz_path):
            st = Path(p).resolve().stat()
            digest.update(f"{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


_PATH_FIELD = re.compile(r"(rgb_path|xyz_path)=\w*Path\((['\"])(.*?)\2\)")


def recorded_paths(entry: str) -> list[str]:
    """The file paths of one ``training.files`` entry of a checkpoint: a path, or the repr of a
    ``SampleFiles`` (what mafr_ros.train writes today: ``SampleFiles(rgb_path=PosixPath('...'), ...``)."""
    if entry.startswith("SampleFiles("):
        found = [m.group(3) for m in _PATH_FIELD.finditer(entry)]
        if len(found) != 2:
            raise RuntimeError(f"cannot read the file paths of checkpoint entry {entry!r}")
        return found
    return [entry]


def leak_check(checkpoint: Path, held_out_files, expected_train_files) -> dict:
    """Raise unless the checkpoint trained on exactly the expected images and on no held-out one."""
    from mafr_ros.core.checkpoint import read_metadata

    recorded = read_metadata(checkpoint)["training"]["files"]
    used = {str(Path(p).resolve()) for entry in recorded for p in recorded_paths(entry)}
    held = {str(Path(p).resolve()) for f in held_out_files for p in (f.rgb_path, f.xyz_path)}
    expected = {str(Path(p).resolve()) for f in expected_train_files for p in (f.rgb_path, f.xyz_path)}
    leaked = sorted(used & held)
    if leaked:
        raise RuntimeError(f"{checkpoint} was trained on {len(leaked)} held-out files, e.g. "
                           f"{leaked[:3]}: the cross-validation would be meaningless")
    if not used <= expected:
        raise RuntimeError(f"{checkpoint} was trained on files outside its fold: "
                           f"{sorted(used - expected)[:3]}")
    return {"training_images": len(recorded), "held_out_images": len(held_out_files),
            "held_out_in_training": 0}


# --------------------------------------------------------------------------------------------
# Scoring and metrics


def _errors(detector, inputs, batch_size: int):
    """(r2d, r3d, mask) of ``inputs``, each (N,S,S) on the CPU: one extraction pass, shared by
    the checkpoint's scoring and every ``--variant``."""
    import torch

    parts = [detector.input_errors(inputs[start:start + batch_size])
             for start in range(0, len(inputs), batch_size)]
    return (torch.cat([p[0].float().cpu() for p in parts]),
            torch.cat([p[1].float().cpu() for p in parts]),
            torch.cat([p[2].cpu() for p in parts]))


def _score(errors, cfg, batch_size: int):
    """(maps (N,S,S) float32, image scores (N,) float64) of shared error maps under ``cfg``
    (``mafr_ros.core.scoring.score_errors``: what ``Detector.score_inputs`` does)."""
    import numpy as np
    from mafr_ros.core.scoring import score_errors

    r2d, r3d, mask = errors
    maps, scores = [], []
    for start in range(0, r2d.shape[0], batch_size):
        part = slice(start, start + batch_size)
        m, s = score_errors(r2d[part], r3d[part], mask[part], cfg)
        maps.append(m.float().numpy())
        scores.append(s.double().numpy())
    return np.concatenate(maps), np.concatenate(scores)


def _metrics(good_scores, good_pixels, bad_scores, bad_pixels, bad_masks) -> dict:
    """Image AUROC (good vs bad) and pixel AUROC over valid pixels (good + bad samples)."""
    import numpy as np
    from mafr_ros.metrics import image_auroc, pixel_auroc

    scores = np.concatenate([good_scores, bad_scores])
    labels = np.concatenate([np.zeros(len(good_scores), bool), np.ones(len(bad_scores), bool)])
    pix_maps = [p[None] for p in list(good_pixels) + list(bad_pixels)]
    pix_gts = [np.zeros_like(p, bool)[None] for p in good_pixels] + [m[None] for m in bad_masks]
    n_defect_pixels = int(sum(int(m.sum()) for m in bad_masks))
    return {"image_auroc": image_auroc(scores, labels),
            "pixel_auroc": pixel_auroc(pix_maps, pix_gts) if n_defect_pixels else math.nan,
            "n_good": int(len(good_scores)), "n_defective": int(len(bad_scores)),
            "n_defect_pixels": n_defect_pixels,
            "n_empty_masks": int(sum(1 for m in bad_masks if not m.any()))}


def evaluate_fold(checkpoint: Path, good_inputs, fold: int, args, kinds) -> dict:
    """Pseudo-defects on the held-out good inputs, scored by the fold's checkpoint: {scoring
    name: results}, "checkpoint" for the checkpoint's own scoring, then each ``--variant``."""
    import numpy as np
    from mafr_ros.core.detector import Detector
    from mafr_ros.data.pseudo_defects import ALL_KINDS, PseudoDefectConfig, add_pseudo_defect

    detector = Detector.from_checkpoint(checkpoint, device=args.score_device,
                                        backbone_weights=args.backbone_weights or None,
                                        precision="fp32")
    configs = {"checkpoint": detector.scoring_cfg,
               **{name: dataclasses.replace(detector.scoring_cfg, **overrides)
                  for name, overrides in args.variants.items()}}
    good_errors = _errors(detector, good_inputs, args.batch_size)
    made_errors = {}  # (set, kind) -> (errors, masks, valid)
    for set_name in args.sets:
        set_index = SETS.index(set_name)
        cfg = PseudoDefectConfig(inside=(set_name == "inside"))
        for kind in kinds:
            kind_index = ALL_KINDS.index(kind)  # a kind draws the same defects whatever else is run
            made, masks = [], []
            for i, sample in enumerate(good_inputs):
                for r in range(args.defects_per_kind):
                    rng = np.random.default_rng([args.seed, fold, i, kind_index, set_index, r])
                    try:
                        defective, mask = add_pseudo_defect(sample, kind, rng, cfg)
                    except (ValueError, ZeroDivisionError) as exc:
                        # ZeroDivisionError: a zero point spacing, when the images are smaller than
                        # the model grid (upsampled, adjacent grid pixels repeat one point)
                        raise RuntimeError(f"fold {fold}, held-out sample {i}: cannot paste a {kind} "
                                           f"({set_name}): {exc!r}") from None
                    made.append(defective)
                    masks.append(mask[sample.valid])
            made_errors[set_name, kind] = (_errors(detector, made, args.batch_size), masks,
                                           [m.valid for m in made])
    out = {}
    for name, scoring in configs.items():
        good_maps, good_scores = _score(good_errors, scoring, args.batch_size)
        good_pixels = [good_maps[i][good_inputs[i].valid] for i in range(len(good_inputs))]
        results = {"good_scores": {"mean": float(good_scores.mean()),
                                   "max": float(good_scores.max())}}
        for set_name in args.sets:
            per_kind = {}
            for kind in kinds:
                errors, masks, valid = made_errors[set_name, kind]
                maps, scores = _score(errors, scoring, args.batch_size)
                pixels = [maps[j][valid[j]] for j in range(len(valid))]
                per_kind[kind] = {"scores": scores, "pixels": pixels, "masks": masks}
            all_scores = np.concatenate([v["scores"] for v in per_kind.values()])
            all_pixels = [p for v in per_kind.values() for p in v["pixels"]]
            all_masks = [m for v in per_kind.values() for m in v["masks"]]
            entry = _metrics(good_scores, good_pixels, all_scores, all_pixels, all_masks)
            entry["per_kind"] = {kind: _metrics(good_scores, good_pixels, v["scores"], v["pixels"],
                                                v["masks"]) for kind, v in per_kind.items()}
            entry["defective_scores"] = {"mean": float(all_scores.mean()),
                                         "max": float(all_scores.max())}
            results[set_name] = entry
        out[name] = results
    return out


# --------------------------------------------------------------------------------------------
# Output


def _mean(values) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(sum(finite) / len(finite)) if len(finite) == len(values) and finite else math.nan


def fold_means(folds: list[dict], sets, kinds) -> dict:
    means = {}
    for s in sets:
        entry = {k: _mean([f["sets"][s][k] for f in folds]) for k in ("image_auroc", "pixel_auroc")}
        entry["per_kind"] = {kind: {k: _mean([f["sets"][s]["per_kind"][kind][k] for f in folds])
                                    for k in ("image_auroc", "pixel_auroc")} for kind in kinds}
        means[s] = entry
    return means


def _cell(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"


def markdown_table(folds: list[dict], means: dict, sets, kinds) -> str:
    header = ("| set | fold | good | defective | I-AUROC | P-AUROC | "
              + " | ".join(f"I {k}" for k in kinds) + " | train s | score s |")
    rule = "|---|---|--:|--:|--:|--:|" + "--:|" * len(kinds) + "--:|--:|"
    rows = [header, rule]
    for s in sets:
        for f in folds:
            e = f["sets"][s]
            rows.append(f"| {s} | {f['fold']} | {e['n_good']} | {e['n_defective']} | "
                        f"{_cell(e['image_auroc'])} | {_cell(e['pixel_auroc'])} | "
                        + " | ".join(_cell(e["per_kind"][k]["image_auroc"]) for k in kinds)
                        + f" | {f['seconds']['train']:.0f} | {f['seconds']['score']:.0f} |")
        m = means[s]
        rows.append(f"| {s} | **mean** | | | **{_cell(m['image_auroc'])}** | "
                    f"**{_cell(m['pixel_auroc'])}** | "
                    + " | ".join(_cell(m["per_kind"][k]["image_auroc"]) for k in kinds) + " | | |")
    return "\n".join(rows)


def variants_table(means: dict, variant_means: dict, variants: dict, sets, kinds) -> str:
    """Fold means of the checkpoint's scoring and of every ``--variant``, one row per set."""
    header = ("| scoring | set | I-AUROC | P-AUROC | " + " | ".join(f"I {k}" for k in kinds) + " |")
    rows = [header, "|---|---|--:|--:|" + "--:|" * len(kinds)]
    for name, m_all in [("checkpoint", means), *variant_means.items()]:
        label = name if name == "checkpoint" else (
            f"{name} (" + ", ".join(f"{k}={v}" for k, v in variants[name].items()) + ")")
        for s in sets:
            m = m_all[s]
            rows.append(f"| {label} | {s} | {_cell(m['image_auroc'])} | {_cell(m['pixel_auroc'])} | "
                        + " | ".join(_cell(m["per_kind"][k]["image_auroc"]) for k in kinds) + " |")
    return "\n".join(rows)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def machine_info() -> dict:
    import torch
    from mafr_ros.machine import cpu_model, gpu_name, load_average

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_name(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_average_at_end": load_average(),
            "host": platform.node()}


# --------------------------------------------------------------------------------------------
# Main


def run(args, train_argv: list[str]) -> dict:
    cfg, _ = parse_train_flags(train_argv, args.category)
    check_script_args(args)
    args.backbone_weights = dict(cfg.backbone_weights)
    started = time.time()
    started_iso = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    from mafr_ros.data.mvtec import MVTecDataset
    from mafr_ros.data.preprocess import PreprocessCache, preprocess_sample
    from mafr_ros.train import train

    kinds = list(args.kinds)
    dataset = args.dataset.expanduser()
    train_files, val_files = source_splits(dataset, args.category)
    splits = [fold_split(len(train_files), k, args.holdout) for k in range(args.folds)]
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    cache = PreprocessCache(cfg.cache_dir) if cfg.cache_dir is not None else PreprocessCache()
    source_train = MVTecDataset(dataset, args.category, "train")
    source_val = MVTecDataset(dataset, args.category, "validation") if val_files else None

    folds = []
    for k, (keep, held) in enumerate(splits):
        t0 = time.time()
        fold_dir = out / f"fold{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = fold_dir / "model.safetensors"
        record_path = fold_dir / FOLD_RECORD
        fold_train = [train_files[i] for i in keep]
        held_files = [train_files[i] for i in held] + list(val_files)
        identity = {"train_flags": list(train_argv), "category": args.category,
                    "train_files": [str(Path(f.rgb_path).resolve()) for f in fold_train],
                    "train_files_stat": files_signature(fold_train)}
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        reused = (checkpoint.is_file() and record is not None
                  and all(record.get(key) == value for key, value in identity.items()))
        if reused:
            train_seconds = float(record.get("train_seconds", 0.0))
            print(f"fold {k}: reusing {checkpoint} (same train flags and images)", flush=True)
        else:
            record_path.unlink(missing_ok=True)
            root = build_fold_dataset(fold_dir / "data", args.category, fold_train)
            print(f"fold {k}: training on {len(fold_train)} images (held out: training images "
                  f"{held[0]}-{held[-1]} and {len(val_files)} validation images)", flush=True)
            fold_cfg = dataclasses.replace(cfg)  # train() may set fields (the loss): one per fold
            t_train = time.time()
            train(root, args.category, checkpoint, fold_cfg)
            train_seconds = time.time() - t_train
            record_path.write_text(json.dumps({**identity, "train_seconds": train_seconds,
                                               "train_config": _jsonable(dataclasses.asdict(cfg))},
                                              indent=2, default=str))
        leaks = leak_check(checkpoint, held_files, fold_train)

        t_score = time.time()
        good_inputs = ([preprocess_sample(source_train[i], cfg.preprocess, cache) for i in held]
                       + [preprocess_sample(source_val[i], cfg.preprocess, cache)
                          for i in range(len(val_files))])
        results = evaluate_fold(checkpoint, good_inputs, k, args, kinds)
        score_seconds = time.time() - t_score
        from mafr_ros.core.checkpoint import read_metadata
        meta = read_metadata(checkpoint)
        fold = {"fold": k, "checkpoint": str(checkpoint), "model_id": meta.get("model_id"),
                "reused_checkpoint": bool(reused),
                "held_out": {"train_indices": [held[0], held[-1] + 1],
                             "train_files": [str(train_files[i].rgb_path) for i in held],
                             "validation_images": len(val_files)},
                "n_train": len(fold_train), "leak_check": leaks,
                "good_scores": results["checkpoint"]["good_scores"],
                "sets": {s: results["checkpoint"][s] for s in args.sets},
                "variants": {name: {"scoring": args.variants[name],
                                    "good_scores": results[name]["good_scores"],
                                    "sets": {s: results[name][s] for s in args.sets}}
                             for name in args.variants},
                "seconds": {"train": round(train_seconds, 2), "score": round(score_seconds, 2),
                            "total": round(time.time() - t0, 2)}}
        folds.append(fold)
        summary = ", ".join(f"{s} I-AUROC {_cell(fold['sets'][s]['image_auroc'])} "
                            f"P-AUROC {_cell(fold['sets'][s]['pixel_auroc'])}" for s in args.sets)
        print(f"fold {k}: {summary} ({fold['seconds']['total']:.0f} s)", flush=True)

    means = fold_means(folds, args.sets, kinds)
    table = markdown_table(folds, means, args.sets, kinds)
    variant_means = {name: fold_means([{"sets": f["variants"][name]["sets"]} for f in folds],
                                      args.sets, kinds) for name in args.variants}
    if args.variants:
        table += "\n\n" + variants_table(means, variant_means, args.variants, args.sets, kinds)
    wall = time.time() - started
    doc = {
        "config": {"dataset": str(dataset), "category": args.category, "out": str(out),
                   "folds": args.folds, "holdout": args.holdout,
                   "defects_per_kind": args.defects_per_kind, "seed": args.seed,
                   "sets": list(args.sets), "kinds": kinds, "score_device": args.score_device,
                   "batch_size": args.batch_size, "train_flags": list(train_argv),
                   "variants": args.variants,
                   "train_config": dataclasses.asdict(cfg),
                   "n_train_images": len(train_files), "n_validation_images": len(val_files),
                   "pseudo_defect_rng": "np.random.default_rng([seed, fold, held-out sample index, "
                                        "kind index in ALL_KINDS, set index (inside 0, edge 1), "
                                        "repeat])"},
        "folds": folds,
        "mean": means,
        "variant_means": variant_means,
        "machine": machine_info(),
        "time": {"started": started_iso, "wall_seconds": round(wall, 2),
                 "seconds_per_fold": [f["seconds"]["total"] for f in folds]},
    }
    (out / RESULT_JSON).write_text(json.dumps(_jsonable(doc), indent=2, default=str) + "\n")
    flags = " ".join(train_argv) or "(mafr train defaults)"
    text = (f"# Pseudo-defect cross-validation: {args.category}\n\n"
            f"train flags: `{flags}`; {args.folds} folds, {args.holdout} training images held out per "
            f"fold plus {len(val_files)} validation images; {args.defects_per_kind} pseudo-defect(s) "
            f"per held-out image, kind and set; seed {args.seed}.\n"
            "I-AUROC: held-out good vs pseudo-defective images; P-AUROC: valid grid pixels of both; "
            "I <kind>: good vs that kind only.\n\n"
            f"{table}\n\n"
            f"{doc['machine']['cpu']}, {doc['machine']['cores']} cores, torch threads "
            f"{doc['machine']['torch_threads']}; wall time {wall:.0f} s.\n")
    (out / RESULT_MD).write_text(text)
    print("\n" + text, flush=True)
    return doc


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, train_argv = split_argv(argv)
    args = build_parser().parse_args(own)
    try:
        run(args, train_argv)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a package error (bad dataset, corrupt file): one clear line
        from mafr_ros.errors import MafrError
        if isinstance(exc, MafrError):
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
