"""``mafr eval --bag``: accuracy of a checkpoint on a bag with ground truth.

Two ways, one scoring (:mod:`mafr_ros.evaluate` computes the metrics and writes the report of
both, and of ``mafr eval --dataset``):

* **direct** (:func:`evaluate_bag`): read the bag, decode each frame's colour image and organised
  cloud (or depth + camera_info) with the node's own conversions, run the
  :class:`~mafr_ros.core.detector.Detector` in this process. No DDS. On a bag written by
  ``mafr bag make`` this gives the very numbers of ``mafr eval`` on the source dataset.
* **live** (:func:`evaluate_bag_live`): start the node as a process, replay the bag into it in
  lockstep (one frame, wait for its ``~/anomaly``, next frame) so that the node's latest-wins slot
  never drops a frame, record the results and score them. A frame the node did not answer is
  reported as missing, never silently left out.

Ground truth comes from the bag: ``gt/mask`` (mono8, non-zero = defect) and ``/mafr/sample``
(label, name); without a sample message a frame's label is "defective" iff its mask is non-empty.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import layout

log = logging.getLogger("mafr_ros.bag.evaluate")


@dataclass
class BagSample:
    """What the evaluation needs of one frame of a dataset bag (the fields save_overlays reads).

    ``xyz`` is dropped (set to None) once the frame is preprocessed, so a long bag is not held in
    memory as float clouds."""

    index: int
    stamp_ns: int
    name: str
    label: int
    defect_type: str
    category: str | None
    rgb: np.ndarray            # (H, W, 3) uint8
    gt: np.ndarray             # (H, W) bool
    xyz: np.ndarray | None     # (H, W, 3) float32, NaN where invalid


@dataclass(frozen=True)
class BagLayout:
    """Topics of a dataset bag and which 3D input it carries."""

    topics: layout.BagTopics
    has_points: bool
    has_depth: bool
    has_sample: bool
    category: str | None
    frames: int

    @property
    def input_mode(self) -> str:
        """The node's input_mode that replays this bag: points when the bag has them."""
        return "points" if self.has_points else "depth"


def inspect_bag(bag) -> BagLayout:
    """Find the layout of a dataset bag (namespace from `mafr bag make`'s metadata, else from the
    topic names); InputError saying what is missing otherwise."""
    from .make import read_make_metadata
    from .reader import bag_info

    info = bag_info(bag)
    names = {t.name: t for t in info.topics}
    made = read_make_metadata(info.custom_data) or {}
    namespace = made.get("namespace")
    if namespace is None:
        suffix = "/" + layout.RGB
        found = sorted(n[: -len(suffix)] or "/" for n in names if n.endswith(suffix))
        if len(found) != 1:
            raise InputError(
                f"bag {info.path} has {'no' if not found else 'several'} colour topic(s) "
                f"'<ns>/{layout.RGB}' ({', '.join(found) or 'topics: ' + ', '.join(sorted(names))})"
                ": evaluation needs one camera as written by `mafr bag make`")
        namespace = found[0]
    topics = layout.topics_for(namespace)
    missing = [t for t in (topics.rgb, topics.gt_mask) if t not in names]
    if missing:
        raise InputError(f"bag {info.path} has no {', '.join(missing)}: evaluation needs the colour "
                         "image and the ground-truth mask of every frame (`mafr bag make` writes "
                         "both)")
    has_points, has_depth = topics.points in names, topics.depth in names
    if not has_points and not (has_depth and topics.camera_info in names):
        raise InputError(f"bag {info.path} has neither {topics.points} nor {topics.depth} + "
                         f"{topics.camera_info}: there is no 3D input to evaluate on")
    return BagLayout(topics=topics, has_points=has_points, has_depth=has_depth,
                     has_sample=topics.sample in names, category=made.get("category"), frames=names[topics.rgb].count)


def _decode(message, cache: dict):
    from rclpy.serialization import deserialize_message

    from .types import message_class

    cls = cache.get(message.msgtype)
    if cls is None:
        cls = cache[message.msgtype] = message_class(message.msgtype)
    return deserialize_message(message.data, cls)


def read_bag_samples(bag, bag_layout: BagLayout | None = None,
                     with_xyz: bool = True) -> Iterator[BagSample]:
    """The frames of a dataset bag in stamp order, decoded with the node's conversions: colour
    from ``rgb/image_rect_color``, xyz from the organised ``points`` (else ``depth`` through
    ``camera_info``), ground truth from ``gt/mask`` and ``/mafr/sample``."""
    from ..geometry import depth_to_xyz
    from ..ros import conversions
    from .reader import read_frames

    bag_layout = bag_layout or inspect_bag(bag)
    topics = bag_layout.topics
    wanted = [topics.rgb, topics.gt_mask]
    if bag_layout.has_sample:
        wanted.append(topics.sample)
    if with_xyz:
        wanted += [topics.points] if bag_layout.has_points else [topics.depth, topics.camera_info]
    classes: dict = {}
    intrinsics = None
    index = 0
    for frame in read_frames(bag, topics=wanted):
        by_topic = frame.by_topic()
        if with_xyz and not bag_layout.has_points and topics.camera_info in by_topic:
            intrinsics = conversions.camera_info_to_intrinsics(
                _decode(by_topic[topics.camera_info], classes), rectified=True)
        if topics.rgb not in by_topic:
            if set(by_topic) - {topics.camera_info}:
                raise InputError(f"bag {bag}: the frame stamped {frame.stamp_ns} has no "
                                 f"{topics.rgb} (it has {', '.join(sorted(by_topic))})")
            continue  # a camera_info on its own
        rgb_msg = _decode(by_topic[topics.rgb], classes)
        header_stamp = int(rgb_msg.header.stamp.sec) * 1_000_000_000 + int(rgb_msg.header.stamp.nanosec)
        rgb = conversions.rgb_from_image(rgb_msg)
        if topics.gt_mask not in by_topic:
            raise InputError(f"bag {bag}: the frame stamped {header_stamp} has no ground-truth "
                             f"mask on {topics.gt_mask}")
        gt = conversions.image_to_array(_decode(by_topic[topics.gt_mask], classes)) != 0
        if gt.shape != rgb.shape[:2]:
            raise InputError(f"bag {bag}: the mask of frame {header_stamp} is {gt.shape[1]}x"
                             f"{gt.shape[0]} but its image {rgb.shape[1]}x{rgb.shape[0]}")
        sample = None
        if topics.sample in by_topic:
            sample = layout.parse_sample(_decode(by_topic[topics.sample], classes).data)
        xyz = None
        if with_xyz:
            if bag_layout.has_points:
                if topics.points not in by_topic:
                    raise InputError(f"bag {bag}: the frame stamped {header_stamp} has no "
                                     f"{topics.points}")
                xyz = conversions.pointcloud2_to_xyz(_decode(by_topic[topics.points], classes))
            else:
                if topics.depth not in by_topic:
                    raise InputError(f"bag {bag}: the frame stamped {header_stamp} has no "
                                     f"{topics.depth}")
                if intrinsics is None:
                    raise InputError(f"bag {bag}: no {topics.camera_info} before the frame "
                                     f"stamped {header_stamp}: depth cannot be turned into points")
                depth, scale = conversions.depth_from_image(_decode(by_topic[topics.depth], classes))
                xyz = depth_to_xyz(depth, intrinsics, depth_scale=scale)
            if xyz.shape[:2] != rgb.shape[:2]:
                raise InputError(f"bag {bag}: the 3D input of frame {header_stamp} is "
                                 f"{xyz.shape[1]}x{xyz.shape[0]} but its image "
                                 f"{rgb.shape[1]}x{rgb.shape[0]}: it must be registered")
        label = int(sample["label"]) if sample else int(gt.any())
        yield BagSample(
            index=int(sample["index"]) if sample else index, stamp_ns=header_stamp,
            name=sample["name"] if sample else f"frame_{index:04d}", label=label,
            defect_type=sample["defect_type"] if sample else ("defect" if label else "good"),
            category=sample["category"] if sample else bag_layout.category,
            rgb=rgb, gt=gt, xyz=xyz)
        index += 1


def _category(bag_layout: BagLayout, samples, detector) -> str:
    for sample in samples:
        if sample.category:
            return sample.category
    return bag_layout.category or detector.metadata.get("category") or "unknown"


def _frames_table(samples, scores, missing=()) -> list[dict]:
    rows = [{"index": s.index, "name": s.name, "stamp_ns": s.stamp_ns, "label": s.label,
             "score": float(score)} for s, score in zip(samples, scores)]
    rows += [{"index": s.index, "name": s.name, "stamp_ns": s.stamp_ns, "label": s.label,
              "score": None, "missing": reason} for s, reason in missing]
    return sorted(rows, key=lambda r: r["stamp_ns"])


def evaluate_bag(bag, checkpoint, out_dir=None, json_path=None, device: str = "auto",
                 overlays: int = 12, progress: bool = True, backbone_weights=None) -> dict:
    """Direct evaluation of a dataset bag (read -> detector -> metrics, no DDS).

    Returns the summary of :func:`mafr_ros.evaluate.write_evaluation` plus ``mode`` ("direct"),
    ``bag``, ``frames`` (per-frame index, name, stamp_ns, label, raw score) and ``n_frames``."""
    from ..core.detector import Detector
    from ..data.preprocess import preprocess
    from ..evaluate import compute_metrics, score_samples, write_evaluation

    bag_layout = inspect_bag(bag)
    detector = Detector.from_checkpoint(checkpoint, device=device, backbone_weights=backbone_weights)
    cfg = detector.preprocess_cfg

    def prepare(sample: BagSample):
        model_input = preprocess(sample.rgb, sample.xyz, cfg)
        sample.xyz = None  # not needed any more (the report needs rgb and gt only)
        return model_input

    run = score_samples(detector, read_bag_samples(bag, bag_layout), prepare,
                        progress=progress, total=bag_layout.frames)
    if not run["samples"]:
        raise InputError(f"bag {bag} holds no frame to evaluate")
    category = _category(bag_layout, run["samples"], detector)
    metrics = compute_metrics(category, run)
    th = detector.thresholds
    return write_evaluation(
        run, metrics, checkpoint=checkpoint, model_id=detector.model_id,
        device=str(detector.device), pixel_threshold=th.pixel if th else None, out_dir=out_dir,
        json_path=json_path, overlays=overlays,
        extra={"mode": "direct", "bag": str(Path(bag)), "n_frames": len(run["samples"]),
               "frames": _frames_table(run["samples"], run["scores"])})
