"""The node under load and faults, fed from bags (issue 5 item 7).

* Load: a bag of 50 small synthetic frames at 10 Hz, looped and played at 10x (100 frames/s)
  for >= 500 frames: the node stays up, its RSS grows by < 50 MB between the end of a warm-up and
  the end of the run, and every frame sent is accounted for in /diagnostics (processed + dropped,
  failed == 0).
* Faults, each recovered from: the player (`mafr bag play`, its own process) killed with SIGKILL
  mid-bag and restarted; camera_info absent for 2 s; a corrupted message in the bag (an Image
  whose data is shorter than step x height, and a message whose CDR bytes are truncated).

One depth-mode node serves the load and the player/corruption tests; the camera_info test has a
node of its own (it needs one that has never received a camera_info).
"""
import os
import time

import psutil
import pytest
from diagnostic_msgs.msg import DiagnosticStatus

from mafr_ros.bag.player import BagPlayer, player_qos

pytestmark = [pytest.mark.ros]

PARAMS = {"input_mode": "depth", "device": "cpu", "qos.input.reliability": "reliable",
          # deep enough that a 100 Hz burst is not cut short while the executor waits for the GIL
          "qos.input.depth": 100, "sync.queue_size": 50, "diagnostics.period": 0.25, "diagnostics.stale_after": 1.0,
          "diagnostics.log_throttle": 0.0}
TAG = os.getpid()


@pytest.fixture(scope="module")
def load_bag(synthetic_bags):
    # 10 good + 5 defect types x 8 = 50 frames of 128 x 128 at 10 Hz
    return synthetic_bags("load", n_test_good=10, n_test_per_defect=8, size=128, inputs="depth",
                          rate=10.0, start_s=1_700_000_000)


@pytest.fixture(scope="module")
def fault_bag(synthetic_bags):
    return synthetic_bags("faults", n_test_good=2, n_test_per_defect=1, size=128, inputs="depth",
                          rate=10.0, start_s=1_800_000_000)


def _node_topics(bag, namespace):
    """(played bag topics, remap of the bag's camera topics into ``namespace``)."""
    from mafr_ros.bag.layout import topics_for
    target = topics_for(namespace)
    roles = ("camera_info", "depth", "rgb")
    return ([getattr(bag.topics, r) for r in roles],
            {getattr(bag.topics, r): getattr(target, r) for r in roles})


@pytest.fixture(scope="module")
def rig(processes, load_bag):
    """The shared depth-mode node and a replay participant for the load bag."""
    namespace = f"/load_{TAG}"
    node = processes.node(namespace, PARAMS)
    played, remap = _node_topics(load_bag, namespace)
    replay = processes.replay(load_bag.path, node.node_name, topics=played, remap=remap)
    replay.wait_ready(node, timeout=300)
    return node, replay, namespace


def _counters(values):
    failed = sum(int(v) for k, v in values.items() if k.startswith("failed."))
    return {"matched": int(values["frames_matched"]), "processed": int(values["frames_processed"]),
            "dropped": int(values["frames_dropped"]), "failed": failed}


def _quiescent(replay, node, matched_at_least=0, timeout=60.0):
    """Detector counters once every matched set is processed, dropped or failed, from a
    diagnostics message newer than this call."""
    seen = len(replay.diagnostics)
    deadline = time.monotonic() + timeout
    while True:
        assert node.alive(), node.log_tail()
        if len(replay.diagnostics) > seen + 1:
            counts = _counters(replay.detector_status())
            if counts["matched"] >= matched_at_least and \
                    counts["processed"] + counts["dropped"] + counts["failed"] == counts["matched"]:
                return counts
        assert time.monotonic() < deadline, (
            f"expected >= {matched_at_least} matched sets, all accounted for: "
            f"{_counters(replay.detector_status())}; inputs {replay.inputs_status()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def long_bag(load_bag, tmp_path_factory):
    """The 50 load frames 11 times over with continuous stamps: 550 frames, 55 s at 10 Hz."""
    from corrupt_bags import repeat_bag
    played, _ = _node_topics(load_bag, "/unused")
    path = tmp_path_factory.mktemp("long") / "bag"
    frames = repeat_bag(load_bag.path, path, 11, played)
    return path, frames


@pytest.mark.slow
def test_load_550_frames_at_10x(rig, load_bag, long_bag):
    """550 frames at 10x (100 frames/s) after a warm-up pass of 50: all accounted for.

    The long bag is the short one repeated with continuous stamps rather than played with
    --loop: at every wrap a looped bag jumps back in time, the synchroniser resets and a set in
    flight can be lost (counted as sync.unmatched; measured once: 17 sets over 12 wraps), which
    would make "processed + dropped == sent" untrue for reasons that are not load."""
    node, replay, namespace = rig
    played, remap = _node_topics(load_bag, namespace)
    long_path, frames = long_bag
    process = psutil.Process(node.pid)
    # Reliable with a deep history: a keep-last writer overwrites samples its reader has not
    # acknowledged yet (lost, as far as the reader is concerned) when the node's executor lags.
    qos = player_qos("reliable", 1000)
    before = _quiescent(replay, node)
    with BagPlayer(replay.node, load_bag.path, rate=10.0, topics=played, remap=remap,
                   qos=qos) as warmup:  # buffers, caches, DDS pools
        warm = warmup.play().published[load_bag.topics.rgb]
    after_warmup = _quiescent(replay, node, before["matched"] + warm)
    rss_warm = process.memory_info().rss
    with BagPlayer(replay.node, long_path, rate=10.0, topics=played, remap=remap,
                   qos=qos) as player:
        stats = player.play()
    sent = stats.published[load_bag.topics.rgb]
    end = _quiescent(replay, node, after_warmup["matched"] + sent)
    rss_end = process.memory_info().rss
    delta = {k: end[k] - after_warmup[k] for k in end}
    growth_mb = (rss_end - rss_warm) / 2 ** 20
    print(f"\nload: {sent} frames in {stats.seconds:.1f} s ({sent / stats.seconds:.0f} Hz); node "
          f"counters {delta}; RSS {rss_warm / 2 ** 20:.0f} -> {rss_end / 2 ** 20:.0f} MB "
          f"({growth_mb:+.1f} MB)")
    assert sent == frames == 550 and stats.seconds < 8.0  # 55 s of bag at 10x
    assert node.alive()
    assert delta["matched"] == sent, (delta, sent, replay.inputs_status())
    assert delta["failed"] == 0, replay.detector_status()
    assert delta["processed"] + delta["dropped"] == sent, delta
    assert delta["processed"] >= 1 and delta["dropped"] >= 1  # latest-wins did its job
    assert growth_mb < 50.0, (rss_warm, rss_end)


def _inputs_status(replay, predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = replay.inputs_status()
        if status is not None and predicate(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"inputs status never matched; last: {replay.inputs_status()}")


def _results_since(replay, count, at_least, timeout=60.0, node=None):
    deadline = time.monotonic() + timeout
    while len(replay.result_order) - count < at_least:
        assert node is None or node.alive(), node.log_tail()
        assert time.monotonic() < deadline, f"{len(replay.result_order) - count} new results"
        time.sleep(0.05)
    return replay.result_order[count:]


@pytest.mark.slow
def test_player_killed_mid_bag_and_restarted(rig, load_bag, processes):
    """`mafr bag play` dies (SIGKILL) in the middle of the bag: the node stays up, reports its
    inputs as stalled, and answers again as soon as a new player replays the bag."""
    node, replay, namespace = rig
    played, remap = _node_topics(load_bag, namespace)
    args = ["--loop", "--topics", *played, "--remap", *[f"{k}:={v}" for k, v in remap.items()],
            "--wait-for-subscribers", "30"]
    rgb_topic = remap[load_bag.topics.rgb]

    count = len(replay.result_order)
    player = processes.player(load_bag.path, *args)
    _results_since(replay, count, 2, node=node)
    assert player.alive(), player.log()
    player.kill()
    killed_at = time.monotonic()
    status = _inputs_status(replay, lambda s: f"no message on {rgb_topic}" in s[1])
    assert status[0] == DiagnosticStatus.WARN
    assert node.alive() and time.monotonic() - killed_at < 10

    count = len(replay.result_order)
    restarted = processes.player(load_bag.path, *args)
    _results_since(replay, count, 2, node=node)
    _inputs_status(replay, lambda s: s[0] == DiagnosticStatus.OK and s[1] == "receiving")
    assert restarted.stop() == 0, restarted.log()  # SIGINT: a normal end
    assert node.alive()


def _send(replay, frame, node, timeout=60.0):
    failed = replay.failed_count()
    replay.player.publish_frame(frame)
    return replay.wait_result(int(frame.stamp_ns), timeout, node=node, failed_before=failed)


@pytest.mark.slow
def test_corrupted_messages_are_reported_and_survived(rig, fault_bag, processes, tmp_path):
    """A bag with an Image whose data is shorter than step x height, and a message whose CDR
    bytes are cut in half: the first fails as malformed_message (counted, logged), the second
    cannot even be read (the node's CDR view refuses it before synchronisation: received, counted
    as rejected, logged with what is missing; its depth partner is left without a set); each next
    valid frame is answered."""
    from corrupt_bags import rewrite_bag

    from mafr_ros.bag.reader import read_frames

    node, _, namespace = rig
    rgb = fault_bag.topics.rgb
    malformed_frame, truncated_frame = 2, 4

    def corrupt(index, message, msg):
        if message.topic != rgb:
            return None
        if index == malformed_frame:
            msg.data = bytes(msg.data)[: len(msg.data) // 2]  # header still says H x step
            return msg
        if index == truncated_frame:
            return message.data[: len(message.data) // 2]
        return None

    bad_bag = tmp_path / "corrupted"
    rewrite_bag(fault_bag.path, bad_bag, corrupt)
    played, remap = _node_topics(fault_bag, namespace)
    replay = processes.replay(bad_bag, node.node_name, topics=played, remap=remap)
    replay.wait_ready(node, timeout=60)
    _quiescent(replay, node)
    before = replay.detector_status()
    depth_topic = remap[fault_bag.topics.depth]
    inputs_before = _inputs_status(replay, lambda s: True)[2]

    frames = list(read_frames(bad_bag, topics=played))
    outcomes = [_send(replay, frame, node, timeout=8.0 if i == truncated_frame else 60.0)
                for i, frame in enumerate(frames)]
    for i, outcome in enumerate(outcomes):
        if i == malformed_frame:
            assert outcome.result is None and outcome.reason.startswith("malformed_message"), outcome
            assert "data length" in outcome.reason
        elif i == truncated_frame:
            assert outcome.result is None and outcome.reason.startswith("timeout"), outcome
        else:
            assert outcome.result is not None, (i, outcome.reason, node.log_tail())
    assert node.alive()
    _quiescent(replay, node)
    after = replay.detector_status()
    assert int(after["failed.malformed_message"]) == int(before["failed.malformed_message"]) + 1, (before, after)
    assert f"frame dropped [malformed_message]: {remap[rgb]}" in node.log()
    # The truncated message: the node's CDR view refuses it (no stamp can be read from it) and
    # says what is missing; its depth partner waits in the synchroniser for a colour image that
    # never comes (sync.pending, until a newer set pushes it out as sync.unmatched).
    assert f"message refused on {remap[rgb]}: serialised sensor_msgs/Image is truncated" \
        in node.log(), node.log_tail()
    assert int(after["messages_rejected"]) == int(before["messages_rejected"]) + 1, (before, after)
    inputs = _inputs_status(replay, lambda s: True)[2]
    received = lambda values, topic: int(values[f"{topic} received"])  # noqa: E731
    assert received(inputs, depth_topic) - received(inputs_before, depth_topic) == len(frames)
    assert received(inputs, remap[rgb]) - received(inputs_before, remap[rgb]) == len(frames)
    orphaned = lambda values: sum(int(values[f"sync.{kind} {depth_topic}"])  # noqa: E731
                                  for kind in ("unmatched", "pending"))
    assert orphaned(inputs) - orphaned(inputs_before) == 1, inputs


@pytest.mark.slow
def test_camera_info_absent_for_2_s(processes, load_bag):
    """A node that has never had a camera_info fails frames as no_camera_info naming the topic,
    and its inputs status says it never came; once it arrives the node answers. Later camera_info
    is silent for 2 s while the images keep coming: the cached intrinsics keep the node
    answering, the inputs status names the silent topic, and clears once camera_info is back."""
    from mafr_ros.bag.reader import read_frames

    namespace = f"/caminfo_{TAG}"
    node = processes.node(namespace, PARAMS)
    played, remap = _node_topics(load_bag, namespace)
    replay = processes.replay(load_bag.path, node.node_name, topics=played, remap=remap)
    replay.wait_ready(node, timeout=300)
    info_bag_topic = load_bag.topics.camera_info
    info_topic = remap[info_bag_topic]
    frames = iter(list(read_frames(load_bag.path, topics=played)))

    def without_info(frame):
        return type(frame)(frame.stamp_ns, tuple(m for m in frame.messages
                                                 if m.topic != info_bag_topic))

    def publish_for(seconds, period, keep_info):
        """A new frame every ``period`` s for ``seconds``; their stamps."""
        sent, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            frame = next(frames)
            replay.player.publish_frame(frame if keep_info else without_info(frame))
            sent.append(frame.stamp_ns)
            time.sleep(period)
        return sent

    # 1. No camera_info for the first 2 s: every frame fails as no_camera_info.
    publish_for(2.0, 0.2, keep_info=False)
    counts = _quiescent(replay, node)
    values = replay.detector_status()
    # Every set fails for this reason, except one the latest-wins slot replaced while the worker
    # was still failing its predecessor (seen once on the loaded machine): dropped, and counted.
    failed = int(values["failed.no_camera_info"])
    assert counts["processed"] == 0 and counts["failed"] == failed >= 5, counts
    assert failed + counts["dropped"] == counts["matched"], counts
    assert values["last_failure"].startswith("no_camera_info") and info_topic in \
        values["last_failure"], values
    assert "frame dropped [no_camera_info]" in node.log()
    _inputs_status(replay, lambda s: f"no message on {info_topic} yet" in s[1])
    # 2. camera_info arrives (with the next frame): that frame is answered.
    outcome = _send(replay, next(frames), node)
    assert outcome.result is not None, outcome.reason
    # 3. camera_info silent for 2 s, images go on: still answered (cached intrinsics), reported.
    count = len(replay.result_order)
    stamps = publish_for(2.0, 0.25, keep_info=False)
    _inputs_status(replay, lambda s: f"no message on {info_topic} for" in s[1])
    assert set(_results_since(replay, count, 1, node=node)) <= set(stamps)
    # 4. camera_info back: the inputs status clears while frames keep coming.
    deadline = time.monotonic() + 20
    while not (replay.inputs_status()[0] == DiagnosticStatus.OK
               and replay.inputs_status()[1] == "receiving"):
        assert time.monotonic() < deadline, replay.inputs_status()
        publish_for(0.2, 0.1, keep_info=True)
    assert node.alive()
