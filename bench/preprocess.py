"""Per-stage time of the shared preprocessing: the original implementation (method="reference")
against the default one (method="fast"), measured in the same run, interleaved frame by frame so
that both see the same machine load.

    python bench/preprocess.py [--repeats N] [--gland-frames K] [--json PATH]

Frames: the real Kinect RGB-D frame (640 x 480, depth back-projected with the Kinect intrinsics, as
the node does), K real MVTec 3D-AD cable_gland test frames (400 x 400 organised clouds), and one
synthetic gland part (256 x 256, the embedded model's training distribution). Every frame is first
checked to give bit-identical arrays with both methods (rgb, xyz, valid, frame); a mismatch is an
error, not a footnote.

Stages (``preprocess(..., timings=...)``, medians over the repeats, milliseconds):
- plane: validity mask, border-strip RANSAC plane fit and the plane cut;
- cluster: the voxel DBSCAN largest-cluster filter;
- grid: square padding and resizing of both modalities to the model grid;
- total: the whole ``preprocess`` call.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _core_common import markdown_table, median, synthetic_frames  # noqa: E402

from mafr_ros.data.preprocess import METHODS, PreprocessConfig, preprocess  # noqa: E402
from mafr_ros.machine import cpu_model, load_average  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
KINECT_STEM = "frame_20121214T142255.814212"
STAGES = ("plane", "cluster", "grid", "total")


def load_frames(gland_frames: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    import tifffile

    from mafr_ros.data.mvtec import MVTecDataset
    from mafr_ros.geometry import CameraIntrinsics, depth_to_xyz

    kinect = SHARED / "kinect_rgbd"
    if not kinect.is_dir():
        raise SystemExit(f"the shared data is missing ({kinect}): this benchmark measures real frames")
    rgb = np.ascontiguousarray(tifffile.imread(kinect / f"{KINECT_STEM}_rgb.tiff")[..., :3])
    depth = tifffile.imread(kinect / f"{KINECT_STEM}_depth.tiff")
    intrinsics = CameraIntrinsics(fx=525.0, fy=525.0, cx=320.0, cy=240.0, width=640, height=480)
    frames = [(f"Kinect {rgb.shape[1]}x{rgb.shape[0]}", rgb, depth_to_xyz(depth, intrinsics))]
    test = MVTecDataset(SHARED / "mvtec3d", "cable_gland", "test")
    for index in np.linspace(0, len(test) - 1, gland_frames).round().astype(int):
        sample = test[int(index)]
        name = f"{sample.rgb_path.parent.parent.name}/{sample.rgb_path.stem}"
        frames.append((f"cable_gland {name} {sample.rgb.shape[1]}x{sample.rgb.shape[0]}", sample.rgb, sample.xyz))
    rgb, xyz = synthetic_frames(1)[0]
    frames.append((f"synthetic gland {rgb.shape[1]}x{rgb.shape[0]}", rgb, xyz))
    return frames


def check_identical(rgb, xyz, cfg) -> None:
    ref = preprocess(rgb, xyz, cfg, method="reference")
    new = preprocess(rgb, xyz, cfg, method="fast")
    for field in ("rgb", "xyz", "valid"):
        a, b = getattr(ref, field), getattr(new, field)
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            raise SystemExit(f"method='fast' differs from the reference in {field}: fix the fast path "
                             "before timing it")
    if ref.frame != new.frame:
        raise SystemExit("method='fast' returns a different GridFrame than the reference")


def measure(frames, repeats: int, cfg) -> list[dict]:
    results = []
    for name, rgb, xyz in frames:
        check_identical(rgb, xyz, cfg)  # also the warm-up of both paths
        samples = {method: {stage: [] for stage in STAGES} for method in METHODS}
        for _ in range(repeats):
            for method in METHODS:
                timings = {}
                start = time.perf_counter()
                preprocess(rgb, xyz, cfg, method=method, timings=timings)
                timings["total"] = time.perf_counter() - start
                for stage in STAGES:
                    samples[method][stage].append(timings[stage])
        medians = {method: {stage: 1000.0 * median(v) for stage, v in stages.items()}
                   for method, stages in samples.items()}
        results.append({"frame": name, "ms": medians})
        print(f"  {name}: reference {medians['reference']['total']:.1f} ms, "
              f"fast {medians['fast']['total']:.1f} ms", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--gland-frames", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    if args.repeats < 1 or args.gland_frames < 1:
        parser.error("--repeats and --gland-frames must be >= 1")

    cfg = PreprocessConfig()
    frames = load_frames(args.gland_frames)
    load_before = load_average()
    results = measure(frames, args.repeats, cfg)
    load_after = load_average()

    rows = []
    for result in results:
        ref, new = result["ms"]["reference"], result["ms"]["fast"]
        for method, ms in (("reference", ref), ("fast", new)):
            rows.append([result["frame"] if method == "reference" else "", method]
                        + [f"{ms[s]:.1f}" for s in STAGES]
                        + ([""] if method == "reference" else [f"{ref['total'] / new['total']:.2f}x"]))
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
               f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {load_before} before, "
               f"{load_after} after")
    print(f"Preprocessing per stage (median of {args.repeats}, ms; outputs bit-identical on every frame)")
    print(f"Machine: {machine}\n")
    print(markdown_table(["frame", "method", "plane fit", "clustering", "padding/resize", "total",
                          "speed-up"], rows, align="llrrrrr"))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "repeats": args.repeats,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
