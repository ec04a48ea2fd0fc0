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

#: Namespace of the node started by a live evaluation.
LIVE_NAMESPACE = "/mafr_eval"


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


def _category(bag_layout: BagLayout, samples, fallback: str | None) -> str:
    """The frames' category (/mafr/sample), else the bag's metadata, else ``fallback``."""
    for sample in samples:
        if sample.category:
            return sample.category
    return bag_layout.category or fallback or "unknown"


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
    category = _category(bag_layout, run["samples"], detector.metadata.get("category"))
    metrics = compute_metrics(category, run)
    th = detector.thresholds
    return write_evaluation(
        run, metrics, checkpoint=checkpoint, model_id=detector.model_id,
        device=str(detector.device), pixel_threshold=th.pixel if th else None, out_dir=out_dir,
        json_path=json_path, overlays=overlays,
        extra={"mode": "direct", "bag": str(Path(bag)), "n_frames": len(run["samples"]),
               "frames": _frames_table(run["samples"], run["scores"])})


def _heatmap_array(msg) -> np.ndarray:
    from ..ros import conversions
    return conversions.image_to_array(msg, copy=True).astype(np.float32, copy=False)


def evaluate_bag_live(bag, checkpoint=None, out_dir=None, json_path=None, device: str = "auto",
                      overlays: int = 12, progress: bool = True, namespace: str | None = None,
                      frame_timeout: float = 60.0, startup_timeout: float = 300.0,
                      node_params: dict | None = None, log_path=None) -> dict:
    """Live evaluation: the node in its own process, the bag replayed into it in lockstep, its
    ``~/anomaly`` results (raw score, normalised heatmap at input resolution) scored with the
    shared metrics. With ``out_dir`` the node's results are also recorded as a rosbag2
    (``out_dir/node_results``) and its log kept (``out_dir/node.log``).

    ``namespace``: run the node there, the bag's camera topics remapped to it (default
    :data:`LIVE_NAMESPACE`, so that a camera publishing the bag's topic names on the same ROS
    domain never feeds the evaluated node). Frames the node did not answer are listed in ``missing`` (with the
    node's reason) and left out of the metrics; the summary says how many.
    Returns the summary of :func:`mafr_ros.evaluate.write_evaluation` plus ``mode`` ("live"),
    ``bag``, ``frames`` (per frame: index, name, stamp_ns, label, raw score or None),
    ``n_frames``, ``n_missing``, ``missing``, ``node_log`` and ``timings``.
    """
    import time

    from tqdm import tqdm

    from ..core.checkpoint import read_metadata
    from ..core.detector import default_model_path
    from ..evaluate import compute_metrics, write_evaluation
    from .live import LiveReplay, NodeProcess, node_params_for_evaluation

    started = time.perf_counter()
    bag_layout = inspect_bag(bag)
    checkpoint = Path(checkpoint) if checkpoint else default_model_path()
    meta = read_metadata(checkpoint)  # a clear CheckpointError before any process starts
    topics = bag_layout.topics
    played = [topics.camera_info, topics.points if bag_layout.has_points else topics.depth,
              topics.rgb]
    played = [t for t in played if t in _bag_topics(bag)]
    remap = None
    node_ns = layout.normalize_namespace(namespace or LIVE_NAMESPACE)
    if node_ns != topics.namespace:
        target = layout.topics_for(node_ns)
        remap = {getattr(topics, role): getattr(target, role)
                 for role in ("camera_info", "points", "depth", "rgb")
                 if getattr(topics, role) in played}
    out_dir = Path(out_dir) if out_dir is not None else None
    if log_path is None and out_dir is not None:
        log_path = out_dir / "node.log"
    params = node_params_for_evaluation(bag_layout.input_mode, checkpoint, device, node_params)

    node = NodeProcess(node_ns, params, log_path)
    outcomes, stats = [], None
    try:
        with LiveReplay(bag, node.node_name, topics=played, remap=remap,
                        record=(out_dir / "node_results") if out_dir is not None else None) as replay:
            replay.wait_ready(node, timeout=startup_timeout)
            ready_s = time.perf_counter() - started
            bar = tqdm(total=bag_layout.frames, desc="live", unit="frame", disable=not progress,
                       leave=False)
            outcomes, stats = replay.lockstep(node, timeout=frame_timeout,
                                              on_frame=lambda _: bar.update())
            bar.close()
            replay.wait_acks(2.0)
    finally:
        code = node.stop()
    if code not in (0, None):
        log.warning("the node exited with code %s; its log: %s", code, node.log_path)

    by_stamp = {o.stamp_ns: o for o in outcomes}
    answered, scores, maps, missing, seconds = [], [], [], [], []
    for sample in read_bag_samples(bag, bag_layout, with_xyz=False):
        outcome = by_stamp.get(sample.stamp_ns)
        if outcome is None or outcome.result is None:
            missing.append((sample, outcome.reason if outcome else "not sent (the node had stopped)"))
            continue
        result = outcome.result
        heat = result.heatmap
        if (heat.width, heat.height) != (sample.rgb.shape[1], sample.rgb.shape[0]):
            missing.append((sample, f"the result carries no {sample.rgb.shape[1]}x"
                                    f"{sample.rgb.shape[0]} heatmap (got {heat.width}x{heat.height})"))
            continue
        answered.append(sample)
        scores.append(float(result.score))
        maps.append(_heatmap_array(heat))
        seconds.append(result.processing_time.sec + result.processing_time.nanosec * 1e-9)
    for sample, reason in missing:
        log.warning("frame %s (%s) has no result from the node: %s", sample.index, sample.name,
                    reason)
    if not answered:
        raise InputError(f"the node answered none of the {len(missing)} frames of {bag}; first "
                         f"reason: {missing[0][1] if missing else 'no frames'}; node log: "
                         f"{node.log_path}\n{node.log_tail(1500)}")
    run = {"samples": answered, "scores": np.asarray(scores, dtype=np.float64),
           "labels": np.array([s.label for s in answered]), "full_maps": maps,
           "seconds_per_image": float(np.median(seconds))}
    category = _category(bag_layout, answered, meta.get("category"))
    metrics = compute_metrics(category, run)
    missing_rows = [{"index": s.index, "name": s.name, "stamp_ns": s.stamp_ns, "reason": r}
                    for s, r in missing]
    return write_evaluation(
        run, metrics, checkpoint=checkpoint, model_id=answered_model_id(outcomes, meta),
        device=device, pixel_threshold=0.5, out_dir=out_dir, json_path=json_path,
        overlays=overlays,
        extra={"mode": "live", "bag": str(Path(bag)), "n_frames": len(answered) + len(missing),
               "n_missing": len(missing), "missing": missing_rows, "node_log": str(node.log_path),
               "maps": "normalised heatmaps of ~/anomaly (0.5 = pixel threshold)",
               "timings": {"node_ready_s": round(ready_s, 2),
                           "replay_s": round(stats.seconds, 2) if stats else None,
                           "total_s": round(time.perf_counter() - started, 2)},
               "frames": _frames_table(answered, scores, missing)})


def answered_model_id(outcomes, meta: dict) -> str:
    """The model id the node reported (falls back to the checkpoint's)."""
    for outcome in outcomes:
        if outcome.result is not None and outcome.result.model_id:
            return outcome.result.model_id
    return meta.get("model_id", "?")


def _bag_topics(bag) -> set[str]:
    from .reader import bag_info
    return {t.name for t in bag_info(bag).topics}
