"""The live node fed by a bag: the node as a child process, a lockstep replay into it, and the
collection of its answers (used by ``mafr eval --bag --live``, ``mafr demo`` and the test harness).

:class:`NodeProcess` runs ``python -m mafr_ros.ros.node`` in a process group of its own, so that
:meth:`NodeProcess.stop` ends it and anything it started even when it hangs, and nothing outlives
the caller. :class:`LiveReplay` publishes a bag through :class:`~mafr_ros.bag.player.BagPlayer`
from a participant of its own and keeps every ``~/anomaly`` and ``/diagnostics`` message of the
node; :meth:`LiveReplay.lockstep` sends one frame, waits for the result with that frame's stamp,
then sends the next: the node's latest-wins slot then never replaces a frame, so every frame is
answered, or reported with the reason the node gave (its ``last_failure``) or as a timeout.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MafrError
from . import layout

log = logging.getLogger("mafr_ros.bag.live")

NODE_NAME = "mafr"  # the node's name (mafr_ros.ros.node.NODE_NAME), results on <ns>/mafr/anomaly


class NodeStartError(MafrError):
    """The node process exited or did not subscribe to its inputs in time."""


def stamp_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ros_param_text(value) -> str:
    """A Python value as the text of a ``-p name:=value`` ROS argument."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


class NodeProcess:
    """The mafr node in a child process (own process group), stdout + stderr to ``log_path``.

    ``params``: ROS parameters ({name: value}, dotted names as in config/mafr.yaml);
    ``namespace``: the node's namespace (its relative input topics resolve under it);
    ``params_file``: an optional YAML passed before the ``-p`` overrides.
    """

    def __init__(self, namespace: str, params: dict | None = None, log_path=None,
                 params_file=None, extra_args=(), env: dict | None = None):
        self.namespace = layout.normalize_namespace(namespace) or "/"
        args = [sys.executable, "-m", "mafr_ros.ros.node", "--ros-args"]
        if params_file is not None:
            args += ["--params-file", str(params_file)]
        args += ["-r", f"__ns:={self.namespace}"]
        for name, value in (params or {}).items():
            args += ["-p", f"{name}:={ros_param_text(value)}"]
        args += list(extra_args)
        self.args = args
        if log_path is None:
            handle, log_path = tempfile.mkstemp(prefix="mafr_node_", suffix=".log")
            os.close(handle)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        # A session of its own: stop() signals the whole group, so a hung node (or anything it
        # spawned) cannot survive the evaluation or a failed test.
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     env=None if env is None else {**os.environ, **env})
        self.pid = self.proc.pid

    @property
    def node_name(self) -> str:
        """Fully qualified name of the node ('/camera/mafr')."""
        return f"{self.namespace.rstrip('/')}/{NODE_NAME}"

    def topic(self, name: str) -> str:
        """A private topic of the node ('anomaly' -> '/camera/mafr/anomaly')."""
        return f"{self.node_name}/{name}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def stop(self, timeout: float = 20.0) -> int:
        """SIGINT (a normal shutdown: exit code 0), then SIGKILL to the whole group if it does not
        end within ``timeout``; returns the exit code. Idempotent."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("node %s did not stop within %.0f s: killing it", self.pid, timeout)
        self.kill_group()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL every process of the node's group that is still running, and reap the node."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a zombie the kernel keeps
            log.error("node process %s did not die after SIGKILL", self.pid)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@dataclass
class FrameOutcome:
    """What became of one frame sent in lockstep: its result, or why there is none."""

    stamp_ns: int
    result: object = None          # mafr_ros/AnomalyResult
    reason: str | None = None      # None when answered; else the node's failure or 'timeout ...'
    seconds: float = 0.0           # from publication to the result (or to giving up)


@dataclass
class LiveStats:
    sent: int = 0
    answered: int = 0
    missing: list = field(default_factory=list)   # FrameOutcome without a result
    seconds: float = 0.0


class LiveReplay:
    """A participant (own rclpy context, spun in a background thread) that plays ``bag`` into the
    node at ``node_name`` and keeps the node's results and diagnostics.

    ``topics``: the bag topics to publish (default: every topic of the bag); ``remap`` as for
    :class:`~mafr_ros.bag.player.BagPlayer`; ``record``: a folder to record the node's results
    (and diagnostics) into, as a rosbag2 written by :class:`~mafr_ros.bag.recorder.BagRecorder`.
    """

    def __init__(self, bag, node_name: str, *, topics=None, remap=None, qos=None,
                 record=None, record_topics=("anomaly",), participant: str | None = None):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

        from ..msg import AnomalyResult
        from .player import BagPlayer

        self.node_name = node_name
        self.result_topic = f"{node_name}/anomaly"
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self._closed = False
        try:
            self.node = rclpy.create_node(participant or f"mafr_live_replay_{os.getpid()}",
                                          context=self.context)
            self.player = BagPlayer(self.node, bag, topics=topics, remap=remap, qos=qos)
            self._cond = threading.Condition()
            self.results: dict[int, object] = {}
            self.result_order: list[int] = []
            self.diagnostics: list = []
            keep = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                              reliability=ReliabilityPolicy.RELIABLE)
            self.node.create_subscription(AnomalyResult, self.result_topic, self._on_result, keep)
            self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics,
                                          keep)
            self.recorder = None
            self.spin_error: Exception | None = None
            if record is not None:
                from .recorder import BagRecorder
                # MCAP: one file per bag (any storage works: the recorder writes on a thread of
                # its own, whichever thread spins the node).
                self.recorder = BagRecorder(
                    self.node, record, [f"{node_name}/{t}" if not t.startswith("/") else t
                                        for t in record_topics], storage="mcap", overwrite=True)
            self._executor = SingleThreadedExecutor(context=self.context)
            self._executor.add_node(self.node)
            self._thread = threading.Thread(target=self._spin, name="live_replay", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    # ---- background spinning -----------------------------------------------------------------
    def _spin(self):
        while self.context.ok() and not self._closed:
            try:
                self._executor.spin_once(timeout_sec=0.05)
            except Exception as error:
                if not self.context.ok() or self._closed:  # shutdown race
                    return
                with self._cond:  # waiters must not wait for results that can no longer come
                    self.spin_error = error
                    self._cond.notify_all()
                raise

    def _on_result(self, msg):
        with self._cond:
            stamp = stamp_ns(msg.header.stamp)
            self.results[stamp] = msg
            self.result_order.append(stamp)
            self._cond.notify_all()

    def _on_diagnostics(self, msg):
        with self._cond:
            for status in msg.status:
                if status.name.startswith(f"{self.node_name}: "):
                    self.diagnostics.append(msg)
                    self._cond.notify_all()
                    break

    # ---- waiting -----------------------------------------------------------------------------
    def detector_status(self) -> dict:
        """{key: value} of the newest detector status of the node ({} before the first one)."""
        with self._cond:
            return self._status_values_locked("detector")

    def inputs_status(self) -> tuple[int, str, dict] | None:
        with self._cond:
            for msg in reversed(self.diagnostics):
                for status in msg.status:
                    if status.name == f"{self.node_name}: inputs":
                        return status.level, status.message, {kv.key: kv.value for kv in status.values}
        return None

    def _status_values_locked(self, kind: str) -> dict:
        for msg in reversed(self.diagnostics):
            for status in msg.status:
                if status.name == f"{self.node_name}: {kind}":
                    return {kv.key: kv.value for kv in status.values}
        return {}

    def wait_ready(self, node: NodeProcess | None = None, timeout: float = 300.0,
                   topics=None) -> None:
        """Wait until the node subscribes to the played topics (it subscribes only once its model
        is loaded and warmed up); NodeStartError if the process ends or time runs out."""
        deadline = time.monotonic() + timeout
        wanted = list(topics) if topics is not None else None
        while time.monotonic() < deadline:
            if node is not None and not node.alive():
                raise NodeStartError(f"the node exited with code {node.proc.returncode} before "
                                     f"subscribing; its log ({node.log_path}):\n{node.log_tail()}")
            if self.player.wait_for_subscribers(0.25, topics=wanted):
                if self.recorder is not None:
                    self.recorder.poll()
                return
        raise NodeStartError(f"the node did not subscribe to {wanted or list(self.player.topics)} "
                             f"within {timeout:.0f} s"
                             + (f"; its log:\n{node.log_tail()}" if node is not None else ""))

    def wait_result(self, stamp: int, timeout: float, node: NodeProcess | None = None,
                    failed_before: int | None = None) -> FrameOutcome:
        """The result stamped ``stamp``, or the reason there is none: the node counted a failed
        frame (its last_failure), it died, or ``timeout`` seconds passed."""
        started = time.monotonic()
        deadline = started + timeout
        with self._cond:
            while True:
                if stamp in self.results:
                    return FrameOutcome(stamp, self.results[stamp], None,
                                        time.monotonic() - started)
                values = self._status_values_locked("detector")
                if failed_before is not None and int(values.get("frames_failed", 0)) > failed_before:
                    # The worker handles one frame at a time: in lockstep a new failure is ours.
                    return FrameOutcome(stamp, None, values.get("last_failure", "failed"),
                                        time.monotonic() - started)
                if self.spin_error is not None:
                    raise RuntimeError(f"the replay's executor stopped: {self.spin_error!r}")
                if node is not None and not node.alive():
                    return FrameOutcome(stamp, None, f"the node exited (code "
                                        f"{node.proc.returncode})", time.monotonic() - started)
                left = deadline - time.monotonic()
                if left <= 0:
                    return FrameOutcome(stamp, None, f"timeout: no result within {timeout:g} s",
                                        time.monotonic() - started)
                self._cond.wait(min(left, 0.2))

    def failed_count(self) -> int:
        return int(self.detector_status().get("frames_failed", 0))

    # ---- replay ------------------------------------------------------------------------------
    def lockstep(self, node: NodeProcess | None = None, timeout: float = 60.0,
                 first_timeout: float | None = None, on_frame=None) -> tuple[list[FrameOutcome], LiveStats]:
        """Send every frame of the bag, one at a time, each after the previous one's answer.
        ``on_frame(outcome)`` is called after each frame (progress). Returns the outcomes in bag
        order and the counts."""
        outcomes, stats = [], LiveStats()
        started = time.monotonic()
        # The failure count before the first frame is the baseline that tells our frames' failures
        # from older ones: wait for a detector status (published periodically; any one received
        # here was sent after this participant subscribed, so it is current).
        deadline = started + 10.0
        while not self.detector_status() and time.monotonic() < deadline:
            time.sleep(0.05)
        failed = self.failed_count()
        for i, frame in enumerate(self.player.frames()):
            stamp = self._frame_stamp(frame)
            self.player.publish_frame(frame)
            stats.sent += 1
            outcome = self.wait_result(stamp, first_timeout if (i == 0 and first_timeout)
                                       else timeout, node=node, failed_before=failed)
            if outcome.result is None:
                stats.missing.append(outcome)
                failed = max(failed, self.failed_count())
            else:
                stats.answered += 1
            outcomes.append(outcome)
            if on_frame is not None:
                on_frame(outcome)
            if node is not None and not node.alive():
                break
        stats.seconds = time.monotonic() - started
        return outcomes, stats

    @staticmethod
    def _frame_stamp(frame) -> int:
        """The header stamp of a frame: its bag timestamp (the layout contract of `mafr bag make`:
        every message of a frame is written with its header stamp)."""
        return int(frame.stamp_ns)

    def wait_acks(self, timeout: float = 5.0) -> bool:
        return self.player.wait_for_acks(timeout)

    # ---- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        import rclpy
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(5)
        recorder = getattr(self, "recorder", None)
        if recorder is not None:
            recorder.close()
        player = getattr(self, "player", None)
        if player is not None:
            player.close()
        node = getattr(self, "node", None)
        if node is not None:
            node.destroy_node()
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(timeout_sec=0)
        rclpy.try_shutdown(context=self.context)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def node_params_for_evaluation(input_mode: str, checkpoint=None, device: str = "auto",
                               extra: dict | None = None) -> dict:
    """The node parameters of a lockstep evaluation: reliable inputs (a lost image would be a
    missing frame), the heatmap inside AnomalyResult (one message per frame carries all that is
    scored), frequent diagnostics (failures are seen quickly)."""
    params = {"input_mode": input_mode, "device": device, "qos.input.reliability": "reliable",
              "publish.heatmap_in_result": True, "diagnostics.period": 0.25}
    if checkpoint:
        params["checkpoint"] = str(Path(checkpoint).resolve())
    params.update(extra or {})
    return params
