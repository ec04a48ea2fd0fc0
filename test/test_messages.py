"""The custom interfaces: built by rosidl, importable, (de)serialisable, and exchanged over DDS
between two processes."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROCS = Path(__file__).resolve().parent / "procs"


def test_interfaces_are_generated_by_rosidl():
    from mafr_ros.msg import AnomalyRegion, AnomalyResult

    fields = AnomalyResult.get_fields_and_field_types()
    assert fields["header"] == "std_msgs/Header"
    assert fields["heatmap"] == "sensor_msgs/Image"
    assert fields["regions"] == "sequence<mafr_ros/AnomalyRegion>"
    for name in ("score", "normalized_score", "threshold", "is_anomalous", "model_id",
                 "processing_time", "latency", "pixel_threshold", "valid_fraction"):
        assert name in fields
    region_fields = AnomalyRegion.get_fields_and_field_types()
    assert region_fields["bbox"] == "sensor_msgs/RegionOfInterest"
    assert region_fields["centroid"] == "geometry_msgs/Point"
    assert region_fields["extent"] == "geometry_msgs/Vector3"
    # a real rosidl C type support is behind the Python class
    AnomalyResult.__class__.__import_type_support__()
    assert AnomalyResult._TYPE_SUPPORT is not None


def test_cdr_round_trip():
    from rclpy.serialization import deserialize_message, serialize_message

    sys.path.insert(0, str(PROCS))
    try:
        from publish_anomaly_result import build
    finally:
        sys.path.pop(0)
    from mafr_ros.msg import AnomalyResult

    msg = build(3)
    data = serialize_message(msg)
    back = deserialize_message(data, AnomalyResult)
    # float32 fields come back rounded, so compare the wire bytes of the round trip
    assert serialize_message(back) == data
    assert back.header == msg.header and back.model_id == msg.model_id
    assert back.regions[0].bbox.width == 30
    assert bytes(back.heatmap.data) == bytes(range(24))


@pytest.mark.ros
def test_result_crosses_process_boundary_over_dds():
    import rclpy
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from mafr_ros.msg import AnomalyResult

    topic = "/mafr_test/anomaly"
    publisher = subprocess.Popen([sys.executable, str(PROCS / "publish_anomaly_result.py"), topic, "3"])
    context = rclpy.Context()
    rclpy.init(context=context)
    node = Node("anomaly_result_test_subscriber", context=context)
    received = {}
    node.create_subscription(
        AnomalyResult, topic,
        lambda m: received.setdefault(m.header.frame_id, m),
        QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    executor = rclpy.executors.SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        deadline = time.monotonic() + 30
        while len(received) < 3 and time.monotonic() < deadline:
            assert publisher.poll() is None, "publisher process died"
            executor.spin_once(timeout_sec=0.1)
    finally:
        publisher.send_signal(signal.SIGINT)
        try:
            publisher.wait(timeout=10)
        except subprocess.TimeoutExpired:
            publisher.kill()
        node.destroy_node()
        rclpy.shutdown(context=context)

    assert sorted(received) == [f"camera_color_optical_frame/{i}" for i in range(3)]
    msg = received["camera_color_optical_frame/2"]
    assert msg.header.stamp.sec == 1002 and msg.header.stamp.nanosec == 123456789
    assert msg.score == pytest.approx(3.5)
    assert msg.is_anomalous
    assert (msg.heatmap.width, msg.heatmap.height, msg.heatmap.encoding) == (3, 2, "32FC1")
    assert len(msg.regions) == 1 and msg.regions[0].area_px == 900
    assert msg.regions[0].centroid.z == pytest.approx(0.65)
    assert msg.model_id == "test-model@0123abcd"
    assert msg.processing_time.nanosec == 42_000_000
