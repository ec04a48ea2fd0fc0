"""Per-frame cost of the node's message plumbing on one CPU core, beside a plain memory copy.

    python bench/plumbing.py [--frames N] [--no-pin]

The target is "all of it together <= 5 ms per frame on one core" for a 640x480 RGB-D camera:
rgb8 Image -> array, 16UC1 depth Image -> array, camera_info -> intrinsics, depth -> organised xyz
(preallocated output), a 307,200-point organised PointCloud2 -> xyz array, and a 32FC1 heatmap
array -> Image. Input messages are serialised and deserialised through rclpy first, so their
``data`` is exactly what a subscription callback receives.

Each stage is timed with time.perf_counter_ns in every frame, next to np.copyto of the same number
of bytes (the physical floor for touching that data once), measured in the same loop so that both
see the same cache and clock state. Medians and 95th percentiles are printed as a Markdown table.
The thread's CPU time (time.thread_time_ns) is printed too: on a shared machine the wall-clock
numbers include time the core spent on other processes, the CPU time does not.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
import time

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from mafr_ros.geometry import depth_to_xyz  # noqa: E402
from mafr_ros.machine import cpu_model  # noqa: E402
from mafr_ros.ros.conversions import (  # noqa: E402
    array_to_image, camera_info_to_intrinsics, depth_from_image, image_to_array,
    pointcloud2_to_xyz, rgb_from_image, xyz_to_pointcloud2)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kinect_rgbd"
HEIGHT, WIDTH = 480, 640


def machine() -> str:
    model = cpu_model()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    return (f"{model}; {os.cpu_count()} logical cores (this process may use {affinity}); "
            f"Python {platform.python_version()}; NumPy {np.__version__}; {platform.platform()}")


def frame_arrays():
    """The real Kinect frame when the shared data is present, otherwise a synthetic one."""
    try:
        import tifffile
        rgb = tifffile.imread(next(DATA.glob("*_rgb.tiff")))
        depth = tifffile.imread(next(DATA.glob("*_depth.tiff")))
        source = f"real Kinect frame from {DATA}"
    except (ImportError, StopIteration, OSError):
        rng = np.random.default_rng(0)
        rgb = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        depth = rng.integers(400, 4000, (HEIGHT, WIDTH), dtype=np.uint16)
        depth[rng.random((HEIGHT, WIDTH)) < 0.1] = 0
        source = "synthetic frame (shared data not found)"
    return rgb, depth, source


def received(msg, msg_type):
    """The message as a subscriber gets it (data deserialised into an array.array)."""
    return deserialize_message(serialize_message(msg), msg_type)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="timed frames (>= 100)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-pin", action="store_true", help="do not pin to CPU core 0")
    args = parser.parse_args(argv)
    if args.frames < 100:
        parser.error("--frames must be >= 100 for a stable p95")

    pinned = "not pinned"
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        pinned = f"pinned to core {core}"

    rgb, depth, source = frame_arrays()
    header = Header(frame_id="camera_color_optical_frame")
    rgb_msg = received(array_to_image(rgb, "rgb8", header), Image)
    bgr_msg = received(array_to_image(rgb[..., ::-1], "bgr8", header), Image)
    depth_msg = received(array_to_image(depth, "16UC1", header), Image)
    info = CameraInfo(header=header, width=WIDTH, height=HEIGHT, distortion_model="plumb_bob")
    info.k = np.array([525.0, 0, 320, 0, 525, 240, 0, 0, 1])
    info.p = np.array([525.0, 0, 320, 0, 0, 525, 240, 0, 0, 0, 1, 0])
    info.d = [0.0] * 5
    info = received(info, CameraInfo)
    intrinsics = camera_info_to_intrinsics(info)
    xyz_out = np.empty((HEIGHT, WIDTH, 3), dtype=np.float32)
    depth_to_xyz(depth, intrinsics, out=xyz_out)
    cloud_msg = received(xyz_to_pointcloud2(xyz_out, header), PointCloud2)  # PCL XYZ, point_step 16
    cloud_out = np.empty((HEIGHT, WIDTH, 3), dtype=np.float32)
    heatmap = np.random.default_rng(1).random((HEIGHT, WIDTH), dtype=np.float32)

    def stage_depth_to_xyz():
        array, scale = depth_from_image(depth_msg)
        depth_to_xyz(array, intrinsics, depth_scale=scale, out=xyz_out)

    stages = [  # (name, function, bytes touched, counted in the total)
        ("rgb8 Image -> array (view)", lambda: image_to_array(rgb_msg), rgb.nbytes, True),
        ("16UC1 Image -> array (view)", lambda: depth_from_image(depth_msg), depth.nbytes, True),
        ("CameraInfo -> intrinsics", lambda: camera_info_to_intrinsics(info), 0, True),
        ("depth -> xyz (out=, 3.7 MB)", stage_depth_to_xyz, xyz_out.nbytes, True),
        ("PointCloud2 307,200 pts -> xyz (out=)",
         lambda: pointcloud2_to_xyz(cloud_msg, out=cloud_out), len(cloud_msg.data), True),
        ("32FC1 heatmap -> Image", lambda: array_to_image(heatmap, "32FC1", header),
         heatmap.nbytes, True),
        ("bgr8 Image -> owned RGB copy (extra)", lambda: rgb_from_image(bgr_msg), rgb.nbytes,
         False),
    ]
    buffers = {n: (np.ones(n, dtype=np.uint8), np.empty(n, dtype=np.uint8))
               for _, _, n, _ in stages if n}
    times = np.zeros((len(stages), args.frames), dtype=np.int64)
    cpu_times = np.zeros((len(stages), args.frames), dtype=np.int64)
    copies = np.zeros((len(stages), args.frames), dtype=np.int64)
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for frame in range(-args.warmup, args.frames):
        for index, (_, function, nbytes, _) in enumerate(stages):
            cpu_start = cpu_clock()
            start = clock()
            function()
            elapsed = clock() - start
            cpu_elapsed = cpu_clock() - cpu_start
            copy_elapsed = 0
            if nbytes:
                src, dst = buffers[nbytes]
                start = clock()
                np.copyto(dst, src)
                copy_elapsed = clock() - start
            if frame >= 0:
                times[index, frame], copies[index, frame] = elapsed, copy_elapsed
                cpu_times[index, frame] = cpu_elapsed

    def us(values, q=50):
        return np.percentile(values, q) / 1e3

    print(f"**Machine:** {machine()}; {pinned}.")
    print(f"**Input:** {source}; {args.frames} frames after {args.warmup} warm-up frames.\n")
    print("| stage | bytes | median µs | p95 µs | CPU median µs "
          "| np.copyto same bytes, median µs | ratio to copy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for index, (name, _, nbytes, _) in enumerate(stages):
        copy_text, ratio_text = "n/a", "n/a"
        if nbytes:
            copy_us = us(copies[index])
            copy_text, ratio_text = f"{copy_us:.1f}", f"{us(times[index]) / copy_us:.2f}"
        print(f"| {name} | {nbytes:,} | {us(times[index]):.1f} | {us(times[index], 95):.1f} | "
              f"{us(cpu_times[index]):.1f} | {copy_text} | {ratio_text} |")
    counted = np.array([counted for *_, counted in stages])
    total = times[counted].sum(axis=0)
    total_copy = copies[counted].sum(axis=0)
    print(f"| **total per frame (all but extra)** | {sum(s[2] for s in stages if s[3]):,} | "
          f"**{us(total):.1f}** | {us(total, 95):.1f} | {us(cpu_times[counted].sum(axis=0)):.1f} | "
          f"{us(total_copy):.1f} | "
          f"{us(total) / us(total_copy):.2f} |")
    verdict = "meets" if us(total) <= 5000 else "MISSES"
    print(f"\nMedian total {us(total) / 1e3:.2f} ms per frame {verdict} the 5 ms one-core budget.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
