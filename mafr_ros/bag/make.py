"""``mafr bag make``: an MVTec 3D-AD layout dataset split -> a rosbag2 folder (see ``layout``).

Message contents come from the project's own conversions (``mafr_ros.ros.conversions``: the same
code the node decodes with) and are serialized by rclpy's rosidl type support, i.e. the exact CDR
bytes a live publisher would send; rosbags only stores them and writes each topic's message
definition and type hash.

Intrinsics: MVTec 3D-AD ships organised clouds but no pinhole intrinsics (its calibration is a
HALCON division-model camera). Unless the category has ``calibration/intrinsics.json`` with fx, fy,
cx, cy (the synthetic generator writes one), K is fitted to the written frames' clouds by linear
least squares (``geometry.fit_pinhole``) and its reprojection residual is reported. The choice and
the residual are stored in the bag's metadata.yaml ``custom_data`` under ``layout.CUSTOM_DATA_KEY``
(no sidecar file: the bag stays self-contained).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import DatasetError, InputError
from ..geometry import CameraIntrinsics, PinholeFitter, pinhole_residuals, valid_mask
from . import layout

INTRINSICS_CHOICES = ("auto", "fit", "dataset")


@dataclass
class MakeResult:
    """What ``make_bag`` wrote. ``intrinsics_source`` is 'fit' or 'dataset'; the residual (pixels,
    over every valid pixel of every frame written) is measured against the K that was written."""

    path: Path
    frames: int
    storage: str
    version: int
    topics: layout.BagTopics
    intrinsics: CameraIntrinsics
    intrinsics_source: str
    residual_rms_px: float
    residual_max_px: float
    residual_points: int
    start_ns: int
    end_ns: int
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        """The JSON stored in the bag's custom_data (minus the dataset fields added by make_bag)."""
        k = self.intrinsics
        return {"frames": self.frames, "start_ns": self.start_ns, "end_ns": self.end_ns,
                "intrinsics": {"source": self.intrinsics_source, "fx": k.fx, "fy": k.fy,
                               "cx": k.cx, "cy": k.cy, "width": k.width, "height": k.height},
                "residual_px": {"rms": self.residual_rms_px, "max": self.residual_max_px,
                                "points": self.residual_points}}


def _check_arguments(storage, version, rate, inputs, limit, frame_id, intrinsics):
    if storage not in layout.STORAGES:
        raise InputError(f"unknown storage {storage!r}: use one of {', '.join(layout.STORAGES)}")
    if version not in layout.VERSIONS:
        raise InputError(f"unsupported rosbag2 metadata version {version!r}: use 8 (ROS 2 Humble "
                         "and newer read it) or 9 (Jazzy and newer)")
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise InputError(f"rate must be a positive number of frames per second, got {rate!r}")
    if inputs not in layout.INPUTS:
        raise InputError(f"unknown inputs {inputs!r}: use one of {', '.join(layout.INPUTS)}")
    if limit is not None and (int(limit) != limit or limit < 1):
        raise InputError(f"limit must be a positive number of frames, got {limit!r}")
    if not frame_id or not isinstance(frame_id, str) or frame_id.strip() != frame_id:
        raise InputError(f"frame_id must be a non-empty name without surrounding spaces, got "
                         f"{frame_id!r}")
    if intrinsics not in INTRINSICS_CHOICES:
        raise InputError(f"unknown intrinsics choice {intrinsics!r}: use one of "
                         f"{', '.join(INTRINSICS_CHOICES)}")


def _prepare_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        if not out.parent.is_dir():
            raise InputError(f"the folder {out.parent} that should hold the bag {out.name} does "
                             "not exist; create it first")
        return
    if not overwrite:
        raise InputError(f"output {out} already exists; choose another --out or pass --overwrite "
                         "to replace it")
    # Only ever delete what is recognisably a bag (or nothing at all): a mistyped --out must not
    # wipe an unrelated folder.
    if out.is_dir() and ((out / "metadata.yaml").is_file() or not any(out.iterdir())):
        shutil.rmtree(out)
    else:
        raise InputError(f"--overwrite refuses to delete {out}: it is not a rosbag2 folder (no "
                         "metadata.yaml); remove it yourself or choose another --out")


def dataset_intrinsics(category_dir: Path, width: int, height: int) -> CameraIntrinsics | None:
    """K from ``<category>/calibration/intrinsics.json`` (fx, fy, cx, cy in pixels) if present."""
    path = category_dir / "calibration" / "intrinsics.json"
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
        k = CameraIntrinsics(float(values["fx"]), float(values["fy"]), float(values["cx"]),
                             float(values["cy"]), width, height)
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} must be JSON with numbers fx, fy, cx, cy (pixels): {exc}") \
            from None
    size = (values.get("width"), values.get("height"))
    if size != (None, None) and size != (width, height):
        raise DatasetError(f"{path} describes {size[0]}x{size[1]} images but the clouds are "
                           f"{width}x{height}")
    return k


def camera_info_message(intr: CameraIntrinsics, header):
    """sensor_msgs/CameraInfo of a rectified pinhole image: K, P = [K | 0], R = I, no distortion."""
    from sensor_msgs.msg import CameraInfo

    msg = CameraInfo()
    msg.header = header
    msg.height, msg.width = int(intr.height), int(intr.width)
    msg.distortion_model = "plumb_bob"
    msg.d = [0.0] * 5
    msg.k = [intr.fx, 0.0, intr.cx, 0.0, intr.fy, intr.cy, 0.0, 0.0, 1.0]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [intr.fx, 0.0, intr.cx, 0.0, 0.0, intr.fy, intr.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return msg


def _header(stamp_ns: int, frame_id: str):
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    return Header(stamp=Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000),
                  frame_id=frame_id)


def _sample_name(split: str, files) -> str:
    return f"{split}/{files.defect_type}/{Path(files.rgb_path).stem}"


def make_bag(dataset, category: str, out, *, split: str = "test",
             storage: str = layout.DEFAULT_STORAGE, version: int = layout.DEFAULT_VERSION,
             rate: float = layout.DEFAULT_RATE_HZ, inputs: str = "both",
             namespace: str = layout.DEFAULT_NAMESPACE, frame_id: str = layout.DEFAULT_FRAME_ID,
             limit: int | None = None, start_ns: int | None = None, intrinsics: str = "auto",
             overwrite: bool = False, progress: bool = True) -> MakeResult:
    """Write one dataset split as a rosbag2 folder ``out`` (see the module and ``layout``).

    inputs: 'depth' (32FC1 depth image), 'points' (organised PointCloud2) or 'both'. rgb,
    camera_info, gt mask and /mafr/sample are always written. limit: only the first N samples
    (dataset order: defect type, then file name). start_ns: stamp of frame 0 (default: now,
    rounded down to the second). intrinsics: 'auto' (dataset calibration/intrinsics.json if
    present, else fit), 'fit' (always fit, e.g. to check a calibration), 'dataset' (require the
    file). overwrite: replace ``out`` if it is a rosbag2 folder.
    """
    from rclpy.serialization import serialize_message
    from rosbags.rosbag2 import StoragePlugin, Writer
    from std_msgs.msg import String
    from tqdm import tqdm

    from ..data.mvtec import MVTecDataset
    from ..ros.conversions import array_to_image, xyz_to_pointcloud2
    from .types import bag_typestore

    _check_arguments(storage, version, rate, inputs, limit, frame_id, intrinsics)
    topics = layout.topics_for(namespace)
    out = Path(out).expanduser()
    dataset_root = Path(dataset).expanduser()
    samples = MVTecDataset(dataset_root, category, split)  # clear DatasetErrors for bad paths
    files = samples.files()[:limit] if limit else samples.files()
    _prepare_output(out, overwrite)
    started = time.perf_counter()

    # Intrinsics before writing: every frame's camera_info carries the same K (one camera).
    first = samples[0].xyz
    height, width = first.shape[:2]
    intr = None if intrinsics == "fit" else dataset_intrinsics(samples.root / category, width, height)
    if intr is None and intrinsics == "dataset":
        raise DatasetError(f"{samples.root / category}/calibration/intrinsics.json is missing; "
                           "use --intrinsics fit (or auto) to fit K to the clouds")
    source = "dataset" if intr is not None else "fit"
    if intr is None:
        fitter = PinholeFitter()
        for index in tqdm(range(len(files)), desc="fit K", unit="frame", disable=not progress):
            fitter.add(first if index == 0 else samples[index].xyz)
        intr = fitter.solve()
    del first

    with_depth, with_points = inputs in ("depth", "both"), inputs in ("points", "both")
    roles = [r for r in layout.FRAME_ORDER
             if (r != "depth" or with_depth) and (r != "points" or with_points)]
    typestore = bag_typestore()
    types = topics.types()
    start_ns = int(time.time()) * 1_000_000_000 if start_ns is None else int(start_ns)
    counts = dict.fromkeys((topics.by_role()[r] for r in roles), 0)
    squares, largest, points = 0.0, 0.0, 0
    stamp = start_ns

    writer = Writer(out, version=version, storage_plugin=StoragePlugin[storage.upper()])
    writer.open()
    try:
        connections = {role: writer.add_connection(topics.by_role()[role],
                                                   types[topics.by_role()[role]],
                                                   typestore=typestore) for role in roles}
        for index in tqdm(range(len(files)), desc=f"bag {category}/{split}", unit="frame",
                          disable=not progress):
            sample = samples[index]
            if sample.xyz.shape[:2] != (height, width):
                raise DatasetError(f"{sample.xyz_path} is {sample.xyz.shape[1]}x"
                                   f"{sample.xyz.shape[0]}, the first cloud {width}x{height}: a "
                                   "bag holds one camera, so every frame needs the same size")
            stamp = layout.frame_stamp_ns(start_ns, index, rate)
            header = _header(stamp, frame_id)
            residual = pinhole_residuals(sample.xyz, intr)
            residual = residual[np.isfinite(residual)]
            squares += float(np.dot(residual, residual))
            largest = max(largest, float(residual.max(initial=0.0)))
            points += residual.size

            # REP 118 / depth_image_proc: a missing point is NaN, not the dataset's (0, 0, 0).
            xyz = sample.xyz.copy()
            xyz[~valid_mask(xyz)] = np.nan
            messages = {
                "sample": String(data=layout.sample_json(
                    index, _sample_name(split, files[index]), sample.label, sample.defect_type,
                    category, stamp)),
                "camera_info": camera_info_message(intr, header),
                "gt_mask": array_to_image(np.where(sample.gt, np.uint8(layout.GT_DEFECT),
                                                   np.uint8(0)), layout.GT_ENCODING, header),
            }
            if with_depth:
                messages["depth"] = array_to_image(np.ascontiguousarray(xyz[..., 2]),
                                                   layout.DEPTH_ENCODING, header)
            if with_points:
                messages["points"] = xyz_to_pointcloud2(xyz, header)
            messages["rgb"] = array_to_image(sample.rgb, layout.RGB_ENCODING, header)
            for role in roles:
                writer.write(connections[role], stamp, serialize_message(messages[role]))
                counts[topics.by_role()[role]] += 1
        result = MakeResult(
            path=out, frames=len(files), storage=storage, version=version, topics=topics,
            intrinsics=intr, intrinsics_source=source,
            residual_rms_px=float(math.sqrt(squares / points)) if points else float("nan"),
            residual_max_px=largest, residual_points=points, start_ns=start_ns, end_ns=stamp,
            counts=counts)
        writer.set_custom_data(layout.CUSTOM_DATA_KEY, json.dumps({
            "generator": f"mafr_ros {__version__} (mafr bag make)",
            "dataset": str(dataset_root.resolve()), "category": category, "split": split,
            "inputs": inputs, "rate_hz": float(rate), "namespace": topics.namespace,
            "frame_id": frame_id, **result.summary()}, sort_keys=True))
        writer.close()
    except BaseException:
        writer.abort()
        shutil.rmtree(out, ignore_errors=True)  # never leave a half-written bag behind
        raise
    result.seconds = time.perf_counter() - started
    return result


def read_make_metadata(info_custom_data: dict) -> dict | None:
    """The ``mafr bag make`` JSON of a bag's custom_data (``BagInfo.custom_data``), or None."""
    text = (info_custom_data or {}).get(layout.CUSTOM_DATA_KEY)
    return json.loads(text) if text else None
