"""Test-side helpers for the node's process-level tests (imported by test_node_*.py and
bench/node.py): the camera as a separate process, and a third participant that observes the
graph. The node process itself is mafr_ros.bag.live.NodeProcess (through test/bag_harness.py in
the tests, where MAFR_TEST_CHECKPOINT, when set, replaces the embedded default model).

Every process inherits ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and ROS_DOMAIN_ID from the caller
(test/conftest.py sets both), so DDS stays on loopback and concurrent runs do not hear each
other.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from mafr_ros.bag.live import stamp_ns  # noqa: F401 (re-exported for the tests)
from mafr_ros.ros.memory import keep_large_allocations_on_heap

REPO = Path(__file__).resolve().parents[2]
PROCS = Path(__file__).resolve().parent
KINECT_DIR = REPO.parent / "shared" / "data" / "kinect_rgbd"
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50,
                      reliability=ReliabilityPolicy.RELIABLE)


class CameraProcess:
    """test/procs/node_camera.py, driven by JSON commands (see its docstring)."""

    def __init__(self, namespace: str, reliability: str = "reliable"):
        self.proc = subprocess.Popen(
            [sys.executable, str(PROCS / "node_camera.py"), "--ns", namespace,
             "--reliability", reliability, "--kinect-dir", str(KINECT_DIR)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._reply(timeout=120)  # {"ready": true}

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line)

    def _reply(self, timeout: float) -> dict:
        try:
            return json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            raise TimeoutError(f"camera process gave no answer within {timeout} s "
                               f"(alive: {self.proc.poll() is None})") from None

    def cmd(self, timeout: float = 60.0, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(15)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class Observer:
    """A test participant in its own rclpy context, spinning in a background thread and keeping
    every message received per topic, with its arrival time (``time.time_ns()`` taken first thing
    in the subscription callback, the clock the camera stamps with) in ``arrivals[topic]``."""

    def __init__(self, name: str = "node_test_observer"):
        keep_large_allocations_on_heap()  # as the camera: taking large messages without faults
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = Node(name, context=self.context)
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self.node)
        self._cond = threading.Condition()
        self.messages: dict[str, list] = defaultdict(list)
        self.arrivals: dict[str, list] = defaultdict(list)  # time.time_ns() per message
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self):
        # spin_once() without a timeout: a timeout creates and waits on one more timer per
        # wake-up, measurable in the benchmark's result latency. New subscriptions wake the
        # executor themselves (rclpy's Node._wake_executor), and shutdown wakes it too.
        while self.context.ok():
            try:
                self._executor.spin_once()
            except Exception:  # shutdown race
                if not self.context.ok():
                    return
                raise

    def subscribe(self, msg_type, topic: str, qos=RELIABLE):
        def store(msg, topic=topic):
            arrived = time.time_ns()
            with self._cond:
                self.messages[topic].append(msg)
                self.arrivals[topic].append(arrived)
                self._cond.notify_all()
        return self.node.create_subscription(msg_type, topic, store, qos)

    def wait_for(self, topic: str, predicate=lambda m: True, timeout: float = 60.0):
        """The first message on ``topic`` satisfying ``predicate`` (already received or new)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages[topic]:
                    if predicate(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching message on {topic} within {timeout} s "
                                       f"({len(self.messages[topic])} received)")
                self._cond.wait(min(left, 0.5))

    def with_stamp(self, topic: str, stamp: int, timeout: float = 120.0):
        return self.wait_for(topic, lambda m: stamp_ns(m.header.stamp) == stamp, timeout)

    def arrival_of(self, topic: str, msg) -> int:
        """When ``msg`` (a message received on ``topic``) arrived, as time.time_ns()."""
        with self._cond:
            for index, received in enumerate(self.messages[topic]):
                if received is msg:
                    return self.arrivals[topic][index]
        raise KeyError(f"that message was not received on {topic}")

    def received_stamps(self, topic: str) -> set:
        with self._cond:
            return {stamp_ns(m.header.stamp) for m in self.messages[topic]}

    def set_parameters(self, node_name: str, **values):
        """Set parameters of a remote node through its SetParameters service; the results."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        client = self.node.create_client(SetParameters, f"{node_name}/set_parameters")
        try:
            if not client.wait_for_service(timeout_sec=30.0):
                raise TimeoutError(f"{node_name}/set_parameters is not available")
            request = SetParameters.Request()
            request.parameters = [Parameter(k.replace("__", "."), value=v).to_parameter_msg()
                                  for k, v in values.items()]
            future = client.call_async(request)
            deadline = time.monotonic() + 30.0
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not future.done():
                raise TimeoutError(f"{node_name}/set_parameters did not answer")
            return future.result().results
        finally:
            self.node.destroy_client(client)

    def close(self):
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(5)


def diagnostic_values(array, status_name: str):
    """(level, message, {key: value}) of one status of a DiagnosticArray, or None."""
    for status in array.status:
        if status.name == status_name:
            return status.level, status.message, {kv.key: kv.value for kv in status.values}
    return None
