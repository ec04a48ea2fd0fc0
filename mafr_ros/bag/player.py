"""``mafr bag play``: publish a bag's recorded messages into a live ROS 2 graph, undecoded.

Each message's CDR bytes go straight to an rclpy publisher (``Publisher.publish(bytes)`` =
``publish_raw``): nothing is deserialized, so any type whose Python package is installed plays, at
the cost of one DDS write per message.

Timing: message *k* of a pass is due at ``t0 + (stamp_k - stamp_first) / rate`` on the monotonic
clock, where ``t0`` is when playback started; every deadline is computed from ``t0`` (never from
the previous message), so late wake-ups do not accumulate into drift. With ``loop`` the next pass
starts one mean inter-frame gap after the last message of the previous pass, so a looped bag keeps
its rate (``ros2 bag play --loop`` restarts immediately).

With ``clock`` (Hz), ``/clock`` (rosgraph_msgs/Clock) is published at that wall-clock rate with the
current bag time, ``stamp_first + (now - t0) * rate`` of the current pass (it jumps back at a loop,
as ``ros2 bag play --clock`` does); nodes run with ``use_sim_time:=true`` then follow the bag.

Two ways to drive it:

- ``BagPlayer.play(stop_event)``: the whole bag (or passes of it) with recorded timing; blocking.
- lockstep: ``for frame in player.frames(): player.publish_frame(frame); <wait for the node>``
  publishes one frame (all messages that share a bag timestamp) at a time, with no timing.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import InputError
from . import layout
from .reader import BagFrame, BagMessage, bag_info, check_bag_path, read_frames, read_messages
from .types import message_class

_LOG = logging.getLogger("mafr_ros.bag.player")

RELIABILITIES = ("reliable", "best_effort")
DEFAULT_QOS_DEPTH = 10
DEFAULT_CLOCK_HZ = 100.0


def player_qos(reliability: str = "reliable", depth: int = DEFAULT_QOS_DEPTH):
    """QoS of the player's publishers: keep-last ``depth``, volatile, ``reliability``.

    Reliable (the default) matches reliable and best-effort subscribers alike; best-effort
    publishers only match best-effort subscribers.
    """
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    if reliability not in RELIABILITIES:
        raise InputError(f"unknown QoS reliability {reliability!r}: use reliable or best_effort")
    if int(depth) != depth or depth < 1:
        raise InputError(f"QoS depth must be a positive integer, got {depth!r}")
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth),
                      reliability=(ReliabilityPolicy.RELIABLE if reliability == "reliable"
                                   else ReliabilityPolicy.BEST_EFFORT),
                      durability=DurabilityPolicy.VOLATILE)


def parse_remaps(remap) -> dict[str, str]:
    """{from: to} from a mapping or from 'FROM:=TO' strings (ros2 bag play --remap syntax)."""
    if remap is None:
        return {}
    if isinstance(remap, Mapping):
        pairs = list(remap.items())
    else:
        pairs = []
        for rule in remap:
            source, sep, target = str(rule).partition(":=")
            if not sep:
                raise InputError(f"remap rule {rule!r} must be FROM:=TO, e.g. "
                                 "/camera/points:=/cam2/points")
            pairs.append((source, target))
    result = {}
    for source, target in pairs:
        if not source.startswith("/") or not target.startswith("/") or len(target) < 2:
            raise InputError(f"remap {source}:={target}: both names must be absolute topics "
                             "(starting with '/')")
        result[source] = target
    return result


@dataclass
class PlayStats:
    """Outcome of :meth:`BagPlayer.play`: messages published per (bag) topic, /clock messages,
    completed passes over the bag, wall seconds, and whether a stop request ended it early."""

    published: dict[str, int] = field(default_factory=dict)
    clock_messages: int = 0
    passes: int = 0
    seconds: float = 0.0
    stopped: bool = False

    @property
    def total(self) -> int:
        return sum(self.published.values())

    def format(self) -> str:
        width = max((len(t) for t in self.published), default=0)
        lines = [f"published {self.total} messages in {self.seconds:.2f} s "
                 f"({self.passes} complete pass{'es' if self.passes != 1 else ''}"
                 f"{', stopped early' if self.stopped else ''})"]
        lines += [f"  {topic:<{width}}  {count}" for topic, count in sorted(self.published.items())]
        if self.clock_messages:
            lines.append(f"  {layout.CLOCK_TOPIC:<{width}}  {self.clock_messages}")
        return "\n".join(lines)


class BagPlayer:
    """Publishes a bag's raw messages through ``node``'s publishers (one per played topic).

    Parameters:
        node: an rclpy Node; the player creates its publishers on it (it needs no spinning).
        bag_path: rosbag2 folder (sqlite3 or MCAP).
        rate: speed factor of :meth:`play` (2.0 = twice as fast); > 0.
        loop: :meth:`play` repeats the bag until stopped.
        start_offset: skip the first ``start_offset`` seconds of the bag (every pass).
        clock: publish rosgraph_msgs/Clock on /clock at this many Hz during :meth:`play`
            (None or 0: no clock).
        remap: {bag topic: published topic} or ['FROM:=TO', ...].
        qos: rclpy QoSProfile of every publisher (default :func:`player_qos` ()).
        topics: play only these bag topics; exclude: leave these out (exact names).
        ack_timeout: at the end of :meth:`play`, wait up to this many seconds for reliable
            subscribers to acknowledge everything (so the last messages are not lost when the
            process exits right after); 0 disables.

    Attributes: ``topics`` ({bag topic: type} being played), ``published`` ({bag topic: count}
    so far, across :meth:`play` and :meth:`publish` calls), ``start_ns`` / ``end_ns`` of the bag.
    Call :meth:`close` (or use it as a context manager) to destroy the publishers.
    """

    def __init__(self, node, bag_path, *, rate: float = 1.0, loop: bool = False,
                 start_offset: float = 0.0, clock: float | None = None, remap=None, qos=None,
                 topics: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                 ack_timeout: float = 2.0):
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise InputError(f"rate must be a positive factor (1.0 = recorded speed), got {rate!r}")
        if not (isinstance(start_offset, (int, float)) and start_offset >= 0):
            raise InputError(f"start offset must be >= 0 seconds, got {start_offset!r}")
        if clock is not None and not (isinstance(clock, (int, float)) and clock >= 0
                                      and math.isfinite(clock)):
            raise InputError(f"clock rate must be a positive number of Hz, got {clock!r}")
        self.node = node
        self.bag_path = check_bag_path(bag_path)
        self.rate = float(rate)
        self.loop = bool(loop)
        self.start_offset = float(start_offset)
        self.clock_hz = float(clock) if clock else 0.0
        self.ack_timeout = float(ack_timeout)
        self._topic_filter = None if topics is None else list(topics)
        self._exclude = list(exclude or ())

        info = bag_info(self.bag_path)
        self.start_ns, self.end_ns = info.start_ns, info.end_ns
        available = {t.name: t.msgtype for t in info.topics}
        if not available or info.message_count == 0:
            raise InputError(f"bag {self.bag_path} holds no messages: nothing to play")
        unknown = [t for t in (self._topic_filter or []) + self._exclude if t not in available]
        if unknown:
            raise InputError(f"bag {self.bag_path} has no topic {', '.join(unknown)}; its topics "
                             f"are {', '.join(sorted(available)) or 'none'}")
        self.topics = {name: msgtype for name, msgtype in available.items()
                       if (self._topic_filter is None or name in self._topic_filter)
                       and name not in self._exclude}
        if not self.topics:
            raise InputError(f"nothing to play: every topic of {self.bag_path} was filtered out")
        self.remap = parse_remaps(remap)
        stray = sorted(set(self.remap) - set(self.topics))
        if stray:
            raise InputError(f"remap of {', '.join(stray)}: not a played topic of the bag "
                             f"(played: {', '.join(sorted(self.topics))})")
        self.qos = qos if qos is not None else player_qos()
        self._publishers = {}
        for name, msgtype in sorted(self.topics.items()):
            self._publishers[name] = node.create_publisher(message_class(msgtype),
                                                           self.remap.get(name, name), self.qos)
        self._clock_publisher = None
        if self.clock_hz:
            from rosgraph_msgs.msg import Clock
            # /clock is what use_sim_time nodes read; reliable keep-last 1 like ros2 bag play.
            self._clock_publisher = node.create_publisher(Clock, layout.CLOCK_TOPIC,
                                                          player_qos("reliable", 1))
        self.published = dict.fromkeys(self.topics, 0)
        self.clock_messages = 0
        self._gap_ns = self._mean_frame_gap_ns(info)

    # ---- introspection -----------------------------------------------------------------------

    def published_name(self, bag_topic: str) -> str:
        """The topic a bag topic is published on (after remapping)."""
        return self.remap.get(bag_topic, bag_topic)

    @staticmethod
    def _mean_frame_gap_ns(info) -> int:
        # A bag of one frame has no rate: its loop repeats once a (bag) second.
        frames = max((t.count for t in info.topics), default=0)
        return int(info.duration_ns / (frames - 1)) if frames > 1 else 1_000_000_000

    def messages(self) -> Iterator[BagMessage]:
        """One pass over the played messages (topics/exclude/start_offset applied), raw."""
        return read_messages(self.bag_path, list(self.topics), None, self.start_offset)

    def frames(self) -> Iterator[BagFrame]:
        """One pass over the played messages grouped by bag timestamp (lockstep driving)."""
        return read_frames(self.bag_path, list(self.topics), None, self.start_offset)

    # ---- publishing --------------------------------------------------------------------------

    def publish(self, message: BagMessage) -> None:
        """Publish one message's raw bytes on its (remapped) topic."""
        publisher = self._publishers.get(message.topic)
        if publisher is None:
            raise InputError(f"topic {message.topic} is not played by this player "
                             f"(played: {', '.join(sorted(self.topics))})")
        publisher.publish(message.data)
        self.published[message.topic] += 1

    def publish_frame(self, frame: BagFrame) -> None:
        """Publish every message of one frame, in recorded order."""
        for message in frame.messages:
            self.publish(message)

    def publish_clock(self, stamp_ns: int) -> None:
        """Publish ``stamp_ns`` on /clock (needs ``clock`` > 0 at construction)."""
        if self._clock_publisher is None:
            raise InputError("this player was created without a clock (clock=None)")
        from builtin_interfaces.msg import Time
        from rosgraph_msgs.msg import Clock

        stamp_ns = int(stamp_ns)
        self._clock_publisher.publish(Clock(clock=Time(sec=stamp_ns // 1_000_000_000,
                                                       nanosec=stamp_ns % 1_000_000_000)))
        self.clock_messages += 1

    def subscriber_counts(self) -> dict[str, int]:
        """{bag topic: matched subscriptions of its publisher}."""
        return {name: pub.get_subscription_count() for name, pub in self._publishers.items()}

    def wait_for_subscribers(self, timeout: float, topics: Sequence[str] | None = None,
                             stop_event: threading.Event | None = None) -> bool:
        """Wait until every (given) played topic has a matched subscriber; False on timeout."""
        wanted = list(self.topics if topics is None else topics)
        deadline = time.monotonic() + timeout
        stop_event = stop_event or threading.Event()
        while not stop_event.is_set():
            counts = self.subscriber_counts()
            if all(counts[t] > 0 for t in wanted):
                return True
            if time.monotonic() >= deadline:
                return False
            stop_event.wait(0.02)
        return False

    def wait_for_acks(self, timeout: float) -> bool:
        """Wait until reliable subscribers acknowledged every message sent (True when done)."""
        from rclpy.duration import Duration

        deadline = time.monotonic() + timeout
        done = True
        for publisher in self._publishers.values():
            left = max(0.0, deadline - time.monotonic())
            done = publisher.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9))) and done
        return done

    # ---- timed playback ----------------------------------------------------------------------

    def play(self, stop_event: threading.Event | None = None) -> PlayStats:
        """Publish the bag with recorded timing (scaled by ``rate``) until its end (or forever with
        ``loop``) or until ``stop_event`` is set; returns the counts of this call."""
        stop_event = stop_event or threading.Event()
        before = dict(self.published)
        clock_before = self.clock_messages
        stats = PlayStats()
        period = 1.0 / self.clock_hz if self.clock_hz else math.inf
        t0 = time.monotonic()
        next_tick = t0
        pass_t0 = t0                  # wall time at which this pass's first message is due
        pass_first: int | None = None  # bag stamp of this pass's first message
        finished = False
        while not finished and not stop_event.is_set():
            pass_first = None
            last = None
            for message in self.messages():
                if pass_first is None:
                    pass_first = message.stamp_ns
                due = pass_t0 + (message.stamp_ns - pass_first) / 1e9 / self.rate
                while True:  # sleep until the message is due, ticking the clock meanwhile
                    now = time.monotonic()
                    if self.clock_hz and now >= next_tick:
                        self.publish_clock(pass_first + int((now - pass_t0) * self.rate * 1e9))
                        next_tick = t0 + (math.floor((now - t0) / period) + 1) * period
                        continue
                    wake = min(due, next_tick)
                    if now >= due or stop_event.wait(max(0.0, wake - now)):
                        break
                if stop_event.is_set():
                    break
                self.publish(message)
                last = message.stamp_ns
            else:
                if pass_first is None:
                    raise InputError(f"bag {self.bag_path} has no message to play after the "
                                     f"start offset of {self.start_offset} s")
                stats.passes += 1
                if not self.loop:
                    finished = True
                else:
                    pass_t0 += ((last - pass_first) + self._gap_ns) / 1e9 / self.rate
        stats.stopped = stop_event.is_set()
        if self.ack_timeout > 0 and not stats.stopped:
            if not self.wait_for_acks(self.ack_timeout):
                _LOG.warning("not every reliable subscriber acknowledged all messages within "
                             "%.1f s", self.ack_timeout)
        stats.seconds = time.monotonic() - t0
        stats.published = {t: self.published[t] - before[t] for t in self.published}
        stats.clock_messages = self.clock_messages - clock_before
        return stats

    def close(self) -> None:
        for publisher in self._publishers.values():
            self.node.destroy_publisher(publisher)
        if self._clock_publisher is not None:
            self.node.destroy_publisher(self._clock_publisher)
        self._publishers, self._clock_publisher = {}, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

