"""rosbag2 tooling without a ROS install: make bags from datasets, play, record, inspect.

Modules (the heavy ones are imported on first use, so ``import mafr_ros.bag`` stays cheap):

- :mod:`.layout`   topic names, types, the per-frame contract of bags made from datasets
- :mod:`.types`    rosbags typestore with the project's messages registered (``bag_typestore``)
- :mod:`.reader`   ``read_messages`` / ``read_frames`` (raw CDR, no decoding), ``bag_info``
- :mod:`.make`     ``make_bag``: MVTec 3D-AD layout dataset -> rosbag2 folder
- :mod:`.player`   ``BagPlayer``: publish a bag's raw messages into a live ROS graph
- :mod:`.recorder` ``BagRecorder``: subscribe raw to topics and write a rosbag2 folder

Bags are written and read with ``rosbags`` (sqlite3 ``.db3`` or MCAP, metadata version 8 or 9).
"""
from __future__ import annotations

import importlib

from . import layout  # noqa: F401  (constants only, cheap)

_EXPORTS = {
    "bag_typestore": "types",
    "BagMessage": "reader", "BagFrame": "reader", "BagInfo": "reader", "read_messages": "reader",
    "read_frames": "reader", "bag_info": "reader", "format_bag_info": "reader",
    "make_bag": "make", "MakeResult": "make",
    "BagPlayer": "player", "PlayStats": "player", "player_qos": "player",
    "BagRecorder": "recorder", "RecordStats": "recorder",
}

__all__ = ["layout", *_EXPORTS]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
