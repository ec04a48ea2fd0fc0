"""A camera for the node's end-to-end tests and benchmark, in its own process: publishes colour,
registered depth (or a point cloud) and camera_info over DDS, driven by JSON commands on stdin.

Usage: python node_camera.py --ns /cam [--reliability reliable] [--kinect-dir DIR]

Topics (as a depth_image_proc-style driver): NS/rgb/image_rect_color, NS/rgb/camera_info,
NS/depth_registered/image_rect, NS/points.

Commands (one JSON object per line); every command is answered by one JSON line on stdout:
  {"op": "wait", "timeout": 60}            -> {"subscribers": {topic: count}} once every topic
                                              that will be used has a subscriber (or on timeout)
  {"op": "frame", ...}                      -> {"sent": stamp_ns, "publish_ns": ns}
      (publish_ns: stamp -> every message published, for stamp "now"; else null)
      source: "kinect" (the real Kinect frame) | "synthetic" (a part on a table, 640x480)
      stamp: seconds (float) or "now" (this process's clock, for latency measurements)
      frame_id: optical frame of every message (default camera_color_optical_frame)
      send: subset of ["info", "rgb", "depth", "points"] (default: info + rgb + depth)
      points: "organised" | "unorganised" (with "points" in send)
      info_delay: seconds between camera_info and the images (default 0.2)
      serialized: true = serialise the images before stamping and publish the CDR bytes with the
                  stamp written in (publish cost of a C++ driver; for latency measurements)
      faults: {"rgb_truncate": true, "rgb_encoding": "yuv422", "depth_fill": "nan"|"inf"|"zero",
               "depth_keep": N, "depth_size": [w, h], "depth_frame": "other",
               "depth_encoding": "32FC1", "info": "zero", "info_frame": "other",
               "points_truncate": true (cloud data a row / a point short),
               "points_without_z": true (cloud fields x, y only)}; depth_* faults also shape
               the cloud built from that depth
  {"op": "burst", "n": 30, "period": 0.033, ...frame keys}  -> {"sent": [stamp_ns, ...]}
      (stamps "now", on schedule where the machine keeps up, never closer than the period)
  {"op": "quit"}
"""
import argparse
import glob
import json
import os
import struct
import sys
import time

import numpy as np
import rclpy
import tifffile
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header

from mafr_ros.geometry import CameraIntrinsics, depth_to_xyz
from mafr_ros.ros.conversions import array_to_image, xyz_to_pointcloud2
from mafr_ros.ros.memory import keep_large_allocations_on_heap

WIDTH, HEIGHT = 640, 480
INTRINSICS = CameraIntrinsics(fx=525.0, fy=525.0, cx=320.0, cy=240.0, width=WIDTH, height=HEIGHT)


def kinect_frame(directory):
    """(rgb uint8 RGB, depth uint16 mm) of the real Kinect frame."""
    rgb = tifffile.imread(glob.glob(os.path.join(directory, "*_rgb.tiff"))[0])
    depth = tifffile.imread(glob.glob(os.path.join(directory, "*_depth.tiff"))[0])
    return np.ascontiguousarray(rgb[..., :3]), depth


def synthetic_frame(seed=0):
    """A textured box-shaped part (40 x 30 cm footprint seen from 0.8 m) on a table plane, with a
    dent: (rgb, depth uint16 mm). Deterministic."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:HEIGHT, 0:WIDTH]
    depth = np.full((HEIGHT, WIDTH), 900.0) + 0.05 * (v - HEIGHT / 2)   # slightly tilted table
    part = (np.abs(u - 320) < 130) & (np.abs(v - 240) < 100)
    depth[part] = 820.0 + 4.0 * np.sin(u[part] / 25.0)                    # wavy top surface
    dent = (u - 360) ** 2 + (v - 220) ** 2 < 15 ** 2
    depth[dent] += 6.0
    rgb = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    rgb[...] = (90, 90, 95)
    rgb[part] = (180, 150, 60)
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    rgb[dent] = (60, 40, 30)
    return rgb, np.round(depth).astype(np.uint16)


_CDR_LITTLE_ENDIAN = b"\x00\x01"
_STAMP = struct.Struct("<iI")  # std_msgs/Header.stamp (sec, nanosec), first field of the message


def _with_stamp(blob: bytearray, stamp) -> bytes:
    """CDR bytes of a serialised stamped message (Header first) with ``stamp`` written in."""
    if blob[:2] != _CDR_LITTLE_ENDIAN:
        raise ValueError("expected little-endian CDR (encapsulation 0x0001)")
    _STAMP.pack_into(blob, 4, stamp.sec, stamp.nanosec)  # after the 4-byte encapsulation header
    return bytes(blob)


class Camera(Node):
    def __init__(self, ns, reliability, kinect_dir):
        super().__init__("node_test_camera")
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                         reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable"
                         else ReliabilityPolicy.BEST_EFFORT)
        ns = ns.rstrip("/")
        self.pubs = {
            "rgb": self.create_publisher(Image, f"{ns}/rgb/image_rect_color", qos),
            "info": self.create_publisher(CameraInfo, f"{ns}/rgb/camera_info", qos),
            "depth": self.create_publisher(Image, f"{ns}/depth_registered/image_rect", qos),
            "points": self.create_publisher(PointCloud2, f"{ns}/points", qos),
        }
        self.sources = {"synthetic": synthetic_frame()}
        if kinect_dir:
            self.sources["kinect"] = kinect_frame(kinect_dir)

    def wait(self, cmd):
        wanted = cmd.get("topics", ["rgb", "info", "depth"])
        deadline = time.monotonic() + float(cmd.get("timeout", 60))
        while time.monotonic() < deadline:
            if all(self.pubs[t].get_subscription_count() > 0 for t in wanted):
                break
            time.sleep(0.05)
        return {"subscribers": {t: self.pubs[t].get_subscription_count() for t in wanted}}

    def stamp(self, value):
        if value in (None, "now"):
            return self.get_clock().now().to_msg()
        header = Header()
        ns = int(round(float(value) * 1e9))
        header.stamp.sec, header.stamp.nanosec = divmod(ns, 1_000_000_000)
        return header.stamp

    def frame(self, cmd):
        faults = cmd.get("faults", {})
        send = cmd.get("send", ["info", "rgb", "depth"])
        rgb, depth = self.sources[cmd.get("source", "synthetic")]
        frame_id = cmd.get("frame_id", "camera_color_optical_frame")

        if "info" in send:
            info = CameraInfo()
            info.header.frame_id = faults.get("info_frame", frame_id)
            info.header.stamp = self.stamp(cmd.get("stamp"))
            info.width, info.height = WIDTH, HEIGHT
            info.distortion_model = "plumb_bob"
            info.d = [0.0] * 5
            if faults.get("info") != "zero":
                i = INTRINSICS
                info.k = [i.fx, 0.0, i.cx, 0.0, i.fy, i.cy, 0.0, 0.0, 1.0]
                info.p = [i.fx, 0.0, i.cx, 0.0, 0.0, i.fy, i.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
            info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
            self.pubs["info"].publish(info)
            time.sleep(float(cmd.get("info_delay", 0.2)))

        # Stamped right before publishing (below), after every message is built: a latency
        # measured from the stamp then starts at publish, not at this harness's own conversions.
        header = Header(frame_id=frame_id)
        messages = []
        if "rgb" in send:
            msg = array_to_image(rgb, "rgb8", header)
            if "rgb_encoding" in faults:
                msg.encoding = faults["rgb_encoding"]
            if faults.get("rgb_truncate"):
                msg.data = msg.data[:-WIDTH]  # one row short: data length != step * height
            messages.append(("rgb", msg))
        if "depth" in send or "points" in send:
            d = depth.astype(np.float32) * np.float32(0.001)  # metres
            fill = faults.get("depth_fill")
            if fill:
                d[...] = {"nan": np.nan, "inf": np.inf, "zero": 0.0}[fill]
                d[::2] = np.nan if fill != "nan" else np.inf  # a mix of invalid markers
            if "depth_keep" in faults:
                keep = np.zeros(d.shape, bool)
                keep.ravel()[:: max(1, d.size // int(faults["depth_keep"]))] = True
                d[~keep] = np.nan
            if "depth_size" in faults:
                w, h = faults["depth_size"]
                d = np.ascontiguousarray(d[:h, :w])
            dheader = Header(frame_id=faults.get("depth_frame", frame_id))
            if "depth" in send:
                if faults.get("depth_encoding", "16UC1") == "16UC1":
                    mm = np.where(np.isfinite(d), np.round(d * 1000.0), 0).astype(np.uint16)
                    msg = array_to_image(mm, "16UC1", dheader)
                else:
                    msg = array_to_image(d, "32FC1", dheader)
                messages.append(("depth", msg))
            if "points" in send:
                intr = CameraIntrinsics(525.0, 525.0, 320.0, 240.0, d.shape[1], d.shape[0])
                xyz = depth_to_xyz(d, intr, depth_scale=1.0)
                if cmd.get("points", "organised") == "unorganised":
                    flat = xyz.reshape(-1, 3)
                    flat = flat[np.isfinite(flat).all(axis=1)]
                    xyz = np.random.default_rng(0).permutation(flat)  # no pixel order left
                cloud = xyz_to_pointcloud2(xyz, dheader)
                if faults.get("points_truncate"):  # a row (organised) or a point short
                    cut = int(cloud.row_step) if cloud.height > 1 else int(cloud.point_step)
                    cloud.data = cloud.data[:-cut]
                if faults.get("points_without_z"):  # a driver that publishes only x, y
                    cloud.fields = [f for f in cloud.fields if f.name != "z"]
                messages.append(("points", cloud))
        if cmd.get("serialized"):
            # As a C++ driver: the Python message -> CDR conversion (about 1 ms per 640x480 image
            # here) happens before stamping; only the stamp is written into the CDR bytes, and
            # the span from the stamp starts at the DDS write.
            blobs = [(topic, bytearray(serialize_message(msg))) for topic, msg in messages]
            stamp = self.stamp(cmd.get("stamp"))
            for topic, blob in blobs:
                self.pubs[topic].publish(_with_stamp(blob, stamp))
        else:
            stamp = self.stamp(cmd.get("stamp"))
            for _, msg in messages:
                msg.header.stamp = stamp
            for topic, msg in messages:
                self.pubs[topic].publish(msg)
        self.last_publish_ns = time.time_ns() - (stamp.sec * 1_000_000_000 + stamp.nanosec) \
            if cmd.get("stamp") in (None, "now") else None
        return stamp.sec * 1_000_000_000 + stamp.nanosec


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ns", required=True)
    parser.add_argument("--reliability", default="reliable")
    parser.add_argument("--kinect-dir", default=None)
    args = parser.parse_args()
    keep_large_allocations_on_heap()  # as a C++ driver: publishing costs no page faults
    rclpy.init()
    camera = Camera(args.ns, args.reliability, args.kinect_dir)
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "quit":
                break
            if op == "wait":
                reply = camera.wait(cmd)
            elif op == "frame":
                reply = {"sent": camera.frame(cmd), "publish_ns": camera.last_publish_ns}
            elif op == "burst":
                # As a camera: frames are never closer than the period, also when publishing
                # falls behind schedule (a loaded machine), so consecutive sets are never within
                # the node's sync slop of each other and always pair up as sent.
                stamps, period = [], float(cmd.get("period", 1 / 30))
                period_ns = int(round(period * 1e9))
                start = time.monotonic()
                for i in range(int(cmd["n"])):
                    delay = start + i * period - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    while stamps and time.time_ns() < stamps[-1] + period_ns:
                        time.sleep((stamps[-1] + period_ns - time.time_ns()) / 1e9)
                    stamps.append(camera.frame(dict(cmd, info_delay=0.0)))
                reply = {"sent": stamps}
            else:
                reply = {"error": f"unknown op {op!r}"}
            print(json.dumps(reply), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        camera.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
