"""End-to-end: the mafr node in its own process, a camera process publishing the real Kinect frame
and synthetic frames over DDS, a bag of synthetic parts played into the node, and this process
observing every output.

The node processes are started through the bag harness (test/bag_harness.py, fixture
``processes``): each in a process group of its own, stopped at the end of the module and checked,
with psutil, to have left nothing running, whatever the tests did.

Two node processes start together (depth mode and points mode), so their model loads overlap.
Inputs are reliable (qos.input.reliability:=reliable): large images over best-effort Fast DDS
are mostly lost (docs/environment.md). Each fault test sends a bad frame, checks the counter in
/diagnostics and the error line in the node's log, then sends a valid frame and checks that it
is answered.
"""
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parent / "procs"))
from node_harness import CameraProcess, Observer, diagnostic_values, stamp_ns  # noqa: E402

pytestmark = pytest.mark.ros

OUTPUTS = ("anomaly", "heatmap", "overlay", "mask", "markers", "anomaly_points")
WIDTH, HEIGHT = 640, 480
COMMON = {"qos.input.reliability": "reliable", "diagnostics.period": 0.25,
          "diagnostics.stale_after": 1.0, "diagnostics.log_throttle": 60.0,
          "publish.heatmap_in_result": True, "regions.min_area": 1, "device": "cpu"}


def _default(name):
    from mafr_ros.ros.node import PARAMETERS
    return next(spec.default for spec in PARAMETERS if spec.name == name)


class Rig:
    """One node process + its camera, observed by the shared Observer."""

    def __init__(self, observer, processes, namespace, params):
        self.obs = observer
        self.ns = namespace
        self.node_name = f"{namespace}/mafr"
        # The shipped parameters file first, as a deployment would; -p overrides it.
        self.node = processes.node(namespace, {**COMMON, **params},
                                   params_file=REPO / "config" / "mafr.yaml")
        self.camera = None

    def connect(self, topics):
        self.camera = CameraProcess(self.ns)
        # The node subscribes only once its model is loaded and warmed up.
        reply = self.camera.cmd(timeout=320, op="wait", topics=topics)
        assert all(reply["subscribers"].values()), (reply, self.node.log())

    def topic(self, name):
        return f"{self.node_name}/{name}"

    def send(self, **frame):
        frame.setdefault("stamp", "now")
        return self.camera.cmd(op="frame", **frame)["sent"]

    def result(self, stamp, timeout=120.0):
        try:
            return self.obs.with_stamp(self.topic("anomaly"), stamp, timeout)
        except TimeoutError:
            raise AssertionError(f"no result for stamp {stamp}; node log:\n{self.node.log()[-3000:]}")

    def diagnostics(self, kind="detector"):
        """(level, message, values) of the newest status of this node."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for msg in reversed(list(self.obs.messages["/diagnostics"])):
                found = diagnostic_values(msg, f"{self.node_name}: {kind}")
                if found is not None:
                    return found
            time.sleep(0.1)
        raise AssertionError(f"no diagnostics from {self.node_name}")

    def wait_counter(self, key, at_least, timeout=60.0):
        """Wait until the detector status reports ``key`` >= at_least; return all values."""
        deadline = time.monotonic() + timeout
        values = {}
        while time.monotonic() < deadline:
            values = self.diagnostics()[2]
            if int(values.get(key, 0)) >= at_least:
                return values
            time.sleep(0.1)
        raise AssertionError(f"{key} never reached {at_least}: {values}\n{self.node.log()[-2000:]}")

    def failed(self, reason):
        return int(self.diagnostics()[2][f"failed.{reason}"])


@pytest.fixture(scope="module")
def rigs(processes):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image, PointCloud2
    from visualization_msgs.msg import MarkerArray

    from mafr_ros.msg import AnomalyResult

    tag = os.getpid()
    observer = Observer(f"node_e2e_observer_{tag}")
    # Both nodes load their model at the same time.
    depth = Rig(observer, processes, f"/e2e_depth_{tag}", {"input_mode": "depth"})
    points = Rig(observer, processes, f"/e2e_points_{tag}", {"input_mode": "points"})
    types = {"anomaly": AnomalyResult, "heatmap": Image, "overlay": Image, "mask": Image,
             "markers": MarkerArray, "anomaly_points": PointCloud2}
    for rig in (depth, points):
        for name in OUTPUTS:
            observer.subscribe(types[name], rig.topic(name))
    observer.subscribe(DiagnosticArray, "/diagnostics")
    try:
        depth.connect(["rgb", "info", "depth"])
        points.connect(["rgb", "info", "points"])
        yield {"depth": depth, "points": points}
    finally:
        for rig in (depth, points):
            if rig.camera is not None:
                rig.camera.stop()
        codes = {name: rig.node.stop() for name, rig in (("depth", depth), ("points", points))}
        observer.close()
        # A SIGINT is a normal shutdown: exit code 0, no traceback.
        for name, rig in (("depth", depth), ("points", points)):
            assert codes[name] == 0, rig.node.log()[-3000:]
            assert "Traceback" not in rig.node.log(), rig.node.log()[-3000:]


# --------------------------------------------------------------------------------------------------
# Helpers: what every result and output must satisfy
# --------------------------------------------------------------------------------------------------
def _image_array(msg, dtype, channels=1):
    arr = np.frombuffer(bytes(msg.data), dtype=dtype)
    shape = (msg.height, msg.width) if channels == 1 else (msg.height, msg.width, channels)
    return arr.reshape(shape)


def check_result(result, stamp, frame_id="camera_color_optical_frame", size=(WIDTH, HEIGHT)):
    assert stamp_ns(result.header.stamp) == stamp
    assert result.header.frame_id == frame_id
    assert result.model_id
    assert result.threshold > 0 and result.pixel_threshold > 0
    assert 0.0 <= result.normalized_score <= 1.0
    assert result.is_anomalous == (result.score > result.threshold)
    assert (result.normalized_score > 0.5) == result.is_anomalous
    assert 0.0 < result.valid_fraction <= 1.0
    processing = result.processing_time.sec + result.processing_time.nanosec * 1e-9
    latency = result.latency.sec + result.latency.nanosec * 1e-9
    assert 0.0 < processing <= latency < 600.0
    heat = result.heatmap
    assert (heat.width, heat.height, heat.encoding) == (*size, "32FC1")
    assert heat.header == result.header
    heatmap = _image_array(heat, np.float32)
    assert np.isfinite(heatmap).all() and heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    peaks = [r.peak_score for r in result.regions]
    assert peaks == sorted(peaks, reverse=True)
    # regions.min_area is 1 here: the regions partition the thresholded map exactly.
    assert sum(r.area_px for r in result.regions) == int((heatmap > 0.5).sum())
    for i, region in enumerate(result.regions):
        assert region.id == i
        box = region.bbox
        assert box.x_offset + box.width <= size[0] and box.y_offset + box.height <= size[1]
        inside = heatmap[box.y_offset:box.y_offset + box.height,
                         box.x_offset:box.x_offset + box.width]
        assert inside.max() == pytest.approx(region.peak_score, abs=1e-6)
        assert 0.5 < region.mean_score <= region.peak_score + 1e-6
        centroid = (region.centroid.x, region.centroid.y, region.centroid.z)
        if region.num_points:
            assert np.isfinite(centroid).all() and region.centroid.z > 0
            assert min(region.extent.x, region.extent.y, region.extent.z) >= 0
        else:
            assert np.isnan(centroid).all()
    return heatmap


def check_outputs(rig, result, heatmap, size=(WIDTH, HEIGHT)):
    """Heatmap / overlay / mask / markers / anomaly_points of the same frame."""
    stamp = stamp_ns(result.header.stamp)
    heat = rig.obs.with_stamp(rig.topic("heatmap"), stamp, 30)
    assert bytes(heat.data) == bytes(result.heatmap.data)
    overlay = rig.obs.with_stamp(rig.topic("overlay"), stamp, 30)
    assert (overlay.encoding, overlay.width, overlay.height) == ("bgr8", *size)
    assert overlay.header == result.header
    mask = _image_array(rig.obs.with_stamp(rig.topic("mask"), stamp, 30), np.uint8)
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, heatmap > 0.5)

    markers = rig.obs.wait_for(
        rig.topic("markers"),
        lambda m: m.markers and stamp_ns(m.markers[0].header.stamp) == stamp, 30).markers
    from visualization_msgs.msg import Marker
    assert markers[0].action == Marker.DELETEALL
    with_points = [r for r in result.regions if r.num_points > 0]
    assert len(markers) == 1 + 2 * len(with_points)
    for marker in markers:
        assert marker.header == result.header
        for c in (marker.color.r, marker.color.g, marker.color.b, marker.color.a):
            assert 0.0 <= c <= 1.0
    boxes = [m for m in markers[1:] if m.ns == "anomaly_boxes"]
    labels = [m for m in markers[1:] if m.ns == "anomaly_labels"]
    assert [m.type for m in boxes] == [Marker.CUBE] * len(with_points)
    assert [m.type for m in labels] == [Marker.TEXT_VIEW_FACING] * len(with_points)
    for box, region in zip(boxes, with_points):
        assert box.id == region.id and box.color.a > 0
        assert box.scale.x >= region.extent.x and box.scale.z >= region.extent.z

    cloud = rig.obs.with_stamp(rig.topic("anomaly_points"), stamp, 30)
    assert [f.name for f in cloud.fields] == ["x", "y", "z", "score"]
    assert cloud.header == result.header
    if cloud.width:
        from mafr_ros.ros.conversions import pointcloud2_fields
        scores = pointcloud2_fields(cloud, ["score"], organised=False)["score"]
        assert scores.min() >= 0.5


# --------------------------------------------------------------------------------------------------
# Depth mode
# --------------------------------------------------------------------------------------------------
def test_kinect_frame_full_image(rigs):
    rig = rigs["depth"]
    stamp = rig.send(source="kinect")
    result = rig.result(stamp, timeout=300)
    heatmap = check_result(result, stamp)
    check_outputs(rig, result, heatmap)
    # The newest status may predate this result (one per diagnostics.period): wait for one that
    # counts it before reading its latency.
    values = rig.wait_counter("frames_processed", 1)
    assert values["state"] == "ready" and values["device"] == "cpu" and values["precision"] == "fp32"
    assert values["model_id"] == result.model_id
    assert float(values["latency_median_ms"]) > 0


def test_kinect_frame_with_roi_maps_back_to_full_resolution(rigs):
    rig = rigs["depth"]
    roi = [180, 120, 280, 240]
    results = rig.obs.set_parameters(rig.node_name, roi=roi)
    assert results[0].successful, results[0].reason
    try:
        stamp = rig.send(source="kinect")
        result = rig.result(stamp)
        heatmap = check_result(result, stamp)
    finally:
        assert rig.obs.set_parameters(rig.node_name, roi=[0, 0, 0, 0])[0].successful
    outside = np.ones(heatmap.shape, bool)
    outside[roi[1]:roi[1] + roi[3], roi[0]:roi[0] + roi[2]] = False
    assert (heatmap[outside] == 0).all()
    # the detector scored the ROI (pixels far from every valid 3D point are 0 by definition)
    assert (heatmap[~outside] > 0).mean() > 0.1
    for region in result.regions:
        assert region.bbox.x_offset >= roi[0] and region.bbox.y_offset >= roi[1]

    # The node adds nothing to the model's answer: the detector, run here on the same crop
    # (16UC1 millimetres -> metres, intrinsics cropped to the ROI), gives the same score and map.
    from mafr_ros.core.detector import Detector, default_model_path
    from mafr_ros.geometry import CameraIntrinsics, depth_to_xyz
    from node_camera import kinect_frame
    from node_harness import KINECT_DIR

    rgb, depth = kinect_frame(KINECT_DIR)
    rows, cols = slice(roi[1], roi[1] + roi[3]), slice(roi[0], roi[0] + roi[2])
    intrinsics = CameraIntrinsics(525.0, 525.0, 320.0, 240.0, WIDTH, HEIGHT)
    xyz = depth_to_xyz(depth[rows, cols], intrinsics.cropped(roi[0], roi[1], roi[2], roi[3]))
    checkpoint = os.environ.get("MAFR_TEST_CHECKPOINT") or default_model_path()
    expected = Detector.from_checkpoint(checkpoint, device="cpu").detect(rgb[rows, cols], xyz)
    assert result.score == pytest.approx(expected.score, rel=1e-5)
    assert result.valid_fraction == pytest.approx(expected.valid_fraction, rel=1e-6)
    np.testing.assert_allclose(heatmap[rows, cols], expected.normalized_map, atol=1e-5)


def test_threshold_overrides_apply_at_run_time(rigs):
    """A very low pixel threshold turns the part into anomalous regions (so markers and anomalous
    points are exercised on real geometry); a very high image threshold clears the decision."""
    rig = rigs["depth"]
    results = rig.obs.set_parameters(rig.node_name, pixel_threshold=1e-3, image_threshold=1e6)
    assert all(r.successful for r in results), results
    try:
        stamp = rig.send(source="kinect")
        result = rig.result(stamp)
    finally:
        results = rig.obs.set_parameters(rig.node_name, pixel_threshold=0.0, image_threshold=0.0)
        assert all(r.successful for r in results)
    assert result.threshold == pytest.approx(1e6) and result.pixel_threshold == pytest.approx(1e-3)
    assert not result.is_anomalous and result.normalized_score < 0.5
    heatmap = check_result(result, stamp)
    regions = [r for r in result.regions if r.num_points > 0]
    assert regions, "no region with 3D points at a near-zero pixel threshold"
    for region in regions:  # the Kinect scene is 0.5-2 m in front of the camera
        assert 0.3 < region.centroid.z < 3.0 and region.extent.z >= 0
    check_outputs(rig, result, heatmap)
    cloud = rig.obs.with_stamp(rig.topic("anomaly_points"), stamp, 30)
    assert cloud.width > 0


def test_synthetic_part(rigs):
    rig = rigs["depth"]
    stamp = rig.send(source="synthetic")
    heatmap = check_result(rig.result(stamp), stamp)
    assert heatmap.shape == (HEIGHT, WIDTH)


def test_parameter_updates_are_validated(rigs):
    rig = rigs["depth"]
    for values, expected in (({"roi": [10, 10, -5, 20]}, "positive"),
                             ({"image_threshold": -1.0}, "image_threshold"),
                             ({"qos__input__reliability": "reliable"}, "read-only"),
                             ({"checkpoint": "/tmp/other.safetensors"}, "read-only"),
                             ({"overlay__alpha": 1.5}, "overlay.alpha")):
        result = rig.obs.set_parameters(rig.node_name, **values)[0]
        assert not result.successful and expected in result.reason, (values, result.reason)
    assert rig.obs.set_parameters(rig.node_name, image_threshold=0.0)[0].successful


FAULTS = [
    # (fault frame, failure reason, text the error line must contain)
    (dict(faults={"rgb_truncate": True}), "malformed_message", "data length"),
    (dict(faults={"rgb_encoding": "yuv422"}), "unsupported_encoding", "'yuv422'"),
    (dict(faults={"depth_fill": "nan", "depth_encoding": "32FC1"}), "too_few_points",
     "only 0 valid 3D points"),
    (dict(faults={"depth_fill": "inf", "depth_encoding": "32FC1"}), "too_few_points",
     "only 0 valid 3D points"),
    (dict(faults={"depth_fill": "zero"}), "too_few_points", "only 0 valid 3D points"),
    (dict(faults={"depth_keep": 200}), "too_few_points", "min_valid_points"),
    (dict(faults={"depth_size": [320, 240]}), "unregistered_input", "320x240"),
    (dict(faults={"depth_frame": "camera_depth_optical_frame"}), "unregistered_input",
     "'camera_depth_optical_frame'"),
    (dict(send=["rgb", "depth"], frame_id="second_camera_optical_frame"), "no_camera_info",
     "no camera_info for frame 'second_camera_optical_frame'"),
    (dict(faults={"info": "zero"}, frame_id="uncalibrated_optical_frame"), "invalid_camera_info",
     "zero focal length"),
]


@pytest.mark.parametrize("fault,reason,text", FAULTS, ids=[f[1] + "-" + str(i)
                                                          for i, f in enumerate(FAULTS)])
def test_bad_input_is_counted_logged_and_survived(rigs, fault, reason, text):
    rig = rigs["depth"]
    before = rig.failed(reason)
    bad = rig.send(source="synthetic", **fault)
    values = rig.wait_counter(f"failed.{reason}", before + 1)
    # The reason is logged (once per diagnostics.log_throttle), the details are in diagnostics.
    assert f"frame dropped [{reason}]" in rig.node.log()
    assert values["last_failure"].startswith(reason) and text in values["last_failure"], values
    assert bad not in rig.obs.received_stamps(rig.topic("anomaly"))
    # The camera_info faults recover once a valid camera_info for that frame arrives.
    recovery = {"frame_id": fault.get("frame_id", "camera_color_optical_frame")}
    stamp = rig.send(source="synthetic", **recovery)
    check_result(rig.result(stamp), stamp, recovery["frame_id"])


def test_errors_are_throttled_per_reason(rigs):
    rig = rigs["depth"]
    rig.send(source="synthetic", faults={"rgb_truncate": True})  # logged now or recently
    before = rig.wait_counter("failed.malformed_message", rig.failed("malformed_message") + 1)
    before = int(before["failed.malformed_message"])
    lines_before = rig.node.log().count("[malformed_message]")
    assert lines_before >= 1
    for i in range(1, 4):
        # One at a time: sets sent while the worker is busy would be replaced (latest wins) and
        # counted as dropped, not failed.
        rig.send(source="synthetic", faults={"rgb_truncate": True})
        rig.wait_counter("failed.malformed_message", before + i)
    # diagnostics.log_throttle is 60 s: the counter counts every frame, the log holds at most one
    # line per 60 s. (The first fault may have been suppressed after an earlier test's report, so
    # the 60 s can run out during the loop: then one new line reports the suppressed ones.)
    lines = [line for line in rig.node.log().splitlines() if "[malformed_message]" in line]
    times = [float(re.search(r"\[(\d+\.\d+)\]", line).group(1)) for line in lines]
    assert len(lines) <= lines_before + 1, lines
    assert all(later - earlier >= 59.0 for earlier, later in zip(times, times[1:])), lines
    if len(lines) > lines_before:
        assert "more since the last report" in lines[-1], lines[-1]


def test_stamps_out_of_order_are_dropped(rigs):
    rig = rigs["depth"]
    now = time.time()
    first = rig.send(source="synthetic", stamp=now)
    rig.result(first)
    before = rig.failed("out_of_order")
    late = rig.send(source="synthetic", stamp=now - 0.05)
    values = rig.wait_counter("failed.out_of_order", before + 1)
    assert "arrived after one stamped" in values["last_failure"]
    assert "frame dropped [out_of_order]" in rig.node.log()
    stamp = rig.send(source="synthetic", stamp=now + 0.5)
    check_result(rig.result(stamp), stamp)
    assert late not in rig.obs.received_stamps(rig.topic("anomaly"))


def test_stalled_stream_is_reported_and_recovers(rigs):
    rig = rigs["depth"]
    depth_topic = f"{rig.ns}/depth_registered/image_rect"
    deadline = time.monotonic() + 60
    stalled = None
    while time.monotonic() < deadline:  # colour keeps coming, depth has stopped
        rig.send(source="synthetic", send=["info", "rgb"], info_delay=0.0)
        level, message, _ = rig.diagnostics("inputs")
        if depth_topic in message:
            stalled = (level, message)
            break
        time.sleep(0.2)
    assert stalled is not None, "the stalled depth stream was never reported"
    from diagnostic_msgs.msg import DiagnosticStatus
    assert stalled[0] == DiagnosticStatus.WARN and "no message on" in stalled[1]
    stamp = rig.send(source="synthetic")
    check_result(rig.result(stamp), stamp)


def _accounted(values):
    failed = sum(int(v) for k, v in values.items() if k.startswith("failed."))
    return int(values["frames_processed"]) + int(values["frames_dropped"]) + failed


def _quiescent(rig, at_least_matched=0, timeout=30.0):
    """Diagnostics once nothing is in flight: every matched set processed, dropped or failed.
    Waits two diagnostics periods first, so the values are newer than any result seen so far."""
    time.sleep(2 * COMMON["diagnostics.period"] + 0.1)
    deadline = time.monotonic() + timeout
    while True:
        values = rig.diagnostics()[2]
        matched = int(values["frames_matched"])
        if matched >= at_least_matched and _accounted(values) == matched:
            return values
        assert time.monotonic() < deadline, "not quiescent: " + json.dumps(
            {"detector": {k: v for k, v in values.items() if k.startswith(("frames_", "failed."))},
             "inputs": rig.diagnostics("inputs")[2]}, indent=1)
        time.sleep(0.1)


def test_latest_frame_wins_and_every_set_is_accounted_for(rigs):
    rig = rigs["depth"]
    before = _quiescent(rig)
    # As many sets as the synchroniser queues per input: then every set pairs up whatever order
    # the executor takes the messages in. One more, and a depth stream lagging behind the whole
    # burst (DDS repairing a large frame on a loaded machine) evicts the oldest colour image
    # before its partner arrives: a set lost by design of the queue (and counted unmatched).
    n = _default("sync.queue_size")
    stamps = rig.camera.cmd(op="burst", n=n, period=0.03, source="synthetic")["sent"]
    # Sets closer than the slop could cross-pair (rgb of one with depth of the next) and leave
    # members pending: the camera paces its stamps so every set pairs with itself.
    assert min(b - a for a, b in zip(stamps, stamps[1:])) > _default("sync.slop") * 1e9, stamps
    rig.result(stamps[-1])  # the newest set is always processed
    values = _quiescent(rig, int(before["frames_matched"]) + len(stamps))
    processed = int(values["frames_processed"]) - int(before["frames_processed"])
    dropped = int(values["frames_dropped"]) - int(before["frames_dropped"])
    answered = set(stamps) & rig.obs.received_stamps(rig.topic("anomaly"))
    assert len(answered) == processed and processed + dropped == len(stamps)
    assert dropped >= 1  # inference takes far longer than 30 ms: older sets were replaced


def test_killed_detector_process_fails_one_frame_and_is_restarted(rigs):
    """detector.isolation process (the default): the node outlives its detector."""
    import psutil

    rig = rigs["depth"]
    children = [p for p in psutil.Process(rig.node.pid).children()
                if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(children) == 1, [p.cmdline() for p in children]
    before = rig.failed("detector_crashed")
    children[0].kill()
    deadline = time.monotonic() + 10
    while children[0].status() != psutil.STATUS_ZOMBIE:  # the node reaps it on the next frame
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rig.send(source="synthetic")
    values = rig.wait_counter("failed.detector_crashed", before + 1)
    assert "detector process died" in values["last_failure"], values
    assert "frame dropped [detector_crashed]" in rig.node.log()
    # The failure is counted once the new child is up: the next frame is answered.
    stamp = rig.send(source="synthetic")
    check_result(rig.result(stamp), stamp)
    assert "restarted it" in values["last_failure"], values


# --------------------------------------------------------------------------------------------------
# Points mode
# --------------------------------------------------------------------------------------------------
def test_points_organised_kinect_cloud(rigs):
    rig = rigs["points"]
    stamp = rig.send(source="kinect", send=["info", "rgb", "points"], points="organised")
    result = rig.result(stamp, timeout=300)
    heatmap = check_result(result, stamp)
    check_outputs(rig, result, heatmap)


def test_points_unorganised_cloud_is_projected(rigs):
    rig = rigs["points"]
    stamp = rig.send(source="synthetic", send=["info", "rgb", "points"], points="unorganised")
    result = rig.result(stamp)
    check_result(result, stamp)
    assert math.isfinite(result.score)


def test_points_unregistered_cloud_is_refused(rigs):
    rig = rigs["points"]
    before = rig.failed("unregistered_input")
    rig.send(source="synthetic", send=["info", "rgb", "points"], points="organised",
             faults={"depth_size": [320, 240]})
    values = rig.wait_counter("failed.unregistered_input", before + 1)
    assert "the organised cloud" in values["last_failure"] and "320x240" in values["last_failure"]
    stamp = rig.send(source="synthetic", send=["info", "rgb", "points"], points="organised")
    check_result(rig.result(stamp), stamp)


CLOUD_FAULTS = [
    # (cloud layout, fault, failure reason, text the error line must contain)
    ("organised", {"points_truncate": True}, "malformed_message", "data length"),
    ("unorganised", {"points_truncate": True}, "malformed_message", "data length"),
    ("organised", {"points_without_z": True}, "malformed_message", "no 'z' field"),
    ("organised", {"depth_fill": "nan"}, "too_few_points", "only 0 valid 3D points"),
]


@pytest.mark.parametrize("layout,fault,reason,text", CLOUD_FAULTS,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CLOUD_FAULTS)])
def test_bad_clouds_are_counted_logged_and_survived(rigs, layout, fault, reason, text):
    rig = rigs["points"]
    before = rig.failed(reason)
    bad = rig.send(source="synthetic", send=["info", "rgb", "points"], points=layout,
                   faults=fault)
    values = rig.wait_counter(f"failed.{reason}", before + 1)
    assert f"frame dropped [{reason}]" in rig.node.log()
    assert values["last_failure"].startswith(reason) and text in values["last_failure"], values
    assert bad not in rig.obs.received_stamps(rig.topic("anomaly"))
    stamp = rig.send(source="synthetic", send=["info", "rgb", "points"], points=layout)
    check_result(rig.result(stamp), stamp)


# --------------------------------------------------------------------------------------------------
# Bag replay (through the harness's replay participant)
# --------------------------------------------------------------------------------------------------
def test_synthetic_bag_played_into_the_points_node(rigs, synthetic_bags, processes):
    """A bag of synthetic parts (`mafr bag make`: organised clouds, camera_info, colour) played
    frame by frame into the points-mode node: every frame is answered with its own stamp, a
    heatmap at the bag's resolution and every other output of that frame."""
    from mafr_ros.bag.layout import topics_for

    rig = rigs["points"]
    # Stamped just after every frame the camera sent before (so not out of order), and in the
    # past once played (so the latency in the results is real).
    start_s = int(time.time()) + 2
    bag = synthetic_bags("e2e_points", n_test_good=1, n_test_per_defect=1, inputs="points",
                         start_s=start_s)
    while time.time() < start_s + 1.0:
        time.sleep(0.05)
    target = topics_for(rig.ns)
    roles = ("camera_info", "points", "rgb")
    replay = processes.replay(bag.path, rig.node_name,
                              topics=[getattr(bag.topics, r) for r in roles],
                              remap={getattr(bag.topics, r): getattr(target, r) for r in roles})
    replay.wait_ready(rig.node, timeout=60)
    outcomes, stats = replay.lockstep(rig.node, timeout=120)
    assert stats.sent == bag.frames == 6 and not stats.missing, [o.reason for o in stats.missing]
    for outcome in outcomes:
        result = rig.result(outcome.stamp_ns, timeout=30)  # also seen by the observer
        heatmap = check_result(result, outcome.stamp_ns, size=(256, 256))
        check_outputs(rig, result, heatmap, size=(256, 256))
        assert result.score == pytest.approx(outcome.result.score, rel=1e-12)
