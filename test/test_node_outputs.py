"""The node's building blocks without a running graph: output builders (regions, markers, images,
anomalous points), diagnostics accounting, parameter validation and the latest-wins hand-off."""
import math
import threading
import time

import numpy as np
import pytest
from scipy import ndimage

from mafr_ros.errors import InputError
from mafr_ros.ros.conversions import image_to_array, pointcloud2_fields
from mafr_ros.ros.diagnostics import (FAILURE_REASONS, STAGE_CPU, STAGES, NodeDiagnostics,
                                      RateMeter, ThrottledReporter, WindowStats, resident_set_mb)
from mafr_ros.ros.node import PARAMETERS, LatestSlot, validate_parameter
from mafr_ros.ros.outputs import (Roi, anomaly_points_cloud, build_markers, find_regions,
                                  full_resolution, heatmap_image, mask_image, overlay_image,
                                  region_to_msg)


def _header(frame="cam_optical_frame", sec=12, nanosec=345):
    from std_msgs.msg import Header
    header = Header(frame_id=frame)
    header.stamp.sec, header.stamp.nanosec = sec, nanosec
    return header


def _scene(height=120, width=160, seed=0):
    """A smooth random score map and a plane of points 0.7 m away with some holes."""
    rng = np.random.default_rng(seed)
    scores = ndimage.gaussian_filter(rng.random((height, width)), 3)
    scores = (scores - scores.min()) / (scores.max() - scores.min())
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    z = np.full((height, width), 0.7, np.float32) + 0.01 * np.sin(u / 7)
    xyz = np.stack([(u - width / 2) / 500 * z, (v - height / 2) / 500 * z, z], -1)
    xyz[rng.random((height, width)) < 0.2] = np.nan
    xyz[:, :20] = np.nan  # a band without depth
    return scores.astype(np.float32), xyz.astype(np.float32)


def test_regions_match_a_per_region_reference():
    scores, xyz = _scene()
    regions = find_regions(scores, xyz, min_area=1, offset=(30, 40))
    labels, count = ndimage.label(scores > 0.5, structure=np.ones((3, 3)))
    assert len(regions) == count > 2
    assert [r.peak_score for r in regions] == sorted((r.peak_score for r in regions), reverse=True)
    ok = np.isfinite(xyz).all(-1)
    by_peak = {}
    for label in range(1, count + 1):
        member = labels == label
        rows, cols = np.nonzero(member)
        pts = xyz[member & ok].astype(np.float64)
        by_peak[float(scores[member].max())] = dict(
            x=cols.min() + 30, y=rows.min() + 40, w=cols.max() - cols.min() + 1,
            h=rows.max() - rows.min() + 1, area=member.sum(), mean=scores[member].mean(), pts=pts)
    for region in regions:
        ref = by_peak[region.peak_score]
        assert (region.x, region.y, region.width, region.height) == (ref["x"], ref["y"], ref["w"], ref["h"])
        assert region.area_px == ref["area"]
        assert region.mean_score == pytest.approx(ref["mean"], rel=1e-6)
        assert region.num_points == len(ref["pts"])
        if len(ref["pts"]):
            np.testing.assert_allclose(region.centroid, ref["pts"].mean(0), rtol=1e-9)
            np.testing.assert_allclose(region.box_min, ref["pts"].min(0))
            np.testing.assert_allclose(region.box_max, ref["pts"].max(0))
            np.testing.assert_allclose(region.extent, ref["pts"].max(0) - ref["pts"].min(0))


def _regions_reference(scores, xyz, min_area, offset):
    """find_regions by the definition: a full-image label, then per-region masks."""
    labels, count = ndimage.label(scores > 0.5, structure=np.ones((3, 3)))
    out = []
    for label in range(1, count + 1):
        member = labels == label
        if member.sum() < min_area:
            continue
        rows, cols = np.nonzero(member)
        pts = xyz[member].astype(np.float64)
        pts = pts[np.isfinite(pts).all(1) & (pts != 0).any(1)]
        out.append(dict(box=(cols.min() + offset[0], rows.min() + offset[1],
                             cols.max() - cols.min() + 1, rows.max() - rows.min() + 1),
                        area=int(member.sum()), peak=float(scores[member].max()),
                        mean=float(scores[member].astype(np.float64).mean()), pts=pts))
    return sorted(out, key=lambda r: -r["peak"])


@pytest.mark.parametrize("seed", range(6))
def test_regions_match_the_definition_with_every_kind_of_invalid_point(seed):
    # Maps whose regions touch the image border or sit in one corner (the labelled box is then
    # a small part of the map), speckle below min_area, and points that are NaN, (0, 0, 0) or
    # infinite in a single coordinate.
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(20, 90)), int(rng.integers(20, 120))
    scores = ndimage.gaussian_filter(rng.random((height, width)), rng.uniform(0.7, 3.0))
    scores = ((scores - scores.min()) / np.ptp(scores)).astype(np.float32)
    if seed % 2:  # everything above threshold in the lower-right corner only
        scores[: height // 2] *= 0.4
        scores[:, : width // 2] *= 0.4
    xyz = rng.normal(0.0, 0.5, (height, width, 3)).astype(np.float32)
    xyz[rng.random((height, width)) < 0.2] = np.nan
    xyz[rng.random((height, width)) < 0.1] = 0.0
    xyz[rng.random((height, width)) < 0.05, int(rng.integers(3))] = np.inf
    min_area, offset = int(rng.integers(1, 6)), (int(rng.integers(50)), int(rng.integers(50)))
    reference = _regions_reference(scores, xyz, min_area, offset)
    regions = find_regions(scores, xyz, min_area=min_area, offset=offset)
    assert len(regions) == len(reference) > 0
    for rank, (region, ref) in enumerate(zip(regions, reference)):
        assert region.id == rank and region.peak_score == ref["peak"]
        assert (region.x, region.y, region.width, region.height) == ref["box"]
        assert region.area_px == ref["area"] and region.num_points == len(ref["pts"])
        assert region.mean_score == pytest.approx(ref["mean"], rel=1e-9)
        if len(ref["pts"]):
            np.testing.assert_allclose(region.centroid, ref["pts"].mean(0), rtol=1e-9)
            np.testing.assert_array_equal(region.box_min, ref["pts"].min(0))
            np.testing.assert_array_equal(region.box_max, ref["pts"].max(0))
        else:
            assert all(math.isnan(v) for v in region.centroid + region.box_min + region.box_max)
    # Without points: the same regions, 3D fields NaN.
    flat = find_regions(scores, None, min_area=min_area, offset=offset)
    assert [(r.x, r.y, r.width, r.height, r.area_px) for r in flat] == \
        [(r.x, r.y, r.width, r.height, r.area_px) for r in regions]
    assert all(r.num_points == 0 and math.isnan(r.centroid[0]) for r in flat)
    with pytest.raises(InputError, match="xyz must be"):
        find_regions(scores, xyz[:, 1:], min_area=min_area)


@pytest.mark.parametrize("blobs", [1, 2, 4, 5, 40])
def test_regions_by_mask_and_by_sorted_pass_both_match_the_definition(blobs):
    # find_regions reduces up to 4 regions through their masks and more in one sorted pass:
    # both sides of that boundary, with invalid points inside the regions.
    rng = np.random.default_rng(blobs)
    scores = np.zeros((120, 160), np.float32)
    xyz = rng.normal(0.0, 0.5, (120, 160, 3)).astype(np.float32)
    xyz[rng.random((120, 160)) < 0.2] = np.nan
    xyz[rng.random((120, 160)) < 0.1] = 0.0
    for index in range(blobs):  # separated 3x3..7x7 squares on a 10-pixel lattice
        row, col = divmod(index, 14)
        size = int(rng.integers(3, 8))
        scores[5 + 10 * row: 5 + 10 * row + size, 5 + 10 * col: 5 + 10 * col + size] = \
            rng.uniform(0.51, 1.0, (size, size))
    reference = _regions_reference(scores, xyz, 1, (7, 3))
    regions = find_regions(scores, xyz, min_area=1, offset=(7, 3))
    assert len(regions) == len(reference) == blobs
    for region, ref in zip(regions, reference):
        assert (region.x, region.y, region.width, region.height) == ref["box"]
        assert region.area_px == ref["area"] and region.peak_score == ref["peak"]
        assert region.mean_score == pytest.approx(ref["mean"], rel=1e-9)
        assert region.num_points == len(ref["pts"])
        np.testing.assert_allclose(region.centroid, ref["pts"].mean(0), rtol=1e-9)
        np.testing.assert_array_equal(region.box_min, ref["pts"].min(0))
        np.testing.assert_array_equal(region.box_max, ref["pts"].max(0))


def test_region_without_points_has_nan_geometry_and_small_regions_are_dropped():
    scores = np.zeros((50, 60), np.float32)
    scores[5:8, 5:8] = 0.9        # 9 px, over missing depth
    scores[20:40, 30:50] = 0.7    # 400 px with points
    scores[45, 0] = 0.99          # 1 px speckle, the strongest
    xyz = np.full((50, 60, 3), np.nan, np.float32)
    xyz[20:40, 30:50] = (0.1, 0.2, 0.6)
    regions = find_regions(scores, xyz, min_area=5)
    assert [r.area_px for r in regions] == [9, 400]
    assert regions[0].num_points == 0 and all(math.isnan(c) for c in regions[0].centroid)
    msg = region_to_msg(regions[0])
    assert math.isnan(msg.centroid.x) and math.isnan(msg.extent.z) and msg.num_points == 0
    assert regions[1].centroid == pytest.approx((0.1, 0.2, 0.6))
    assert find_regions(np.zeros((10, 10), np.float32), None) == []


def test_markers_clear_first_then_box_and_label_per_region_with_points():
    from visualization_msgs.msg import Marker

    scores, xyz = _scene()
    regions = find_regions(scores, xyz, min_area=1)
    header = _header()
    markers = build_markers(regions, header, lifetime_s=0.25).markers
    assert markers[0].action == Marker.DELETEALL and markers[0].header == header
    with_points = [r for r in regions if r.num_points]
    assert len(markers) == 1 + 2 * len(with_points) and with_points
    boxes = [m for m in markers if m.ns == "anomaly_boxes"]
    labels = [m for m in markers if m.ns == "anomaly_labels"]
    for box, label, region in zip(boxes, labels, with_points):
        assert box.type == Marker.CUBE and label.type == Marker.TEXT_VIEW_FACING
        assert box.id == label.id == region.id and box.header == header
        np.testing.assert_allclose([box.pose.position.x, box.pose.position.y, box.pose.position.z],
                                   region.box_center)
        assert box.scale.x >= region.extent[0] and box.scale.z >= 0.002  # flat regions visible
        assert label.text == f"{region.peak_score:.2f}"
        assert label.pose.position.y < region.box_min[1]  # above the box (optical frame: -y up)
        assert box.lifetime.nanosec == 250_000_000
        for m in (box, label):
            assert all(0.0 <= c <= 1.0 for c in (m.color.r, m.color.g, m.color.b, m.color.a))


def test_images_at_full_resolution_with_zeros_outside_the_roi():
    header = _header()
    roi = Roi.resolve([20, 10, 40, 30], 100, 80)
    crop = np.full((30, 40), 0.75, np.float32)
    crop[:, :10] = 0.25
    full = full_resolution(crop, roi, 100, 80)
    assert full.shape == (80, 100) and full[10:40, 20:60].min() == 0.25 and full.sum() == crop.sum()
    heat = heatmap_image(full, header)
    assert (heat.encoding, heat.width, heat.height, heat.header) == ("32FC1", 100, 80, header)
    np.testing.assert_array_equal(image_to_array(heat), full)
    mask = image_to_array(mask_image(full, header))
    assert set(np.unique(mask)) == {0, 255} and (mask == 255).sum() == 30 * 30

    rgb = np.zeros((80, 100, 3), np.uint8)
    rgb[..., 0] = 200  # red image
    overlay = overlay_image(rgb, crop, roi, header, alpha=0.5)
    assert overlay.encoding == "bgr8"
    bgr = image_to_array(overlay)
    assert (bgr[0, 0] == (0, 0, 200)).all()  # outside the ROI: the plain image, in BGR order
    assert not (bgr[20, 50] == (0, 0, 200)).all()  # inside: blended with the colour map
    # A full-image ROI needs no copy of the map.
    assert full_resolution(full, Roi.resolve([0, 0, 0, 0], 100, 80), 100, 80) is full


def test_roi_must_fit_the_image():
    assert Roi.resolve([], 64, 48) == Roi(0, 0, 64, 48)
    with pytest.raises(InputError, match="does not fit"):
        Roi.resolve([60, 0, 10, 10], 64, 48)


def test_anomaly_points_keep_valid_points_above_the_score():
    header = _header()
    scores, xyz = _scene()
    cloud = anomaly_points_cloud(xyz, scores, header, min_score=0.6)
    expected = np.isfinite(xyz).all(-1) & (scores >= 0.6)
    assert cloud.height == 1 and cloud.width == expected.sum() > 0
    assert [f.name for f in cloud.fields] == ["x", "y", "z", "score"]
    fields = pointcloud2_fields(cloud, organised=False)
    np.testing.assert_array_equal(fields["score"], scores[expected])
    np.testing.assert_array_equal(fields["z"], xyz[expected][:, 2])
    empty = anomaly_points_cloud(xyz, scores * 0, header)
    assert empty.width == 0 and len(empty.data) == 0 and len(empty.fields) == 4


def test_diagnostics_account_rates_latency_and_staleness():
    from diagnostic_msgs.msg import DiagnosticStatus

    now = [100.0]
    clock = lambda: now[0]  # noqa: E731
    diag = NodeDiagnostics("/ns/mafr", ["/ns/rgb", "/ns/depth"], stale_after_s=1.0, clock=clock)
    diag.info["device"] = "cpu"
    diag.set_state("ready")
    for i in range(11):  # 10 Hz for 1 s on rgb, depth only once
        diag.received("/ns/rgb")
        if i == 0:
            diag.received("/ns/depth")
        now[0] += 0.1
    for latency in range(1, 101):
        diag.count_processed(latency, latency / 2)
    diag.count_matched()
    diag.count_dropped()
    diag.count_failed("too_few_points", "only 3 points")
    array = diag.build(_header().stamp)
    detector, inputs = array.status
    values = {kv.key: kv.value for kv in detector.values}
    assert detector.name == "/ns/mafr: detector" and detector.hardware_id == "cpu"
    assert detector.level == DiagnosticStatus.WARN and "too_few_points" in detector.message
    assert values["failed.too_few_points"] == "1" and values["frames_dropped"] == "1"
    assert set(FAILURE_REASONS) <= {k[len("failed."):] for k in values if k.startswith("failed.")}
    assert float(values["latency_median_ms"]) == pytest.approx(50.5)
    assert float(values["latency_p95_ms"]) == pytest.approx(95.05, abs=0.06)  # 0.1 ms resolution
    inputs_values = {kv.key: kv.value for kv in inputs.values}
    assert float(inputs_values["/ns/rgb rate_hz"]) == pytest.approx(10.0, rel=1e-6)
    assert inputs.level == DiagnosticStatus.WARN and "/ns/depth" in inputs.message
    assert "/ns/rgb" not in inputs.message
    # No new failure since the last report: the detector status is OK again.
    diag.received("/ns/depth")
    assert diag.build(_header().stamp).status[0].level == DiagnosticStatus.OK
    with pytest.raises(KeyError):
        diag.count_failed("bogus", "")


def test_diagnostics_report_time_per_stage_and_resident_memory():
    diag = NodeDiagnostics("/ns/mafr", ["/ns/rgb"])
    diag.set_state("ready")
    for i in range(1, 11):
        diag.count_processed(100.0 + i, 90.0, 5.0, {"input": float(i), "wait": 0.5,
                                                    "convert": 1.0, "detector": 90.0,
                                                    "handoff": 0.3, "regions": 2.0,
                                                    "result": 0.5,
                                                    "publish": 0.25,
                                                    "cpu": 3.0})
    values = {kv.key: kv.value for kv in diag.build(_header().stamp).status[0].values}
    assert float(values["stage.input_median_ms"]) == pytest.approx(5.5)
    assert float(values["stage.input_p95_ms"]) == pytest.approx(9.55)
    assert values["stage.publish_median_ms"] == "0.25"
    assert {f"stage.{stage}_median_ms" for stage in STAGES} <= set(values)
    assert values[f"stage.{STAGE_CPU}_median_ms"] == "3.00"
    rss = resident_set_mb()
    assert rss is not None and rss > 10  # this Python process with NumPy and rclpy loaded
    assert float(values["rss_mb"]) == pytest.approx(rss, rel=0.2)
    with pytest.raises(KeyError):
        diag.count_processed(1.0, 1.0, 1.0, {"bogus_stage": 1.0})


def test_valid_depth_count_is_the_valid_point_count_of_its_cloud():
    from mafr_ros.geometry import CameraIntrinsics, depth_to_xyz
    from mafr_ros.ros.node import _count_valid, _count_valid_depth

    rng = np.random.default_rng(3)
    intrinsics = CameraIntrinsics(fx=50.0, fy=50.0, cx=20.0, cy=15.0, width=40, height=30)
    millimetres = rng.integers(0, 3000, (30, 40)).astype(np.uint16)
    millimetres[rng.random((30, 40)) < 0.3] = 0
    metres = rng.normal(1.0, 1.0, (30, 40)).astype(np.float32)  # negative depth too
    for bad, share in ((np.nan, 0.1), (np.inf, 0.05), (-np.inf, 0.05), (0.0, 0.1)):
        metres[rng.random((30, 40)) < share] = bad
    for depth, scale in ((millimetres, 0.001), (metres, 1.0)):
        xyz = depth_to_xyz(depth, intrinsics, depth_scale=scale)
        assert _count_valid_depth(depth) == _count_valid(xyz) > 0
        assert _count_valid_depth(depth[5:20, 3:33]) == _count_valid(xyz[5:20, 3:33])


def test_rate_window_and_percentiles():
    meter = RateMeter(window_s=1.0)
    assert meter.rate(0.0) == 0.0 and meter.age(0.0) is None
    for t in np.arange(0, 3, 0.05):
        meter.tick(float(t))
    assert meter.rate(2.95) == pytest.approx(20.0, rel=1e-6)
    assert meter.age(3.5) == pytest.approx(0.55)
    stats = WindowStats(size=10)
    assert all(math.isnan(v) for v in stats.summary())
    for v in range(100):
        stats.add(v)
    assert stats.summary() == pytest.approx((94.5, 98.55))
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 7, 200):  # the same interpolation as np.percentile
        stats = WindowStats(size=size)
        values = rng.exponential(10.0, size)
        for v in values:
            stats.add(v)
        assert stats.summary() == pytest.approx(tuple(np.percentile(values, (50, 95))),
                                                rel=1e-12)


def test_throttle_is_per_reason_and_counts_suppressed():
    now = [0.0]
    reporter = ThrottledReporter(period_s=5.0, clock=lambda: now[0])
    assert reporter.should_log("a") == (True, 0)
    assert reporter.should_log("b") == (True, 0)  # another reason is not hidden by "a"
    assert reporter.should_log("a") == (False, 0)
    assert reporter.should_log("a") == (False, 0)
    now[0] = 5.0
    assert reporter.should_log("a") == (True, 2)


@pytest.mark.parametrize("name,value,error", [
    ("roi", [0, 0, -4, 10], "positive"),
    ("roi", [1, 2, 3], "[x, y, width, height]"),
    ("roi", [-1, 0, 4, 4], "origin"),
    ("roi", [5, 5, 0, 0], "[0, 0, 0, 0]"),
    ("qos.input.reliability", "fast", "best_effort, reliable, system_default"),
    ("qos.output.reliability", "BEST_EFFORT", "one of"),
    ("image_threshold", -0.5, "[0.0"),
    ("pixel_threshold", float("nan"), "finite"),
    ("device", "tpu", "auto, cpu, cuda"),
    ("input_mode", "stereo", "depth, points"),
    ("sync.queue_size", 0, "[1, 100]"),
    ("overlay.alpha", 1.5, "[0.0, 1.0]"),
])
def test_invalid_parameter_values_are_refused_with_a_reason(name, value, error):
    reason = validate_parameter(name, value)
    assert reason is not None and error in reason, reason


def test_valid_parameter_values_and_defaults_pass():
    for spec in PARAMETERS:
        assert validate_parameter(spec.name, spec.default) is None, spec.name
        descriptor = spec.descriptor()
        assert descriptor.description and descriptor.name == spec.name
    for name, value in (("roi", [0, 0, 0, 0]), ("roi", []), ("roi", [10, 20, 30, 40]),
                        ("image_threshold", 0.0), ("image_threshold", 12.5),
                        ("device", "cuda:1"), ("qos.input.reliability", "reliable")):
        assert validate_parameter(name, value) is None, (name, value)
    read_only = {s.name for s in PARAMETERS if s.read_only}
    assert {"checkpoint", "device", "input_mode", "qos.input.reliability"} <= read_only
    assert not {"roi", "image_threshold", "publish.overlay"} & read_only


def test_latest_slot_replaces_unprocessed_items_and_closes():
    slot = LatestSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True  # 1 was never taken: dropped
    assert slot.take() == 2
    got = []
    worker = threading.Thread(target=lambda: got.append(slot.take()))
    worker.start()
    time.sleep(0.05)
    assert slot.put(3) is False
    worker.join(5)
    assert got == [3]
    slot.close()
    assert slot.take() is None


_FAULTS_PROBE = """
import resource, sys
import numpy as np
from mafr_ros.ros.memory import keep_large_allocations_on_heap
if sys.argv[1] == "tuned":
    assert keep_large_allocations_on_heap() and keep_large_allocations_on_heap()  # idempotent
frame = np.ones((480, 640, 3), np.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # per frame: a few frame-sized buffers (message, CDR, temporary), freed
    message, serialised, temporary = frame.copy(), frame.copy(), frame.copy()
    del message, serialised, temporary
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_frame_sized_buffers_are_reused_instead_of_faulted_in_again():
    """keep_large_allocations_on_heap: by default, 3 x 50 fresh 900 KiB buffers freed together
    are trimmed from the heap (or unmapped) and fault in every one of their 225 pages again
    (measured 32000 faults); once tuned they are reused (measured 700)."""
    import subprocess
    import sys

    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS_PROBE, mode], check=True,
                                       capture_output=True, text=True).stdout)
              for mode in ("default", "tuned")}
    assert faults["default"] > 150 * 100, faults
    assert faults["tuned"] < 3000, faults
