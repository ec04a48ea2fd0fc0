"""Approximate-time synchroniser for 2 or 3 topics, with ROS 2 Python ``message_filters`` semantics.

``message_filters`` has no ROS 2 build in this environment, so the node cannot use
``message_filters.ApproximateTimeSynchronizer``. This module re-implements that algorithm from its
description and source, in plain Python with no rclpy import, so it can be unit-tested on synthetic
stamp streams and its counters can feed the node's diagnostics.

The algorithm (identical to ``ApproximateTimeSynchronizer(fs, queue_size, slop)``, checked against
ros2/message_filters ``src/message_filters/__init__.py``):

1. Each topic has a queue keyed by stamp (integer nanoseconds), in insertion order. A message whose
   stamp is already queued on its topic replaces the queued one (last wins). If the queue is then
   longer than ``queue_size``, the entry with the *smallest stamp* is evicted; that can be the new
   message itself when it arrives late and is older than everything queued.
2. For every other topic, the queued stamps ``s`` with ``|s - t| <= slop`` (``t`` = new stamp) are the
   candidates, sorted by ``|s - t|``; equal distances keep queue insertion order. If any topic has no
   candidate, nothing is emitted.
3. The candidate combinations are tried in lexicographic order (the lowest-indexed other topic varies
   slowest). The first one whose span ``max - min`` over all members, the new message included, is
   *strictly less* than ``slop`` is emitted at once, and only its members leave the queues. So the
   emitted set is the first acceptable one, not the one with the smallest span, and sets only
   form when their last member arrives. Older unmatched messages stay queued until evicted (or
   until a later arrival matches them, which can emit sets out of stamp order).

What differs from upstream, on purpose:

* The user callback runs *after* the lock is released (upstream runs it under the lock, so one slow
  callback serialises every subscription; message_filters issue #65). Consequence: when add() is
  called from several threads, two sets may reach the callback in a different order than they were
  formed. Every set is still formed exactly once, and add() also returns it to its caller.
* Counters (``stats``) that account for every message: received = matched + unmatched + pending,
  per topic. Upstream drops unmatched messages silently (ros2/ros2 #1313).
* Backward time jumps (a bag that loops, a restarted ``/clock``): a stamp older than the newest
  stamp seen on its topic by more than ``backward_jump_s`` clears every queue before it is stored.
  Upstream has no such rule and, because it evicts the *smallest* stamp, a queue left full of
  pre-jump stamps evicts every post-jump message on arrival and never matches again.
  ``backward_jump_s=None`` restores the upstream behaviour.
* Optional ``drop_older_on_match``: after a set is emitted, also drop queued messages older than the
  set's member on each topic, so emitted sets are monotonic in time. Off by default (upstream keeps
  them).
* Stamps are integer nanoseconds and ``slop`` is rounded to the nearest nanosecond (rclpy's
  ``Duration(seconds=slop)`` truncates, which can make it 1 ns shorter).
* Headerless messages are refused (upstream's ``allow_headerless`` stamps them with the current
  clock, which its own docstring advises against). Pass ``stamp_ns`` to add() to supply a stamp.
"""
from __future__ import annotations

import itertools
import math
import numbers
import operator
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from mafr_ros.errors import InputError

__all__ = ["ApproximateTimeSync", "SyncStats", "header_stamp_ns", "NS_PER_S"]

NS_PER_S = 1_000_000_000


def header_stamp_ns(msg: Any) -> int:
    """Return ``msg.header.stamp`` (a ``builtin_interfaces/Time``) as integer nanoseconds.

    Integer arithmetic keeps the slop comparison exact: float seconds lose nanoseconds beyond
    about 2**53 ns (104 days), and wall-clock stamps are far beyond that.
    """
    try:
        stamp = msg.header.stamp
        sec, nanosec = stamp.sec, stamp.nanosec
    except AttributeError:
        raise InputError(
            f"a {type(msg).__name__} has no header.stamp.sec/nanosec, so it cannot be synchronised; "
            "synchronise stamped messages, or pass stamp_ns to add() / a stamp_of function"
        ) from None
    if not (isinstance(sec, numbers.Integral) and isinstance(nanosec, numbers.Integral)):
        raise InputError(f"header.stamp must hold integers, got sec={sec!r}, nanosec={nanosec!r}")
    if sec < 0 or not 0 <= nanosec < NS_PER_S:
        raise InputError(
            f"header.stamp sec={sec}, nanosec={nanosec} is not a valid ROS time "
            "(sec >= 0 and 0 <= nanosec < 1e9); fix the publisher's stamping"
        )
    return int(sec) * NS_PER_S + int(nanosec)


@dataclass(frozen=True)
class SyncStats:
    """A consistent snapshot of the synchroniser's lifetime counters (tuples are per topic).

    ``received[i] == matched[i] + unmatched[i] + pending[i]`` always holds. ``unmatched`` counts
    messages that left a queue without being part of a set: evicted by ``queue_size``, replaced by
    a duplicate stamp, dropped by ``drop_older_on_match`` or cleared by a reset. ``duplicates`` and
    ``out_of_order`` classify arrivals and overlap with the other counters.
    """

    sets: int
    received: tuple[int, ...]
    matched: tuple[int, ...]
    unmatched: tuple[int, ...]
    pending: tuple[int, ...]
    duplicates: tuple[int, ...]
    out_of_order: tuple[int, ...]
    resets: int

    def is_balanced(self) -> bool:
        """True when every received message is matched, unmatched or pending, and every set has
        exactly one message from each topic."""
        return all(
            r == m + u + p and m == self.sets
            for r, m, u, p in zip(self.received, self.matched, self.unmatched, self.pending)
        )


class ApproximateTimeSync:
    """Greedy approximate-time synchroniser for 2 or 3 topics (see the module docstring).

    Thread safety: all state is guarded by one lock, held only for the bookkeeping of one add();
    the stamp extraction and the user callback run outside it. add() may be called concurrently
    from the subscription callbacks of a ``MultiThreadedExecutor``.
    """

    def __init__(
        self,
        num_topics: int,
        queue_size: int,
        slop: float,
        callback: Optional[Callable[..., Any]] = None,
        stamp_of: Callable[[Any], int] = header_stamp_ns,
        *,
        backward_jump_s: Optional[float] = 1.0,
        drop_older_on_match: bool = False,
    ) -> None:
        """
        Args:
            num_topics: 2 or 3 (e.g. rgb, depth and optionally camera_info).
            queue_size: messages kept per topic while waiting for partners (>= 1).
            slop: a set must span strictly less than this many seconds (> 0).
            callback: called as ``callback(msg_0, ..., msg_{n-1})`` for each set, in topic order.
            stamp_of: maps a message to its stamp in integer nanoseconds.
            backward_jump_s: a stamp this many seconds older than the newest one on its topic
                clears all queues (see the module docstring); must exceed ``slop`` so ordinary
                reordering within the matching window never triggers it. None disables it.
            drop_older_on_match: also drop messages older than an emitted set (monotonic output).
        """
        if isinstance(num_topics, bool) or num_topics not in (2, 3):
            raise InputError(
                f"num_topics must be 2 or 3, got {num_topics!r}; the synchroniser pairs rgb with "
                "depth and optionally camera_info"
            )
        if isinstance(queue_size, bool) or not isinstance(queue_size, numbers.Integral) or queue_size < 1:
            raise InputError(
                f"queue_size must be an integer >= 1, got {queue_size!r}; use 5-10 for 30 Hz cameras"
            )
        slop_ns = self._seconds_to_ns("slop", slop)
        jump_ns = None
        if backward_jump_s is not None:
            jump_ns = self._seconds_to_ns("backward_jump_s", backward_jump_s)
            if jump_ns <= slop_ns:
                raise InputError(
                    f"backward_jump_s={backward_jump_s} must be greater than slop={slop}, or "
                    "reordering inside the matching window would clear the queues; use None to disable"
                )
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be callable or None, got {type(callback).__name__}")
        if not callable(stamp_of):
            raise InputError(f"stamp_of must be callable, got {type(stamp_of).__name__}")

        self._n = int(num_topics)
        self._queue_size = int(queue_size)
        self._slop_ns = slop_ns
        self._jump_ns = jump_ns
        self._drop_older = bool(drop_older_on_match)
        self._callback = callback
        self._stamp_of = stamp_of
        self._lock = threading.Lock()
        # dicts, not sorted containers: queues are tiny and insertion order is upstream's tie-break.
        self._queues: list[dict[int, Any]] = [{} for _ in range(self._n)]
        self._newest: list[Optional[int]] = [None] * self._n
        self._sets = 0
        self._resets = 0
        self._received = [0] * self._n
        self._matched = [0] * self._n
        self._unmatched = [0] * self._n
        self._duplicates = [0] * self._n
        self._out_of_order = [0] * self._n

    @staticmethod
    def _seconds_to_ns(name: str, seconds: float) -> int:
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not math.isfinite(seconds):
            raise InputError(f"{name} must be a finite number of seconds, got {seconds!r}")
        ns = round(float(seconds) * NS_PER_S)
        if ns < 1:
            raise InputError(f"{name} must be > 0 seconds (at least 1 ns), got {seconds!r}")
        return ns

    # -- read-only configuration ------------------------------------------------------------------
    @property
    def num_topics(self) -> int:
        return self._n

    @property
    def queue_size(self) -> int:
        return self._queue_size

    @property
    def slop_ns(self) -> int:
        return self._slop_ns

    # -- main entry -------------------------------------------------------------------------------
    def add(self, topic_index: int, msg: Any, stamp_ns: Optional[int] = None) -> Optional[tuple]:
        """Queue ``msg`` on topic ``topic_index``; return the set it completes, in topic order, or None.

        The callback (if any) is called with the same set after the lock is released; an exception
        it raises propagates to the caller, with the set already counted and dequeued. Malformed
        input (bad index, missing or invalid stamp) raises InputError and changes nothing.
        """
        if isinstance(topic_index, bool) or not isinstance(topic_index, numbers.Integral) \
                or not 0 <= topic_index < self._n:
            raise InputError(f"topic_index must be an integer in [0, {self._n}), got {topic_index!r}")
        source = "stamp_of(msg)" if stamp_ns is None else "stamp_ns"
        raw = self._stamp_of(msg) if stamp_ns is None else stamp_ns
        try:
            if isinstance(raw, bool):
                raise TypeError
            stamp = operator.index(raw)  # int and NumPy integers; floats are refused, not truncated
        except TypeError:
            raise InputError(
                f"{source} must be an integer number of nanoseconds, got {raw!r} ({type(raw).__name__})"
            ) from None
        if stamp < 0:
            raise InputError(f"{source} must be >= 0 ns (a ROS time), got {stamp}")
        i = int(topic_index)
        with self._lock:
            matched = self._add_locked(i, msg, stamp)
        if matched is not None and self._callback is not None:
            self._callback(*matched)
        return matched

    def _add_locked(self, i: int, msg: Any, stamp: int) -> Optional[tuple]:
        self._received[i] += 1
        newest = self._newest[i]
        if newest is not None and stamp < newest:
            if self._jump_ns is not None and newest - stamp > self._jump_ns:
                self._reset_locked()
            else:
                self._out_of_order[i] += 1
        if self._newest[i] is None or stamp > self._newest[i]:
            self._newest[i] = stamp

        queue = self._queues[i]
        if stamp in queue:
            # Same stamp twice on one topic: the newer message wins (as upstream), the older one is
            # accounted as unmatched. Reassignment keeps the key's insertion position, as upstream.
            self._duplicates[i] += 1
            self._unmatched[i] += 1
        queue[stamp] = msg
        if len(queue) > self._queue_size:
            del queue[min(queue)]
            self._unmatched[i] += 1
            if stamp not in queue:  # it was the oldest: evicted on arrival, nothing to match
                return None

        chosen = self._find_set(i, stamp)
        if chosen is None:
            return None
        out = tuple(self._queues[j].pop(s) for j, s in enumerate(chosen))
        self._sets += 1
        for j in range(self._n):
            self._matched[j] += 1
        if self._drop_older:
            for j, s in enumerate(chosen):
                q = self._queues[j]
                stale = [k for k in q if k < s]
                for k in stale:
                    del q[k]
                self._unmatched[j] += len(stale)
        return out

    def _find_set(self, i: int, stamp: int) -> Optional[tuple[int, ...]]:
        """Upstream's search: per-topic candidates within slop, nearest first, first combination
        spanning strictly less than slop wins. Returns the stamps of the set in topic order."""
        slop = self._slop_ns
        candidates = []
        for j in range(self._n):
            if j == i:
                continue
            near = [s for s in self._queues[j] if abs(s - stamp) <= slop]
            if not near:
                return None
            near.sort(key=lambda s: abs(s - stamp))  # stable: ties keep queue insertion order
            candidates.append(near)
        for combo in itertools.product(*candidates):
            if max(stamp, *combo) - min(stamp, *combo) < slop:
                return combo[:i] + (stamp,) + combo[i:]
        return None

    # -- maintenance and statistics ---------------------------------------------------------------
    def reset(self) -> None:
        """Drop every queued message (counted as unmatched) and forget the newest stamps.

        Call it when the node sees time jump (e.g. from an rclpy jump callback); counters are
        lifetime totals and are kept.
        """
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        for j, q in enumerate(self._queues):
            self._unmatched[j] += len(q)
            q.clear()
        self._newest = [None] * self._n
        self._resets += 1

    def pending(self) -> tuple[int, ...]:
        """Messages currently queued per topic, waiting for partners."""
        with self._lock:
            return tuple(len(q) for q in self._queues)

    @property
    def stats(self) -> SyncStats:
        """A snapshot of the counters, taken under the lock so it is internally consistent."""
        with self._lock:
            return SyncStats(
                sets=self._sets,
                received=tuple(self._received),
                matched=tuple(self._matched),
                unmatched=tuple(self._unmatched),
                pending=tuple(len(q) for q in self._queues),
                duplicates=tuple(self._duplicates),
                out_of_order=tuple(self._out_of_order),
                resets=self._resets,
            )
