#!/usr/bin/env python3
"""End-to-end benchmark of the mafr node over DDS (three processes: camera, node, observer).

1. Latency: single 640x480 frames (the real Kinect frame, 16UC1 depth), one at a time. For each:
   end-to-end latency = result received - input stamp (the camera stamps with the shared system
   clock right before publishing), the detector's own time = AnomalyResult.processing_time, and
   node overhead = the difference (DDS transfer of the inputs and of the result, conversions,
   synchronisation, regions, result building). Median and p95. The node's own share without
   DDS (its diagnostics' node_overhead_*_ms) is printed beside it.
2. Sustained input: the camera publishes at 30 Hz for --duration seconds; the node's
   /diagnostics give the processed / dropped split, the synchroniser's pending queues show
   whether anything grows, and result latency early vs late in the run shows whether the node
   falls behind (it must not: latest-wins drops instead of queueing).

Usage: python bench/node.py [--frames 20] [--duration 60] [--checkpoint FILE] [--device cpu]
Prints a Markdown table with the machine. DDS stays on loopback (ROS_AUTOMATIC_DISCOVERY_RANGE)
in a domain of its own.
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 90 + 10))

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test" / "procs"))

import numpy as np  # noqa: E402

from node_harness import (CameraProcess, NodeProcess, Observer, diagnostic_values,  # noqa: E402
                          stamp_ns)


def _seconds(duration) -> float:
    return duration.sec + duration.nanosec * 1e-9


def _machine(device: str) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    gpu = torch.cuda.get_device_name(0) if device != "cpu" and torch.cuda.is_available() else "-"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, GPU {gpu}, load average {load}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def _pct(values, q):
    return float(np.percentile(values, q)) * 1e3 if len(values) else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20, help="single frames for the latency phase")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of 30 Hz input")
    parser.add_argument("--rate", type=float, default=30.0, help="input rate of the sustained phase")
    parser.add_argument("--checkpoint", default="", help="default: the embedded lite model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--source", default="kinect", choices=["kinect", "synthetic"])
    args = parser.parse_args()

    ns = f"/bench_{os.getpid()}"
    params = {"qos.input.reliability": "reliable", "device": args.device,
              "diagnostics.period": 0.5}
    if args.checkpoint:
        params["checkpoint"] = args.checkpoint
    log = Path(tempfile.mkdtemp(prefix="mafr_bench_")) / "node.log"
    from diagnostic_msgs.msg import DiagnosticArray

    from mafr_ros.msg import AnomalyResult

    observer = Observer("mafr_bench_observer")
    result_topic = f"{ns}/mafr/anomaly"
    observer.subscribe(AnomalyResult, result_topic)
    observer.subscribe(DiagnosticArray, "/diagnostics")
    node = NodeProcess(ns, params, log)
    camera = None
    try:
        camera = CameraProcess(ns)
        reply = camera.cmd(timeout=600, op="wait", topics=["rgb", "info", "depth"])
        if not all(reply["subscribers"].values()):
            raise SystemExit(f"the node did not come up:\n{node.log()}")

        # -- 1. latency, one frame at a time ---------------------------------------------------
        e2e, detector, node_side = [], [], []
        for i in range(args.frames + 1):
            stamp = camera.cmd(op="frame", source=args.source, stamp="now", info_delay=0.0)["sent"]
            result = observer.with_stamp(result_topic, stamp, timeout=300)
            received = time.time_ns()
            if i == 0:
                continue  # first frame: lazy allocations on both sides
            e2e.append((received - stamp) / 1e9)
            detector.append(_seconds(result.processing_time))
            node_side.append(_seconds(result.latency))
        overhead = np.array(e2e) - np.array(detector)

        def detector_values():
            for msg in reversed(list(observer.messages["/diagnostics"])):
                found = diagnostic_values(msg, f"{ns}/mafr: detector")
                if found:
                    inputs = diagnostic_values(msg, f"{ns}/mafr: inputs")
                    return found[2], inputs[2] if inputs else {}
            return {}, {}

        time.sleep(1.5)
        # The node's own work per frame (its diagnostics: conversions, checks, regions, result).
        before, _ = detector_values()
        own = (before.get("node_overhead_median_ms", "nan"), before.get("node_overhead_p95_ms", "nan"))

        # -- 2. sustained input -----------------------------------------------------------------
        n = int(round(args.duration * args.rate))
        started = time.time_ns()
        sent = camera.cmd(timeout=args.duration * 3 + 120, op="burst", n=n,
                          period=1.0 / args.rate, source=args.source)["sent"]
        wall = (time.time_ns() - started) / 1e9
        time.sleep(max(3.0, 3 * float(np.median(detector))))  # let the last frame finish
        after, inputs = detector_values()
        sent_set = set(sent)
        results = [m for m in list(observer.messages[result_topic])
                   if stamp_ns(m.header.stamp) in sent_set]
        late = [(stamp_ns(m.header.stamp) - sent[0]) / 1e9 for m in results]
        lat = np.array([_seconds(m.latency) for m in results])
        first = lat[np.array(late) < args.duration / 3] if len(lat) else lat
        last = lat[np.array(late) > 2 * args.duration / 3] if len(lat) else lat
        delta = {k: int(after.get(k, 0)) - int(before.get(k, 0))
                 for k in ("frames_matched", "frames_processed", "frames_dropped", "frames_failed")}
        pending = {k.split(" ", 1)[1]: v for k, v in inputs.items() if k.startswith("sync.pending")}

        print(f"\n## mafr node, end to end over DDS ({args.source} frame 640x480, "
              f"{args.device}, reliable QoS)\n")
        print(f"Machine: {_machine(args.device)}\n")
        print(f"Model: {after.get('model_id', '?')}\n")
        print("| Latency, single frames (n = %d) | median ms | p95 ms |" % len(e2e))
        print("|---|---|---|")
        print(f"| end to end (stamp -> result received) | {_pct(e2e, 50):.1f} | {_pct(e2e, 95):.1f} |")
        print(f"| detector (processing_time) | {_pct(detector, 50):.1f} | {_pct(detector, 95):.1f} |")
        print(f"| node overhead (difference) | {_pct(overhead, 50):.1f} | {_pct(overhead, 95):.1f} |")
        print(f"| node-side latency (AnomalyResult.latency) | {_pct(node_side, 50):.1f} | "
              f"{_pct(node_side, 95):.1f} |")
        print(f"| node's own work per frame (diagnostics, DDS excluded) | {own[0]} | {own[1]} |")
        print()
        print(f"| Sustained input, {args.rate:g} Hz for {args.duration:g} s | value |")
        print("|---|---|")
        print(f"| sets published / achieved input rate | {n} / {n / wall:.1f} Hz |")
        print(f"| matched by the node | {delta['frames_matched']} |")
        print(f"| processed (results) | {delta['frames_processed']} "
              f"({delta['frames_processed'] / max(1, delta['frames_matched']):.1%}), "
              f"{delta['frames_processed'] / wall:.2f} Hz |")
        print(f"| dropped (latest wins) | {delta['frames_dropped']} |")
        print(f"| failed | {delta['frames_failed']} |")
        print(f"| result latency median, first third / last third | {_pct(first, 50):.0f} / "
              f"{_pct(last, 50):.0f} ms |")
        print(f"| synchroniser pending at the end | {pending} |")
    finally:
        if camera is not None:
            camera.stop()
        node.stop()
        observer.close()


if __name__ == "__main__":
    main()
