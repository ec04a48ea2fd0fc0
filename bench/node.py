#!/usr/bin/env python3
"""End-to-end benchmark of the mafr node over DDS (three processes: camera, node, observer).

What is measured, and with which clock (all on the one machine clock, CLOCK_REALTIME):

1. Latency, single 640x480 frames (the real Kinect frame, rgb8 + 16UC1 depth), one at a time:
   * end to end = result arrival - input stamp. The camera process builds its messages first and
     stamps them right before publishing; the observer takes the arrival time first thing in its
     subscription callback. So the span is publish -> AnomalyResult received: the inputs' DDS
     transfer and deserialisation, the node's work, the detector, the result's transfer.
   * detector = AnomalyResult.processing_time (Detector.detect, measured by the detector).
   * node overhead = end to end - detector: everything the node and the middleware add.
   * its breakdown from the node's /diagnostics (stage.*: input = stamp -> set complete in the
     node, wait = slot -> worker, convert, handoff = the detector call beyond the detector's
     own time (to the detector process and back), regions, result) and the result's own transfer
     (arrival - stamp - AnomalyResult.latency, the latter taken by the node right before its
     publish call, which is part of the transfer).
2. Sustained input: the camera publishes at --rate Hz for --duration s. The node's /diagnostics
   give the processed / dropped / failed split; the synchroniser's pending queues, the node's
   resident set size and the result latency, each compared between the first and the last third
   of the run, show whether anything grows (nothing may: latest-wins drops instead of queueing).

Transport: --transport large-shm (default) runs every process with bench/fastdds_large_frames.xml
(Fast DDS shared memory with a segment that holds whole frames; see the file for why);
--transport default keeps Fast DDS's built-in transports (512 KiB shared-memory segments: 640x480
rgb8 frames are then partly repaired by reliable retransmission, which shows as a long tail).

Camera: the camera process serialises each frame before stamping it and publishes the CDR bytes
with the stamp written in (as a C++ driver's publish costs next to nothing); with
--camera-python-publish it converts its Python messages after stamping instead (rclpy's
Python -> CDR conversion, about 1 ms per 640x480 frame here, then counts as overhead).

Usage: python bench/node.py [--frames 20] [--duration 60] [--transport large-shm|default]
       [--checkpoint FILE] [--device cpu]
Prints Markdown tables with the machine and the load average before and after. DDS stays on
loopback (ROS_AUTOMATIC_DISCOVERY_RANGE) in a domain of its own.
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
PROFILE = REPO / "bench" / "fastdds_large_frames.xml"
sys.path.insert(0, str(REPO / "test" / "procs"))

import numpy as np  # noqa: E402
import yaml  # noqa: E402


def _seconds(duration) -> float:
    return duration.sec + duration.nanosec * 1e-9


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


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
    return (f"{cpu}, {os.cpu_count()} cores, GPU {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.platform()}")


def _ms(values, q):
    return float(np.percentile(values, q)) * 1e3 if len(values) else float("nan")


def _num(text, default=float("nan")) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return default


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20, help="single frames for the latency phase")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of sustained input")
    parser.add_argument("--rate", type=float, default=30.0, help="input rate of the sustained phase")
    parser.add_argument("--transport", default="large-shm", choices=["large-shm", "default"])
    parser.add_argument("--checkpoint", default="", help="default: the embedded lite model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--source", default="kinect", choices=["kinect", "synthetic"])
    parser.add_argument("--camera-python-publish", action="store_true",
                        help="the camera converts its Python messages to CDR after stamping "
                             "(default: serialised before stamping, as a C++ driver publishes)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME:=VALUE",
                        help="a node parameter, as ros2 run's -p (repeatable), e.g. "
                             "detector.isolation:=thread")
    args = parser.parse_args()
    extra_params = {}
    for item in args.param:
        name, sep, value = item.partition(":=")
        if not sep or not name:
            parser.error(f"--param {item!r}: expected NAME:=VALUE")
        extra_params[name] = yaml.safe_load(value)  # typed as a ROS parameter file would
    if args.transport == "large-shm":
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(PROFILE)  # node, camera and observer
    else:
        os.environ.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)

    from diagnostic_msgs.msg import DiagnosticArray
    from node_harness import CameraProcess, Observer, diagnostic_values, stamp_ns

    from mafr_ros.bag.live import NodeProcess

    from mafr_ros.msg import AnomalyResult

    load_before = _load()
    serialized = not args.camera_python_publish
    ns = f"/bench_{os.getpid()}"
    node_name = f"{ns}/mafr"
    params = {"qos.input.reliability": "reliable", "device": args.device,
              "diagnostics.period": 0.5}
    if args.checkpoint:
        params["checkpoint"] = args.checkpoint
    params.update(extra_params)
    log = Path(tempfile.mkdtemp(prefix="mafr_bench_")) / "node.log"

    observer = Observer("mafr_bench_observer")
    result_topic = f"{node_name}/anomaly"
    observer.subscribe(AnomalyResult, result_topic)
    observer.subscribe(DiagnosticArray, "/diagnostics")
    # The shipped parameters file first, as a deployment would; the -p values override it.
    node = NodeProcess(ns, params, log, params_file=REPO / "config" / "mafr.yaml")
    camera = None

    def node_status(after_ns: int = 0, before_ns: int = 2 ** 63):
        """[(arrival_ns, detector values, input values)] of the node's /diagnostics."""
        out = []
        with observer._cond:
            pairs = list(zip(observer.messages["/diagnostics"], observer.arrivals["/diagnostics"]))
        for msg, arrived in pairs:
            if not after_ns <= arrived < before_ns:
                continue
            found = diagnostic_values(msg, f"{node_name}: detector")
            if found:
                inputs = diagnostic_values(msg, f"{node_name}: inputs")
                out.append((arrived, found[2], inputs[2] if inputs else {}))
        return out

    try:
        camera = CameraProcess(ns)
        reply = camera.cmd(timeout=600, op="wait", topics=["rgb", "info", "depth"])
        if not all(reply["subscribers"].values()):
            raise SystemExit(f"the node did not come up:\n{node.log()}")

        # -- 1. latency, one frame at a time ---------------------------------------------------
        e2e, detector, result_transfer = [], [], []
        for i in range(args.frames + 1):
            stamp = camera.cmd(op="frame", source=args.source, stamp="now", info_delay=0.0,
                               serialized=serialized)["sent"]
            result = observer.with_stamp(result_topic, stamp, timeout=300)
            arrived = observer.arrival_of(result_topic, result)
            if i == 0:
                continue  # first frame: lazy allocations on both sides
            e2e.append((arrived - stamp) / 1e9)
            detector.append(_seconds(result.processing_time))
            result_transfer.append((arrived - stamp) / 1e9 - _seconds(result.latency))
        overhead = np.array(e2e) - np.array(detector)
        time.sleep(1.5)  # the next /diagnostics covers every frame of this phase
        latency_phase = node_status()[-1][1]

        # -- 2. sustained input -----------------------------------------------------------------
        n = int(round(args.duration * args.rate))
        started = time.time_ns()
        sent = camera.cmd(timeout=args.duration * 3 + 120, op="burst", n=n,
                          period=1.0 / args.rate, source=args.source,
                          serialized=serialized)["sent"]
        ended = time.time_ns()
        wall = (ended - started) / 1e9
        # Let the last frame finish: poll the node's status until every matched set is
        # processed, dropped or failed (a loaded machine can need more than one detector time).
        deadline = time.time() + max(30.0, 30 * float(np.median(detector)))
        time.sleep(max(1.0, 2 * float(np.median(detector))))
        while True:
            after = node_status()[-1][1]
            settled = int(after.get("frames_matched", 0)) - sum(
                int(after.get(k, 0)) for k in ("frames_processed", "frames_dropped",
                                               "frames_failed"))
            if settled <= 0 or time.time() > deadline:
                break
            time.sleep(0.5)
        run = node_status(started, ended)
        third = (ended - started) // 3
        early = [s for s in run if s[0] < started + third]
        late = [s for s in run if s[0] >= ended - third]

        sent_set = set(sent)
        with observer._cond:
            pairs = list(zip(observer.messages[result_topic], observer.arrivals[result_topic]))
        results = [(stamp_ns(m.header.stamp), arrived, m) for m, arrived in pairs
                   if stamp_ns(m.header.stamp) in sent_set]
        sus_e2e = np.array([(a - s) / 1e9 for s, a, _ in results])
        sus_det = np.array([_seconds(m.processing_time) for _, _, m in results])
        at = np.array([s - sent[0] for s, _, _ in results]) / 1e9
        early_results = at < args.duration / 3 if len(at) else np.zeros(0, bool)
        late_results = at >= 2 * args.duration / 3 if len(at) else np.zeros(0, bool)
        first, last = sus_e2e[early_results], sus_e2e[late_results]
        first_det, last_det = sus_det[early_results], sus_det[late_results]
        delta = {k: int(after.get(k, 0)) - int(latency_phase.get(k, 0))
                 for k in ("frames_matched", "frames_processed", "frames_dropped", "frames_failed")}

        def pending(statuses):
            return max((sum(int(v) for k, v in s[2].items() if k.startswith("sync.pending"))
                        for s in statuses), default=-1)

        def rss(statuses):
            values = [_num(s[1].get("rss_mb")) for s in statuses]
            return float(np.nanmedian(values)) if values else float("nan")

        load_after = _load()
        camera_mode = "pre-serialised" if serialized else "Python messages"
        print(f"\n## mafr node, end to end over DDS ({args.source} frame 640x480 rgb8 + 16UC1, "
              f"{args.device}, reliable QoS, transport {args.transport}, camera publishes "
              f"{camera_mode})\n")
        print(f"Machine: {_machine(args.device)}\n")
        print(f"Load average (1, 5, 15 min): before {load_before}; after {load_after}\n")
        print(f"Model: {after.get('model_id', '?')}\n")
        print("| Latency, single frames (n = %d) | median ms | p95 ms |" % len(e2e))
        print("|---|---|---|")
        print(f"| end to end (publish -> result received) | {_ms(e2e, 50):.1f} | "
              f"{_ms(e2e, 95):.1f} |")
        print(f"| detector (processing_time) | {_ms(detector, 50):.1f} | {_ms(detector, 95):.1f} |")
        print(f"| **node overhead (difference)** | **{_ms(overhead, 50):.1f}** | "
              f"**{_ms(overhead, 95):.1f}** |")
        print(f"| ratio end to end / detector (medians) | "
              f"{np.median(e2e) / np.median(detector):.3f} | |")
        print("| breakdown of the overhead (node diagnostics, its clock): | | |")
        for stage, what in (("input", "input: stamp -> set complete in the node (DDS + take)"),
                            ("wait", "wait: set complete -> worker starts it"),
                            ("convert", "convert: messages -> arrays, checks"),
                            ("handoff", "handoff: detector call beyond the detector's own time "
                                        "(request to the detector process and reply)"),
                            ("regions", "regions: connected regions of the map"),
                            ("result", "result: build AnomalyResult")):
            print(f"| &nbsp; {what} | {latency_phase.get(f'stage.{stage}_median_ms', 'nan')} | "
                  f"{latency_phase.get(f'stage.{stage}_p95_ms', 'nan')} |")
        print(f"| &nbsp; result transfer: node's publish call -> observer callback | "
              f"{_ms(result_transfer, 50):.2f} | {_ms(result_transfer, 95):.2f} |")
        print(f"| &nbsp; &nbsp; of which the node's publish call | "
              f"{latency_phase.get('stage.publish_median_ms', 'nan')} | "
              f"{latency_phase.get('stage.publish_p95_ms', 'nan')} |")
        print(f"| node's own work (convert + regions + result + publish call, diagnostics) | "
              f"{latency_phase.get('node_overhead_median_ms', 'nan')} | "
              f"{latency_phase.get('node_overhead_p95_ms', 'nan')} |")
        print(f"| &nbsp; the same as worker-thread CPU time (without preemption by other "
              f"processes) | {latency_phase.get('stage.cpu_median_ms', 'nan')} | "
              f"{latency_phase.get('stage.cpu_p95_ms', 'nan')} |")
        print()
        print(f"| Sustained input, {args.rate:g} Hz for {args.duration:g} s | value |")
        print("|---|---|")
        print(f"| sets published / achieved input rate | {n} / {n / wall:.1f} Hz |")
        print(f"| matched by the node | {delta['frames_matched']} |")
        print(f"| processed (results) | {delta['frames_processed']} "
              f"({delta['frames_processed'] / max(1, delta['frames_matched']):.1%}), "
              f"{delta['frames_processed'] / wall:.2f} Hz |")
        print(f"| dropped (latest wins) | {delta['frames_dropped']} "
              f"({delta['frames_dropped'] / max(1, delta['frames_matched']):.1%}) |")
        print(f"| failed | {delta['frames_failed']} |")
        print(f"| unaccounted (matched - processed - dropped - failed) | "
              f"{delta['frames_matched'] - delta['frames_processed'] - delta['frames_dropped'] - delta['frames_failed']} |")
        print(f"| end-to-end latency median, first / last third | {_ms(first, 50):.0f} / "
              f"{_ms(last, 50):.0f} ms |")
        print(f"| end-to-end latency p95, first / last third | {_ms(first, 95):.0f} / "
              f"{_ms(last, 95):.0f} ms |")
        print(f"| detector median, first / last third | {_ms(first_det, 50):.0f} / "
              f"{_ms(last_det, 50):.0f} ms |")
        print(f"| end to end - detector (includes waiting for the busy worker), median first / "
              f"last third | {_ms(first - first_det, 50):.0f} / {_ms(last - last_det, 50):.0f} ms |")
        print(f"| synchroniser pending messages (both inputs), max over first / last third | {pending(early)} / "
              f"{pending(late)} |")
        print(f"| node resident set, median first / last third | {rss(early):.0f} / "
              f"{rss(late):.0f} MiB |")
        inputs_after = node_status()[-1][2]
        for topic in sorted(k[: -len(" received")] for k in inputs_after if k.endswith(" received")):
            if "camera_info" in topic:
                continue
            print(f"| {topic}: received / unmatched by the synchroniser / lost (DDS), whole run | "
                  f"{inputs_after.get(topic + ' received')} / "
                  f"{inputs_after.get('sync.unmatched ' + topic, '-')} / "
                  f"{inputs_after.get(topic + ' lost')} |")
    finally:
        if camera is not None:
            camera.stop()
        node.stop()
        observer.close()


if __name__ == "__main__":
    main()
