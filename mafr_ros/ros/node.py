"""The ``mafr`` ROS 2 node: synchronised colour + depth (or point cloud) in, anomaly results out.

Data flow (the node only schedules and converts; every model decision is the Detector's)::

    rgb/image_rect_color ----+
    depth_registered/image_rect | points --> ApproximateTimeSync --> latest-wins slot --> worker
    rgb/camera_info --> latest intrinsics per frame_id (cache) ---------------------------^  |
        ~/anomaly (AnomalyResult), ~/heatmap, ~/overlay, ~/mask, ~/markers, ~/anomaly_points <+
        /diagnostics (timer)

Design decisions, and why:

* **camera_info is cached, not synchronised.** The latest camera_info of each optical frame is
  kept (converted to intrinsics, P of the rectified image as depth_image_proc does). Intrinsics of
  a rectified stream do not change per frame, and putting a tiny message into the time
  synchroniser only adds a way to lose image pairs (a driver that stamps camera_info with now()
  instead of the image stamp, a dropped best-effort camera_info). A frame whose frame_id has no
  camera_info yet fails with reason ``no_camera_info`` naming the resolved topic, and the node
  recovers as soon as one arrives. In ``points`` mode an organised, pixel-registered cloud needs
  no intrinsics at all; only an unorganised cloud is projected through camera_info.
* **Registered input only.** Depth (or an organised cloud) must have the colour image's size and
  frame_id; otherwise the frame fails with ``unregistered_input``. Nothing is resampled or guessed:
  pixel-level 2D + 3D fusion is meaningless on unregistered depth.
* **Frames are read where they arrive.** The colour and depth/cloud subscriptions are raw: the
  callback gets the serialised bytes and reads the header fields in place
  (conversions.CdrImage / CdrPointCloud2); the pixels stay a view of the received buffer until
  the worker converts them. rclpy's deserialisation would copy each frame twice with the GIL
  held. A message that cannot be read (truncated) is refused before synchronisation: counted as
  rejected and logged.
* **Callbacks stay short.** A subscription callback only feeds the synchroniser; a matched set is
  checked for stamp order and put into a one-element latest-wins slot. One worker thread converts,
  runs the detector and publishes. A set replaced in the slot before the worker took it is counted
  as dropped, so every matched set is processed, dropped or failed (with a reason).
* **Lazy outputs.** Heatmap, overlay, mask, markers and the anomalous-point cloud are built only
  while someone subscribes (``get_subscription_count() > 0``) and their ``publish.*`` toggle is on.
* **No half-loaded model.** The checkpoint is loaded and warmed up before any subscription exists;
  a missing, corrupt or incompatible checkpoint ends the process with the file and the problem in
  the log and a non-zero exit code.
* **Faults never stop the node.** Each bad frame is one throttled error line (per reason) plus a
  counter in ``/diagnostics``; the next valid frame is answered.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                ParameterType, SetParametersResult)
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.exceptions import InvalidParameterValueException, ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.time import Time
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from visualization_msgs.msg import MarkerArray

from ..core.detector_process import DetectorCrashed
from ..errors import CheckpointError, InputError, MafrError
from ..geometry import depth_to_xyz, project_points_to_grid
from . import conversions
from .diagnostics import NodeDiagnostics, ThrottledReporter
from .memory import keep_large_allocations_on_heap
from .outputs import (Roi, anomaly_points_cloud, build_markers, build_result, find_regions,
                      full_resolution, heatmap_image, mask_image, overlay_image)
from .sync import ApproximateTimeSync, header_stamp_ns

__all__ = ["MafrNode", "PARAMETERS", "ParamSpec", "validate_parameter", "main", "StartupError",
           "NODE_NAME", "TOPIC_RGB", "TOPIC_DEPTH", "TOPIC_CAMERA_INFO", "TOPIC_POINTS"]

NODE_NAME = "mafr"
# Relative names, as depth_image_proc's point_cloud_xyzrgb: remap or namespace them per camera.
TOPIC_RGB = "rgb/image_rect_color"
TOPIC_DEPTH = "depth_registered/image_rect"
TOPIC_CAMERA_INFO = "rgb/camera_info"
TOPIC_POINTS = "points"

RGB_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1")
DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")
RELIABILITY = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE,
               "system_default": ReliabilityPolicy.SYSTEM_DEFAULT}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# A set older than the last one by more than this is a time jump (looping bag, restarted
# /clock), not a late frame: accepted, and the ordering starts again (as the synchroniser does).
_BACKWARD_JUMP_S = 1.0
_CAMERA_INFO_FRAMES = 16  # cache bound: junk frame ids cannot grow it without limit
_GIL_SWITCH_INTERVAL_S = 0.001


class StartupError(MafrError):
    """The node cannot start: an invalid parameter value or an unusable device."""


# --------------------------------------------------------------------------------------------------
# Parameters: one table, used for declaration, validation, --help and the launch/config tests.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    read_only: bool = False
    range: Optional[tuple] = None          # (from, to) inclusive, ints or floats
    choices: Optional[tuple] = None        # allowed strings

    @property
    def type_name(self) -> str:
        return {bool: "bool", int: "int", float: "double", str: "string",
                list: "int[]"}[type(self.default)]

    def descriptor(self) -> ParameterDescriptor:
        constraints = ""
        if self.choices:
            constraints = "one of: " + ", ".join(self.choices)
        descriptor = ParameterDescriptor(name=self.name, description=self.description,
                                         read_only=self.read_only,
                                         additional_constraints=constraints)
        if self.range is not None and isinstance(self.default, float):
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=float(self.range[0]), to_value=float(self.range[1]), step=0.0)]
        elif self.range is not None and isinstance(self.default, int) \
                and not isinstance(self.default, bool):
            descriptor.integer_range = [IntegerRange(
                from_value=int(self.range[0]), to_value=int(self.range[1]), step=1)]
        if isinstance(self.default, list):
            descriptor.type = ParameterType.PARAMETER_INTEGER_ARRAY
        return descriptor


PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("checkpoint", "", "MAFR checkpoint (.safetensors) to load; empty = the embedded lite "
              "model (models/lite_synthetic.safetensors)", read_only=True),
    ParamSpec("device", "auto", "torch device: auto (CUDA if available, else CPU), cpu, cuda or "
              "cuda:N", read_only=True),
    ParamSpec("precision", "auto", "inference precision: auto (bf16 on a CUDA device when the "
              "checkpoint's training-time bf16 check passed, else fp32), fp32 or bf16 (extractors "
              "and heads in bf16, scoring in fp32)", read_only=True,
              choices=("auto", "fp32", "bf16")),
    ParamSpec("detector.isolation", "process", "process: the detector runs in a child process "
              "(frames in shared memory), so its GIL-holding C calls (e.g. Open3D FPFH, up to 250 ms) "
              "never stall the node's callbacks, and a crashed detector is restarted; thread: in "
              "a worker thread of the node process", read_only=True,
              choices=("process", "thread")),
    ParamSpec("input_mode", "depth", "depth: rgb + registered depth image + camera_info; points: "
              "rgb + PointCloud2 (organised and pixel-registered, or unorganised and projected "
              "through camera_info)", read_only=True, choices=("depth", "points")),
    ParamSpec("image_threshold", 0.0, "raw image-score decision threshold; 0 = the checkpoint's "
              "calibrated threshold", range=(0.0, 1.0e9)),
    ParamSpec("pixel_threshold", 0.0, "raw pixel-score threshold for mask, regions and the "
              "normalised map; 0 = the checkpoint's calibrated threshold", range=(0.0, 1.0e9)),
    ParamSpec("roi", [0, 0, 0, 0], "region of interest [x, y, width, height] in input pixels "
              "sent to the detector; [0, 0, 0, 0] = the full image; outputs stay at full "
              "resolution with zeros outside"),
    ParamSpec("min_valid_points", 500, "frames (ROI) with fewer valid 3D points fail with "
              "too_few_points instead of reaching the detector", range=(1, 100_000_000)),
    ParamSpec("sync.queue_size", 5, "messages kept per input while waiting for partners "
              "(approximate-time synchroniser)", read_only=True, range=(1, 100)),
    ParamSpec("sync.slop", 0.015, "max stamp spread (s) of a synchronised rgb/depth set; a little "
              "under half the frame period (15 ms at 30 Hz)", read_only=True,
              range=(0.0001, 10.0)),
    ParamSpec("qos.input.reliability", "best_effort", "input subscriptions: best_effort (REP-2003 "
              "sensor data, the default), reliable or system_default. Large images over "
              "best-effort Fast DDS are mostly lost with default transports: prefer reliable, or "
              "set FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA", read_only=True,
              choices=tuple(RELIABILITY)),
    ParamSpec("qos.input.depth", 10, "input subscription history depth (KEEP_LAST); 10 covers a "
              "250 ms detector stall at 30 Hz (8 messages)",
              read_only=True, range=(1, 1000)),
    ParamSpec("qos.output.reliability", "reliable", "output publishers' reliability",
              read_only=True, choices=tuple(RELIABILITY)),
    ParamSpec("qos.output.depth", 5, "output publishers' history depth (KEEP_LAST)",
              read_only=True, range=(1, 1000)),
    ParamSpec("publish.heatmap", True, "publish ~/heatmap (32FC1 normalised map)"),
    ParamSpec("publish.overlay", True, "publish ~/overlay (bgr8 heatmap over the image)"),
    ParamSpec("publish.mask", True, "publish ~/mask (mono8 0/255 thresholded map)"),
    ParamSpec("publish.markers", True, "publish ~/markers (boxes and score labels of regions)"),
    ParamSpec("publish.anomaly_points", True, "publish ~/anomaly_points (x, y, z, score)"),
    ParamSpec("publish.heatmap_in_result", False, "also embed the 32FC1 heatmap in AnomalyResult "
              "(doubles the bandwidth; ~/heatmap carries the same map)"),
    ParamSpec("overlay.alpha", 0.5, "heatmap opacity in ~/overlay", range=(0.0, 1.0)),
    ParamSpec("markers.lifetime", 0.5, "marker lifetime (s, RViz wall time; 0 = forever); a "
              "DELETEALL clears the previous frame anyway", range=(0.0, 3600.0)),
    ParamSpec("regions.min_area", 20, "connected regions smaller than this (pixels) are ignored",
              range=(1, 100_000_000)),
    ParamSpec("anomaly_points.min_score", 0.5, "normalised score from which a valid point goes "
              "into ~/anomaly_points (0.5 = pixel threshold)", range=(0.0, 1.0)),
    ParamSpec("diagnostics.period", 1.0, "period (s) of the /diagnostics status",
              read_only=True, range=(0.05, 60.0)),
    ParamSpec("diagnostics.stale_after", 2.0, "an input silent this long (s) is reported as "
              "stalled", range=(0.1, 3600.0)),
    ParamSpec("diagnostics.log_throttle", 5.0, "at most one error line per failure reason per "
              "this many seconds (the counters count every frame)", range=(0.0, 3600.0)),
)
_SPECS = {spec.name: spec for spec in PARAMETERS}


def validate_parameter(name: str, value) -> Optional[str]:
    """Why ``value`` is not acceptable for parameter ``name``, or None if it is.

    Side-effect free (the on-set callback contract); also used at start-up, where rclpy runs the
    same callback for values from --params-file / -p.
    """
    spec = _SPECS.get(name)
    if spec is None:
        return None  # use_sim_time, qos_overrides.* ... belong to rclpy
    if isinstance(spec.default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            return f"{name} must be a finite number, got {value!r}"
    if spec.range is not None and not isinstance(value, (bool, list, str)):
        low, high = spec.range
        if not low <= value <= high:
            return f"{name} must be in [{low}, {high}], got {value}"
    if spec.choices and value not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}, got {value!r}"
    if name == "device" and not _DEVICE.fullmatch(str(value)):
        return f"device must be auto, cpu, cuda or cuda:N, got {value!r}"
    if name in ("image_threshold", "pixel_threshold") and value < 0:
        return f"{name} must be > 0 (a raw score), or 0 for the checkpoint's calibrated value; " \
               f"got {value}"
    if name == "roi":
        values = list(value)
        if len(values) not in (0, 4):
            return f"roi must be [x, y, width, height] (or [0, 0, 0, 0] for the full image), got " \
                   f"{values}"
        if values:
            x, y, w, h = values
            if x < 0 or y < 0:
                return f"roi origin must be >= 0, got x={x}, y={y}"
            if w < 0 or h < 0:
                return f"roi size must be positive, got width={w}, height={h}"
            if (w == 0) != (h == 0) or (w == 0 and (x or y)):
                return f"roi {values}: use width and height > 0, or [0, 0, 0, 0] for the full image"
    return None


# --------------------------------------------------------------------------------------------------
# Worker hand-off
# --------------------------------------------------------------------------------------------------
class LatestSlot:
    """One-element hand-off between the executor and the worker: a newer item replaces an
    unprocessed one (latest wins; the caller counts the replacement as dropped)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item = None
        self._closed = False

    def put(self, item) -> bool:
        """Store ``item``; True if it replaced one the worker had not taken yet."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
            return replaced

    def take(self):
        """Block until an item is there (returned) or the slot is closed (None)."""
        with self._cond:
            while self._item is None and not self._closed:
                self._cond.wait()
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _FrameError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class _Config:
    """The run-time tunable parameters, swapped atomically by the post-set callback."""

    image_threshold: float
    pixel_threshold: float
    roi: tuple
    min_valid_points: int
    publish_heatmap: bool
    publish_overlay: bool
    publish_mask: bool
    publish_markers: bool
    publish_anomaly_points: bool
    heatmap_in_result: bool
    overlay_alpha: float
    marker_lifetime: float
    min_area: int
    points_min_score: float

    @classmethod
    def from_node(cls, node: Node) -> "_Config":
        def p(name):
            return node.get_parameter(name).value
        return cls(
            image_threshold=float(p("image_threshold")), pixel_threshold=float(p("pixel_threshold")),
            roi=tuple(int(v) for v in p("roi")), min_valid_points=int(p("min_valid_points")),
            publish_heatmap=bool(p("publish.heatmap")), publish_overlay=bool(p("publish.overlay")),
            publish_mask=bool(p("publish.mask")), publish_markers=bool(p("publish.markers")),
            publish_anomaly_points=bool(p("publish.anomaly_points")),
            heatmap_in_result=bool(p("publish.heatmap_in_result")),
            overlay_alpha=float(p("overlay.alpha")), marker_lifetime=float(p("markers.lifetime")),
            min_area=int(p("regions.min_area")),
            points_min_score=float(p("anomaly_points.min_score")))


def _count_valid(xyz: np.ndarray) -> int:
    """Points with a finite, positive depth. Only z is tested (an (H, W) pass instead of
    geometry.valid_mask's three channels, 10x faster at 640x480): invalid depth is NaN in all
    three coordinates, and z <= 0 lies behind the camera."""
    z = xyz[..., 2]
    return int(np.count_nonzero((z > 0) & (z < np.inf)))


def _count_valid_depth(depth: np.ndarray) -> int:
    """_count_valid of depth_to_xyz(depth), from the compact depth image (5-10x cheaper than the
    strided z channel): z = depth x a positive scale, so z > 0 and finite exactly where the depth
    is; unsigned integer depth (16UC1, mono16) is valid wherever it is not 0."""
    if depth.dtype.kind == "u":
        return int(np.count_nonzero(depth))
    return int(np.count_nonzero((depth > 0) & (depth < np.inf)))


def _qos(reliability: str, depth: int) -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth),
                      reliability=RELIABILITY[reliability])


# --------------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------------
class MafrNode(Node):
    """See the module docstring. Construct, then call :meth:`start` (loads the model; raises
    CheckpointError / StartupError), then spin; :meth:`stop` before destroy_node()."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.add_on_set_parameters_callback(self._validate_parameters)
        for spec in PARAMETERS:
            try:
                self.declare_parameter(spec.name, spec.default, spec.descriptor())
            except (InvalidParameterValueException, ParameterException) as error:
                raise StartupError(f"invalid value for parameter {spec.name}: {error}") from None
        self.add_post_set_parameters_callback(self._apply_parameters)
        self._config = _Config.from_node(self)
        self._input_mode = self.get_parameter("input_mode").value
        self._isolation = self.get_parameter("detector.isolation").value
        self._detector = None
        self._base_thresholds = None
        self._stopping = False
        self._last_set_stamp: Optional[int] = None
        self._camera_info: dict[str, Any] = {}
        self._camera_info_lock = threading.Lock()
        self._xyz_buffers: dict[tuple, np.ndarray] = {}
        self._slot = LatestSlot()
        self._worker: Optional[threading.Thread] = None
        self._inputs = []

        self._in_qos = _qos(self.get_parameter("qos.input.reliability").value,
                            self.get_parameter("qos.input.depth").value)
        out_qos = _qos(self.get_parameter("qos.output.reliability").value,
                       self.get_parameter("qos.output.depth").value)
        resolve = lambda name: self.resolve_topic_name(name)  # noqa: E731
        self._topic_rgb = resolve(TOPIC_RGB)
        self._topic_other = resolve(TOPIC_DEPTH if self._input_mode == "depth" else TOPIC_POINTS)
        self._topic_info = resolve(TOPIC_CAMERA_INFO)
        self._sync_topics = (self._topic_rgb, self._topic_other)
        self._diag = NodeDiagnostics(self.get_fully_qualified_name(),
                                     (self._topic_rgb, self._topic_other, self._topic_info),
                                     self.get_parameter("diagnostics.stale_after").value)
        self._reporter = ThrottledReporter(self.get_parameter("diagnostics.log_throttle").value)
        slop = self.get_parameter("sync.slop").value
        self._backward_jump_s = max(_BACKWARD_JUMP_S, 2 * slop)  # must exceed the slop
        self._sync = ApproximateTimeSync(2, self.get_parameter("sync.queue_size").value, slop,
                                         backward_jump_s=self._backward_jump_s)

        from ..msg import AnomalyResult
        self._pub_result = self.create_publisher(AnomalyResult, "~/anomaly", out_qos)
        self._pub_heatmap = self.create_publisher(Image, "~/heatmap", out_qos)
        self._pub_overlay = self.create_publisher(Image, "~/overlay", out_qos)
        self._pub_mask = self.create_publisher(Image, "~/mask", out_qos)
        self._pub_markers = self.create_publisher(MarkerArray, "~/markers", out_qos)
        self._pub_points = self.create_publisher(PointCloud2, "~/anomaly_points", out_qos)
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._publish_diagnostics()  # "loading": visible before the (slow) model load

    # -- start-up ------------------------------------------------------------------------------
    def start(self) -> None:
        """Load and warm up the detector, then subscribe. Raises CheckpointError / StartupError."""
        from ..core.detector import Detector, default_model_path

        checkpoint = self.get_parameter("checkpoint").value or str(default_model_path())
        device = self.get_parameter("device").value
        precision = self.get_parameter("precision").value
        self.get_logger().info(f"loading {checkpoint} on device '{device}' (precision {precision}, "
                               f"detector isolation: {self._isolation})")
        t0 = time.perf_counter()
        try:
            if self._isolation == "process":  # loads and warms up in the child
                from ..core.detector_process import DetectorProcess
                self._detector = DetectorProcess(checkpoint, device=device, precision=precision)
            else:
                self._detector = Detector.from_checkpoint(checkpoint, device=device,
                                                          precision=precision)
        except InputError as error:  # e.g. device 'cuda' without a GPU
            raise StartupError(f"cannot use device '{device}': {error}") from None
        if self._detector.thresholds is None:
            raise CheckpointError(f"checkpoint {checkpoint} has no calibrated thresholds; train "
                                  "it with `mafr train` (which calibrates them)")
        self._base_thresholds = self._detector.thresholds
        self._diag.info.update({
            "device": str(self._detector.device), "precision": self._detector.precision,
            "model_id": self._detector.model_id,
            "checkpoint": checkpoint, "input_mode": self._input_mode})
        if self._isolation == "thread":
            self._diag.set_state("warming_up")
            self._publish_diagnostics()
            t0 = time.perf_counter()
            self._detector.warmup()
        warmup_s = time.perf_counter() - t0

        self._worker = threading.Thread(target=self._work, name="mafr_worker", daemon=True)
        self._worker.start()
        events = lambda topic: SubscriptionEventCallbacks(  # noqa: E731
            incompatible_qos=lambda info, t=topic: self._on_incompatible_qos(t, info),
            message_lost=lambda info, t=topic: self._diag.message_lost(t, info.total_count_change))
        other_type = Image if self._input_mode == "depth" else PointCloud2
        self._other_view = conversions.CdrImage if other_type is Image \
            else conversions.CdrPointCloud2
        # raw=True: the frames arrive as their serialised bytes and are read in place (CdrImage,
        # CdrPointCloud2) instead of being deserialised into Python messages on the executor
        # thread (two copies of every frame with the GIL held; see conversions.py).
        self._inputs = [
            self.create_subscription(Image, TOPIC_RGB, self._on_rgb, self._in_qos,
                                     event_callbacks=events(self._topic_rgb), raw=True),
            self.create_subscription(other_type, TOPIC_DEPTH if self._input_mode == "depth"
                                     else TOPIC_POINTS, self._on_other, self._in_qos,
                                     event_callbacks=events(self._topic_other), raw=True),
            self.create_subscription(CameraInfo, TOPIC_CAMERA_INFO, self._on_camera_info,
                                     self._in_qos, event_callbacks=events(self._topic_info)),
        ]
        self._diag_timer = self.create_timer(self.get_parameter("diagnostics.period").value,
                                             self._publish_diagnostics)
        self._diag.set_state("ready")
        self._publish_diagnostics()
        reliability = self.get_parameter("qos.input.reliability").value
        self.get_logger().info(
            f"ready: model {self._detector.model_id} on {self._detector.device} "
            f"({self._detector.precision}; load + warm-up "
            f"{warmup_s:.1f} s); input_mode {self._input_mode}: {self._topic_rgb} + "
            f"{self._topic_other} (+ {self._topic_info}), {reliability} depth "
            f"{self._in_qos.depth}; results on {self._pub_result.topic_name}")
        if reliability == "best_effort":
            self.get_logger().info(
                "inputs are best_effort (REP-2003): with Fast DDS default transports most large "
                "images are lost; set qos.input.reliability:=reliable if the camera publishes "
                "reliable, or FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker (it finishes the frame in progress, up to ``timeout_s``)."""
        self._stopping = True
        self._slot.close()
        if self._worker is not None:
            self._worker.join(timeout_s)
        if self._isolation == "process" and self._detector is not None:
            self._detector.close()  # the child exits, the shared memory is unlinked

    @property
    def diagnostics(self) -> NodeDiagnostics:
        return self._diag

    # -- parameters ----------------------------------------------------------------------------
    def _validate_parameters(self, params) -> SetParametersResult:
        for param in params:
            reason = validate_parameter(param.name, param.value)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params) -> None:
        self._config = _Config.from_node(self)
        for param in params:
            if param.name == "diagnostics.stale_after":
                self._diag.stale_after_s = float(param.value)
            elif param.name == "diagnostics.log_throttle":
                self._reporter.period_s = float(param.value)

    def _thresholds(self):
        """The checkpoint's thresholds with the node's overrides (0 = keep calibrated)."""
        base, cfg = self._base_thresholds, self._config
        image = cfg.image_threshold or base.image
        pixel = cfg.pixel_threshold or base.pixel
        if (image, pixel) == (base.image, base.pixel):
            return base
        return dataclasses.replace(base, image=image, pixel=pixel)

    # -- callbacks (executor thread): bookkeeping only -----------------------------------------
    def _on_rgb(self, serialized: bytes) -> None:
        self._diag.received(self._topic_rgb)
        self._feed(0, self._view(conversions.CdrImage, serialized, self._topic_rgb))

    def _on_other(self, serialized: bytes) -> None:
        self._diag.received(self._topic_other)
        self._feed(1, self._view(self._other_view, serialized, self._topic_other))

    def _view(self, view_type, serialized: bytes, topic: str):
        """The message's fields over its serialised bytes; None (counted, logged) if it cannot
        be read (truncated, or not XCDR1): such a message has no stamp to be synchronised by."""
        try:
            return view_type(serialized)
        except InputError as error:
            self._diag.count_rejected()
            self._log_fault("malformed_message", f"message refused on {topic}: {error}")
            return None

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._diag.received(self._topic_info)
        try:
            entry = conversions.camera_info_to_intrinsics(msg, rectified=True)
        except InputError as error:
            entry = error
        with self._camera_info_lock:
            self._camera_info.pop(msg.header.frame_id, None)
            self._camera_info[msg.header.frame_id] = entry
            while len(self._camera_info) > _CAMERA_INFO_FRAMES:
                self._camera_info.pop(next(iter(self._camera_info)))

    def _on_incompatible_qos(self, topic: str, info) -> None:
        self.get_logger().error(
            f"a publisher on {topic} has a QoS incompatible with this subscription (policy "
            f"{info.last_policy_kind}): nothing will be received from it. Make "
            f"qos.input.reliability match the camera (a reliable subscription cannot receive "
            f"from a best_effort publisher)", throttle_duration_sec=10.0)

    def _feed(self, index: int, msg) -> None:
        if msg is None:
            return
        try:
            matched = self._sync.add(index, msg)
        except InputError as error:  # a stamp that is not a valid ROS time: never part of a set
            self._diag.count_rejected()
            self._log_fault("invalid_stamp", f"message refused on {self._sync_topics[index]}: "
                                             f"{error}")
            return
        if matched is None:
            return
        self._diag.count_matched()
        stamp = header_stamp_ns(matched[0])
        last = self._last_set_stamp
        if last is not None and stamp <= last:
            behind = (last - stamp) / 1e9
            if behind < self._backward_jump_s:
                self._fail("out_of_order",
                           f"set stamped {stamp / 1e9:.6f} s arrived after one stamped "
                           f"{last / 1e9:.6f} s ({behind * 1e3:.1f} ms older); dropped so that "
                           "results stay in time order")
                return
            self.get_logger().warning(f"time jumped back by {behind:.2f} s (looping bag or "
                                      "restarted clock?): restarting the stamp order")
        self._last_set_stamp = stamp
        # Stamp -> set complete here, on the node's clock (the input stage of the diagnostics).
        input_ms = (self.get_clock().now().nanoseconds - stamp) / 1e6
        if self._slot.put((matched, time.perf_counter(), input_ms)):
            self._diag.count_dropped()

    def _fail(self, reason: str, message: str) -> None:
        self._diag.count_failed(reason, message)
        self._log_fault(reason, f"frame dropped [{reason}]: {message}")

    def _log_fault(self, reason: str, text: str) -> None:
        log_now, suppressed = self._reporter.should_log(reason)
        if log_now:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            self.get_logger().error(text + more)

    # -- worker thread -------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._slot.take()
            if item is None:
                return
            (rgb_msg, other_msg), matched_at, input_ms = item
            started_at = time.perf_counter()
            # Wall time per stage, plus this thread's CPU time outside the detector ("cpu"): on
            # a loaded machine the wall times include preemption, the CPU time does not.
            stages = {"input": input_ms, "wait": (started_at - matched_at) * 1e3,
                      "cpu": -time.thread_time()}
            try:
                self._process(rgb_msg, other_msg, started_at, stages)
            except _FrameError as error:
                self._fail(error.reason, str(error))
            except InputError as error:
                self._fail("detector_input", str(error))
            except DetectorCrashed as error:
                self._fail("detector_crashed", str(error))
            except Exception:  # a bug must not kill the worker: report it and carry on
                if self._stopping:
                    return
                self._fail("internal_error", traceback.format_exc())

    def _process(self, rgb_msg: Image, other_msg, started_at: float, stages: dict) -> None:
        cfg = self._config
        header = rgb_msg.header
        width, height = int(rgb_msg.width), int(rgb_msg.height)
        rgb = self._read_rgb(rgb_msg)
        try:
            roi = Roi.resolve(cfg.roi, width, height)
        except InputError as error:
            raise _FrameError("roi_outside_image", str(error)) from None
        if self._input_mode == "depth":
            xyz, valid = self._xyz_from_depth(other_msg, rgb_msg, roi)
        else:
            xyz = self._xyz_from_cloud(other_msg, rgb_msg, roi)
            valid = _count_valid(xyz)
        if valid < cfg.min_valid_points:
            raise _FrameError("too_few_points",
                              f"only {valid} valid 3D points in the {roi.width}x{roi.height} "
                              f"input (min_valid_points {cfg.min_valid_points}); depth is "
                              "missing, zero, NaN or inf there (part out of range, or roi wrong)")

        thresholds = self._thresholds()
        if self._detector.thresholds != thresholds:  # an override changed since the last frame
            self._detector.thresholds = thresholds
        rows, cols = roi.slices
        detector_at = time.perf_counter()
        stages["cpu"] += time.thread_time()
        stages["convert"] = (detector_at - started_at) * 1e3
        if self._isolation == "process":  # only the map the outputs use crosses over
            detection = self._detector.detect(rgb[rows, cols], xyz, maps=("normalized_map",))
        else:
            detection = self._detector.detect(rgb[rows, cols], xyz)
        if detection.valid_fraction <= 0.0:
            raise _FrameError("no_part_found",
                              "no 3D point left after background removal (no part in view, or "
                              "the roi does not contain it); no result published")
        call_ms = (time.perf_counter() - detector_at) * 1e3
        stages["detector"] = detection.timings_ms.get("total", call_ms)
        stages["handoff"] = max(0.0, call_ms - stages["detector"])
        stages["cpu"] -= time.thread_time()
        self._publish(header, rgb, xyz, roi, detection, thresholds, cfg, started_at, stages)

    def _read_rgb(self, msg: Image) -> np.ndarray:
        if msg.encoding not in RGB_ENCODINGS:
            raise _FrameError("unsupported_encoding",
                              f"{self._topic_rgb}: image encoding '{msg.encoding}' is not "
                              f"supported; expected one of {', '.join(RGB_ENCODINGS)}")
        try:
            # No copy: a read-only view of the received bytes (the detector only reads it; in
            # process mode it is copied once, into the detector's shared-memory input).
            return conversions.rgb_from_image(msg, copy=False)
        except InputError as error:
            raise _FrameError("malformed_message", f"{self._topic_rgb}: {error}") from None

    def _check_registered(self, other, rgb_msg: Image, what: str, size=None) -> None:
        rgb_size = (int(rgb_msg.width), int(rgb_msg.height))
        if size is not None and size != rgb_size:
            raise _FrameError(
                "unregistered_input",
                f"{what} on {self._topic_other} is {size[0]}x{size[1]} but the colour image on "
                f"{self._topic_rgb} is {rgb_size[0]}x{rgb_size[1]}: it must be registered to the "
                "colour camera (same pixel grid: depth_image_proc register, or the driver's "
                "align-depth option); the node never resamples")
        if other.header.frame_id != rgb_msg.header.frame_id:
            raise _FrameError(
                "unregistered_input",
                f"{what} on {self._topic_other} is in frame '{other.header.frame_id}' but the "
                f"colour image is in '{rgb_msg.header.frame_id}': publish {what} registered to "
                "the colour optical frame (depth_image_proc register or the driver's align-depth)")

    def _intrinsics(self, rgb_msg: Image):
        frame = rgb_msg.header.frame_id
        with self._camera_info_lock:
            entry = self._camera_info.get(frame)
            known = list(self._camera_info)
        if entry is None:
            if not known:
                raise _FrameError("no_camera_info",
                                  f"no camera_info received on {self._topic_info} yet: check that "
                                  "the driver publishes it and that its QoS matches "
                                  "qos.input.reliability")
            raise _FrameError("no_camera_info",
                              f"no camera_info for frame '{frame}' received on {self._topic_info} "
                              f"yet (received frames: {', '.join(map(repr, known))})")
        if isinstance(entry, InputError):
            raise _FrameError("invalid_camera_info", f"{self._topic_info}: {entry}")
        if (entry.width, entry.height) != (int(rgb_msg.width), int(rgb_msg.height)):
            raise _FrameError(
                "invalid_camera_info",
                f"camera_info on {self._topic_info} describes a {entry.width}x{entry.height} "
                f"image but the colour image is {rgb_msg.width}x{rgb_msg.height}; publish the "
                "camera_info of this image (scaled when the driver resizes)")
        return entry

    def _buffer(self, shape: tuple, detector_input: bool = False) -> np.ndarray:
        """The xyz array to convert into: the detector process's shared-memory input when it is
        the detector's input as a whole (then nothing is copied to the child)."""
        if detector_input and self._isolation == "process":
            return self._detector.input_buffers(shape[0], shape[1])[1]
        buffer = self._xyz_buffers.get(shape)
        if buffer is None:
            self._xyz_buffers.clear()  # one resolution at a time: no growth if it changes
            buffer = self._xyz_buffers[shape] = np.empty(shape, dtype=np.float32)
        return buffer

    def _xyz_from_depth(self, msg: Image, rgb_msg: Image, roi: Roi) -> np.ndarray:
        if msg.encoding not in DEPTH_ENCODINGS:
            raise _FrameError("unsupported_encoding",
                              f"{self._topic_other}: depth encoding '{msg.encoding}' is not "
                              f"supported; expected 16UC1 (mm) or 32FC1 (m)")
        self._check_registered(msg, rgb_msg, "the depth image", (int(msg.width), int(msg.height)))
        try:
            depth, scale = conversions.depth_from_image(msg)
        except InputError as error:
            raise _FrameError("malformed_message", f"{self._topic_other}: {error}") from None
        intrinsics = self._intrinsics(rgb_msg).cropped(roi.x, roi.y, roi.width, roi.height)
        rows, cols = roi.slices
        depth = depth[rows, cols]
        xyz = depth_to_xyz(depth, intrinsics, depth_scale=scale,
                           out=self._buffer((roi.height, roi.width, 3), detector_input=True))
        return xyz, _count_valid_depth(depth)

    def _xyz_from_cloud(self, msg: PointCloud2, rgb_msg: Image, roi: Roi) -> np.ndarray:
        rows, cols = roi.slices
        if int(msg.height) > 1:  # organised: pixel (u, v) of the cloud is pixel (u, v) of rgb
            self._check_registered(msg, rgb_msg, "the organised cloud",
                                   (int(msg.width), int(msg.height)))
            try:
                whole = roi.is_full(int(msg.width), int(msg.height))
                xyz = conversions.pointcloud2_to_xyz(
                    msg, organised=True, out=self._buffer((int(msg.height), int(msg.width), 3),
                                                          detector_input=whole))
            except InputError as error:
                raise _FrameError("malformed_message", f"{self._topic_other}: {error}") from None
            return xyz[rows, cols]
        self._check_registered(msg, rgb_msg, "the unorganised cloud")
        try:
            points = conversions.pointcloud2_to_xyz(msg, organised=False)
        except InputError as error:
            raise _FrameError("malformed_message", f"{self._topic_other}: {error}") from None
        intrinsics = self._intrinsics(rgb_msg).cropped(roi.x, roi.y, roi.width, roi.height)
        xyz, _ = project_points_to_grid(points, intrinsics)
        return xyz

    def _publish(self, header, rgb, xyz, roi: Roi, detection, thresholds, cfg: _Config,
                 started_at: float, stages: dict) -> None:
        width, height = rgb.shape[1], rgb.shape[0]
        crop_map = detection.normalized_map
        regions_at = time.perf_counter()
        regions = find_regions(crop_map, xyz, cfg.min_area, offset=(roi.x, roi.y))
        result_at = time.perf_counter()
        stages["regions"] = (result_at - regions_at) * 1e3
        want_heatmap = cfg.publish_heatmap and self._pub_heatmap.get_subscription_count() > 0
        full_map = heat_msg = None
        if want_heatmap or cfg.heatmap_in_result or (
                cfg.publish_mask and self._pub_mask.get_subscription_count() > 0):
            full_map = full_resolution(crop_map, roi, width, height)
        if want_heatmap or cfg.heatmap_in_result:
            heat_msg = heatmap_image(full_map, header)

        result = build_result(header, detection, thresholds, regions, self._detector.model_id,
                              heat_msg if cfg.heatmap_in_result else None)
        latency_s = (self.get_clock().now() - Time.from_msg(header.stamp)).nanoseconds / 1e9
        result.latency.sec, result.latency.nanosec = divmod(max(0, int(latency_s * 1e9)), 10 ** 9)
        publish_at = time.perf_counter()  # result.latency ends here: the publish call is transfer
        self._pub_result.publish(result)
        published_at = time.perf_counter()
        stages["cpu"] = (stages["cpu"] + time.thread_time()) * 1e3
        stages["result"] = (publish_at - result_at) * 1e3
        stages["publish"] = (published_at - publish_at) * 1e3
        detector_ms = detection.timings_ms.get("total", math.nan)
        # The node's own work on this frame: conversions, checks, regions, the result message and
        # its publication (DDS transfer and waiting for the worker excluded).
        overhead_ms = (published_at - started_at) * 1e3 - detector_ms
        self._diag.count_processed(latency_s * 1e3, detector_ms, overhead_ms, stages)

        # Secondary outputs after the result: they never delay the answer a robot waits for.
        if want_heatmap:
            self._pub_heatmap.publish(heat_msg)
        if full_map is not None and cfg.publish_mask and self._pub_mask.get_subscription_count():
            self._pub_mask.publish(mask_image(full_map, header))
        if cfg.publish_overlay and self._pub_overlay.get_subscription_count():
            self._pub_overlay.publish(overlay_image(rgb, crop_map, roi, header, cfg.overlay_alpha))
        if cfg.publish_markers and self._pub_markers.get_subscription_count():
            self._pub_markers.publish(build_markers(regions, header, cfg.marker_lifetime))
        if cfg.publish_anomaly_points and self._pub_points.get_subscription_count():
            self._pub_points.publish(anomaly_points_cloud(xyz, crop_map, header,
                                                          cfg.points_min_score))

    # -- diagnostics ---------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        if self._stopping:
            return
        array = self._diag.build(self.get_clock().now().to_msg(), self._sync.stats,
                                 self._sync_topics)
        self._pub_diag.publish(array)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def _usage() -> str:
    lines = ["usage: mafr_node [--ros-args -p NAME:=VALUE ... --params-file FILE -r FROM:=TO ...]",
             "", "The mafr anomaly-detection node. Subscribes (relative names, remap them):",
             f"  {TOPIC_RGB}, {TOPIC_DEPTH} (input_mode depth) or {TOPIC_POINTS} (points), "
             f"{TOPIC_CAMERA_INFO}",
             "Publishes: ~/anomaly, ~/heatmap, ~/overlay, ~/mask, ~/markers, ~/anomaly_points, "
             "/diagnostics", "", "Parameters:"]
    for spec in PARAMETERS:
        extra = " (read-only)" if spec.read_only else ""
        if spec.range:
            extra += f" [{spec.range[0]}, {spec.range[1]}]"
        lines.append(f"  {spec.name} ({spec.type_name}, default {spec.default!r}){extra}: "
                     f"{spec.description}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    """Run the node until shutdown; returns the process exit code.

    ``argv``: the arguments after the program name (default ``sys.argv[1:]``): ROS arguments
    (``--ros-args -p ... --params-file ... -r ...``) and ``-h``/``--help``. Exit codes: 0 after a
    normal shutdown, 1 when the checkpoint or a parameter is unusable, 2 on a command-line error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    own = remove_ros_args(["mafr_node", *args])[1:]
    if any(a in ("-h", "--help") for a in own):
        print(_usage())
        return 0
    if own:
        print(f"mafr_node: unexpected arguments {own}; node options are ROS parameters "
              "(--ros-args -p name:=value); see --help", file=sys.stderr)
        return 2

    keep_large_allocations_on_heap()  # frame-sized buffers without page faults (see memory.py)
    # The executor thread and the worker share the GIL. A thread that wants it waits until the
    # holder releases it or for this interval (default 5 ms): then a callback waits that long
    # while the detector runs Python code, and the worker that long to start a frame the
    # executor just handed over. 1 ms bounds both; only threads that want the GIL are affected.
    sys.setswitchinterval(_GIL_SWITCH_INTERVAL_S)
    rclpy.init(args=["mafr_node", *args])
    node = None
    try:
        node = MafrNode()
        node.start()
    except (CheckpointError, StartupError) as error:
        rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {error}")
        if node is not None:
            node.stop()
            node.destroy_node()
        rclpy.try_shutdown()
        return 1
    except Exception:
        # Ctrl-C while the model loads shuts the context down under our feet: a normal exit.
        if rclpy.ok():
            raise
        if node is not None:
            node.stop()
        rclpy.try_shutdown()
        return 0

    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.stop()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
