"""``mafr bag record``: subscribe raw to topics of a live graph and write them to a rosbag2 folder.

Each topic's type is taken from the graph (the recorder waits until the topic has a publisher);
messages are received as CDR bytes (``create_subscription(..., raw=True)``) and written undecoded,
stamped with their receive time on the node's clock (system time, or /clock with use_sim_time),
as ``ros2 bag record`` does. Each connection's message definition and type hash come from
:func:`types.bag_typestore` (Kilted messages + the project's msg/*.msg), so a recording of
``mafr_ros/msg/AnomalyResult`` is self-describing for ``ros2 bag`` and MCAP readers.

QoS: by default each subscription adapts to the topic's publishers, like ``ros2 bag record``:
reliable if every publisher offers reliable (else best-effort), transient-local if every
publisher offers it (else volatile). ``reliability`` forces one.

Writing happens on a thread of the recorder's own: subscription callbacks only queue the bytes,
so a slow disk never stalls the executor, and the storage is used by the one thread that opened
it (a sqlite3 connection refuses use from any other), whichever thread spins the node.

The writer is closed (metadata.yaml written) by :meth:`BagRecorder.close`, which
:meth:`BagRecorder.record` calls on every exit path: duration, message count, stop event, error.
A write that failed is raised by ``close`` (as ``InputError``, with the bag's path).
"""
from __future__ import annotations

import logging
import math
import queue
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from . import layout
from .types import bag_typestore, require_known_type

_LOG = logging.getLogger("mafr_ros.bag.recorder")

DEFAULT_QOS_DEPTH = 100


def _type_hash_string(type_hash) -> str | None:
    """'RIHS01_<hex>' of an rclpy TypeHash, None when the graph gave none."""
    try:
        version, value = int(type_hash.version), bytes(type_hash.value)
    except (AttributeError, TypeError, ValueError):
        return None
    return f"RIHS{version:02d}_{value.hex()}" if version > 0 else None


@dataclass
class RecordStats:
    """Outcome of a recording: messages per topic, topics never seen, wall seconds, why it ended."""

    path: Path
    counts: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reason: str = ""

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def format(self) -> str:
        width = max((len(t) for t in list(self.counts) + self.missing), default=0)
        lines = [f"recorded {self.total} messages in {self.seconds:.2f} s into {self.path} "
                 f"({self.reason})"]
        lines += [f"  {t:<{width}}  {n}" for t, n in sorted(self.counts.items())]
        lines += [f"  {t:<{width}}  never published (not in the bag)" for t in self.missing]
        return "\n".join(lines)


class BagRecorder:
    """Raw subscriptions on ``node`` that write what they receive into a new rosbag2 folder.

    Parameters:
        node: an rclpy Node (the caller may spin it; :meth:`record` spins it itself).
        out: bag folder to create (must not exist, unless ``overwrite`` and it is a bag).
        topics: absolute topic names to record.
        storage: 'sqlite3' or 'mcap'; version: rosbag2 metadata version 8 or 9.
        reliability: None (adapt to the publishers), 'reliable' or 'best_effort'.
        depth: keep-last depth of the subscriptions.
        max_messages: stop after this many messages in all (further ones are not written).

    Use :meth:`poll` (subscribe to the topics that have appeared), then spin the node, then
    :meth:`close`; or just :meth:`record`. Attributes: ``counts`` ({topic: messages written}),
    ``types`` ({topic: type} subscribed so far), ``done`` (Event set when max_messages is
    reached), ``path``.
    """

    def __init__(self, node, out, topics: Iterable[str], *, storage: str = layout.DEFAULT_STORAGE,
                 version: int = layout.DEFAULT_VERSION, reliability: str | None = None,
                 depth: int = DEFAULT_QOS_DEPTH, max_messages: int | None = None,
                 overwrite: bool = False):
        from rosbags.rosbag2 import StoragePlugin, Writer

        from .make import _prepare_output
        from .player import RELIABILITIES

        self.topics = list(dict.fromkeys(topics))
        if not self.topics:
            raise InputError("no topics to record: pass at least one topic name")
        bad = [t for t in self.topics if not t.startswith("/")]
        if bad:
            raise InputError(f"topic names must be absolute (start with '/'): {', '.join(bad)}")
        if storage not in layout.STORAGES:
            raise InputError(f"unknown storage {storage!r}: use one of {', '.join(layout.STORAGES)}")
        if version not in layout.VERSIONS:
            raise InputError(f"unsupported rosbag2 metadata version {version!r}: use 8 or 9")
        if reliability is not None and reliability not in RELIABILITIES:
            raise InputError(f"unknown QoS reliability {reliability!r}: use reliable or best_effort")
        if int(depth) != depth or depth < 1:
            raise InputError(f"QoS depth must be a positive integer, got {depth!r}")
        if max_messages is not None and (int(max_messages) != max_messages or max_messages < 1):
            raise InputError(f"max messages must be a positive integer, got {max_messages!r}")
        self.node = node
        self.path = Path(out).expanduser()
        _prepare_output(self.path, overwrite)
        self.reliability, self.depth, self.max_messages = reliability, int(depth), max_messages
        self.counts: dict[str, int] = {}
        self.types: dict[str, str] = {}
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._subscriptions = {}
        self._total = 0
        self._closed = False
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._write_error: BaseException | None = None
        opened = threading.Event()
        writer = Writer(self.path, version=version, storage_plugin=StoragePlugin[storage.upper()])
        self._thread = threading.Thread(target=self._write_loop, args=(writer, opened),
                                        name="bag_writer", daemon=True)
        self._thread.start()
        opened.wait()
        if self._write_error is not None:
            self._thread.join()
            raise InputError(f"cannot open {self.path} for writing: {self._write_error}") \
                from self._write_error

    # ---- the writer thread -------------------------------------------------------------------

    _STOP = object()

    def _write_loop(self, writer, opened: threading.Event) -> None:
        """Open the storage, then add connections and write messages in queue order until close.
        After a failure the remaining jobs are drained unwritten and the error kept for close."""
        try:
            writer.open()
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor
            self._write_error = exc
            opened.set()
            return
        opened.set()
        connections = {}
        while True:
            job = self._jobs.get()
            if job is self._STOP:
                break
            if self._write_error is not None:
                continue
            try:
                if job[0] == "connection":
                    _, topic, msgtype, typestore = job
                    connections[topic] = writer.add_connection(topic, msgtype, typestore=typestore)
                else:
                    _, topic, stamp, data = job
                    writer.write(connections[topic], stamp, data)
            except BaseException as exc:  # noqa: BLE001 - raised by close()
                self._write_error = exc
                _LOG.error("writing %s failed: %s (later messages are not written)", self.path, exc)
        try:
            writer.close()
        except BaseException as exc:  # noqa: BLE001
            self._write_error = self._write_error or exc

    # ---- subscriptions -----------------------------------------------------------------------

    def _qos(self, topic: str):
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        infos = self.node.get_publishers_info_by_topic(topic)
        if self.reliability is not None:
            reliable = self.reliability == "reliable"
        else:
            reliable = bool(infos) and all(
                i.qos_profile.reliability == ReliabilityPolicy.RELIABLE for i in infos)
        latched = bool(infos) and all(
            i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for i in infos)
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.depth,
                          reliability=(ReliabilityPolicy.RELIABLE if reliable
                                       else ReliabilityPolicy.BEST_EFFORT),
                          durability=(DurabilityPolicy.TRANSIENT_LOCAL if latched
                                      else DurabilityPolicy.VOLATILE)), infos

    def poll(self) -> list[str]:
        """Subscribe to every wanted topic that now has a publisher; returns the ones still absent."""
        from .types import message_class

        if self._closed:
            raise InputError(f"the recorder of {self.path} is closed")
        graph = dict(self.node.get_topic_names_and_types())
        missing = []
        for topic in self.topics:
            if topic in self._subscriptions:
                continue
            types = graph.get(topic)
            if not types:
                missing.append(topic)
                continue
            if len(types) > 1:
                raise InputError(f"topic {topic} is published with several types ({', '.join(types)})"
                                 "; a bag connection has one type: fix the publishers")
            msgtype = types[0]
            require_known_type(msgtype, topic)
            qos, infos = self._qos(topic)
            if not infos:  # only subscribers so far: wait for a publisher to learn its QoS
                missing.append(topic)
                continue
            typestore = bag_typestore()
            digest = typestore.hash_rihs01(msgtype)
            offered = {_type_hash_string(i.topic_type_hash) for i in infos} - {None}
            if offered and offered != {digest}:
                _LOG.warning("topic %s: publishers offer type hash %s but the definition stored "
                             "for %s has %s (a different distro's type?); the bag keeps the "
                             "local definition", topic, ", ".join(sorted(offered)), msgtype, digest)
            with self._lock:
                self._jobs.put(("connection", topic, msgtype, typestore))
                self.counts[topic] = 0
                self.types[topic] = msgtype
            self._subscriptions[topic] = self.node.create_subscription(
                message_class(msgtype), topic, self._callback(topic), qos, raw=True)
            _LOG.info("recording %s (%s, %s)", topic, msgtype,
                      qos.reliability.name.lower())
        return missing

    def _callback(self, topic: str):
        clock = self.node.get_clock()

        def receive(data: bytes) -> None:
            stamp = clock.now().nanoseconds
            with self._lock:
                if self._closed or self.done.is_set():
                    return
                self._jobs.put(("message", topic, stamp, bytes(data)))
                self.counts[topic] += 1
                self._total += 1
                if self.max_messages is not None and self._total >= self.max_messages:
                    self.done.set()
        return receive

    @property
    def total(self) -> int:
        return self._total

    # ---- blocking recording ------------------------------------------------------------------

    def record(self, duration: float | None = None, stop_event: threading.Event | None = None,
               executor=None, poll_period: float = 0.1) -> RecordStats:
        """Spin until ``duration`` seconds passed (counted from this call), ``max_messages`` were
        written or ``stop_event`` is set; then close the bag. Topics are subscribed as they appear.
        """
        from rclpy.executors import SingleThreadedExecutor

        if duration is not None and not (duration > 0 and math.isfinite(duration)):
            raise InputError(f"duration must be a positive number of seconds, got {duration!r}")
        stop_event = stop_event or threading.Event()
        own_executor = executor is None
        if own_executor:
            executor = SingleThreadedExecutor(context=self.node.context)
            executor.add_node(self.node)
        started = time.monotonic()
        deadline = started + duration if duration else math.inf
        next_poll = started
        waiting_logged: set[str] = set()
        reason = "stopped"
        try:
            while True:
                now = time.monotonic()
                if now >= next_poll and len(self._subscriptions) < len(self.topics):
                    missing = self.poll()
                    for topic in sorted(set(missing) - waiting_logged):
                        _LOG.info("waiting for %s to appear", topic)
                    waiting_logged.update(missing)
                    next_poll = now + poll_period
                if self.done.is_set():
                    reason = f"{self.max_messages} messages"
                    break
                if stop_event.is_set():
                    reason = "stopped"
                    break
                if now >= deadline:
                    reason = f"duration {duration:g} s"
                    break
                executor.spin_once(timeout_sec=min(poll_period, max(0.0, deadline - now)))
        finally:
            if own_executor:
                executor.remove_node(self.node)
                executor.shutdown(timeout_sec=0)
            self.close()
        return RecordStats(path=self.path, counts=dict(self.counts),
                           missing=[t for t in self.topics if t not in self.counts],
                           seconds=time.monotonic() - started, reason=reason)

    def close(self) -> None:
        """Destroy the subscriptions, write what is queued and finish the bag (metadata.yaml);
        idempotent. Raises InputError if any write failed (the bag then lacks those messages)."""
        for subscription in self._subscriptions.values():
            self.node.destroy_subscription(subscription)
        self._subscriptions = {}
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(self._STOP)
        self._thread.join()
        if self._write_error is not None:
            raise InputError(f"recording into {self.path} failed: {self._write_error}; the bag "
                             "is incomplete (check free disk space and permissions)") \
                from self._write_error

    def abort(self) -> None:
        """Close and delete the partial bag (a failed write does not matter any more)."""
        try:
            self.close()
        except InputError:
            pass
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
