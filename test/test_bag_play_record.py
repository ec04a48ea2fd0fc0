"""`mafr bag play` / `record` across real processes over DDS (loopback, this test run's domain).

Each test starts the player and/or the recorder as `python -m mafr_ros.cli bag ...` subprocesses,
or drives the in-process APIs (BagPlayer, BagRecorder) against such a subprocess. Bags are made
from a tiny synthetic dataset. Timing checks are loose: the machine may be loaded.
"""
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mafr_ros.bag import layout

pytestmark = pytest.mark.ros

PROCS = Path(__file__).resolve().parent / "procs"
START_NS = 1_700_000_000_000_000_000
N_FRAMES = 7
TOPICS = layout.topics_for("/camera")


@pytest.fixture(scope="session")
def synth_root(synthetic_dataset):
    return synthetic_dataset(seed=0, n_train=0, n_validation=0, n_test_good=2,
                             n_test_per_defect=1, size=96)


@pytest.fixture(scope="session")
def bag5(synth_root, tmp_path_factory):
    """7 frames at 5 Hz: 1.2 s of bag time."""
    from mafr_ros.bag import make_bag

    out = tmp_path_factory.mktemp("play_bags") / "five_hz"
    make_bag(synth_root, "gland", out, rate=5.0, start_ns=START_NS, progress=False)
    return out


@pytest.fixture(scope="session")
def bag10(synth_root, tmp_path_factory):
    """7 frames at 10 Hz (0.6 s), MCAP, only the 3D points (no depth image)."""
    from mafr_ros.bag import make_bag

    out = tmp_path_factory.mktemp("play_bags") / "ten_hz"
    make_bag(synth_root, "gland", out, rate=10.0, start_ns=START_NS, storage="mcap",
             inputs="points", progress=False)
    return out


@pytest.fixture
def node():
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context)
    ros_node = rclpy.create_node("bag_test_node", context=context)
    yield ros_node
    ros_node.destroy_node()
    context.try_shutdown()


def _mafr(*args, stderr=subprocess.PIPE):
    return subprocess.Popen([sys.executable, "-m", "mafr_ros.cli", "bag", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def _same_message(received: bytes, sent: bytes) -> bool:
    """A message as received over DDS is the sent CDR plus up to 3 zero bytes of alignment padding
    at the end (the serialized payload is padded to 4 bytes)."""
    extra = received[len(sent):]
    return received[:len(sent)] == sent and len(extra) < 4 and not extra.strip(b"\0")


def _finish(proc, timeout=30.0, sig=None):
    """(returncode, stdout, stderr); sends ``sig`` first if given; kills on timeout."""
    if sig is not None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"process did not finish in {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def _sample_indexes(bag, topic=layout.SAMPLE_TOPIC):
    from mafr_ros.bag import read_messages

    store = _typestore()
    return [(json.loads(store.deserialize_cdr(m.data, m.msgtype).data)["index"], m.stamp_ns)
            for m in read_messages(bag, topics=[topic])]


def test_play_to_record_keeps_every_message_in_order_and_timing(bag5, node, tmp_path):
    """Player subprocess -> in-process BagRecorder: all 42 messages, byte-identical, in order,
    spread over the recorded duration divided by --rate."""
    from mafr_ros.bag import BagRecorder, read_messages

    player = _mafr("play", bag5, "--rate", 2, "--wait-for-subscribers", 30)
    try:
        recorder = BagRecorder(node, tmp_path / "rec", list(TOPICS.types()),
                               max_messages=N_FRAMES * 6)
        stats = recorder.record(duration=60)
    finally:
        rc, out, err = _finish(player)
    assert rc == 0, err
    assert stats.reason == "42 messages" and stats.counts == dict.fromkeys(TOPICS.types(), 7)
    assert "published 42 messages" in out
    for topic in TOPICS.types():
        assert re.search(rf"^  {topic} +7$", out, re.MULTILINE), out

    recorded = list(read_messages(tmp_path / "rec"))
    source = list(read_messages(bag5))
    for topic, msgtype in TOPICS.types().items():
        got = [m for m in recorded if m.topic == topic]
        assert [m.msgtype for m in got] == [msgtype] * N_FRAMES
        sent = [m.data for m in source if m.topic == topic]
        assert all(_same_message(r.data, d) for r, d in zip(got, sent, strict=True)), topic
    receive = [stamp for _, stamp in _sample_indexes(tmp_path / "rec")]
    assert [i for i, _ in _sample_indexes(tmp_path / "rec")] == list(range(N_FRAMES))
    assert receive == sorted(receive)
    # Frames 0.2 s apart in the bag, played at rate 2: 0.1 s apart. The median gap is robust to
    # a message delivered late on a loaded machine (rate ignored: 0.2 s; no timing: ~0).
    gaps = np.diff(receive) / 1e9
    assert 0.07 < np.median(gaps) < 0.15, gaps
    assert 0.4 < (receive[-1] - receive[0]) / 1e9 < 2.0, gaps


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_recorder_spun_from_another_thread_writes_every_message(storage, bag5, node, tmp_path):
    """The recorder is built here and its node spun by an executor in another thread (as the
    live evaluation does): the storage is used only by the recorder's writer thread, so sqlite3
    works too, and every received message is in the bag once it is closed."""
    from rclpy.executors import SingleThreadedExecutor

    from mafr_ros.bag import BagRecorder, read_messages

    recorder = BagRecorder(node, tmp_path / "rec", list(TOPICS.types()), storage=storage)
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            recorder.poll()
            executor.spin_once(timeout_sec=0.05)

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    player = _mafr("play", bag5, "--rate", 4, "--wait-for-subscribers", 30)
    try:
        deadline = time.monotonic() + 60
        while recorder.total < N_FRAMES * 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        spinner.join(10)
        executor.shutdown(timeout_sec=0)
        rc, out, err = _finish(player)
        recorder.close()
    assert rc == 0, err
    assert recorder.counts == dict.fromkeys(TOPICS.types(), N_FRAMES)
    recorded = list(read_messages(tmp_path / "rec"))
    assert len(recorded) == N_FRAMES * 6
    source = {m.topic: [] for m in read_messages(bag5)}
    for m in read_messages(bag5):
        source[m.topic].append(m.data)
    for topic in TOPICS.types():
        got = [m.data for m in recorded if m.topic == topic]
        assert all(_same_message(r, d) for r, d in zip(got, source[topic], strict=True)), topic


def test_loop_start_offset_remap_and_sigint(bag10, tmp_path):
    """--loop replays from --start-offset every pass; --remap renames; the recorder subprocess
    stops at --max-messages; SIGINT ends the looping player with code 0 and a summary."""
    recorder = _mafr("record", "--out", tmp_path / "rec", "--topics", "/other/sample",
                     "--max-messages", 12, "--storage", "mcap", "--version", 9)
    player = _mafr("play", bag10, "--loop", "--start-offset", 0.25, "--topics", layout.SAMPLE_TOPIC,
                   "--remap", "/mafr/sample:=/other/sample", "--wait-for-subscribers", 30)
    try:
        rc, out, err = _finish(recorder, timeout=60)
        assert rc == 0, err
        assert "recorded 12 messages" in out and "(12 messages)" in out
    finally:
        prc, pout, perr = _finish(player, sig=signal.SIGINT)
    assert prc == 0, perr
    assert "stopped early" in pout and "/mafr/sample" in pout
    published = int(pout.split("published ")[1].split()[0])
    assert published >= 12
    from mafr_ros.bag import bag_info
    info = bag_info(tmp_path / "rec")
    assert (info.storage_id, info.version, info.message_count) == ("mcap", 9, 12)
    # frames 0-2 lie in the first 0.25 s of the 10 Hz bag: each pass plays frames 3..6
    assert [i for i, _ in _sample_indexes(tmp_path / "rec", "/other/sample")] == [3, 4, 5, 6] * 3


def test_clock_follows_bag_time(bag10, node, tmp_path):
    """--clock 50 at --rate 0.5: /clock carries bag time, advancing at half the wall rate, and a
    frame is never published before the clock reached its stamp's neighbourhood."""
    from mafr_ros.bag import BagRecorder, read_messages

    player = _mafr("play", bag10, "--clock", 50, "--rate", 0.5, "--topics", layout.SAMPLE_TOPIC,
                   "--wait-for-subscribers", 30)
    stop = threading.Event()

    def stop_after_player():
        player.wait()
        time.sleep(0.3)
        stop.set()

    threading.Thread(target=stop_after_player, daemon=True).start()
    try:
        recorder = BagRecorder(node, tmp_path / "rec", [layout.CLOCK_TOPIC, layout.SAMPLE_TOPIC])
        stats = recorder.record(duration=60, stop_event=stop)
    finally:
        rc, out, err = _finish(player)
    assert rc == 0, err
    assert stats.counts[layout.SAMPLE_TOPIC] == N_FRAMES
    store = _typestore()
    clocks, samples = [], []
    for m in read_messages(tmp_path / "rec"):
        msg = store.deserialize_cdr(m.data, m.msgtype)
        if m.topic == layout.CLOCK_TOPIC:
            clocks.append((m.stamp_ns, msg.clock.sec * 10**9 + msg.clock.nanosec))
        else:
            samples.append((m.stamp_ns, json.loads(msg.data)["stamp_ns"]))
    bag_end = START_NS + 600_000_000
    values = np.array([c for _, c in clocks], dtype=np.int64)
    received = np.array([r for r, _ in clocks], dtype=np.int64)
    assert len(values) > 20, len(values)  # 1.2 s at 50 Hz is ~60 ticks; fewer under load
    assert (np.diff(values) > 0).all()
    assert START_NS <= values[0] and values[-1] <= bag_end + 20_000_000
    # bag time advances at rate 0.5 relative to the recorder's receive time
    speed = (values[-1] - values[0]) / (received[-1] - received[0])
    assert 0.35 < speed < 0.65, speed
    # bag time on /clock when each frame arrived (interpolated between ticks) is the frame's
    # stamp, give or take delivery latency (0.1 s of bag time = 0.2 s of wall time here)
    at_arrival = np.interp([r for r, _ in samples], received, values)
    assert np.abs(at_arrival - [s for _, s in samples]).max() < 100_000_000
    assert f"{layout.CLOCK_TOPIC}" in out


def test_record_anomaly_results_self_describing_and_sigterm(tmp_path):
    """The node's result type is recorded (custom rosidl message): SIGTERM closes the bag, the
    MCAP is decoded by the mcap package from its own embedded definitions, in publish order."""
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    topic = "/mafr_test/bag_anomaly"
    publisher = subprocess.Popen([sys.executable, str(PROCS / "publish_anomaly_result.py"), topic,
                                  "3"])
    log = tmp_path / "recorder.log"
    with log.open("w") as log_file:
        recorder = _mafr("record", "--out", tmp_path / "rec", "--topics", topic, "--storage",
                         "mcap", stderr=log_file)
    bag_file = tmp_path / "rec" / "rec.mcap"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "recording /mafr_test" not in log.read_text():
            assert recorder.poll() is None and publisher.poll() is None
            time.sleep(0.1)
        time.sleep(1.0)  # ~20 results at 20 Hz
        rc, out, _ = _finish(recorder, sig=signal.SIGTERM)
        err = log.read_text()
    finally:
        publisher.send_signal(signal.SIGINT)
        try:
            publisher.wait(timeout=10)
        except subprocess.TimeoutExpired:
            publisher.kill()
    assert rc == 0, err
    assert "recording /mafr_test/bag_anomaly (mafr_ros/msg/AnomalyResult" in err
    assert "type hash" not in err  # the stored definition hashes like the live rosidl type
    assert (tmp_path / "rec" / "metadata.yaml").is_file() and "recorded" in out

    decoded = []
    with bag_file.open("rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        for schema, channel, message, msg in reader.iter_decoded_messages():
            assert schema.name == "mafr_ros/msg/AnomalyResult" and channel.topic == topic
            assert b"MSG: mafr_ros/AnomalyRegion" in schema.data
            decoded.append(msg)
    assert len(decoded) >= 3
    seqs = [int(m.header.frame_id.rsplit("/", 1)[1]) for m in decoded]
    assert all((b - a) % 3 == 1 for a, b in zip(seqs, seqs[1:])), seqs  # publish order, no gaps
    first = decoded[0]
    assert first.model_id == "test-model@0123abcd" and first.is_anomalous
    assert first.regions[0].bbox.width == 30 and first.regions[0].area_px == 900
    assert bytes(first.heatmap.data) == bytes(range(24))
    assert first.score == pytest.approx(1.5 + seqs[0])


def test_lockstep_publish_frame_api(bag5, node, tmp_path):
    """BagPlayer.frames()/publish_frame() in this process, recorded by a subprocess: one frame at
    a time, exactly the frames published."""
    from mafr_ros.bag import BagPlayer, read_frames

    recorder = _mafr("record", "--out", tmp_path / "rec", "--topics", *TOPICS.types(),
                     "--max-messages", 12)
    try:
        with BagPlayer(node, bag5) as player:
            assert player.wait_for_subscribers(30), player.subscriber_counts()
            frames = player.frames()
            for _ in range(2):
                player.publish_frame(next(frames))
                assert player.wait_for_acks(10)
            frames.close()
            assert sum(player.published.values()) == 12
    finally:
        rc, out, err = _finish(recorder)
    assert rc == 0, err
    got = list(read_frames(tmp_path / "rec"))
    source = list(read_frames(bag5))[:2]
    for got_frame, sent_frame in zip(_by_sample(got), source, strict=True):
        sent = {m.topic: m.data for m in sent_frame.messages}
        assert len(got_frame.messages) == len(sent) == 6
        assert all(_same_message(m.data, sent[m.topic]) for m in got_frame.messages)


def _by_sample(frames):
    """Recorded frames have receive stamps (one per message): regroup them per source frame."""
    from mafr_ros.bag.reader import BagFrame

    messages = sorted((m for f in frames for m in f.messages), key=lambda m: m.stamp_ns)
    groups = [messages[i:i + 6] for i in range(0, len(messages), 6)]
    return [BagFrame(g[0].stamp_ns, tuple(g)) for g in groups]


def test_play_and_record_refuse_bad_arguments(bag5, tmp_path, capsys):
    from mafr_ros.cli import main

    assert main(["bag", "play", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["bag", "play", str(bag5), "--topics", "/nope"]) == 1
    assert "has no topic /nope" in capsys.readouterr().err
    assert main(["bag", "play", str(bag5), "--rate", "0"]) == 1
    assert "rate must be a positive factor" in capsys.readouterr().err
    assert main(["bag", "play", str(bag5), "--remap", "/mafr/sample=/x"]) == 1
    assert "must be FROM:=TO" in capsys.readouterr().err
    assert main(["bag", "play", str(bag5), "--start-offset", "100"]) == 1
    assert "no message to play after the start offset of 100.0 s" in capsys.readouterr().err
    assert main(["bag", "record", "--out", str(tmp_path / "r"), "--topics", "relative"]) == 1
    assert "must be absolute" in capsys.readouterr().err
    assert main(["bag", "record", "--out", str(bag5), "--topics", "/x"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_player_topic_selection_and_recorder_qos_adaptation(bag5, node, tmp_path):
    """Played topics follow --topics/--exclude; the recorder subscribes best-effort to a
    best-effort publisher and reliable to a reliable one (as ros2 bag record), unless forced."""
    import rclpy
    from rclpy.qos import ReliabilityPolicy

    from mafr_ros.bag import BagPlayer, BagRecorder, player_qos

    other = rclpy.create_node("bag_test_recorder", context=node.context)
    try:
        with BagPlayer(node, bag5, exclude=[TOPICS.points, TOPICS.depth]) as player:
            assert set(player.topics) == set(TOPICS.types()) - {TOPICS.points, TOPICS.depth}
        with BagPlayer(node, bag5, topics=[TOPICS.rgb], qos=player_qos("best_effort", 3)), \
                BagPlayer(node, bag5, topics=[TOPICS.sample], remap=["/mafr/sample:=/s2"]):
            cases = [(None, TOPICS.rgb, ReliabilityPolicy.BEST_EFFORT),
                     (None, "/s2", ReliabilityPolicy.RELIABLE),
                     ("best_effort", "/s2", ReliabilityPolicy.BEST_EFFORT)]
            for i, (forced, topic, expected) in enumerate(cases):
                recorder = BagRecorder(other, tmp_path / f"r{i}", [topic], reliability=forced)
                deadline = time.monotonic() + 20
                while recorder.poll() and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert recorder.types == {topic: "sensor_msgs/msg/Image" if topic == TOPICS.rgb
                                          else "std_msgs/msg/String"}
                assert recorder._subscriptions[topic].qos_profile.reliability == expected
                recorder.close()
    finally:
        other.destroy_node()
