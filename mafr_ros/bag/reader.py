"""Read rosbag2 folders as raw messages (CDR bytes, never decoded) and summarise them.

``read_messages`` yields :class:`BagMessage` in bag-timestamp order; ``read_frames`` groups
consecutive messages with the same timestamp (a frame of a bag made by ``mafr bag make``) into
:class:`BagFrame`. Both re-open the bag on every call, so a caller can iterate as often as it
likes (the player's --loop). ``bag_info`` / ``format_bag_info`` are ``mafr bag info``.
"""
from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from ..errors import InputError


class BagMessage(NamedTuple):
    """One recorded message: topic, type ('pkg/msg/Name'), bag timestamp (ns), CDR bytes."""

    topic: str
    msgtype: str
    stamp_ns: int
    data: bytes


class BagFrame(NamedTuple):
    """Consecutive messages sharing one bag timestamp, in their recorded order."""

    stamp_ns: int
    messages: tuple[BagMessage, ...]

    def by_topic(self) -> dict[str, BagMessage]:
        """{topic: message}; the last one wins if a topic occurs twice in the frame."""
        return {m.topic: m for m in self.messages}


@dataclass(frozen=True)
class TopicSummary:
    name: str
    msgtype: str
    count: int
    serialization_format: str


@dataclass(frozen=True)
class BagInfo:
    """What ``mafr bag info`` prints (times in ns since the epoch; duration = end - start)."""

    path: Path
    files: tuple[str, ...]
    storage_id: str
    version: int
    ros_distro: str
    size_bytes: int
    start_ns: int
    end_ns: int
    duration_ns: int
    message_count: int
    compression: str
    topics: tuple[TopicSummary, ...]
    custom_data: dict = field(default_factory=dict)

    def topic(self, name: str) -> TopicSummary:
        for summary in self.topics:
            if summary.name == name:
                return summary
        raise KeyError(name)


def check_bag_path(bag) -> Path:
    """The bag folder as a Path; InputError with what to do if it is not a rosbag2 folder."""
    path = Path(bag).expanduser()
    if not path.exists():
        raise InputError(f"bag {path} does not exist: pass the folder written by `mafr bag make`, "
                         "`mafr bag record` or `ros2 bag record`")
    if not path.is_dir():
        raise InputError(f"bag {path} is a file: pass its folder (the one holding metadata.yaml)")
    if not (path / "metadata.yaml").is_file():
        raise InputError(f"{path} holds no metadata.yaml, so it is not a rosbag2 folder (an "
                         "unfinished recording? `ros2 bag reindex` rebuilds the metadata)")
    return path


def _open_reader(path: Path):
    from rosbags.rosbag2 import Reader
    from rosbags.rosbag2.errors import ReaderError

    reader = Reader(path)
    try:
        reader.open()
    except (ReaderError, OSError) as exc:
        raise InputError(f"cannot read bag {path}: {exc}") from None
    return reader


def _select(connections, topics: Iterable[str] | None, exclude: Iterable[str] | None, path: Path):
    available = sorted({c.topic for c in connections})
    wanted = None if topics is None else list(topics)
    skipped = set(exclude or ())
    unknown = [t for t in (wanted or []) + sorted(skipped) if t not in available]
    if unknown:
        raise InputError(f"bag {path} has no topic {', '.join(unknown)}; its topics are "
                         f"{', '.join(available) or 'none'}")
    return [c for c in connections
            if (wanted is None or c.topic in wanted) and c.topic not in skipped]


def read_messages(bag, topics: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                  start_offset: float = 0.0) -> Iterator[BagMessage]:
    """Messages of ``bag`` in timestamp order (ties in their stored order), as raw CDR bytes.

    topics: only these topic names (default all); exclude: leave these out; start_offset: skip
    the messages of the first ``start_offset`` seconds after the bag's first message. Unknown
    topic names raise InputError (a typo would otherwise replay nothing).
    """
    path = check_bag_path(bag)
    if not start_offset >= 0:
        raise InputError(f"start offset must be >= 0 seconds, got {start_offset}")
    reader = _open_reader(path)
    try:
        connections = _select(reader.connections, topics, exclude, path)
        if not connections or reader.message_count == 0:
            return
        start = reader.start_time + int(round(start_offset * 1e9))
        for connection, stamp, data in reader.messages(connections=connections, start=start):
            yield BagMessage(connection.topic, connection.msgtype, int(stamp),
                             data if isinstance(data, bytes) else bytes(data))
    finally:
        reader.close()


def read_frames(bag, topics: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                start_offset: float = 0.0) -> Iterator[BagFrame]:
    """:func:`read_messages` grouped into frames of equal timestamp (see the module docstring)."""
    pending: list[BagMessage] = []
    for message in read_messages(bag, topics, exclude, start_offset):
        if pending and message.stamp_ns != pending[0].stamp_ns:
            yield BagFrame(pending[0].stamp_ns, tuple(pending))
            pending = []
        pending.append(message)
    if pending:
        yield BagFrame(pending[0].stamp_ns, tuple(pending))


def bag_info(bag) -> BagInfo:
    """Summary of a bag from its metadata.yaml, cross-checked by opening it with rosbags."""
    path = check_bag_path(bag)
    try:
        meta = yaml.safe_load((path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise InputError(f"{path}/metadata.yaml is not rosbag2 metadata ({exc})") from None
    reader = _open_reader(path)  # validates storage files and message definitions
    try:
        counts = {(c.topic, c.msgtype): c.msgcount for c in reader.connections}
        formats = {(c.topic, c.msgtype): c.ext.serialization_format for c in reader.connections}
    finally:
        reader.close()
    files = tuple(str(f) for f in meta.get("relative_file_paths", ()))
    size = sum((path / f).stat().st_size for f in files if (path / f).is_file())
    size += (path / "metadata.yaml").stat().st_size
    start = int(meta["starting_time"]["nanoseconds_since_epoch"])
    duration = int(meta["duration"]["nanoseconds"])
    custom = meta.get("custom_data") or {}
    compression = "/".join(x for x in (meta.get("compression_mode"), meta.get("compression_format"))
                           if x) or "none"
    topics = tuple(TopicSummary(name, msgtype, int(counts[(name, msgtype)]),
                                formats[(name, msgtype)])
                   for name, msgtype in sorted(counts))
    return BagInfo(path=path, files=files, storage_id=str(meta["storage_identifier"]),
                   version=int(meta["version"]), ros_distro=str(meta.get("ros_distro", "")),
                   size_bytes=size, start_ns=start, end_ns=start + duration, duration_ns=duration,
                   message_count=int(meta["message_count"]), compression=compression,
                   topics=topics, custom_data=dict(custom))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def _time(ns: int) -> str:
    utc = _dt.datetime.fromtimestamp(ns // 1_000_000_000, tz=_dt.timezone.utc)
    return f"{utc:%b %d %Y %H:%M:%S}.{ns % 1_000_000_000:09d} UTC ({ns // 1_000_000_000}." \
           f"{ns % 1_000_000_000:09d})"


def format_bag_info(info: BagInfo) -> str:
    """Text in the style of ``ros2 bag info``."""
    width = max((len(t.name) for t in info.topics), default=0)
    type_width = max((len(t.msgtype) for t in info.topics), default=0)
    lines = [
        f"Files:             {', '.join(info.files)}",
        f"Bag path:          {info.path}",
        f"Bag size:          {_size(info.size_bytes)}",
        f"Storage id:        {info.storage_id}",
        f"Metadata version:  {info.version}",
        f"ROS Distro:        {info.ros_distro}",
        f"Compression:       {info.compression}",
        f"Duration:          {info.duration_ns / 1e9:.9f}s",
        f"Start:             {_time(info.start_ns) if info.message_count else '-'}",
        f"End:               {_time(info.end_ns) if info.message_count else '-'}",
        f"Messages:          {info.message_count}",
    ]
    prefix = "Topic information: "
    for i, t in enumerate(info.topics):
        lines.append((prefix if i == 0 else " " * len(prefix))
                     + f"Topic: {t.name:<{width}} | Type: {t.msgtype:<{type_width}} | "
                       f"Count: {t.count} | Serialization Format: {t.serialization_format}")
    if not info.topics:
        lines.append(prefix + "none")
    for key, value in sorted(info.custom_data.items()):
        try:  # pretty-print JSON values (mafr bag make stores its parameters and the K fit as JSON)
            value = json.dumps(json.loads(value), sort_keys=True)
        except (TypeError, ValueError):
            pass
        lines.append(f"Custom data:       {key}: {value}")
    return "\n".join(lines)
