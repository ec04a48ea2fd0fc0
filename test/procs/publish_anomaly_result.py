"""Separate process for the DDS test: publishes AnomalyResult messages until told to stop.

Usage: python publish_anomaly_result.py TOPIC COUNT
Publishes COUNT distinct results (seq in header.frame_id) every 50 ms, repeating the cycle until
the parent kills the process (discovery can take a moment, so the first messages may be missed).
"""
import sys

import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy

from mafr_ros.msg import AnomalyRegion, AnomalyResult


def build(seq: int) -> AnomalyResult:
    msg = AnomalyResult()
    msg.header.stamp.sec = 1000 + seq
    msg.header.stamp.nanosec = 123456789
    msg.header.frame_id = f"camera_color_optical_frame/{seq}"
    msg.score = 1.5 + seq
    msg.normalized_score = 0.75
    msg.threshold = 1.25
    msg.is_anomalous = True
    msg.heatmap.height, msg.heatmap.width = 2, 3
    msg.heatmap.encoding = "32FC1"
    msg.heatmap.step = 12
    msg.heatmap.data = bytes(range(24))
    region = AnomalyRegion()
    region.id = 0
    region.bbox.x_offset, region.bbox.y_offset, region.bbox.width, region.bbox.height = 10, 20, 30, 40
    region.area_px = 900
    region.peak_score, region.mean_score = 0.9, 0.7
    region.num_points = 850
    region.centroid.x, region.centroid.y, region.centroid.z = 0.01, -0.02, 0.65
    region.extent.x, region.extent.y, region.extent.z = 0.004, 0.005, 0.001
    msg.regions.append(region)
    msg.pixel_threshold = 0.3
    msg.valid_fraction = 0.66
    msg.model_id = "test-model@0123abcd"
    msg.processing_time.nanosec = 42_000_000
    msg.latency.nanosec = 55_000_000
    return msg


def main():
    topic, count = sys.argv[1], int(sys.argv[2])
    rclpy.init()
    node = Node("anomaly_result_test_publisher")
    pub = node.create_publisher(AnomalyResult, topic,
                                QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    messages = [build(i) for i in range(count)]
    state = {"i": 0}

    def tick():
        pub.publish(messages[state["i"] % count])
        state["i"] += 1

    node.create_timer(0.05, tick)
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
