"""Test helper: copy a bag while changing some of its messages (fault and evaluation tests).

The copy is written the way `mafr bag make` writes bags (rosbags Writer, the project typestore
for the message definitions), so players and readers treat it as any other bag.
"""
from __future__ import annotations

from pathlib import Path


def rewrite_bag(src, dst, transform, drop_topics=(), storage: str = "sqlite3"):
    """Copy bag ``src`` to ``dst``. ``transform(frame_index, message, decoded)`` is called for each
    message (BagMessage; ``decoded`` its rclpy message) and returns None (keep the recorded
    bytes), a message (serialized in its place) or bytes (written as they are, e.g. truncated
    CDR). Topics in ``drop_topics`` are left out. Returns {topic: messages written}."""
    from rclpy.serialization import deserialize_message, serialize_message
    from rosbags.rosbag2 import StoragePlugin, Writer

    from mafr_ros.bag.reader import bag_info, read_frames
    from mafr_ros.bag.types import bag_typestore, message_class

    info = bag_info(src)
    typestore = bag_typestore()
    writer = Writer(Path(dst), version=info.version, storage_plugin=StoragePlugin[storage.upper()])
    writer.open()
    counts = {}
    try:
        connections = {t.name: writer.add_connection(t.name, t.msgtype, typestore=typestore)
                       for t in info.topics if t.name not in set(drop_topics)}
        for index, frame in enumerate(read_frames(src)):
            for message in frame.messages:
                if message.topic not in connections:
                    continue
                decoded = deserialize_message(message.data, message_class(message.msgtype))
                replaced = transform(index, message, decoded)
                if replaced is None:
                    data = message.data
                elif isinstance(replaced, (bytes, bytearray)):
                    data = bytes(replaced)
                else:
                    data = serialize_message(replaced)
                writer.write(connections[message.topic], message.stamp_ns, data)
                counts[message.topic] = counts.get(message.topic, 0) + 1
    finally:
        writer.close()
    return counts


def repeat_bag(src, dst, passes: int, topics, storage: str = "sqlite3"):
    """``passes`` copies of bag ``src`` one after the other in ``dst``, as one continuous
    recording: pass k is shifted by k x (the bag's span + one frame gap), bag timestamps and
    header stamps alike, so stamps only ever increase (a looped replay instead jumps back at
    every wrap, which a time synchroniser rightly treats as a reset). Only ``topics`` (whose
    messages have a header) are copied. Returns the number of frames written."""
    from rclpy.serialization import deserialize_message, serialize_message
    from rosbags.rosbag2 import StoragePlugin, Writer

    from mafr_ros.bag.reader import bag_info, read_frames
    from mafr_ros.bag.types import bag_typestore, message_class

    info = bag_info(src)
    frames = list(read_frames(src, topics=list(topics)))
    gap = (frames[-1].stamp_ns - frames[0].stamp_ns) // max(len(frames) - 1, 1)
    span = frames[-1].stamp_ns - frames[0].stamp_ns + gap
    typestore = bag_typestore()
    writer = Writer(Path(dst), version=info.version, storage_plugin=StoragePlugin[storage.upper()])
    writer.open()
    try:
        connections = {t.name: writer.add_connection(t.name, t.msgtype, typestore=typestore)
                       for t in info.topics if t.name in set(topics)}
        decoded = [[(m, deserialize_message(m.data, message_class(m.msgtype)))
                    for m in frame.messages] for frame in frames]
        for k in range(passes):
            for frame in decoded:
                for message, msg in frame:
                    stamp = message.stamp_ns + k * span
                    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 10 ** 9)
                    writer.write(connections[message.topic], stamp, serialize_message(msg))
    finally:
        writer.close()
    return passes * len(frames)
