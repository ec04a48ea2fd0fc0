"""ROS message <-> NumPy conversions: Image, PointCloud2 and CameraInfo.

Why our own code: cv_bridge and sensor_msgs_py have no ROS 2 build in this environment, and a NumPy
view over the message buffer is faster than either.

Reading is zero-copy wherever the layout allows: the arrays are strided views over ``msg.data``
(rclpy gives an ``array.array('B')``, rosbags a uint8 ndarray; both export their buffer), so row
padding (``step`` / ``row_step``) and point padding (``point_step``) cost nothing. A view aliases
the message: writing into it changes the message, and a view of a ``bytes`` buffer is read-only.
Pass ``copy=True`` for an array you own. Data in the non-native byte order is converted (one
copy), because torch and most NumPy consumers require native order.

Writing does exactly one memcpy, into a fresh ``array.array('B')`` handed to the message as is.
rclpy's generated ``data`` setter walks bytes, lists, memoryviews and ndarrays element by element
(0.1-0.2 s for one 640x480 float image, 1000x slower; see ros2_numpy PR #3), and in the Kilted
wheels it even copies an ``array.array`` once more unless field checks are on (``_assign_data``).

Copies of interleaved data (colour channels, x/y/z of a point) are done one channel at a time:
NumPy's inner loop then runs over a whole image row instead of 3 elements, which is 5-10x faster.

Every malformed message raises :class:`mafr_ros.errors.InputError` saying what is wrong and what
to do; a node counts it and drops the frame.
"""
from __future__ import annotations

import array
import functools
import logging
import math
import re
import sys
import threading
from collections.abc import Mapping, Sequence

import numpy as np
from sensor_msgs.msg import Image, PointCloud2, PointField
from std_msgs.msg import Header

from ..errors import InputError
from ..geometry import CameraIntrinsics

__all__ = [
    "image_encoding_layout", "image_to_array", "array_to_image", "rgb_from_image",
    "depth_from_image", "pointcloud2_dtype", "pointcloud2_to_array", "pointcloud2_fields",
    "pointcloud2_to_xyz", "pointcloud2_to_rgb", "unpack_rgb", "pack_rgb", "xyz_to_pointcloud2",
    "camera_info_to_intrinsics", "CdrImage", "CdrPointCloud2",
]

_LOG = logging.getLogger("mafr_ros.conversions")
_HOST_BIG_ENDIAN = sys.byteorder == "big"

# --------------------------------------------------------------------------------------------------
# Image
# --------------------------------------------------------------------------------------------------

#: sensor_msgs/image_encodings names -> (element dtype, channels). The generic OpenCV-style names
#: (8UC3, 16SC1, 32FC1, 64FC4, ...) are parsed by ``_GENERIC_ENCODING``.
_NAMED_ENCODINGS = {
    "mono8": (np.uint8, 1), "rgb8": (np.uint8, 3), "bgr8": (np.uint8, 3),
    "rgba8": (np.uint8, 4), "bgra8": (np.uint8, 4),
    "mono16": (np.uint16, 1), "rgb16": (np.uint16, 3), "bgr16": (np.uint16, 3),
    "rgba16": (np.uint16, 4), "bgra16": (np.uint16, 4),
}
_GENERIC_ENCODING = re.compile(r"(8U|8S|16U|16S|32S|32F|64F)C([1-9][0-9]*)")
_GENERIC_DTYPES = {"8U": np.uint8, "8S": np.int8, "16U": np.uint16, "16S": np.int16,
                   "32S": np.int32, "32F": np.float32, "64F": np.float64}
_DEPTH_SCALES = {"16UC1": 0.001, "mono16": 0.001, "32FC1": 1.0}


@functools.lru_cache(maxsize=64)
def image_encoding_layout(encoding: str) -> tuple[np.dtype, int]:
    """(native element dtype, channels) of an Image encoding; InputError for unsupported ones."""
    layout = _NAMED_ENCODINGS.get(encoding)
    if layout is None:
        match = _GENERIC_ENCODING.fullmatch(encoding)
        if match is None:
            raise InputError(
                f"unsupported image encoding '{encoding}': use one of "
                f"{', '.join(_NAMED_ENCODINGS)} or an OpenCV-style type such as 8UC3, 16UC1, "
                "32FC1 (Bayer, YUV and compressed formats must be debayered/decoded upstream, "
                "e.g. by image_proc)"
            )
        layout = (_GENERIC_DTYPES[match.group(1)], int(match.group(2)))
    return np.dtype(layout[0]), layout[1]


def _buffer_nbytes(data) -> int:
    try:
        return memoryview(data).nbytes
    except TypeError:
        raise InputError(
            f"message data of type {type(data).__name__} does not expose a buffer; "
            "it must be bytes, array.array('B') or a uint8 ndarray"
        ) from None


def _check_extent(kind: str, height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise InputError(
            f"{kind} is empty (height {height}, width {width}): the publisher sent no "
            "pixels/points; drop the message or fix the driver"
        )


def _native(view: np.ndarray, copy: bool) -> np.ndarray:
    """The view itself, or a native-order / owned copy when asked for or unavoidable."""
    if not view.dtype.isnative:
        return view.astype(view.dtype.newbyteorder("="), order="C")
    return np.array(view, order="C") if copy else view


def image_to_array(msg, copy: bool = False) -> np.ndarray:
    """Pixels of a sensor_msgs/Image as (H, W) for one channel or (H, W, C), in native byte order.

    With ``copy=False`` the result is a view over ``msg.data`` (strided when rows are padded, i.e.
    ``step`` > width x channels x element size; the padding is excluded). Big-endian data on a
    little-endian host (or the reverse) is converted, which is a copy.
    Works on rclpy messages and on any object with the same fields (rosbags messages).
    """
    encoding = msg.encoding
    dtype, channels = image_encoding_layout(encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    _check_extent(f"Image ({encoding})", height, width)
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise InputError(
            f"Image step {step} < width {width} x {channels} channel(s) x {dtype.itemsize} byte(s) "
            f"= {row_bytes} for encoding {encoding}: step or encoding is wrong; fix the publisher"
        )
    nbytes = _buffer_nbytes(msg.data)
    if nbytes != step * height:
        raise InputError(
            f"Image data length {nbytes} != step {step} x height {height} ({step * height}): "
            "the message is truncated or its step/height are wrong; check the publisher"
        )
    if dtype.itemsize > 1 and bool(msg.is_bigendian) != _HOST_BIG_ENDIAN:
        dtype = dtype.newbyteorder()
    if channels == 1:
        shape, strides = (height, width), (step, dtype.itemsize)
    else:
        shape = (height, width, channels)
        strides = (step, channels * dtype.itemsize, dtype.itemsize)
    view = np.ndarray(shape, dtype=dtype, buffer=msg.data, strides=strides)
    return _native(view, copy)


def _message_dtype(array_dtype: np.dtype, dtype: np.dtype, what: str) -> np.dtype:
    """Accept the encoding's dtype in either byte order, or any float for a float encoding.

    Integer narrowing (int64 -> uint8, ...) wraps silently in NumPy, and integer -> float is the
    classic "millimetres published as 32FC1 metres" bug, so both are refused.
    """
    if array_dtype.newbyteorder("=") == dtype:
        return dtype
    if dtype.kind == "f" and array_dtype.kind == "f":
        return dtype
    raise InputError(
        f"{what}: array dtype {array_dtype} does not match {dtype}; convert it explicitly "
        "(e.g. clip and astype) so that no value wraps around"
    )


def _copy_channels(dst: np.ndarray, src: np.ndarray) -> None:
    """np.copyto one channel at a time: the inner loop then spans a row, not 3-4 elements."""
    if dst.ndim == 2:
        np.copyto(dst, src, casting="same_kind")
    else:
        for channel in range(dst.shape[-1]):
            np.copyto(dst[..., channel], src[..., channel], casting="same_kind")


def _to_byte_array(contiguous: np.ndarray) -> array.array:
    data = array.array("B")
    data.frombytes(memoryview(contiguous).cast("B"))
    return data


@functools.lru_cache(maxsize=None)
def _setter_copies(message_type) -> bool:
    """Whether ``msg.data = array.array(...)`` copies the array (so the slot must be set instead).

    The setter generated for the Kilted wheels used here keeps an assigned array.array only when
    ROS_PYTHON_CHECK_FIELDS=1; otherwise it runs array.array('B', value), a second memcpy of the
    whole payload (about 1 ms for a 5 MB cloud). Other generator versions keep it. Probed once
    per message type, so the slot is only touched where the probe proved it is the storage.
    """
    probe, msg = array.array("B", b"\0"), message_type()
    msg.data = probe
    if msg.data is probe:
        return False
    msg._data = probe
    return msg.data is probe


def _assign_data(msg, data: array.array) -> None:
    """Give ``data`` to the message without another copy, through the slot if the setter copies."""
    if _setter_copies(type(msg)):
        msg._data = data  # the slot the generated property reads; verified by _setter_copies
    else:
        msg.data = data


def array_to_image(image: np.ndarray, encoding: str, header: Header | None = None,
                   step: int | None = None) -> Image:
    """A sensor_msgs/Image of ``encoding`` holding ``image`` ((H, W), (H, W, 1) or (H, W, C)).

    The dtype must be the encoding's (any float is accepted for 32FC*/64FC*). ``step`` pads each
    row to that many bytes (zero padding); by default rows are tightly packed. The data is in the
    host's byte order and costs one memcpy.
    """
    dtype, channels = image_encoding_layout(encoding)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == channels and channels == 1:
        image = image[..., 0]
    expected = "(H, W)" if channels == 1 else f"(H, W, {channels})"
    if image.ndim != (2 if channels == 1 else 3) or (channels > 1 and image.shape[2] != channels):
        raise InputError(
            f"array of shape {image.shape} cannot be encoded as {encoding}: it needs {expected}"
        )
    dtype = _message_dtype(image.dtype, dtype, f"array_to_image({encoding})")
    height, width = image.shape[:2]
    _check_extent(f"array for {encoding}", height, width)
    row_bytes = width * channels * dtype.itemsize
    step = row_bytes if step is None else int(step)
    if step < row_bytes:
        raise InputError(f"step {step} is smaller than one {encoding} row of {width} pixels "
                         f"({row_bytes} bytes); pass step >= {row_bytes} or None")

    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width, msg.encoding, msg.step = int(height), int(width), encoding, int(step)
    msg.is_bigendian = int(_HOST_BIG_ENDIAN)
    if step == row_bytes and image.dtype == dtype and image.flags.c_contiguous:
        _assign_data(msg, _to_byte_array(image))
    else:  # padded, cast or strided: written straight into a zeroed message buffer
        data = array.array("B", b"\0") * (step * height)
        strides = (step, dtype.itemsize) if channels == 1 else (
            step, channels * dtype.itemsize, dtype.itemsize)
        rows = np.ndarray(image.shape, dtype=dtype, buffer=data, strides=strides)
        _copy_channels(rows, image)
        _assign_data(msg, data)
    return msg


def rgb_from_image(msg, copy: bool = True) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from an rgb8/bgr8/rgba8/bgra8/mono8 Image.

    By default a new C-contiguous array: the result must not alias a message that its owner may
    reuse (a bag reader, a message pool). Made one channel at a time, which is several times
    faster than a channel-reversing slice copy. ``copy=False`` returns, for an rgb8 image, the
    zero-copy view over ``msg.data`` (strided when rows are padded) and saves that copy (0.4 ms at
    640x480): for a caller that owns the message, such as a subscription callback's; other
    encodings need the reordering copy anyway.
    """
    encoding = msg.encoding
    if encoding not in ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1"):
        raise InputError(
            f"cannot read image encoding '{encoding}' as RGB: expected rgb8, bgr8, rgba8, bgra8 or "
            "mono8 (8UC3 has no channel order and 16-bit colour needs an explicit scaling; "
            "convert it upstream, e.g. with image_proc)"
        )
    pixels = image_to_array(msg)
    if not copy and encoding == "rgb8":
        return pixels
    height, width = pixels.shape[:2]
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    if pixels.ndim == 2:
        for channel in range(3):
            rgb[..., channel] = pixels
    elif encoding.startswith("rgb"):
        for channel in range(3):
            rgb[..., channel] = pixels[..., channel]
    else:  # bgr8 / bgra8
        for channel in range(3):
            rgb[..., channel] = pixels[..., 2 - channel]
    return rgb


def depth_from_image(msg, copy: bool = False) -> tuple[np.ndarray, float]:
    """(depth (H, W), metres per unit) of a 16UC1/mono16 (millimetres) or 32FC1 (metres) Image.

    The scale is returned rather than applied so that the caller converts only once, in place
    (e.g. ``geometry.depth_to_xyz(depth, K, depth_scale=scale, out=...)``). Invalid depth stays as
    published: 0 for integer images, 0 or non-finite for float images.
    """
    scale = _DEPTH_SCALES.get(msg.encoding)
    if scale is None:
        raise InputError(
            f"depth image encoding '{msg.encoding}' is not supported: expected 16UC1 or mono16 "
            "(millimetres) or 32FC1 (metres), as depth_image_proc does"
        )
    return image_to_array(msg, copy=copy), scale


# --------------------------------------------------------------------------------------------------
# PointCloud2
# --------------------------------------------------------------------------------------------------

#: sensor_msgs/PointField datatype constants -> (name, element dtype).
_POINTFIELD_TYPES = {
    PointField.INT8: ("INT8", np.int8), PointField.UINT8: ("UINT8", np.uint8),
    PointField.INT16: ("INT16", np.int16), PointField.UINT16: ("UINT16", np.uint16),
    PointField.INT32: ("INT32", np.int32), PointField.UINT32: ("UINT32", np.uint32),
    PointField.FLOAT32: ("FLOAT32", np.float32), PointField.FLOAT64: ("FLOAT64", np.float64),
}
_DTYPE_TO_POINTFIELD = {np.dtype(dt): code for code, (_, dt) in _POINTFIELD_TYPES.items()}


@functools.lru_cache(maxsize=64)
def _structured_dtype(fields: tuple, point_step: int, big_endian: bool) -> np.dtype:
    names, formats, offsets = [], [], []
    order = ">" if big_endian else "<"
    for index, (name, offset, datatype, count) in enumerate(fields):
        name = name or f"unnamed_field_{index}"
        if datatype not in _POINTFIELD_TYPES:
            raise InputError(
                f"PointCloud2 field '{name}' has unknown datatype {datatype}: valid datatypes are "
                + ", ".join(f"{code} ({label})" for code, (label, _) in _POINTFIELD_TYPES.items())
            )
        if count < 1:
            raise InputError(f"PointCloud2 field '{name}' has count {count}; it must be >= 1 "
                             "(fix the publisher's PointField.count)")
        if name in names:
            raise InputError(f"PointCloud2 field '{name}' appears twice; "
                             "field names must be unique")
        element = np.dtype(_POINTFIELD_TYPES[datatype][1]).newbyteorder(order)
        end = offset + element.itemsize * count
        if end > point_step:
            raise InputError(
                f"PointCloud2 point_step {point_step} is smaller than field '{name}' "
                f"(offset {offset} + {element.itemsize} bytes x count {count} = {end}): the "
                "fields or point_step are wrong; fix the publisher"
            )
        names.append(name)
        formats.append(element if count == 1 else (element, (count,)))
        offsets.append(offset)
    if not names:
        raise InputError("PointCloud2 has no fields: a cloud needs at least x, y and z")
    try:
        return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                         "itemsize": point_step})
    except (ValueError, TypeError) as error:
        raise InputError(f"PointCloud2 fields {names} at offsets {offsets} do not form a valid "
                         f"point of {point_step} bytes ({error}); fix the publisher") from None


def pointcloud2_dtype(fields: Sequence, point_step: int, is_bigendian: bool = False) -> np.dtype:
    """Structured dtype of one point: each PointField at its offset, itemsize ``point_step``.

    A field with count > 1 becomes a sub-array of shape (count,); an unnamed field is called
    ``unnamed_field_<index>``.
    """
    key = tuple((f.name, int(f.offset), int(f.datatype), int(f.count)) for f in fields)
    return _structured_dtype(key, int(point_step), bool(is_bigendian))


def _cloud_view(msg) -> np.ndarray:
    """Structured (height, width) view over the cloud's buffer, in the message's byte order."""
    height, width = int(msg.height), int(msg.width)
    _check_extent("PointCloud2", height, width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    if point_step <= 0:
        raise InputError(f"PointCloud2 point_step is {point_step}; it must be the positive size "
                         "of one point in bytes")
    dtype = pointcloud2_dtype(msg.fields, point_step, msg.is_bigendian)
    if row_step < width * point_step:
        raise InputError(
            f"PointCloud2 row_step {row_step} < width {width} x point_step {point_step} "
            f"({width * point_step}): set row_step to the bytes of one row"
        )
    nbytes = _buffer_nbytes(msg.data)
    if nbytes != row_step * height:
        raise InputError(
            f"PointCloud2 data length {nbytes} != row_step {row_step} x height {height} "
            f"({row_step * height}): the message is truncated or row_step/height are wrong "
            "(an unorganised cloud has height 1 and width = number of points)"
        )
    return np.ndarray((height, width), dtype=dtype, buffer=msg.data,
                      strides=(row_step, point_step))


def pointcloud2_to_array(msg, copy: bool = False) -> np.ndarray:
    """The cloud as a structured (height, width) array; an unorganised cloud is (1, N).

    With ``copy=False`` it is a view over ``msg.data`` (padding between fields and rows is skipped
    by the strides). Big-endian clouds are converted to native order, which is a copy.
    """
    return _native(_cloud_view(msg), copy)


def _field(view: np.ndarray, name: str) -> np.ndarray:
    if name not in view.dtype.names:
        raise InputError(
            f"PointCloud2 has no '{name}' field (fields: {', '.join(view.dtype.names)}); "
            f"publish a cloud with '{name}' or ask for another field"
        )
    return view[name]


def pointcloud2_fields(msg, names: Sequence[str] | None = None,
                       organised: bool = True) -> dict[str, np.ndarray]:
    """Selected fields (all by default) as plain native-order arrays, keyed by name.

    Each array is (height, width) (plus (count,) for count > 1), a zero-copy strided view when the
    cloud is native-endian; ``organised=False`` flattens to (N,) (a copy if rows are padded).
    """
    view = _cloud_view(msg)
    names = view.dtype.names if names is None else ((names,) if isinstance(names, str) else names)
    out = {}
    for name in names:
        values = _native(_field(view, name), copy=False)
        if not organised:
            values = values.reshape((-1,) + values.shape[2:])
        out[name] = values
    return out


def pointcloud2_to_xyz(msg, organised: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """x, y, z of every point as a C-contiguous float32 (H, W, 3) array, or (H*W, 3).

    NaN points are kept (an organised cloud keeps its pixel order); FLOAT64 or integer fields are
    cast to float32 and big-endian data is swapped during the same single copy. ``out`` may be a
    preallocated C-contiguous float32 array of the result's shape (no allocation per frame).
    """
    view = _cloud_view(msg)
    height, width = view.shape
    coordinates = [_field(view, name) for name in ("x", "y", "z")]
    for name, values in zip("xyz", coordinates):
        if values.ndim != 2:
            raise InputError(f"PointCloud2 field '{name}' has count {values.shape[2]}; "
                             "x, y and z must be scalars (count 1)")
    shape = (height, width, 3) if organised else (height * width, 3)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise InputError(f"out must be a C-contiguous float32 array of shape {shape}, "
                         f"got {out.dtype} {out.shape}")
    grid = out.reshape(height, width, 3)
    for axis, values in enumerate(coordinates):
        np.copyto(grid[..., axis], values, casting="unsafe")
    return out


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB from PCL's packed rgb/rgba (0x00RRGGBB in a float32 or uint32 field)."""
    packed = np.asarray(packed)
    if packed.dtype.itemsize != 4 or packed.dtype.kind not in "fiu":
        raise InputError(f"packed rgb must be a 4-byte float32/uint32 array, got {packed.dtype}")
    # Reinterpret the bits (never convert the float value: the colour is not a number).
    bits = packed.view(np.dtype(np.uint32).newbyteorder(packed.dtype.byteorder))
    rgb = np.empty(packed.shape + (3,), dtype=np.uint8)
    for channel, shift in enumerate((16, 8, 0)):
        np.copyto(rgb[..., channel], (bits >> shift) & 0xFF, casting="unsafe")
    return rgb


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """PCL's packed float32 rgb (bits 0x00RRGGBB) from (..., 3) uint8 RGB."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise InputError(f"rgb must be a (..., 3) uint8 array, got {rgb.dtype} {rgb.shape}")
    bits = rgb[..., 0].astype(np.uint32) << 16
    bits |= rgb[..., 1].astype(np.uint32) << 8
    bits |= rgb[..., 2]
    return bits.view(np.float32)


def pointcloud2_to_rgb(msg, organised: bool = True, field: str | None = None) -> np.ndarray:
    """(H, W, 3) or (N, 3) uint8 RGB from a packed 'rgb' (or 'rgba') field; always a copy.

    The bytes are picked straight from the buffer (R, G, B at bit 16, 8, 0 of the packed word),
    so no integer arithmetic runs per point.
    """
    view = _cloud_view(msg)
    names = view.dtype.names
    if field is None:
        field = next((name for name in ("rgb", "rgba") if name in names), "rgb")
    values = _field(view, field)
    if values.dtype.itemsize != 4 or values.ndim != 2:
        raise InputError(f"PointCloud2 field '{field}' must be one packed 4-byte value per point "
                         f"(FLOAT32 or UINT32, count 1), got {values.dtype} count "
                         f"{1 if values.ndim == 2 else values.shape[2]}")
    offset = view.dtype.fields[field][1]
    # Byte address of R, G, B within the packed word depends on the message's byte order.
    red = offset + (1 if msg.is_bigendian else 2)
    step = 1 if msg.is_bigendian else -1
    height, width = view.shape
    channels = np.ndarray((height, width, 3), dtype=np.uint8, buffer=msg.data, offset=red,
                          strides=(view.strides[0], view.strides[1], step))
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    for channel in range(3):
        rgb[..., channel] = channels[..., channel]
    return rgb if organised else rgb.reshape(-1, 3)


def _point_field(name: str, offset: int, dtype: np.dtype) -> PointField:
    return PointField(name=name, offset=int(offset), datatype=_DTYPE_TO_POINTFIELD[dtype], count=1)


def xyz_to_pointcloud2(xyz: np.ndarray, header: Header | None = None, *,
                       rgb: np.ndarray | None = None,
                       fields: Mapping[str, np.ndarray] | None = None) -> PointCloud2:
    """A PCL-compatible PointCloud2 from (H, W, 3) (organised) or (N, 3) (unorganised) points.

    Layout: x, y, z float32 at 0/4/8, then (from offset 16) ``rgb`` packed as float32 (uint8
    (..., 3) input) and each extra scalar field of ``fields`` (e.g. ``score``: (H, W) or (N,)
    float32) in its own dtype, aligned; point_step is rounded up to 16 bytes as PCL does, so
    xyz gives 16 and xyz + rgb or xyz + one scalar gives 32 (PointXYZRGB / PointXYZI). height,
    width and row_step are set explicitly (sensor_msgs_py swaps them for organised clouds,
    ros2/common_interfaces#236). ``is_dense`` is False when any point is non-finite.
    """
    xyz = np.asarray(xyz)
    if xyz.ndim not in (2, 3) or xyz.shape[-1] != 3:
        raise InputError(f"xyz must be (H, W, 3) or (N, 3), got shape {xyz.shape}")
    if xyz.dtype.kind != "f":
        raise InputError(f"xyz must be a float array in metres, got {xyz.dtype}")
    lead = xyz.shape[:-1]
    height, width = (lead[0], lead[1]) if xyz.ndim == 3 else (1, lead[0])
    _check_extent("point cloud to publish", height, width)

    layout = [("x", 0, np.dtype(np.float32)), ("y", 4, np.dtype(np.float32)),
              ("z", 8, np.dtype(np.float32))]
    columns = {}
    offset = 16
    if rgb is not None:
        columns["rgb"] = pack_rgb(rgb)
        layout.append(("rgb", offset, np.dtype(np.float32)))
        offset += 4
    for name, values in (fields or {}).items():
        values = np.asarray(values)
        dtype = values.dtype.newbyteorder("=")
        if name in ("x", "y", "z", "rgb") or not name:
            raise InputError(f"extra field name '{name}' is empty or reserved (x, y, z, rgb)")
        if dtype not in _DTYPE_TO_POINTFIELD:
            raise InputError(f"extra field '{name}' has dtype {values.dtype}; PointCloud2 holds "
                             "int8/16/32, uint8/16/32, float32 or float64")
        offset = -(-offset // dtype.itemsize) * dtype.itemsize
        columns[name] = values
        layout.append((name, offset, dtype))
        offset += dtype.itemsize
    for name, values in columns.items():
        if values.shape != lead:
            raise InputError(f"field '{name}' has shape {values.shape}; it must be {lead}, "
                             "one value per point of xyz")
    point_step = -(-offset // 16) * 16
    row_step = width * point_step

    # Zero-filled so the padding bytes are deterministic (no stale memory on the wire); repeating a
    # one-byte array is the cheapest zeroed array.array (3x faster than array.array(bytes(n))).
    data = array.array("B", b"\0") * (row_step * height)
    points = np.ndarray((height, width),
                        dtype=np.dtype({"names": [n for n, _, _ in layout],
                                        "formats": [d for _, _, d in layout],
                                        "offsets": [o for _, o, _ in layout],
                                        "itemsize": point_step}),
                        buffer=data)
    grid = xyz.reshape(height, width, 3)
    for axis, name in enumerate("xyz"):
        np.copyto(points[name], grid[..., axis], casting="same_kind")
    for name, values in columns.items():
        np.copyto(points[name], values.reshape(height, width), casting="same_kind")

    msg = PointCloud2()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(height), int(width)
    msg.fields = [_point_field(name, off, dtype) for name, off, dtype in layout]
    msg.is_bigendian = _HOST_BIG_ENDIAN
    msg.point_step, msg.row_step = int(point_step), int(row_step)
    msg.is_dense = bool(np.isfinite(xyz).all())
    _assign_data(msg, data)
    return msg


# --------------------------------------------------------------------------------------------------
# CameraInfo
# --------------------------------------------------------------------------------------------------

_DISTORTION_WARNED: set = set()
_DISTORTION_LOCK = threading.Lock()


def _warn_distortion_once(msg, reason: str) -> None:
    key = (msg.header.frame_id, msg.distortion_model)
    with _DISTORTION_LOCK:
        if key in _DISTORTION_WARNED:
            return
        _DISTORTION_WARNED.add(key)
    _LOG.warning(
        "camera_info of frame '%s' has non-zero %s distortion D=%s but %s, so points are "
        "projected without undistortion and are off by the lens distortion: subscribe to the "
        "rectified image (image_rect) and convert with rectified=True. (Logged once per frame "
        "and distortion model.)",
        key[0], key[1] or "(unnamed)", [round(float(d), 6) for d in msg.d], reason)


def camera_info_to_intrinsics(msg, rectified: bool = True) -> CameraIntrinsics:
    """Pinhole intrinsics of the image that ``msg`` (sensor_msgs/CameraInfo) describes.

    ``rectified=True`` (image_rect topics) uses P, as depth_image_proc / image_geometry do; if P is
    all zero but K is set, K is used. ``rectified=False`` (image_raw) uses K and ignores D, with a
    warning logged once per (frame_id, distortion model) when D is non-zero. Binning and ROI are
    applied as image_geometry does (f / binning, c = (c - roi offset) / binning).
    """
    width, height = int(msg.width), int(msg.height)
    if width <= 0 or height <= 0:
        raise InputError(
            f"camera_info has image size {width}x{height}: the driver did not fill width/height "
            "(image_width/image_height of the calibration file); fix the camera_info publisher"
        )
    # Row-major K (3x3) and P (3x4): fx, fy, cx, cy sit at K[0], K[4], K[2], K[5] and P[0], P[5],
    # P[2], P[6]. Plain floats: this runs per frame and NumPy scalars would only add overhead.
    k, p = msg.k, msg.p
    p_valid = float(p[0]) != 0.0 and float(p[5]) != 0.0
    source = "P" if rectified and p_valid else "K"
    fx, fy, cx, cy = ((float(p[0]), float(p[5]), float(p[2]), float(p[6])) if source == "P"
                      else (float(k[0]), float(k[4]), float(k[2]), float(k[5])))
    if fx == 0 or fy == 0:
        raise InputError(
            f"camera_info has a zero focal length: the camera is not calibrated ({source} of frame "
            f"'{msg.header.frame_id}' has fx={fx}, fy={fy}; K[0] == 0 means uncalibrated). "
            "Calibrate it (e.g. camera_calibration) and publish the calibrated camera_info"
        )
    if not (fx > 0 and fy > 0 and math.isfinite(fx + fy + cx + cy)):
        raise InputError(f"camera_info {source} of frame '{msg.header.frame_id}' has invalid "
                         f"intrinsics fx={fx}, fy={fy}, cx={cx}, cy={cy}; recalibrate the camera")
    distortion = tuple(float(d) for d in msg.d)
    if source == "K" and any(distortion):
        _warn_distortion_once(
            msg, "the image is not rectified" if not rectified
            else "P is all zero (rectified=True fell back to K)")

    bin_x, bin_y = max(1, int(msg.binning_x)), max(1, int(msg.binning_y))
    roi = msg.roi
    roi_x, roi_y, roi_w, roi_h = (int(roi.x_offset), int(roi.y_offset), int(roi.width),
                                  int(roi.height))
    if roi_w == 0 or roi_h == 0:  # an all-zero ROI means the full image
        roi_x, roi_y, roi_w, roi_h = 0, 0, width, height
    return CameraIntrinsics(
        fx=fx / bin_x, fy=fy / bin_y, cx=(cx - roi_x) / bin_x, cy=(cy - roi_y) / bin_y,
        width=roi_w // bin_x, height=roi_h // bin_y, distortion=distortion)


# --------------------------------------------------------------------------------------------------
# Serialised (CDR) Image and PointCloud2, read in place
# --------------------------------------------------------------------------------------------------
# Why: a subscription created with raw=True hands over the serialised bytes. rclpy's own take
# deserialises them into a C message (one copy of the data) and converts that to Python (a second
# copy into an array.array), with the GIL held: 0.3 ms for a 640x480 rgb8 image and 0.15 ms for
# 16UC1 depth on the dev machine, on the executor thread, on every frame's critical path. The
# views below read the few header fields and leave the payload where it is: ``data`` is a uint8
# NumPy view of the received bytes, so image_to_array / pointcloud2_to_xyz read it without a copy.
#
# Layout (OMG XCDR1, what every ROS 2 rmw sends): a 4-byte encapsulation header (0x00 0x01:
# little-endian, 0x00 0x00: big-endian; then two option bytes), then the fields in declaration
# order, each primitive aligned to its size relative to the end of that header; a string is a
# uint32 length that counts its terminating NUL, then the bytes; a sequence is a uint32 element
# count, then the elements.

_CDR_ENCAPSULATION = {b"\x00\x00": ">", b"\x00\x01": "<"}


class _CdrReader:
    """Sequential reads from one serialised message; every overrun is an InputError."""

    __slots__ = ("buffer", "size", "offset", "order", "what")

    def __init__(self, buffer, what: str):
        try:
            self.buffer = memoryview(buffer).cast("B")
        except TypeError:
            raise InputError(f"serialised {what} must be bytes-like, got "
                             f"{type(buffer).__name__}") from None
        self.size, self.what = self.buffer.nbytes, what
        if self.size < 4:
            raise InputError(f"serialised {what} of {self.size} bytes is shorter than the CDR "
                             "encapsulation header: the message is truncated")
        order = _CDR_ENCAPSULATION.get(bytes(self.buffer[:2]))
        if order is None:
            raise InputError(f"serialised {what}: CDR encapsulation "
                             f"0x{bytes(self.buffer[:2]).hex()} is not plain CDR (0x0000 "
                             "big-endian or 0x0001 little-endian); use an rmw that sends XCDR1")
        self.order, self.offset = order, 4

    def _take(self, nbytes: int, align: int, field: str) -> int:
        start = self.offset + (-(self.offset - 4)) % align
        end = start + nbytes
        if end > self.size:
            raise InputError(f"serialised {self.what} is truncated: {field} needs bytes "
                             f"{start}..{end} of {self.size}; the message is incomplete")
        self.offset = end
        return start

    def u32(self, field: str) -> int:
        start = self._take(4, 4, field)
        return int.from_bytes(self.buffer[start:start + 4],
                              "little" if self.order == "<" else "big")

    def i32(self, field: str) -> int:
        value = self.u32(field)
        return value - (1 << 32) if value >= 1 << 31 else value

    def u8(self, field: str) -> int:
        return self.buffer[self._take(1, 1, field)]

    def string(self, field: str) -> str:
        length = self.u32(f"{field} length")
        if length == 0:  # some writers send an empty string without its NUL
            return ""
        start = self._take(length, 1, field)
        if self.buffer[start + length - 1] != 0:
            raise InputError(f"serialised {self.what}: {field} is not NUL-terminated; the "
                             "message is corrupt")
        try:
            return bytes(self.buffer[start:start + length - 1]).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"serialised {self.what}: {field} is not UTF-8; the message is "
                             "corrupt") from None

    def header(self) -> Header:
        header = Header()
        header.stamp.sec = self.i32("header.stamp.sec")
        header.stamp.nanosec = self.u32("header.stamp.nanosec")
        header.frame_id = self.string("header.frame_id")
        return header

    def byte_sequence(self, field: str) -> np.ndarray:
        length = self.u32(f"{field} length")
        start = self._take(length, 1, field)
        return np.frombuffer(self.buffer, dtype=np.uint8, count=length, offset=start)


class CdrImage:
    """The fields of a serialised sensor_msgs/Image, with ``data`` a uint8 view of the bytes.

    Accepted wherever an Image is read (image_to_array, rgb_from_image, depth_from_image); the
    ``header`` is a real std_msgs/Header, so outputs can be stamped with it. Keeps the received
    buffer alive for as long as the view is used.
    """

    __slots__ = ("header", "height", "width", "encoding", "is_bigendian", "step", "data")

    def __init__(self, serialized):
        reader = _CdrReader(serialized, "sensor_msgs/Image")
        self.header = reader.header()
        self.height = reader.u32("height")
        self.width = reader.u32("width")
        self.encoding = reader.string("encoding")
        self.is_bigendian = reader.u8("is_bigendian")
        self.step = reader.u32("step")
        self.data = reader.byte_sequence("data")


class CdrPointField:
    __slots__ = ("name", "offset", "datatype", "count")

    def __init__(self, name: str, offset: int, datatype: int, count: int):
        self.name, self.offset, self.datatype, self.count = name, offset, datatype, count


class CdrPointCloud2:
    """The fields of a serialised sensor_msgs/PointCloud2, ``data`` a uint8 view of the bytes
    (accepted by pointcloud2_to_array / pointcloud2_to_xyz / pointcloud2_fields)."""

    __slots__ = ("header", "height", "width", "fields", "is_bigendian", "point_step",
                 "row_step", "data", "is_dense")

    def __init__(self, serialized):
        reader = _CdrReader(serialized, "sensor_msgs/PointCloud2")
        self.header = reader.header()
        self.height = reader.u32("height")
        self.width = reader.u32("width")
        count = reader.u32("fields length")
        if count > (reader.size - reader.offset) // 13:  # each field takes >= 13 bytes
            raise InputError(f"serialised sensor_msgs/PointCloud2 claims {count} fields, more "
                             f"than its {reader.size} bytes can hold: the message is corrupt")
        fields = []
        for index in range(count):
            name = reader.string(f"fields[{index}].name")
            offset = reader.u32(f"fields[{index}].offset")
            datatype = reader.u8(f"fields[{index}].datatype")
            count_of = reader.u32(f"fields[{index}].count")
            fields.append(CdrPointField(name, offset, datatype, count_of))
        self.fields = fields
        self.is_bigendian = bool(reader.u8("is_bigendian"))
        self.point_step = reader.u32("point_step")
        self.row_step = reader.u32("row_step")
        self.data = reader.byte_sequence("data")
        self.is_dense = bool(reader.u8("is_dense"))
