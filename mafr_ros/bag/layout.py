"""The topic layout of the bags written by ``mafr bag make`` (a contract: evaluation relies on it).

One dataset sample is one *frame*: every message of a frame carries the same header stamp and the
same ``frame_id``, and is written with that stamp as its bag timestamp. Frame ``i`` is stamped
``start_ns + round(i * 1e9 / rate)``. Within a frame the messages are written (and therefore played)
in :data:`FRAME_ORDER`: the sample description first, camera_info before the images so that a node
caching camera_info has it when the synchronised images arrive, the colour image last.

The camera topics are relative names under a namespace (default ``/camera``), matching the node's
relative subscriptions (``rgb/image_rect_color``, ``depth_registered/image_rect``,
``rgb/camera_info``, ``points``) when the node runs in that namespace. The sample topic is absolute.

Only constants and name arithmetic here (no rclpy, no rosbags), so any module can import it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import InputError

# --- relative camera topics (under the namespace) -------------------------------------------------
RGB = "rgb/image_rect_color"            #: sensor_msgs/Image rgb8, the raw dataset image
CAMERA_INFO = "rgb/camera_info"         #: sensor_msgs/CameraInfo, K and P of the fitted pinhole
DEPTH = "depth_registered/image_rect"   #: sensor_msgs/Image 32FC1 metres, NaN where invalid (REP 118)
POINTS = "points"                       #: sensor_msgs/PointCloud2 organised HxW, float32 x, y, z
GT_MASK = "gt/mask"                     #: sensor_msgs/Image mono8, 255 = defect pixel, else 0

# --- absolute topics -------------------------------------------------------------------------------
SAMPLE_TOPIC = "/mafr/sample"           #: std_msgs/String, JSON with SAMPLE_KEYS
CLOCK_TOPIC = "/clock"                  #: rosgraph_msgs/Clock, published by the player with --clock

# --- message types (rosbag2 spelling) ---------------------------------------------------------------
IMAGE_TYPE = "sensor_msgs/msg/Image"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
POINTCLOUD2_TYPE = "sensor_msgs/msg/PointCloud2"
STRING_TYPE = "std_msgs/msg/String"
CLOCK_TYPE = "rosgraph_msgs/msg/Clock"
ANOMALY_RESULT_TYPE = "mafr_ros/msg/AnomalyResult"

# --- encodings ---------------------------------------------------------------------------------------
RGB_ENCODING = "rgb8"
DEPTH_ENCODING = "32FC1"
GT_ENCODING = "mono8"
GT_DEFECT = 255                         #: mask value of a defect pixel (0 elsewhere)

# --- defaults of `mafr bag make` ---------------------------------------------------------------------
DEFAULT_NAMESPACE = "/camera"
DEFAULT_FRAME_ID = "camera_color_optical_frame"
DEFAULT_RATE_HZ = 2.0
DEFAULT_VERSION = 8                     #: rosbag2 metadata version: 8 reads on Humble, 9 is Jazzy's
DEFAULT_STORAGE = "sqlite3"
STORAGES = ("sqlite3", "mcap")
VERSIONS = (8, 9)
INPUTS = ("depth", "points", "both")    #: which 3D inputs a bag carries

#: Keys of the JSON held by each /mafr/sample message.
#: index: frame number in the bag (0-based); name: "<split>/<defect_type>/<file stem>", e.g.
#: "test/cut/000"; label: 0 good, 1 defective; defect_type: "good" or the defect folder name;
#: category: dataset category; stamp_ns: the frame's header stamp in nanoseconds.
SAMPLE_KEYS = ("index", "name", "label", "defect_type", "category", "stamp_ns")

#: Key of the bag's metadata.yaml ``custom_data`` entry written by `mafr bag make`: a JSON string
#: with the source dataset, the layout parameters and the pinhole fit (K, RMS and max residual in
#: pixels). The bag is self-contained: no sidecar file.
CUSTOM_DATA_KEY = "mafr_ros.make"

#: Order of the messages within one frame (keys of BagTopics.by_role()).
FRAME_ORDER = ("sample", "camera_info", "gt_mask", "depth", "points", "rgb")


def normalize_namespace(namespace: str) -> str:
    """'/camera' from '/camera', 'camera' or '/camera/'; '' for the root namespace ('/' or '')."""
    if not isinstance(namespace, str):
        raise InputError(f"namespace must be a string, got {namespace!r}")
    stripped = namespace.strip().strip("/")
    if not stripped:
        return ""
    for part in stripped.split("/"):
        if not part or not (part[0].isalpha() or part[0] == "_") or not all(
                c.isalnum() or c == "_" for c in part):
            raise InputError(
                f"namespace {namespace!r} is not a valid ROS namespace: use tokens of letters, "
                "digits and '_' separated by '/', each starting with a letter or '_' (e.g. /camera)")
    return "/" + stripped


def resolve(namespace: str, relative: str) -> str:
    """Absolute topic name of ``relative`` in ``namespace`` ('/camera' + 'points' -> '/camera/points')."""
    return f"{normalize_namespace(namespace)}/{relative}"


@dataclass(frozen=True)
class BagTopics:
    """Absolute topic names of one bag layout."""

    namespace: str
    rgb: str
    camera_info: str
    depth: str
    points: str
    gt_mask: str
    sample: str = SAMPLE_TOPIC

    def by_role(self) -> dict[str, str]:
        """{role: topic} in FRAME_ORDER; roles are sample, camera_info, gt_mask, depth, points, rgb."""
        return {role: getattr(self, role) for role in FRAME_ORDER}

    def types(self) -> dict[str, str]:
        """{topic: message type} of every topic of the layout."""
        return {self.sample: STRING_TYPE, self.camera_info: CAMERA_INFO_TYPE,
                self.gt_mask: IMAGE_TYPE, self.depth: IMAGE_TYPE, self.points: POINTCLOUD2_TYPE,
                self.rgb: IMAGE_TYPE}


def topics_for(namespace: str = DEFAULT_NAMESPACE) -> BagTopics:
    """The layout's topic names under ``namespace``."""
    ns = normalize_namespace(namespace)
    return BagTopics(namespace=ns or "/", rgb=resolve(ns, RGB), camera_info=resolve(ns, CAMERA_INFO),
                     depth=resolve(ns, DEPTH), points=resolve(ns, POINTS),
                     gt_mask=resolve(ns, GT_MASK))


def frame_stamp_ns(start_ns: int, index: int, rate_hz: float) -> int:
    """Header stamp (= bag timestamp) of frame ``index``: start + index / rate, in nanoseconds."""
    return int(start_ns) + int(round(index * 1e9 / float(rate_hz)))


def sample_json(index: int, name: str, label: int, defect_type: str, category: str,
                stamp_ns: int) -> str:
    """The /mafr/sample payload of one frame."""
    return json.dumps({"index": int(index), "name": name, "label": int(label),
                       "defect_type": defect_type, "category": category, "stamp_ns": int(stamp_ns)},
                      sort_keys=False)


def parse_sample(text: str) -> dict:
    """Decode a /mafr/sample payload; InputError if it is not one."""
    try:
        sample = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"/mafr/sample payload is not JSON ({exc}): {text[:80]!r}") from None
    missing = [k for k in SAMPLE_KEYS if not isinstance(sample, dict) or k not in sample]
    if missing:
        raise InputError(f"/mafr/sample payload lacks {missing}: {text[:120]!r}")
    return sample
