"""The `mafr` command: one entry point for data, training, evaluation and the demo.

Heavy modules (torch, open3d, rclpy) are imported inside each sub-command so that `mafr --help`
answers instantly.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EPILOG = """\
typical workflow:
  mafr synth --out data/synth --seed 0                       # synthetic parts, MVTec 3D-AD layout
  mafr preprocess --dataset data/synth                       # optional: fill the preprocessing cache
  mafr train --dataset data/synth --category <name> --profile lite --out models/mine.safetensors
  mafr eval --dataset data/synth --category <name> --checkpoint models/mine.safetensors --json m.json
  mafr demo                                                  # all of the above, end to end
  mafr node --ros-args -p checkpoint:=models/mine.safetensors # the ROS 2 node (see README)

A dataset ROOT holds <category>/{train,validation,test} exactly as MVTec 3D-AD does
(rgb/*.png, xyz/*.tiff organised point clouds in metres, gt/*.png masks for test defects).
"""


# Named sets of `mafr train` flags (--preset NAME): each is applied under the flags given on the
# command line, which override it one by one (extractor options key by key).
TRAIN_PRESETS = {
    # Chosen for real parts by pseudo-defect cross-validation on MVTec 3D-AD cable_gland
    # (docs/real_parts.md): the nearest-neighbour memory bank over turn-invariant lite descriptors,
    # an image score (the reference's max / sqrt(mean)) that leaves out the silhouette band. With
    # a bank the heads do not score, so one epoch gives the same bank, scores and thresholds.
    "real-parts": {
        "profile": "lite",
        "flags": ("--memory-bank 10000 --erode 4 --epochs 1 "
                  "--extractor-option rgb.hog_invariant=true "
                  "--extractor-option rgb.census_invariant=true"),
    },
}


# Loss terms whose weight `mafr train --loss-weight TERM=W` sets (LossConfig.w_<TERM>): the
# published ones, and the per-pixel MSE restoration term the lite profile trains with.
LOSS_TERMS = ("similarity", "census", "smoothness", "local_mean", "restoration")


def _add_common(p):
    p.add_argument("-v", "--verbose", action="store_true", help="log more detail")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mafr",
        description="MAFR multi-modal (RGB + 3D) anomaly detection: data, training, evaluation, "
                    "and the ROS 2 node.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("synth", help="write a seeded synthetic dataset (procedural parts with "
                                     "dents, bumps, cracks, stains, missing regions)",
                       description="Write synthetic parts in the MVTec 3D-AD layout: "
                                   "OUT/<category>/{train,validation,test}/...")
    p.add_argument("--out", required=True, type=Path, help="output root folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--categories", nargs="*", default=None, help="part types (default: all)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--train", type=int, default=None, help="training images per category")
    _add_common(p)

    p = sub.add_parser("preprocess", help="run the background-removal preprocessing of a dataset "
                                          "into the cache (input files are never modified)")
    p.add_argument("--dataset", required=True, type=Path, help="dataset ROOT")
    p.add_argument("--category", action="append", help="only these categories (repeatable)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache folder (default $MAFR_CACHE_DIR or ~/.cache/mafr_ros/preprocess)")
    _add_common(p)

    p = sub.add_parser("train", help="train one model for one object class on its good images")
    p.add_argument("--dataset", required=True, type=Path, help="dataset ROOT")
    p.add_argument("--category", required=True, help="object class (folder under ROOT)")
    p.add_argument("--format", choices=["auto", "mvtec", "eyecandies"], default="auto",
                   help="dataset layout (auto: detected from the folders)")
    p.add_argument("--profile", choices=["lite", "paper"], default="lite",
                   help="lite: weight-free descriptors, fast on CPU; paper: DINO ViT-B/8 + Point-MAE "
                        "(needs --rgb-weights and --xyz-weights)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint file to write (.safetensors)")
    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default=None,
                   help="a named set of the flags below; flags given as well override its "
                        "entries. " + "; ".join(f"{name} ({preset['profile']} profile): "
                                               f"{preset['flags']}"
                                               for name, preset in TRAIN_PRESETS.items())
                        + " (the weight-free recipe chosen for real parts, see README)")
    p.add_argument("--epochs", type=int, default=None, help="default: 50 (lite), 100 (paper)")
    p.add_argument("--batch-size", type=int, default=8, help="crops (or whole grids) per step")
    p.add_argument("--crop", type=int, default=None,
                   help="train on random CROP x CROP windows of the feature grid (0: whole grids, "
                        "as the published code; default: 32 (lite), 64 (paper))")
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3 (lite), 1e-3 (paper)")
    p.add_argument("--seed", type=int, default=115)
    p.add_argument("--latent", type=int, default=None,
                   help="fusion latent width (paper: 960; lite: (d2+d3)/2)")
    p.add_argument("--shots", type=int, default=None, help="use only K training images (few-shot)")
    p.add_argument("--shots-seed", type=int, default=0, help="seed of the few-shot selection")
    p.add_argument("--census", choices=["soft", "reference"], default=None,
                   help="census loss form: true soft census (default) or the reference's local mean")
    p.add_argument("--no-mask", action="store_true", help="do not mask invalid pixels in the loss")
    p.add_argument("--loss-weight", action="append", default=[], metavar="TERM=W",
                   help="weight of a loss term (similarity = ZNSSD, census, smoothness, "
                        "local_mean, restoration = per-pixel MSE, the lite profile's only term; 0 "
                        "drops it), repeatable, e.g. --loss-weight census=0 (ablations)")
    p.add_argument("--fusion", choices=["product", "sum", "max", "2d", "3d"], default=None,
                   help="how the 2D and 3D errors combine (default product; 2d/3d: one alone)")
    p.add_argument("--image-score", choices=["reference", "max", "topk"], default=None,
                   help="image score of the smoothed map (default reference: max / sqrt(mean))")
    p.add_argument("--erode", type=float, default=None, metavar="PX",
                   help="image score without the grid pixels within PX of the 3D-feature mask's "
                        "edge (the anomaly map keeps them; default 0: all pixels)")
    p.add_argument("--floor-3d", type=float, default=0.0, metavar="P",
                   help="image score: 3D errors below the P-th percentile (0-100) of the "
                        "calibration images' 3D errors are raised to it before the fusion, so a "
                        "defect seen in 2D only is not damped by a low 3D error (a softer AND than "
                        "the product; the anomaly map keeps the plain fusion; default 0: off)")
    p.add_argument("--memory-bank", type=int, default=None, metavar="N",
                   help="score with the distance to the nearest of N training pixels per modality "
                        "(k-center coreset, stored in the checkpoint) instead of the heads' "
                        "restoration errors (default 0: off)")
    p.add_argument("--bank-rotations", type=int, choices=[1, 2, 4], default=1, metavar="N",
                   help="build the memory bank from the training images turned by every multiple "
                        "of 360/N degrees too (1, 2 or 4; default 1: as they are), for parts that "
                        "lie in any in-plane orientation; needs --memory-bank (redundant with "
                        "rgb.hog_invariant and rgb.census_invariant, which make every lite channel "
                        "turn-invariant)")
    p.add_argument("--bank-pool", type=int, default=None, metavar="N",
                   help="the bank's coreset is chosen from a seeded random sample of at most N "
                        "valid training pixels (default 200000); larger keeps rarer normal "
                        "structure, training time grows with N; needs --memory-bank")
    p.add_argument("--extractor-option", action="append", default=[], metavar="MOD.KEY=VALUE",
                   help="an option of a weight-free (lite) extractor, MOD rgb or xyz, VALUE in JSON "
                        "(numbers, true/false, lists), e.g. rgb.hog_invariant=true (turn-invariant "
                        "orientation channels) or xyz.fpfh=true; repeatable; recorded in the checkpoint")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="image-level false-positive rate on good validation images for the threshold")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--rgb-weights", type=Path, default=None, help="DINO ViT-B/8 weights (paper)")
    p.add_argument("--xyz-weights", type=Path, default=None, help="Point-MAE weights (paper)")
    p.add_argument("--cache-dir", type=Path, default=None)
    _add_common(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a test split or a bag with ground "
                                    "truth (I-AUROC, P-AUROC, AUPRO)",
                       description="Evaluate a checkpoint on a dataset split (--dataset, --category) "
                                   "or on a bag written by `mafr bag make` (--bag): directly (read "
                                   "-> detector -> metrics) or, with --live, through the node "
                                   "(a node process fed the bag in lockstep, its results scored).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", type=Path, help="dataset ROOT")
    source.add_argument("--bag", type=Path, help="rosbag2 folder with ground truth (mafr bag make)")
    p.add_argument("--category", help="object class (with --dataset; a bag names its own)")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--live", action="store_true",
                   help="with --bag: start the node, replay the bag into it one frame at a time "
                        "and score its ~/anomaly results (frames it does not answer are reported)")
    p.add_argument("--frame-timeout", type=float, default=60.0,
                   help="with --live: seconds to wait for the node's answer to one frame")
    p.add_argument("--format", choices=["auto", "mvtec", "eyecandies"], default="auto",
                   help="dataset layout (auto: detected from the folders)")
    p.add_argument("--json", type=Path, default=None,
                   help="write metrics JSON here (keys i_auroc, p_auroc, aupro)")
    p.add_argument("--report", type=Path, default=None,
                   help="folder for the Markdown/JSON report, heatmap overlays and curves")
    p.add_argument("--split", default="test")
    p.add_argument("--record", action="store_true",
                   help="also keep the metrics in the checkpoint's metadata (its 'metrics' entry, "
                        "one evaluation per dataset split or bag, the latest replacing an earlier "
                        "one; the weights and model id stay the same)")
    p.add_argument("--device", default="auto")
    p.add_argument("--rgb-weights", type=Path, default=None)
    p.add_argument("--xyz-weights", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    _add_common(p)

    p = sub.add_parser("table", help="gather per-class metrics JSON files (mafr eval --json) into "
                                     "paper-style tables (classes as columns, mean last)")
    p.add_argument("runs", nargs="+", type=Path,
                   help="one metrics JSON file or folder of them per run (method/variant)")
    p.add_argument("--out", required=True, type=Path, help="Markdown file to write (JSON beside it)")
    p.add_argument("--name", action="append", default=None,
                   help="row name of each run, in order (default: the file or folder name)")
    p.add_argument("--title", default="MAFR results")
    _add_common(p)

    p = sub.add_parser("node", help="run the ROS 2 node (arguments after `node` go to ROS, e.g. "
                                    "--ros-args -p checkpoint:=FILE -r __ns:=/cam)",
                       add_help=False)
    p.add_argument("ros_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("demo", help="the main job, offline, in a few minutes: synthetic parts -> "
                                    "lite model -> bag -> the live node -> evaluation report")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true",
                   help="train a fresh lite model instead of using the embedded default")
    p.add_argument("--test-good", type=int, default=10, help="good test parts (default 10)")
    p.add_argument("--test-per-defect", type=int, default=4,
                   help="test parts per defect type (default 4; 5 defect types)")
    p.add_argument("--device", default="auto", help="the node's torch device")
    _add_common(p)

    from .bag.cli import add_bag_parser  # light: argparse only, no rclpy/rosbags
    add_bag_parser(sub)
    return parser


def _cmd_synth(args):
    from .data.synthetic import generate_dataset
    kwargs = {"seed": args.seed, "categories": args.categories, "size": args.size}
    if args.train is not None:
        kwargs["n_train"] = args.train
    paths = generate_dataset(args.out, **kwargs)
    print(f"wrote {len(paths)} categories under {args.out}: " + ", ".join(Path(p).name for p in paths))


def _cmd_preprocess(args):
    from tqdm import tqdm
    from .data.formats import open_dataset
    from .data.mvtec import list_categories
    from .data.preprocess import PreprocessCache, PreprocessConfig, preprocess_sample
    cache = PreprocessCache(args.cache_dir) if args.cache_dir else PreprocessCache()
    cfg = PreprocessConfig()
    categories = args.category or list_categories(args.dataset)
    count = 0
    for category in categories:
        for split in ("train", "validation", "test"):
            try:
                dataset = open_dataset(args.dataset, category, split)
            except Exception as exc:  # a class without a validation split, say
                print(f"skip {category}/{split}: {exc}")
                continue
            for i in tqdm(range(len(dataset)), desc=f"{category}/{split}"):
                preprocess_sample(dataset[i], cfg, cache)
                count += 1
    print(f"preprocessed {count} samples into {cache.cache_dir}")


def parse_extractor_options(items, profile: str) -> dict:
    """{"rgb": {...}, "xyz": {...}} of ``--extractor-option MOD.KEY=VALUE`` items (VALUE in JSON),
    checked against the profile's extractors; a ValueError names the bad item."""
    options: dict = {}
    for item in items:
        key, eq, text = item.partition("=")
        modality, dot, name = key.partition(".")
        if not eq or not dot or modality not in ("rgb", "xyz") or not name:
            raise ValueError(f"--extractor-option {item!r}: expected rgb.KEY=VALUE or xyz.KEY=VALUE, "
                             "e.g. rgb.hog_bins=0")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"--extractor-option {item!r}: the value must be JSON (a number, "
                             "true/false, a list such as [7, 15])") from None
        options.setdefault(modality, {})[name] = value
    if options:
        from .core.detector import check_extractor_options
        from .core.profiles import get_profile
        try:
            check_extractor_options(get_profile(profile), options)
        except ValueError as exc:
            raise ValueError(f"--extractor-option: {exc}") from None
    return options


def apply_train_preset(args) -> argparse.Namespace:
    """``args`` of `mafr train` with its ``--preset`` filled in: every flag of the preset whose
    option was not given on the command line takes the preset's value; extractor options are
    merged key by key (the command line's win). Unchanged without a preset."""
    if not args.preset:
        return args
    preset = TRAIN_PRESETS[args.preset]
    if args.profile != preset["profile"]:
        raise SystemExit(f"mafr train: error: --preset {args.preset} is a recipe of the "
                         f"{preset['profile']} profile, not of --profile {args.profile}")
    parser = build_parser()
    base = ["train", "--dataset", "-", "--category", "-", "--out", "-"]
    defaults = vars(parser.parse_args(base))
    values = vars(parser.parse_args(base + preset["flags"].split()))
    merged = argparse.Namespace(**vars(args))
    for key, value in values.items():
        if value == defaults[key]:
            continue
        if key == "extractor_option":  # later items win in parse_extractor_options
            merged.extractor_option = list(value) + list(args.extractor_option)
        elif getattr(args, key) == defaults[key]:
            setattr(merged, key, value)
    return merged


def train_config_from_args(args):
    """The TrainConfig that `mafr train` builds from its parsed arguments (also used by research
    scripts that take `mafr train` flags, such as scripts/pseudo_defects_eval.py), its
    ``--preset`` applied. Bad values end the program with a `mafr train: error:` message."""
    from .core.scoring import ScoringConfig
    from .train import TrainConfig, profile_loss
    args = apply_train_preset(args)
    loss = profile_loss(args.profile)  # the profile's loss; --census/--loss-weight change it
    if args.census:
        loss.census = args.census
    if args.no_mask:
        loss.mask_invalid = False
    for item in args.loss_weight:
        term, _, value = item.partition("=")
        if term not in LOSS_TERMS:
            raise SystemExit(f"mafr train: error: --loss-weight {item!r}: unknown term {term!r}; use "
                             f"{', '.join(LOSS_TERMS[:-1])} or {LOSS_TERMS[-1]}")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not weight >= 0:
            raise SystemExit(f"mafr train: error: --loss-weight {item!r}: the weight must be a number "
                             ">= 0, as in census=0.5")
        setattr(loss, f"w_{term}", weight)
    try:
        extractor_options = parse_extractor_options(args.extractor_option, args.profile)
    except ValueError as exc:
        raise SystemExit(f"mafr train: error: {exc}") from None
    chosen = {"fusion": args.fusion, "image_score": args.image_score, "erode": args.erode}
    try:  # both configs validate their values
        scoring = ScoringConfig(**{k: v for k, v in chosen.items() if v is not None})
        cfg = TrainConfig(
            profile=args.profile, epochs=args.epochs, batch_size=args.batch_size, crop=args.crop,
            lr=args.lr, seed=args.seed, latent=args.latent, shots=args.shots,
            shots_seed=args.shots_seed, target_fpr=args.target_fpr, device=args.device,
            dataset_format=args.format, loss=loss, loss_from_profile=False, scoring=scoring,
            backbone_weights={k: str(v) for k, v in
                              (("rgb", args.rgb_weights), ("xyz", args.xyz_weights)) if v},
            cache_dir=str(args.cache_dir) if args.cache_dir else None,
            memory_bank=args.memory_bank or 0, bank_rotations=args.bank_rotations,
            **({"bank_pool": args.bank_pool} if args.bank_pool is not None else {}),
            extractor_options=extractor_options, floor_3d_percentile=args.floor_3d,
            preset=args.preset)
    except ValueError as exc:
        raise SystemExit(f"mafr train: error: {exc}") from None
    return cfg


def _cmd_train(args):
    from .train import train
    cfg = train_config_from_args(args)
    meta = train(args.dataset, args.category, args.out, cfg)
    t = meta["training"]
    print(f"wrote {args.out} ({meta['model_id']}): {len(t['files'])} images, {t['epochs']} epochs, "
          f"{t['seconds']['total']:.1f} s on {t['device']}; image threshold "
          f"{meta['thresholds']['image']:.4g} (calibrated on {t['calibration']})")


def _cmd_eval(args):
    from .errors import InputError
    from .evaluate import evaluate
    weights = {k: str(v) for k, v in (("rgb", args.rgb_weights), ("xyz", args.xyz_weights)) if v}
    if args.live and args.bag is None:
        raise InputError("--live replays a bag into the node: give --bag BAG")
    if args.bag is not None:
        return _cmd_eval_bag(args, weights)
    if not args.category:
        raise InputError("--dataset needs --category (the object class folder under ROOT)")
    summary = evaluate(args.checkpoint, args.dataset, args.category, out_dir=args.report,
                       json_path=args.json, device=args.device, split=args.split,
                       cache_dir=args.cache_dir, backbone_weights=weights or None,
                       dataset_format=args.format)
    print(json.dumps({k: summary[k] for k in ("category", "model_id", "i_auroc", "p_auroc", "aupro")},
                     indent=2))
    if "report" in summary:
        print(f"report: {summary['report']}")
    if args.record:
        _record(args, summary, {"dataset": str(args.dataset), "category": args.category,
                                "split": args.split})


def _record(args, summary, source):
    from .evaluate import record_metrics
    record_metrics(args.checkpoint, summary, source)
    print(f"recorded in {args.checkpoint} (metadata 'metrics', source {json.dumps(source)})")


def _cmd_eval_bag(args, weights):
    from .bag.evaluate import evaluate_bag, evaluate_bag_live
    from .errors import InputError
    if args.live:
        if weights:
            raise InputError("--live runs the node, which loads the backbone files recorded in the "
                             "checkpoint; --rgb-weights/--xyz-weights apply to direct evaluation")
        summary = evaluate_bag_live(args.bag, args.checkpoint, out_dir=args.report,
                                    json_path=args.json, device=args.device,
                                    frame_timeout=args.frame_timeout)
    else:
        summary = evaluate_bag(args.bag, args.checkpoint, out_dir=args.report, json_path=args.json,
                               device=args.device, backbone_weights=weights or None)
    print(json.dumps({k: summary[k] for k in ("mode", "category", "model_id", "n_frames",
                                              "i_auroc", "p_auroc", "aupro")}, indent=2))
    if "report" in summary:
        print(f"report: {summary['report']}")
    if args.record:
        _record(args, summary, {"bag": str(args.bag), "mode": summary["mode"]})
    if summary.get("n_missing"):
        print(f"mafr eval: {summary['n_missing']} of {summary['n_frames']} frames got no result "
              "from the node (left out of the metrics): " + "; ".join(
                  f"{m['name']}: {m['reason']}" for m in summary["missing"][:5]), file=sys.stderr)
        return 1
    return 0


def _cmd_table(args):
    from .report import table_from_paths
    md_path, json_path = table_from_paths(args.runs, args.out, names=args.name, title=args.title)
    print(f"wrote {md_path} and {json_path}")


def _cmd_demo(args):
    from .demo import run_demo
    summary = run_demo(args.out, seed=args.seed, retrain=args.retrain,
                       n_test_good=args.test_good, n_test_per_defect=args.test_per_defect,
                       device=args.device)
    return 1 if summary["n_missing"] else 0


def _cmd_bag(args):
    from .bag.cli import run_bag
    run_bag(args)


COMMANDS = {"synth": _cmd_synth, "preprocess": _cmd_preprocess, "train": _cmd_train,
            "eval": _cmd_eval, "demo": _cmd_demo, "table": _cmd_table}

COMMANDS["bag"] = _cmd_bag


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["node"]:
        # Everything after `node` belongs to ROS (--ros-args ...) and to the node's own -h.
        from .ros.node import main as node_main
        return node_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[%(levelname)s] %(name)s: %(message)s")
    from .errors import MafrError
    try:
        code = COMMANDS[args.command](args)  # None, or an exit code (mafr eval --live: missing)
    except MafrError as exc:
        print(f"mafr {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
