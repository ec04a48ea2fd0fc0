"""ApproximateTimeSync: message_filters semantics on hand-worked cases and seeded synthetic streams,
with the accounting invariant (received = matched + unmatched + pending) checked on every stream."""
import sys
import threading
import time

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from mafr_ros.errors import InputError
from mafr_ros.ros.sync import NS_PER_S, ApproximateTimeSync, SyncStats, header_stamp_ns

MS = 1_000_000  # ns
PERIOD_30HZ = NS_PER_S // 30


def stamped(msg_type, stamp_ns: int, frame_id: str = ""):
    return msg_type(header=Header(stamp=Time(sec=stamp_ns // NS_PER_S, nanosec=stamp_ns % NS_PER_S),
                                  frame_id=frame_id))


def stamps_of(msgs) -> tuple:
    return tuple(header_stamp_ns(m) for m in msgs)


def check_accounting(sync: ApproximateTimeSync, sent: list, sets) -> SyncStats:
    """The invariant every test ends with: nothing lost, nothing counted twice.
    sets: the emitted message tuples, or just their number."""
    n_sets = sets if isinstance(sets, int) else len(sets)
    st = sync.stats
    assert st.received == tuple(sent)
    assert st.sets == n_sets
    assert st.matched == (n_sets,) * sync.num_topics
    for r, m, u, p in zip(st.received, st.matched, st.unmatched, st.pending):
        assert r == m + u + p
    assert st.is_balanced()
    assert st.pending == sync.pending()
    assert all(p <= sync.queue_size for p in st.pending)
    if not isinstance(sets, int):  # no message is emitted twice
        ids = [id(m) for s in sets for m in s]
        assert len(ids) == len(set(ids))
    return st


def feed(sync: ApproximateTimeSync, events) -> tuple[list, list]:
    """events: (arrival_ns, topic, msg) in any order; fed in arrival order (ties: list order)."""
    sent = [0] * sync.num_topics
    sets = []
    for _, topic, msg in sorted(events, key=lambda e: e[0]):
        out = sync.add(topic, msg)
        sent[topic] += 1
        if out is not None:
            sets.append(out)
        assert max(sync.pending()) <= sync.queue_size
    return sent, sets


def camera_stream(rng, n, topic, jitter_ms=0.0, latency_ms=(1.0, 20.0), start_ns=5 * NS_PER_S,
                  msg_type=Image, period_ns=PERIOD_30HZ, keep=None):
    """n frames of one topic: stamp = frame time + uniform jitter, arrival = stamp + random latency.
    frame_id holds the frame index so tests can check who was paired with whom."""
    events = []
    for k in range(n):
        if keep is not None and not keep[k]:
            continue
        stamp = start_ns + k * period_ns + int(rng.uniform(-jitter_ms, jitter_ms) * MS)
        arrival = stamp + int(rng.uniform(*latency_ms) * MS)
        events.append((arrival, topic, stamped(msg_type, stamp, str(k))))
    return events


def frame_ids(msgs) -> tuple:
    return tuple(m.header.frame_id for m in msgs)


# ------------------------------------------------------------------------------------------------
# Hand-worked examples: the exact output of message_filters' ApproximateTimeSynchronizer.add
# ------------------------------------------------------------------------------------------------
def run_ms(sync, arrivals):
    """arrivals: (topic, stamp in ms); returns the emitted sets as stamps in ms."""
    out = []
    for topic, t_ms in arrivals:
        s = sync.add(topic, ("msg", topic, t_ms), stamp_ns=int(t_ms * MS))
        if s is not None:
            out.append(tuple(m[2] for m in s))
    return out


def test_hand_worked_greedy_two_topics_matches_message_filters():
    # slop 40 ms. Upstream, worked by hand:
    #  t0@0, t0@33: topic 1 empty -> nothing.
    #  t1@10: candidates on topic 0 within 40 ms, nearest first: 0 (10), 33 (23); {0,10} spans 10 -> emit.
    #  t0@66: topic 1 empty -> nothing.
    #  t1@60: candidates 66 (6), 33 (27) -> {66,60} spans 6 -> emit; 33 stays queued.
    #  t1@40 (late): candidate 33 (7) -> {33,40} emitted after the newer set (no purge upstream).
    sync = ApproximateTimeSync(2, queue_size=5, slop=0.040)
    sets = run_ms(sync, [(0, 0), (0, 33), (1, 10), (0, 66), (1, 60), (1, 40)])
    assert sets == [(0, 10), (66, 60), (33, 40)]
    st = sync.stats
    assert st.out_of_order == (0, 1) and st.pending == (0, 0) and st.unmatched == (0, 0)
    assert st.is_balanced()

    # The optional purge drops topic 0's 33 when {66,60} is emitted, so the late 40 finds nothing.
    purge = ApproximateTimeSync(2, queue_size=5, slop=0.040, drop_older_on_match=True)
    assert run_ms(purge, [(0, 0), (0, 33), (1, 10), (0, 66), (1, 60), (1, 40)]) == [(0, 10), (66, 60)]
    st = purge.stats
    assert st.unmatched == (1, 0) and st.pending == (0, 1) and st.is_balanced()


def test_hand_worked_three_topics_first_acceptable_not_smallest_span():
    # slop 10 ms. t1@104, t1@112, t2@113, t2@96 wait (topic 0 empty). t0@105 arrives:
    #   topic 1 nearest first: 104 (1), 112 (7); topic 2: 113 (8), 96 (9).
    #   Lexicographic product, topic 1 slowest: (104, 113) spans 113-104 = 9 < 10 -> emitted,
    #   although (112, 113) would span only 8.
    sync = ApproximateTimeSync(3, queue_size=5, slop=0.010)
    sets = run_ms(sync, [(1, 104), (1, 112), (2, 113), (2, 96), (0, 105)])
    assert sets == [(105, 104, 113)]
    assert sync.pending() == (0, 1, 1)
    # The leftovers 112 and 96 span 16 ms, so a topic-0 message at 104 cannot join them.
    assert run_ms(sync, [(0, 104)]) == []
    check_accounting(sync, [2, 2, 2], 1)


def test_hand_worked_slop_is_strict_and_ties_follow_arrival_order():
    sync = ApproximateTimeSync(2, queue_size=5, slop=0.010)
    assert run_ms(sync, [(0, 1000), (1, 1010)]) == []  # span == slop: refused (strictly less)
    sync.add(1, "late", stamp_ns=1010 * MS - 1)  # 1 ns inside
    assert sync.stats.sets == 1

    # Two partners at equal distance: the one queued first wins (upstream's stable sort).
    a = ApproximateTimeSync(2, queue_size=5, slop=0.020)
    assert run_ms(a, [(1, 95), (1, 115), (0, 105)]) == [(105, 95)]
    b = ApproximateTimeSync(2, queue_size=5, slop=0.020)
    assert run_ms(b, [(1, 115), (1, 95), (0, 105)]) == [(105, 115)]


def test_slop_rounds_to_the_nearest_nanosecond():
    assert ApproximateTimeSync(2, 5, 0.00013).slop_ns == 130_000  # int(0.00013 * 1e9) == 129_999
    assert ApproximateTimeSync(2, 5, 0.015).slop_ns == 15 * MS


# ------------------------------------------------------------------------------------------------
# Synthetic streams
# ------------------------------------------------------------------------------------------------
def test_perfectly_aligned_streams_all_match():
    rng = np.random.default_rng(0)
    n = 300
    sync = ApproximateTimeSync(2, queue_size=5, slop=0.010)
    sent, sets = feed(sync, camera_stream(rng, n, 0) + camera_stream(rng, n, 1))
    assert len(sets) == n
    assert all(stamps_of(s)[0] == stamps_of(s)[1] for s in sets)
    st = check_accounting(sync, sent, sets)
    assert st.unmatched == (0, 0) and st.pending == (0, 0)


def test_jitter_within_slop_all_match_with_their_own_frame():
    rng = np.random.default_rng(1)
    n = 300
    sync = ApproximateTimeSync(2, queue_size=5, slop=0.010)  # |jitter difference| <= 8 ms < 10 ms
    sent, sets = feed(sync, camera_stream(rng, n, 0, jitter_ms=4) + camera_stream(rng, n, 1, jitter_ms=4))
    assert len(sets) == n
    assert all(frame_ids(s)[0] == frame_ids(s)[1] for s in sets)
    check_accounting(sync, sent, sets)


def test_jitter_beyond_slop_never_emits_a_set_spanning_slop():
    rng = np.random.default_rng(2)
    n = 400
    slop = 0.015
    sync = ApproximateTimeSync(2, queue_size=5, slop=slop)
    sent, sets = feed(sync, camera_stream(rng, n, 0, jitter_ms=25) + camera_stream(rng, n, 1, jitter_ms=25))
    spans = np.array([max(stamps_of(s)) - min(stamps_of(s)) for s in sets])
    assert 0 < len(sets) < n
    assert spans.max() < slop * NS_PER_S
    st = check_accounting(sync, sent, sets)
    assert sum(st.unmatched) > 0


def test_dropped_frames_on_one_stream():
    rng = np.random.default_rng(3)
    n = 300
    keep = rng.random(n) > 0.2
    sync = ApproximateTimeSync(2, queue_size=5, slop=0.010)
    sent, sets = feed(sync, camera_stream(rng, n, 0, jitter_ms=3) +
                      camera_stream(rng, n, 1, jitter_ms=3, keep=keep))
    assert len(sets) == int(keep.sum())
    assert all(frame_ids(s)[0] == frame_ids(s)[1] for s in sets)
    st = check_accounting(sync, sent, sets)
    assert st.unmatched[0] + st.pending[0] == n - int(keep.sum())
    assert st.unmatched[1] == 0


def test_30hz_rgb_with_10hz_depth_pairs_each_depth_with_the_nearest_rgb():
    rgb = [5 * NS_PER_S + round(j * NS_PER_S / 30) + 2 * MS for j in range(300)]
    depth = [5 * NS_PER_S + k * 100 * MS for k in range(100)]
    events = [(s, 0, stamped(Image, s)) for s in rgb] + [(s, 1, stamped(Image, s)) for s in depth]
    sync = ApproximateTimeSync(2, queue_size=5, slop=1 / 60)
    sent, sets = feed(sync, events)
    assert len(sets) == len(depth)
    rgb_arr = np.array(rgb)
    for r, d in (stamps_of(s) for s in sets):
        assert r == rgb_arr[np.argmin(np.abs(rgb_arr - d))]
    st = check_accounting(sync, sent, sets)
    assert st.unmatched[0] + st.pending[0] == 200 and st.unmatched[1] == 0


def test_three_topics_rgb_depth_camera_info():
    rng = np.random.default_rng(4)
    n = 200
    events = []
    for k in range(n):
        t = 7 * NS_PER_S + k * PERIOD_30HZ
        d = t + int(rng.uniform(-3, 3) * MS)
        events += [(t + int(rng.uniform(1, 20) * MS), 0, stamped(Image, t, str(k))),
                   (d + int(rng.uniform(1, 20) * MS), 1, stamped(Image, d, str(k))),
                   (t + int(rng.uniform(1, 20) * MS), 2, stamped(CameraInfo, t, str(k)))]
    got = []
    sync = ApproximateTimeSync(3, queue_size=5, slop=0.010, callback=lambda *m: got.append(m))
    sent, sets = feed(sync, events)
    assert len(sets) == n and got == sets
    for s in sets:
        assert [type(m) for m in s] == [Image, Image, CameraInfo]
        assert len(set(frame_ids(s))) == 1
    check_accounting(sync, sent, sets)


def test_a_stream_that_stops_leaves_a_bounded_queue_and_counts_unmatched():
    rng = np.random.default_rng(5)
    n, stop = 100, 30
    sync = ApproximateTimeSync(2, queue_size=4, slop=0.010)
    sent, sets = feed(sync, camera_stream(rng, n, 0, jitter_ms=2) +
                      camera_stream(rng, stop, 1, jitter_ms=2))
    assert len(sets) == stop
    st = check_accounting(sync, sent, sets)
    assert st.pending == (4, 0)
    assert st.unmatched == (n - stop - 4, 0)


@pytest.mark.parametrize("stale", [0, 5])
def test_a_burst_of_queue_size_sets_pairs_up_in_every_arrival_order(stale):
    """What the node's burst test relies on: ``queue_size`` sets pair up whatever order the two
    streams interleave in (each stream in its own order), even with ``stale`` unpaired colour
    images left queued by an earlier stall; one set more, and only the orders in which one whole
    stream lags behind the other lose a set: the oldest, its evicted member counted."""
    from itertools import combinations

    q = 5
    base = 1_000 * NS_PER_S
    for n in (q, q + 1):
        for depth_first in combinations(range(2 * n), n):
            sync = ApproximateTimeSync(2, queue_size=q, slop=0.015)
            events = [(i, 0, stamped(Image, base + i * 200 * MS)) for i in range(stale)]
            k = [0, 0]
            for position in range(2 * n):
                topic = 1 if position in depth_first else 0
                stamp = base + 5 * NS_PER_S + k[topic] * 30 * MS
                events.append((stale + position, topic, stamped(Image, stamp)))
                k[topic] += 1
            sent, sets = feed(sync, events)
            st = check_accounting(sync, sent, sets)
            depth_lags = depth_first == tuple(range(n, 2 * n))
            colour_lags = depth_first == tuple(range(n))
            if n == q or not (depth_lags or colour_lags):
                assert len(sets) == n, (n, depth_first)
            else:  # the oldest set is the one lost, its evicted member counted unmatched
                first = base + 5 * NS_PER_S
                assert sorted(stamps_of(m)[0] for m in sets) == [first + i * 30 * MS
                                                                 for i in range(1, n)]
                if depth_lags:  # the oldest colour image evicted, its depth partner waits
                    assert st.unmatched == (stale + 1, 0) and st.pending == (0, 1)
                else:  # the oldest depth image evicted, its colour partner waits
                    assert st.unmatched[1] == 1 and st.pending[1] == 0


def test_duplicate_stamp_last_wins_and_is_counted():
    sync = ApproximateTimeSync(2, queue_size=5, slop=0.010)
    first, second = stamped(Image, NS_PER_S, "first"), stamped(Image, NS_PER_S, "second")
    assert sync.add(0, first) is None and sync.add(0, second) is None
    out = sync.add(1, stamped(Image, NS_PER_S + MS, "depth"))
    assert frame_ids(out) == ("second", "depth")
    st = check_accounting(sync, [2, 1], [out])
    assert st.duplicates == (1, 0) and st.unmatched == (1, 0)


def test_out_of_order_stamps_still_match_and_are_counted():
    rng = np.random.default_rng(6)
    n = 300
    t = 3 * NS_PER_S + np.arange(n) * PERIOD_30HZ
    order = np.concatenate([rng.permutation(np.arange(b, b + 3)) for b in range(0, n, 3)])
    events = []
    for pos, k in enumerate(order):  # topic 0 shuffled within blocks of 3, topic 1 in order
        events.append((pos * 10, 0, stamped(Image, int(t[k]), str(k))))
        events.append((pos * 10 + 5, 1, stamped(Image, int(t[pos]), str(pos))))
    sync = ApproximateTimeSync(2, queue_size=6, slop=0.010)
    sent, sets = feed(sync, events)
    assert len(sets) == n and all(frame_ids(s)[0] == frame_ids(s)[1] for s in sets)
    st = check_accounting(sync, sent, sets)
    shuffled = t[order]
    assert st.out_of_order == (int(np.sum(shuffled < np.maximum.accumulate(shuffled))), 0)
    assert st.out_of_order[0] > 0 and st.resets == 0


def test_late_message_older_than_a_full_queue_is_evicted_on_arrival():
    sync = ApproximateTimeSync(2, queue_size=2, slop=0.010)
    assert run_ms(sync, [(0, 100), (0, 200), (0, 50), (1, 50)]) == []  # 50 never stayed queued
    st = sync.stats
    assert st.unmatched == (1, 0) and st.pending == (2, 1) and st.out_of_order == (1, 0)
    assert run_ms(sync, [(1, 101)]) == [(100, 101)]
    check_accounting(sync, [3, 2], 1)


def _looping_bag(backward_jump_s):
    """Two synced passes over the same stamps, like `ros2 bag play --loop`; the first pass ends with
    three rgb frames whose depth is missing, which fill the rgb queue (queue_size 3)."""
    rng = np.random.default_rng(7)
    n = 60
    first = camera_stream(rng, n + 3, 0, start_ns=10 * NS_PER_S) + \
        camera_stream(rng, n, 1, start_ns=10 * NS_PER_S)
    replay = camera_stream(rng, n, 0, start_ns=10 * NS_PER_S) + camera_stream(rng, n, 1, start_ns=10 * NS_PER_S)
    second = [(a + 100 * NS_PER_S, topic, m) for a, topic, m in replay]  # arrives later, same stamps
    sync = ApproximateTimeSync(2, queue_size=3, slop=0.010, backward_jump_s=backward_jump_s)
    sent1, sets1 = feed(sync, first)
    assert len(sets1) == n and sync.pending() == (3, 0)
    sent2, sets2 = feed(sync, second)
    check_accounting(sync, [a + b for a, b in zip(sent1, sent2)], sets1 + sets2)
    return sync, sets2


def test_time_jump_backwards_resets_the_queues():
    sync, sets2 = _looping_bag(backward_jump_s=1.0)
    assert len(sets2) == 60 and all(frame_ids(s)[0] == frame_ids(s)[1] for s in sets2)
    st = sync.stats
    assert st.resets == 1 and st.unmatched == (3, 0)


def test_without_the_reset_rule_a_loop_starves_like_upstream():
    # Upstream evicts the smallest stamp, so post-loop rgb frames are evicted on arrival while the
    # three stale pre-loop frames stay forever.
    sync, sets2 = _looping_bag(backward_jump_s=None)
    assert sets2 == []
    st = sync.stats
    assert st.resets == 0 and st.unmatched[0] == 60 and st.pending == (3, 3)


def test_manual_reset_drops_pending_and_keeps_counters():
    sync = ApproximateTimeSync(2, queue_size=5, slop=0.010)
    run_ms(sync, [(0, 100), (0, 200), (1, 300)])
    sync.reset()
    st = sync.stats
    assert st.pending == (0, 0) and st.unmatched == (2, 1) and st.resets == 1 and st.is_balanced()
    assert run_ms(sync, [(0, 50), (1, 51)]) == [(50, 51)]  # no out-of-order after a reset
    assert sync.stats.out_of_order == (0, 0)


# ------------------------------------------------------------------------------------------------
# Validation, callbacks, threads
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(num_topics=1), "num_topics must be 2 or 3"),
    (dict(num_topics=4), "num_topics must be 2 or 3"),
    (dict(num_topics=True), "num_topics must be 2 or 3"),
    (dict(queue_size=0), "queue_size must be an integer >= 1"),
    (dict(queue_size=2.5), "queue_size must be an integer >= 1"),
    (dict(slop=0.0), "slop must be > 0"),
    (dict(slop=-0.01), "slop must be > 0"),
    (dict(slop=float("nan")), "slop must be a finite number"),
    (dict(slop=float("inf")), "slop must be a finite number"),
    (dict(slop="0.01"), "slop must be a finite number"),
    (dict(slop=0.5, backward_jump_s=0.5), "must be greater than slop"),
    (dict(callback=42), "callback must be callable"),
])
def test_invalid_parameters_raise_input_error(kwargs, match):
    args = dict(num_topics=2, queue_size=5, slop=0.01) | kwargs
    with pytest.raises(InputError, match=match):
        ApproximateTimeSync(**args)


def test_invalid_inputs_raise_input_error_and_change_nothing():
    sync = ApproximateTimeSync(2, queue_size=5, slop=0.01)
    with pytest.raises(InputError, match=r"topic_index must be an integer in \[0, 2\)"):
        sync.add(2, stamped(Image, 0))
    with pytest.raises(InputError, match="has no header.stamp"):
        sync.add(0, object())
    with pytest.raises(InputError, match="stamp_ns must be an integer"):
        sync.add(0, "m", stamp_ns=1.5)
    with pytest.raises(InputError, match="must be >= 0"):
        sync.add(0, "m", stamp_ns=-1)
    with pytest.raises(InputError, match="stamp_of\\(msg\\) must be an integer"):
        ApproximateTimeSync(2, 5, 0.01, stamp_of=lambda m: 0.5).add(0, "m")
    assert sync.stats.received == (0, 0)
    sync.add(0, "m", stamp_ns=np.int64(5))  # NumPy integers are fine
    assert sync.pending() == (1, 0)


def test_callback_runs_outside_the_lock_and_its_exception_leaves_a_usable_synchroniser():
    seen = []

    def callback(rgb, depth):
        # Another thread must be able to use the synchroniser while this callback runs (upstream
        # holds its lock here). Probed from a thread with a timeout so a regression fails, not hangs.
        probe = threading.Thread(target=lambda: seen.append(sync.pending()), daemon=True)
        probe.start()
        probe.join(timeout=2.0)
        seen.append(stamps_of((rgb, depth)))
        raise RuntimeError("downstream failure")

    sync = ApproximateTimeSync(2, queue_size=5, slop=0.01, callback=callback)
    sync.add(0, stamped(Image, NS_PER_S))
    with pytest.raises(RuntimeError, match="downstream failure"):
        sync.add(1, stamped(Image, NS_PER_S))
    assert seen == [(0, 0), (NS_PER_S, NS_PER_S)]
    assert sync.stats.sets == 1
    sync.add(0, stamped(Image, 2 * NS_PER_S))  # lock was released
    assert sync.pending() == (1, 0)


def test_two_threads_feeding_concurrently_keep_the_invariant():
    n = 3000
    slop = 0.010
    rng = np.random.default_rng(8)
    jitter = rng.uniform(-3, 3, size=(2, n))
    got, returned = [], [[], []]
    sync = ApproximateTimeSync(2, queue_size=10, slop=slop, callback=lambda *m: got.append(m))
    barrier = threading.Barrier(2)
    done = [0, 0]

    def producer(topic):
        barrier.wait()
        for k in range(n):
            # Pace like two real cameras (neither runs more than 4 frames ahead); without it one
            # thread can race thousands of frames ahead and its queue simply overflows.
            while done[1 - topic] < k - 4:
                time.sleep(0)
            stamp = NS_PER_S + k * PERIOD_30HZ + int(jitter[topic, k] * MS)
            out = sync.add(topic, stamped(Image, stamp, str(k)))
            if out is not None:
                returned[topic].append(out)
            done[topic] = k + 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # force frequent thread switches inside add()
    try:
        threads = [threading.Thread(target=producer, args=(t,)) for t in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        sys.setswitchinterval(old)
    assert not any(t.is_alive() for t in threads)
    sets = returned[0] + returned[1]
    assert len(sets) == n and len(got) == n
    assert len(returned[0]) > 0 and len(returned[1]) > 0  # both threads completed sets
    assert {id(m) for s in got for m in s} == {id(m) for s in sets for m in s}
    for s in sets:
        assert frame_ids(s)[0] == frame_ids(s)[1]
        assert abs(stamps_of(s)[0] - stamps_of(s)[1]) < slop * NS_PER_S
    check_accounting(sync, [n, n], sets)
