"""`make demo` / `mafr demo`: the main job, offline, on this machine, in a few minutes.

synthetic parts (seeded) -> the embedded lite model (or a freshly trained one) -> a rosbag2 of the
test split (`mafr bag make`) -> the ROS 2 node, in its own process, fed the bag by the player one
frame at a time -> its results scored -> a report (Markdown + JSON metrics, heatmap overlays,
ROC/PRO curves) and a line saying where to look.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .core.checkpoint import read_metadata
from .core.detector import default_model_path

#: The node runs in a namespace of its own, so the demo never mixes with a real camera's topics.
DEMO_NAMESPACE = "/mafr_demo"


def run_demo(out_dir, seed: int = 0, retrain: bool = False, n_test_good: int = 10,
             n_test_per_defect: int = 4, size: int = 256, device: str = "auto",
             overlays: int = 12, progress: bool = True) -> dict:
    """Run the demo into ``out_dir``; returns the live evaluation's summary (plus ``bag``).

    ``n_test_good`` good and ``n_test_per_defect`` parts of each defect type make the test split
    (the bag); ``size`` is their image side in pixels.
    """
    from .bag.evaluate import evaluate_bag_live
    from .bag.make import make_bag
    from .data.synthetic import generate_dataset
    from .train import TrainConfig, train

    out_dir = Path(out_dir)
    started = time.time()
    checkpoint = default_model_path()
    if not retrain and not checkpoint.is_file():
        print(f"embedded model {checkpoint} not found: training a fresh one")
        retrain = True
    category = None if retrain else read_metadata(checkpoint)["category"]

    data_root = out_dir / "dataset"
    print(f"[1/4] synthetic parts (seed {seed}, {n_test_good} good + {n_test_per_defect} per "
          f"defect type for testing) -> {data_root}")
    # Training images only when a model is trained here; the embedded one needs the test split.
    counts = {} if retrain else {"n_train": 0, "n_validation": 0}
    generate_dataset(data_root, seed=seed, categories=[category] if category else None,
                     n_test_good=n_test_good, n_test_per_defect=n_test_per_defect, size=size,
                     **counts)
    if category is None:
        category = sorted(p.name for p in data_root.iterdir() if p.is_dir())[0]

    if retrain:
        checkpoint = out_dir / f"lite_{category}.safetensors"
        print(f"[2/4] training a lite model for {category} -> {checkpoint}")
        train(data_root, category, checkpoint,
              TrainConfig(profile="lite", cache_dir=str(out_dir / "cache")))
    else:
        print(f"[2/4] using the embedded default model {checkpoint}")

    bag = out_dir / "bag"
    made = make_bag(data_root, category, bag, split="test", overwrite=True, progress=progress)
    print(f"[3/4] test split -> rosbag2 {bag} ({made.frames} frames: colour, camera_info, depth, "
          f"organised points, ground-truth mask)")

    report_dir = out_dir / "report"
    print(f"[4/4] the node ({DEMO_NAMESPACE}/mafr, its own process) fed the bag frame by frame "
          f"-> {report_dir}")
    summary = evaluate_bag_live(bag, checkpoint, out_dir=report_dir,
                                json_path=report_dir / "metrics.json", device=device,
                                overlays=overlays, progress=progress, namespace=DEMO_NAMESPACE)
    summary["bag"] = str(bag)
    print(json.dumps({k: round(summary[k], 4) if isinstance(summary[k], float) else summary[k]
                      for k in ("category", "model_id", "n_frames", "n_missing", "i_auroc",
                                "p_auroc", "aupro")}, indent=2))
    if summary["n_missing"]:
        print(f"warning: {summary['n_missing']} frames got no result from the node (see "
              f"{summary['node_log']})")
    print(f"done in {time.time() - started:.0f} s. Look at {summary['report']} (metrics), the "
          f"heatmap overlays in {report_dir / 'overlays'}, the ROC and PRO curves "
          f"{report_dir / 'roc.png'} and {report_dir / 'pro.png'}; the node's results are "
          f"recorded in {report_dir / 'node_results'}")
    return summary
