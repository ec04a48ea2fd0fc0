"""The ``mafr bag`` sub-commands: make, play, record, info (wired into ``mafr_ros.cli``)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from pathlib import Path

from . import layout

BAG_EPILOG = f"""\
topic layout of `mafr bag make` (one frame per dataset sample, one header stamp per frame):
  <ns>/{layout.RGB:<30} sensor_msgs/Image rgb8 (the raw dataset image)
  <ns>/{layout.CAMERA_INFO:<30} sensor_msgs/CameraInfo (K and P of the pinhole)
  <ns>/{layout.DEPTH:<30} sensor_msgs/Image 32FC1 metres, NaN = no point
  <ns>/{layout.POINTS:<30} sensor_msgs/PointCloud2 organised, float32 x y z
  <ns>/{layout.GT_MASK:<30} sensor_msgs/Image mono8, 255 = defect
  {layout.SAMPLE_TOPIC:<34} std_msgs/String JSON {{{", ".join(layout.SAMPLE_KEYS)}}}

examples:
  mafr bag make --dataset data/synth --category gland --out bags/gland
  mafr bag info bags/gland
  mafr node --ros-args -r __ns:=/camera &
  mafr bag play bags/gland --rate 0.5 --clock
  mafr bag record --out bags/results --topics /camera/mafr/anomaly --duration 30
"""


def add_bag_parser(sub) -> None:
    """Add the ``bag`` command and its sub-commands to the top-level sub-parsers."""
    bag = sub.add_parser("bag", help="rosbag2 tools: make bags from datasets, play, record, info",
                         description="rosbag2 folders without a ROS install (rosbags): sqlite3 "
                                     "(.db3) or MCAP, metadata version 8 (Humble) or 9 (Jazzy).",
                         epilog=BAG_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = bag.add_subparsers(dest="bag_command", metavar="VERB")
    verbs.required = True

    def storage_options(p):
        p.add_argument("--storage", choices=layout.STORAGES, default=layout.DEFAULT_STORAGE,
                       help="storage plugin (default sqlite3)")
        p.add_argument("--version", type=int, choices=layout.VERSIONS,
                       default=layout.DEFAULT_VERSION,
                       help="rosbag2 metadata version: 8 reads on ROS 2 Humble and newer, 9 on "
                            "Jazzy and newer (default 8)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the output folder if it is a rosbag2 folder")

    p = verbs.add_parser("make", help="write a dataset split (MVTec 3D-AD layout) as a bag",
                         epilog=BAG_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, type=Path, help="dataset ROOT")
    p.add_argument("--category", required=True, help="category folder under ROOT")
    p.add_argument("--split", default="test", help="train, validation or test (default test)")
    p.add_argument("--out", required=True, type=Path, help="bag folder to create")
    storage_options(p)
    p.add_argument("--rate", type=float, default=layout.DEFAULT_RATE_HZ,
                   help="frames per second of bag time (default 2)")
    p.add_argument("--inputs", choices=layout.INPUTS, default="both",
                   help="3D topics to write: depth image, point cloud or both (default both)")
    p.add_argument("--namespace", default=layout.DEFAULT_NAMESPACE,
                   help="namespace of the camera topics (default /camera)")
    p.add_argument("--frame-id", default=layout.DEFAULT_FRAME_ID,
                   help="header frame_id of every message (default camera_color_optical_frame)")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--start-ns", type=int, default=None,
                   help="header stamp of frame 0 in ns since the epoch (default: now); fix it for "
                        "reproducible bags")
    p.add_argument("--intrinsics", choices=("auto", "fit", "dataset"), default="auto",
                   help="auto: <category>/calibration/intrinsics.json if present, else a "
                        "least-squares fit of K to the clouds; fit: always fit; dataset: require "
                        "the file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = verbs.add_parser("play", help="publish a bag's messages (undecoded) with recorded timing")
    p.add_argument("bag", type=Path, help="bag folder")
    p.add_argument("--rate", type=float, default=1.0, help="speed factor (default 1.0)")
    p.add_argument("--loop", action="store_true", help="repeat until interrupted")
    p.add_argument("--start-offset", type=float, default=0.0, metavar="S",
                   help="skip the first S seconds of the bag")
    p.add_argument("--clock", type=float, nargs="?", const=100.0, default=None, metavar="HZ",
                   help="publish rosgraph_msgs/Clock on /clock at HZ (default 100) with bag time")
    p.add_argument("--remap", nargs="+", default=None, metavar="FROM:=TO",
                   help="publish bag topic FROM as TO")
    p.add_argument("--qos-reliability", choices=("reliable", "best_effort"), default="reliable",
                   help="publisher reliability (default reliable: matches every subscriber)")
    p.add_argument("--qos-depth", type=int, default=10, help="publisher keep-last depth")
    p.add_argument("--topics", nargs="+", default=None, metavar="T", help="play only these topics")
    p.add_argument("--exclude", nargs="+", default=None, metavar="T", help="leave these out")
    p.add_argument("--delay", type=float, default=0.0, metavar="S",
                   help="sleep S seconds after creating the publishers (discovery) before playing")
    p.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="S",
                   help="before playing, wait up to S seconds until every played topic has a "
                        "subscriber (then play anyway)")
    p.add_argument("--node-name", default="mafr_bag_player")

    p = verbs.add_parser("record", help="record topics of the live graph into a bag")
    p.add_argument("--out", required=True, type=Path, help="bag folder to create")
    p.add_argument("--topics", nargs="+", required=True, metavar="T", help="topics to record")
    storage_options(p)
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: until interrupted)")
    p.add_argument("--max-messages", type=int, default=None, metavar="N",
                   help="stop after N messages in all")
    p.add_argument("--qos-reliability", choices=("reliable", "best_effort"), default=None,
                   help="subscription reliability (default: adapt to the publishers)")
    p.add_argument("--qos-depth", type=int, default=100, help="subscription keep-last depth")
    p.add_argument("--node-name", default="mafr_bag_recorder")

    p = verbs.add_parser("info", help="summary of a bag, like `ros2 bag info`")
    p.add_argument("bag", type=Path, help="bag folder")

    for verb in verbs.choices.values():
        verb.add_argument("-v", "--verbose", action="store_true", help="log more detail")


def _make(args) -> None:
    from .make import make_bag

    result = make_bag(args.dataset, args.category, args.out, split=args.split,
                      storage=args.storage, version=args.version, rate=args.rate,
                      inputs=args.inputs, namespace=args.namespace, frame_id=args.frame_id,
                      limit=args.limit, start_ns=args.start_ns, intrinsics=args.intrinsics,
                      overwrite=args.overwrite, progress=not args.no_progress)
    k = result.intrinsics
    how = ("fitted to the clouds by least squares" if result.intrinsics_source == "fit"
           else "from calibration/intrinsics.json")
    print(f"wrote {result.path}: {result.frames} frames, {sum(result.counts.values())} messages, "
          f"{result.storage} (metadata version {result.version}), {result.seconds:.1f} s")
    print(f"K {how}: fx={k.fx:.3f} fy={k.fy:.3f} cx={k.cx:.3f} cy={k.cy:.3f} ({k.width}x{k.height})")
    print(f"reprojection residual: RMS {result.residual_rms_px:.4f} px, max "
          f"{result.residual_max_px:.4f} px over {result.residual_points} valid pixels "
          f"(stored in metadata.yaml custom_data '{layout.CUSTOM_DATA_KEY}')")


def _info(args) -> None:
    from .reader import bag_info, format_bag_info

    print(format_bag_info(bag_info(args.bag)))


@contextlib.contextmanager
def _ros_node(name: str, stop: threading.Event):
    """An rclpy context + node whose SIGINT/SIGTERM set ``stop`` (clean exit, code 0)."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    def request_stop(*_):
        # Not stop.set() here: the handler runs in the main thread, possibly while that thread
        # holds the Event's internal lock inside stop.wait(), and the lock is not reentrant.
        threading.Thread(target=stop.set, daemon=True).start()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    context = rclpy.Context()
    # args=[]: rcl must not parse our own command line (it reads 'A:=B' of --remap as a global,
    # deprecated remap rule of the process).
    rclpy.init(args=[], context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node(name, context=context)
    try:
        yield node
    finally:
        node.destroy_node()
        context.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _play(args) -> None:
    from .player import BagPlayer, player_qos

    stop = threading.Event()
    qos = player_qos(args.qos_reliability, args.qos_depth)
    with _ros_node(args.node_name, stop) as node:
        player = BagPlayer(node, args.bag, rate=args.rate, loop=args.loop,
                           start_offset=args.start_offset, clock=args.clock, remap=args.remap,
                           qos=qos, topics=args.topics, exclude=args.exclude)
        with player:
            if args.wait_for_subscribers > 0 and not player.wait_for_subscribers(
                    args.wait_for_subscribers, stop_event=stop):
                if not stop.is_set():
                    lonely = [t for t, n in player.subscriber_counts().items() if n == 0]
                    print(f"no subscriber after {args.wait_for_subscribers:g} s on: "
                          f"{', '.join(lonely)}; playing anyway", flush=True)
            if args.delay > 0:
                stop.wait(args.delay)
            stats = player.play(stop) if not stop.is_set() else None
    if stats is None:
        print("interrupted before playing", flush=True)
    else:
        print(stats.format(), flush=True)


def _record(args) -> None:
    from .recorder import BagRecorder

    stop = threading.Event()
    with _ros_node(args.node_name, stop) as node:
        recorder = BagRecorder(node, args.out, args.topics, storage=args.storage,
                               version=args.version, reliability=args.qos_reliability,
                               depth=args.qos_depth, max_messages=args.max_messages,
                               overwrite=args.overwrite)
        stats = recorder.record(duration=args.duration, stop_event=stop)
    print(stats.format(), flush=True)


VERBS = {"make": _make, "play": _play, "record": _record, "info": _info}


def run_bag(args) -> None:
    """Dispatch ``mafr bag <verb>``."""
    VERBS[args.bag_command](args)
