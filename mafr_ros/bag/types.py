"""Message definitions for bags: a rosbags typestore that also knows the project's messages.

rosbags writes each connection's message definition (``msgdef``) and type hash (RIHS01) into the
bag, which makes a bag self-describing for ``ros2 bag`` and MCAP readers. Its built-in store holds
the standard ROS 2 Kilted messages; the project's ``msg/*.msg`` (``mafr_ros/msg/AnomalyResult``,
``AnomalyRegion``) are parsed from the same files rosidl builds the Python classes from, so the
bag's definitions and the live classes come from one source.

The message *bytes* never go through rosbags' serializer in this package: they are produced by
rclpy's rosidl type support (``rclpy.serialization.serialize_message``) or received raw from DDS.
"""
from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path

from ..errors import InputError

PACKAGE = "mafr_ros"


def project_msg_dirs() -> list[Path]:
    """Folders that may hold the project's .msg files, most authoritative first.

    The installed share folder (colcon install or the venv build) holds exactly what rosidl built;
    the source checkout's msg/ is the fallback for a tree that was never built.
    """
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory(PACKAGE)) / "msg")
    except Exception:  # no ament index (AMENT_PREFIX_PATH unset) or package not installed
        pass
    candidates.append(Path(sys.prefix) / "share" / PACKAGE / "msg")
    candidates.append(Path(__file__).resolve().parents[2] / "msg")
    seen, existing = set(), []
    for path in candidates:
        if path.is_dir() and path.resolve() not in seen:
            seen.add(path.resolve())
            existing.append(path)
    return existing


@functools.lru_cache(maxsize=1)
def bag_typestore():
    """The Kilted typestore plus ``mafr_ros/msg/*`` (cached; treat it as read-only)."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    dirs = project_msg_dirs()
    if not dirs:
        raise InputError(f"the {PACKAGE} message definitions (msg/*.msg) were not found in the "
                         "install or the source tree; run `make setup` (or colcon build)")
    types = {}
    for path in sorted(dirs[0].glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"{PACKAGE}/msg/{path.stem}"))
    store.register(types)
    return store


def known_type(msgtype: str) -> bool:
    """Whether the typestore can write the definition of ``msgtype`` ('pkg/msg/Name')."""
    return msgtype in bag_typestore().fielddefs


def require_known_type(msgtype: str, topic: str) -> None:
    if not known_type(msgtype):
        raise InputError(
            f"topic {topic} has type {msgtype}, whose definition is not known here (the bag "
            "stores each type's definition): only standard ROS 2 Kilted messages and "
            f"{PACKAGE}/msg/* can be recorded; leave this topic out")


def message_class(msgtype: str):
    """The rosidl Python class of 'pkg/msg/Name' (InputError if the package is not importable)."""
    parts = msgtype.split("/")
    if len(parts) == 2:  # 'pkg/Name', as ROS 1 and some tools spell it
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise InputError(f"message type {msgtype!r} is not of the form pkg/msg/Name")
    package, kind, name = parts
    try:
        module = importlib.import_module(f"{package}.{kind}")
        return getattr(module, name)
    except (ImportError, AttributeError):
        raise InputError(f"message type {msgtype} is not installed here (no Python module "
                         f"{package}.{kind} with {name}): install its interface package (for "
                         f"{PACKAGE}/msg/*: `make setup`)") from None
