"""The project's error types: each message says what is wrong and what to do about it."""


class MafrError(Exception):
    """Base class of every error raised on purpose by mafr_ros."""


class InputError(MafrError, ValueError):
    """Input data is malformed or inconsistent: a ROS message, an array, intrinsics, a stamp.

    Raised by the message conversions, the geometry functions and the detector's input checks.
    A running node catches it per frame, counts it and carries on.
    """


class CheckpointError(MafrError):
    """A model or backbone weight file is missing, corrupt or incompatible with this code."""


class DatasetError(MafrError):
    """A dataset folder does not have the expected layout or content."""
