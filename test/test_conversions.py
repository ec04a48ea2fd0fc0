"""Tests of mafr_ros.ros.conversions on real rclpy messages and the real Kinect RGB-D frame.

Messages are passed through rclpy's CDR serialisation where it matters, so that ``data`` has the
type a subscription callback really receives (array.array('B')). Expected arrays are built
independently of the code under test (hand-made structured dtypes, explicit byte orders).
"""
import logging
from pathlib import Path

import numpy as np
import open3d as o3d
import pytest
import tifffile
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from mafr_ros.errors import InputError
from mafr_ros.geometry import CameraIntrinsics, depth_to_xyz
from mafr_ros.ros.conversions import (
    array_to_image, camera_info_to_intrinsics, depth_from_image, image_to_array, pack_rgb,
    pointcloud2_fields, pointcloud2_to_array, pointcloud2_to_rgb, pointcloud2_to_xyz,
    rgb_from_image, unpack_rgb, xyz_to_pointcloud2)

KINECT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kinect_rgbd"
RNG = np.random.default_rng(7)


def wire(msg):
    """The message as a subscriber receives it."""
    return deserialize_message(serialize_message(msg), type(msg))


def buffer_of(msg):
    return np.frombuffer(msg.data, dtype=np.uint8)


def random_array(shape, dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return RNG.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def hand_made_image(array, encoding, step, big_endian):
    """An Image whose bytes are laid out by this test, not by the code under test."""
    height = array.shape[0]
    raw = array.astype(array.dtype.newbyteorder(">" if big_endian else "<"))
    rows = raw.reshape(height, -1).view(np.uint8)
    data = np.full((height, step), 0xAB, dtype=np.uint8)  # non-zero padding must be ignored
    data[:, :rows.shape[1]] = rows
    return Image(height=height, width=array.shape[1], encoding=encoding, step=step,
                 is_bigendian=int(big_endian), data=data.tobytes())


# ---------------------------------------------------------------------------------------------
# Image
# ---------------------------------------------------------------------------------------------

ENCODINGS = [("rgb8", np.uint8, 3), ("bgr8", np.uint8, 3), ("rgba8", np.uint8, 4),
             ("bgra8", np.uint8, 4), ("mono8", np.uint8, 1), ("mono16", np.uint16, 1),
             ("16UC1", np.uint16, 1), ("32FC1", np.float32, 1), ("8UC3", np.uint8, 3),
             ("16SC1", np.int16, 1), ("32FC3", np.float32, 3), ("64FC1", np.float64, 1),
             ("rgb16", np.uint16, 3), ("32SC2", np.int32, 2)]


@pytest.mark.parametrize("encoding,dtype,channels", ENCODINGS)
def test_image_round_trip_every_encoding(encoding, dtype, channels):
    shape = (7, 9) if channels == 1 else (7, 9, channels)
    array = random_array(shape, dtype)
    header = Header(frame_id="cam")
    msg = wire(array_to_image(array, encoding, header=header))
    itemsize = np.dtype(dtype).itemsize
    assert (msg.height, msg.width, msg.encoding) == (7, 9, encoding)
    assert msg.step == 9 * channels * itemsize and len(msg.data) == msg.step * 7
    assert msg.header.frame_id == "cam"
    out = image_to_array(msg)
    assert out.shape == shape and out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("encoding,dtype,channels,pad",
                         [("rgb8", np.uint8, 3, 5), ("32FC1", np.float32, 1, 12),
                          ("16UC1", np.uint16, 1, 3)])
def test_padded_step_is_written_and_read_as_a_view(encoding, dtype, channels, pad):
    shape = (6, 10) if channels == 1 else (6, 10, channels)
    array = random_array(shape, dtype)
    row_bytes = 10 * channels * np.dtype(dtype).itemsize
    msg = wire(array_to_image(array, encoding, step=row_bytes + pad))
    assert msg.step == row_bytes + pad and len(msg.data) == (row_bytes + pad) * 6
    assert not buffer_of(msg).reshape(6, -1)[:, row_bytes:].any()  # padding is zeroed
    out = image_to_array(msg)
    np.testing.assert_array_equal(out, array)
    assert out.strides[0] == row_bytes + pad and np.shares_memory(out, buffer_of(msg))

    hand = hand_made_image(array, encoding, row_bytes + pad, big_endian=False)
    np.testing.assert_array_equal(image_to_array(hand), array)  # 0xAB padding excluded


@pytest.mark.parametrize("encoding,dtype", [("16UC1", np.uint16), ("32FC1", np.float32)])
def test_big_endian_images_are_swapped_to_native(encoding, dtype):
    array = random_array((5, 8), dtype)
    msg = wire(hand_made_image(array, encoding, 8 * array.itemsize + 4, big_endian=True))
    out = image_to_array(msg)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    msg.is_bigendian = 0  # same bytes read as little-endian: every value byte-swapped
    np.testing.assert_array_equal(image_to_array(msg).view(np.uint8),
                                  array.astype(np.dtype(dtype).newbyteorder(">")).view(np.uint8))


def test_image_to_array_is_zero_copy_on_a_received_message():
    array = random_array((4, 6, 3), np.uint8)
    msg = wire(array_to_image(array, "rgb8"))
    view = image_to_array(msg)
    assert np.shares_memory(view, buffer_of(msg))
    view[0, 0] = (1, 2, 3)  # observable: the message itself changes
    assert list(msg.data[:3]) == [1, 2, 3]
    owned = image_to_array(msg, copy=True)
    assert not np.shares_memory(owned, buffer_of(msg)) and owned.flags.c_contiguous
    class BagImage:  # a rosbags-style message whose data is immutable bytes
        height, width, encoding, step, is_bigendian = 4, 6, "rgb8", 18, 0
        data = array.tobytes()
    read_only = image_to_array(BagImage)
    np.testing.assert_array_equal(read_only, array)
    assert not read_only.flags.writeable  # a view of immutable data stays read-only


def test_array_to_image_keeps_the_array_data_bit_exact_for_float_heatmaps():
    heatmap = RNG.random((48, 64), dtype=np.float32)
    heatmap[3, 4] = np.nan
    msg = array_to_image(heatmap, "32FC1")
    assert isinstance(msg.data, type(wire(msg).data))  # array.array, as rclpy stores it
    np.testing.assert_array_equal(image_to_array(msg).view(np.uint32), heatmap.view(np.uint32))
    as_float64 = array_to_image(heatmap.astype(np.float64), "32FC1")  # floats are narrowed
    np.testing.assert_array_equal(image_to_array(as_float64), heatmap, strict=True)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_rgb_from_image_converts_channel_orders(encoding):
    rgb = random_array((5, 7, 3), np.uint8)
    if encoding == "mono8":
        rgb[...] = rgb[..., :1]
        source = rgb[..., 0]
    else:
        order = {"rgb8": [0, 1, 2], "bgr8": [2, 1, 0], "rgba8": [0, 1, 2, 3],
                 "bgra8": [2, 1, 0, 3]}[encoding]
        source = np.concatenate([rgb, np.full((5, 7, 1), 200, np.uint8)], axis=2)[..., order]
    msg = wire(array_to_image(source, encoding, step=source[0].nbytes + 3))
    out = rgb_from_image(msg)
    np.testing.assert_array_equal(out, rgb)
    assert out.flags.c_contiguous and not np.shares_memory(out, buffer_of(msg))
    # copy=False: a view for rgb8 (padded rows stay strided), the same copy for the others.
    uncopied = rgb_from_image(msg, copy=False)
    np.testing.assert_array_equal(uncopied, rgb)
    assert np.shares_memory(uncopied, buffer_of(msg)) == (encoding == "rgb8")


def test_depth_from_image_units():
    depth = random_array((4, 5), np.uint16)
    for encoding in ("16UC1", "mono16"):
        array, scale = depth_from_image(wire(array_to_image(depth, encoding)))
        np.testing.assert_array_equal(array, depth)
        assert scale == 0.001
    metres = depth.astype(np.float32) * np.float32(0.001)
    array, scale = depth_from_image(wire(array_to_image(metres, "32FC1")))
    np.testing.assert_array_equal(array, metres)
    assert scale == 1.0
    with pytest.raises(InputError, match="depth image encoding 'rgb8'.*16UC1.*32FC1"):
        depth_from_image(array_to_image(random_array((4, 5, 3), np.uint8), "rgb8"))


def test_malformed_images_raise_input_error_saying_what_is_wrong():
    good = array_to_image(random_array((48, 64), np.uint16), "16UC1")
    truncated = Image(height=48, width=64, encoding="16UC1", step=128, data=bytes(1000))
    with pytest.raises(InputError, match=r"data length 1000 != step 128 x height 48 \(6144\)"):
        image_to_array(truncated)
    for encoding in ("yuv422", "bayer_rggb8", "32UC1", "rgb9"):
        bad = Image(height=48, width=64, encoding=encoding, step=128, data=good.data)
        with pytest.raises(InputError, match=f"unsupported image encoding '{encoding}'.*rgb8"):
            image_to_array(bad)
    narrow = Image(height=48, width=64, encoding="16UC1", step=100, data=bytes(4800))
    with pytest.raises(InputError, match="step 100 < width 64"):
        image_to_array(narrow)
    for height, width in ((0, 64), (48, 0)):
        empty = Image(height=height, width=width, encoding="16UC1", step=128, data=b"")
        with pytest.raises(InputError, match="empty"):
            image_to_array(empty)
    with pytest.raises(InputError, match=r"shape \(4, 5\) cannot be encoded as rgb8.*\(H, W, 3\)"):
        array_to_image(np.zeros((4, 5), np.uint8), "rgb8")
    with pytest.raises(InputError, match="dtype int64 does not match uint8"):
        array_to_image(np.zeros((4, 5), np.int64), "mono8")
    with pytest.raises(InputError, match="dtype uint16 does not match float32"):
        array_to_image(np.zeros((4, 5), np.uint16), "32FC1")  # millimetres are not metres
    with pytest.raises(InputError, match="step 9 is smaller than one 32FC1 row"):
        array_to_image(np.zeros((4, 5), np.float32), "32FC1", step=9)
    with pytest.raises(InputError, match="empty"):
        array_to_image(np.zeros((0, 5), np.float32), "32FC1")
    with pytest.raises(InputError, match="cannot read image encoding '16UC1' as RGB"):
        rgb_from_image(good)


# ---------------------------------------------------------------------------------------------
# PointCloud2
# ---------------------------------------------------------------------------------------------

POINT_TYPES = {np.dtype(np.int8): 1, np.dtype(np.uint8): 2, np.dtype(np.int16): 3,
               np.dtype(np.uint16): 4, np.dtype(np.int32): 5, np.dtype(np.uint32): 6,
               np.dtype(np.float32): 7, np.dtype(np.float64): 8}


def hand_made_cloud(columns, offsets, point_step, height, width, row_padding=0,
                    big_endian=False):
    """A PointCloud2 with the given field order/offsets, laid out by this test.

    columns: name -> (height, width) array, in the order the PointFields are listed.
    """
    order = ">" if big_endian else "<"
    names = list(columns)
    dtype = np.dtype({"names": names,
                      "formats": [columns[n].dtype.newbyteorder(order) for n in names],
                      "offsets": [offsets[n] for n in names], "itemsize": point_step})
    points = np.zeros((height, width), dtype=dtype)
    for name in names:
        points[name] = columns[name]
    row_step = width * point_step + row_padding
    data = np.full((height, row_step), 0xCD, dtype=np.uint8)
    data[:, :width * point_step] = points.view(np.uint8).reshape(height, -1)
    fields = [PointField(name=n, offset=offsets[n], datatype=POINT_TYPES[columns[n].dtype],
                         count=1) for n in names]
    return PointCloud2(height=height, width=width, fields=fields, is_bigendian=big_endian,
                       point_step=point_step, row_step=row_step, is_dense=False,
                       data=data.tobytes())


@pytest.fixture
def cloud_columns():
    height, width = 4, 6
    xyz = RNG.standard_normal((height, width, 3)).astype(np.float32)
    xyz[1, 2] = np.nan  # an invalid point of an organised cloud
    rgb = random_array((height, width, 3), np.uint8)
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) \
        | rgb[..., 2]
    columns = {  # shuffled order, mixed types, gaps between fields
        "intensity": random_array((height, width), np.uint16),
        "rgb": packed.view(np.float32),
        "z": xyz[..., 2].astype(np.float64),
        "ring": random_array((height, width), np.int8),
        "x": xyz[..., 0], "y": xyz[..., 1],
    }
    offsets = {"intensity": 0, "rgb": 4, "z": 8, "ring": 17, "x": 20, "y": 28}
    return columns, offsets, xyz, rgb


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("row_padding", [0, 7])
def test_cloud_with_shuffled_fields_and_padding(cloud_columns, big_endian, row_padding):
    columns, offsets, xyz, rgb = cloud_columns
    msg = wire(hand_made_cloud(columns, offsets, 40, 4, 6, row_padding, big_endian))
    out = pointcloud2_to_xyz(msg)
    assert out.shape == (4, 6, 3) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, xyz)  # NaN point kept in place (equal_nan by default)
    assert np.isnan(out[1, 2]).all() and np.isfinite(np.delete(out.reshape(-1, 3), 8, 0)).all()
    flat = pointcloud2_to_xyz(msg, organised=False)
    np.testing.assert_array_equal(flat, xyz.reshape(-1, 3))

    fields = pointcloud2_fields(msg, ["intensity", "ring", "rgb"])
    np.testing.assert_array_equal(fields["intensity"], columns["intensity"])
    np.testing.assert_array_equal(fields["ring"], columns["ring"])
    assert all(values.dtype.isnative for values in fields.values())
    assert np.shares_memory(fields["ring"], buffer_of(msg))  # 1-byte fields: always a view
    assert np.shares_memory(fields["intensity"], buffer_of(msg)) != big_endian
    np.testing.assert_array_equal(unpack_rgb(fields["rgb"]), rgb)
    np.testing.assert_array_equal(pointcloud2_to_rgb(msg), rgb)
    np.testing.assert_array_equal(pointcloud2_to_rgb(msg, organised=False), rgb.reshape(-1, 3))

    structured = pointcloud2_to_array(msg)
    assert structured.shape == (4, 6) and structured.dtype.itemsize == 40
    assert structured.dtype.names == ("intensity", "rgb", "z", "ring", "x", "y")
    assert all(structured.dtype[name].isnative for name in structured.dtype.names)
    np.testing.assert_array_equal(structured["z"], columns["z"])
    assert np.shares_memory(structured, buffer_of(msg)) != big_endian


def test_unorganised_cloud_and_preallocated_output():
    points = RNG.standard_normal((50, 3)).astype(np.float32)
    points[[3, 17]] = np.nan
    msg = wire(xyz_to_pointcloud2(points))
    assert (msg.height, msg.width) == (1, 50)
    out = np.empty((50, 3), np.float32)
    assert pointcloud2_to_xyz(msg, organised=False, out=out) is out
    np.testing.assert_array_equal(out, points)
    assert pointcloud2_to_xyz(msg).shape == (1, 50, 3)
    with pytest.raises(InputError, match=r"out must be a C-contiguous float32 array of shape"):
        pointcloud2_to_xyz(msg, organised=False, out=np.empty((50, 3), np.float64))


def test_multi_count_field_becomes_a_trailing_axis():
    normals = RNG.standard_normal((2, 3, 3)).astype(np.float32)
    xyz = RNG.standard_normal((2, 3, 3)).astype(np.float32)
    raw = np.zeros((2, 3), np.dtype({"names": ["xyz", "n"], "formats": [("<f4", 3), ("<f4", 3)],
                                     "offsets": [0, 16], "itemsize": 32}))
    raw["xyz"], raw["n"] = xyz, normals
    fields = [PointField(name=name, offset=offset, datatype=PointField.FLOAT32, count=1)
              for name, offset in (("x", 0), ("y", 4), ("z", 8))]
    fields.append(PointField(name="normal", offset=16, datatype=PointField.FLOAT32, count=3))
    msg = PointCloud2(height=2, width=3, fields=fields, point_step=32, row_step=96,
                      data=raw.tobytes())
    np.testing.assert_array_equal(pointcloud2_fields(msg, ["normal"])["normal"], normals)
    np.testing.assert_array_equal(pointcloud2_to_xyz(msg), xyz)


def test_xyz_to_pointcloud2_layout_is_pcl_compatible():
    xyz = RNG.standard_normal((3, 5, 3)).astype(np.float32)
    msg = wire(xyz_to_pointcloud2(xyz, Header(frame_id="cam")))
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (3, 5, 16, 80)
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1)]
    assert msg.is_dense and msg.header.frame_id == "cam" and len(msg.data) == 240
    # Row-major by image row (v), not the (width, height) swap of ros2/common_interfaces#236.
    v, u = 2, 1
    raw = buffer_of(msg)[v * msg.row_step + u * 16:][:12].view(np.float32)
    np.testing.assert_array_equal(raw, xyz[v, u])

    xyz[0, 0, 1] = np.nan
    rgb = random_array((3, 5, 3), np.uint8)
    score = RNG.random((3, 5), dtype=np.float32)
    label = random_array((3, 5), np.uint16)
    msg = wire(xyz_to_pointcloud2(xyz, rgb=rgb, fields={"score": score, "label": label}))
    assert not msg.is_dense and msg.point_step == 32 and msg.row_step == 160
    assert [(f.name, f.offset, f.datatype) for f in msg.fields] == [
        ("x", 0, 7), ("y", 4, 7), ("z", 8, 7), ("rgb", 16, 7), ("score", 20, 7),
        ("label", 24, 4)]
    np.testing.assert_array_equal(pointcloud2_to_xyz(msg), xyz)
    np.testing.assert_array_equal(pointcloud2_to_rgb(msg), rgb)
    fields = pointcloud2_fields(msg, ["score", "label"], organised=False)
    np.testing.assert_array_equal(fields["score"], score.ravel())
    np.testing.assert_array_equal(fields["label"], label.ravel())
    score_only = xyz_to_pointcloud2(xyz, fields={"score": score})
    assert score_only.point_step == 32 and score_only.fields[3].offset == 16  # PointXYZI layout


def test_pack_and_unpack_rgb():
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [1, 2, 3]], np.uint8)
    packed = pack_rgb(rgb)
    assert packed.dtype == np.float32
    assert packed.view(np.uint32).tolist() == [0xFF0000, 0x00FF00, 0x0000FF, 0xFFFFFF, 0x010203]
    np.testing.assert_array_equal(unpack_rgb(packed), rgb)
    np.testing.assert_array_equal(unpack_rgb(packed.view(np.uint32).astype(">u4")), rgb)
    with pytest.raises(InputError, match="packed rgb must be a 4-byte"):
        unpack_rgb(np.zeros(3, np.float64))


def _xyz_fields(**overrides):
    fields = {"x": (0, PointField.FLOAT32, 1), "y": (4, PointField.FLOAT32, 1),
              "z": (8, PointField.FLOAT32, 1)}
    fields.update(overrides)
    return [PointField(name=n, offset=o, datatype=d, count=c)
            for n, (o, d, c) in fields.items() if o is not None]


def _cloud(fields, height=2, width=3, point_step=16, row_step=None, nbytes=None):
    row_step = width * point_step if row_step is None else row_step
    nbytes = row_step * height if nbytes is None else nbytes
    return PointCloud2(height=height, width=width, fields=fields, point_step=point_step,
                       row_step=row_step, data=bytes(nbytes))


@pytest.mark.parametrize("message,words", [
    (_cloud(_xyz_fields(z=(None, 0, 0))), r"no 'z' field \(fields: x, y\)"),
    (_cloud(_xyz_fields(), nbytes=90), r"data length 90 != row_step 48 x height 2 \(96\)"),
    (_cloud(_xyz_fields(), point_step=8, row_step=24),
     r"point_step 8 is smaller than field 'z' \(offset 8 \+ 4 bytes x count 1 = 12\)"),
    (_cloud(_xyz_fields(), width=0), "PointCloud2 is empty"),
    (_cloud(_xyz_fields(), height=0), "PointCloud2 is empty"),
    (_cloud(_xyz_fields(intensity=(12, 9, 1))), "field 'intensity' has unknown datatype 9"),
    (_cloud(_xyz_fields(intensity=(12, PointField.FLOAT32, 0))),
     "field 'intensity' has count 0"),
    (_cloud(_xyz_fields(x=(0, PointField.FLOAT32, 2))), "field 'x' has count 2"),
    (_cloud(_xyz_fields(), row_step=40), r"row_step 40 < width 3 x point_step 16"),
    (_cloud(_xyz_fields(), point_step=0, row_step=0), "point_step is 0"),
    (_cloud(_xyz_fields() + _xyz_fields()[:1]), "field 'x' appears twice"),
])
def test_malformed_clouds_raise_input_error_saying_what_is_wrong(message, words):
    with pytest.raises(InputError, match=words):
        pointcloud2_to_xyz(message)


def test_malformed_cloud_inputs_to_the_writer():
    with pytest.raises(InputError, match=r"xyz must be \(H, W, 3\) or \(N, 3\)"):
        xyz_to_pointcloud2(np.zeros((4, 2), np.float32))
    with pytest.raises(InputError, match="float array in metres"):
        xyz_to_pointcloud2(np.zeros((4, 3), np.int32))
    with pytest.raises(InputError, match="empty"):
        xyz_to_pointcloud2(np.zeros((0, 3), np.float32))
    with pytest.raises(InputError, match=r"field 'score' has shape \(3,\); it must be \(4,\)"):
        xyz_to_pointcloud2(np.zeros((4, 3), np.float32), fields={"score": np.zeros(3)})
    with pytest.raises(InputError, match="reserved"):
        xyz_to_pointcloud2(np.zeros((4, 3), np.float32), fields={"z": np.zeros(4)})
    with pytest.raises(InputError, match="extra field 'flag' has dtype bool"):
        xyz_to_pointcloud2(np.zeros((4, 3), np.float32), fields={"flag": np.zeros(4, bool)})
    with pytest.raises(InputError, match="no 'rgb' field"):
        pointcloud2_to_rgb(xyz_to_pointcloud2(np.zeros((4, 3), np.float32)))


# ---------------------------------------------------------------------------------------------
# Real data: the Kinect RGB-D frame
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kinect():
    rgb = tifffile.imread(next(KINECT.glob("*_rgb.tiff")))
    depth = tifffile.imread(next(KINECT.glob("*_depth.tiff")))
    return rgb, depth


def kinect_camera_info(frame_id="kinect_rgb_optical_frame", d=(0.0,) * 5, p_scale=1.0):
    info = CameraInfo(header=Header(frame_id=frame_id), width=640, height=480,
                      distortion_model="plumb_bob", d=list(d))
    info.k = np.array([525.0, 0, 320, 0, 525, 240, 0, 0, 1])
    info.p = np.array([525.0 * p_scale, 0, 320, 0, 0, 525 * p_scale, 240, 0, 0, 0, 1, 0])
    return info


def test_kinect_images_convert_bit_exactly(kinect):
    rgb, depth = kinect
    assert rgb.shape == (480, 640, 3) and depth.dtype == np.uint16
    header = Header(frame_id="kinect_rgb_optical_frame")
    rgb_msg = wire(array_to_image(rgb, "rgb8", header))
    np.testing.assert_array_equal(image_to_array(rgb_msg), rgb)
    np.testing.assert_array_equal(rgb_from_image(rgb_msg), rgb)
    bgr_msg = wire(array_to_image(rgb[..., ::-1], "bgr8", header))  # a strided input
    np.testing.assert_array_equal(rgb_from_image(bgr_msg), rgb)

    depth_msg = wire(array_to_image(depth, "16UC1", header))
    array, scale = depth_from_image(depth_msg)
    np.testing.assert_array_equal(array, depth)
    assert scale == 0.001 and np.shares_memory(array, buffer_of(depth_msg))
    metres = np.where(depth > 0, depth * np.float32(0.001), np.float32(np.nan)).astype(np.float32)
    array, scale = depth_from_image(wire(array_to_image(metres, "32FC1", header)))
    np.testing.assert_array_equal(array.view(np.uint32), metres.view(np.uint32))


@pytest.fixture(scope="module")
def kinect_pcd():
    cloud = o3d.t.io.read_point_cloud(str(next(KINECT.glob("*.pcd"))), remove_nan_points=False)
    xyz = cloud.point.positions.numpy().reshape(480, 640, 3)
    colours = cloud.point.colors.numpy().reshape(480, 640, 3)
    return xyz, colours


def test_kinect_pcd_round_trips_through_pointcloud2(kinect_pcd, kinect):
    xyz, colours = kinect_pcd
    assert np.isnan(xyz).any()  # the organised OpenNI cloud keeps invalid pixels
    msg = wire(xyz_to_pointcloud2(xyz, Header(frame_id="kinect"), rgb=colours))
    assert (msg.height, msg.width, msg.point_step) == (480, 640, 32) and not msg.is_dense
    np.testing.assert_array_equal(pointcloud2_to_xyz(msg), xyz)
    np.testing.assert_array_equal(pointcloud2_to_rgb(msg), colours)
    np.testing.assert_array_equal(pointcloud2_to_rgb(msg), kinect[0])  # registered colour

    # The whole depth path (Image + CameraInfo -> xyz) reproduces the driver's cloud.
    depth_msg = wire(array_to_image(kinect[1], "16UC1"))
    depth, scale = depth_from_image(depth_msg)
    intrinsics = camera_info_to_intrinsics(wire(kinect_camera_info()))
    projected = depth_to_xyz(depth, intrinsics, depth_scale=scale)
    np.testing.assert_array_equal(np.isnan(projected), np.isnan(xyz))
    np.testing.assert_allclose(projected, xyz, rtol=2e-7, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# CameraInfo
# ---------------------------------------------------------------------------------------------

def test_camera_info_uses_p_for_rectified_and_k_for_raw_images():
    info = wire(kinect_camera_info(p_scale=0.5))
    rect = camera_info_to_intrinsics(info)
    assert isinstance(rect, CameraIntrinsics)
    assert (rect.fx, rect.fy, rect.cx, rect.cy, rect.width, rect.height) == (
        262.5, 262.5, 320.0, 240.0, 640, 480)
    raw = camera_info_to_intrinsics(info, rectified=False)
    assert (raw.fx, raw.fy, raw.cx, raw.cy) == (525.0, 525.0, 320.0, 240.0)
    info.p = np.zeros(12)  # no rectified projection published: fall back to K
    assert camera_info_to_intrinsics(info).fx == 525.0


def test_camera_info_binning_and_roi_follow_image_geometry():
    info = kinect_camera_info()
    info.binning_x = info.binning_y = 2
    binned = camera_info_to_intrinsics(info)
    assert (binned.fx, binned.cx, binned.width, binned.height) == (262.5, 160.0, 320, 240)
    info.binning_x = info.binning_y = 0
    info.roi.x_offset, info.roi.y_offset, info.roi.width, info.roi.height = 100, 40, 200, 100
    roi = camera_info_to_intrinsics(info)
    assert (roi.fx, roi.cx, roi.cy, roi.width, roi.height) == (525.0, 220.0, 200.0, 200, 100)


def test_uncalibrated_or_sizeless_camera_info_raises():
    info = kinect_camera_info()
    info.k, info.p = np.zeros(9), np.zeros(12)
    with pytest.raises(InputError, match="zero focal length: the camera is not calibrated"):
        camera_info_to_intrinsics(info)
    with pytest.raises(InputError, match="zero focal length"):
        camera_info_to_intrinsics(info, rectified=False)
    info = kinect_camera_info()
    info.width = 0
    with pytest.raises(InputError, match="image size 0x480"):
        camera_info_to_intrinsics(info)
    info = kinect_camera_info()
    info.k[0] = -525.0
    with pytest.raises(InputError, match="invalid intrinsics fx=-525"):
        camera_info_to_intrinsics(info, rectified=False)


def test_distortion_warning_is_logged_once_per_frame_and_model(caplog):
    caplog.set_level(logging.WARNING, logger="mafr_ros.conversions")
    distorted = wire(kinect_camera_info("warn_test_cam_a", d=(0.1, -0.2, 0.0, 0.0, 0.0)))
    for _ in range(3):
        camera_info_to_intrinsics(distorted, rectified=False)
    camera_info_to_intrinsics(distorted, rectified=True)  # P on a rectified image: no warning
    records = [r for r in caplog.records if r.name == "mafr_ros.conversions"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "warn_test_cam_a" in records[0].getMessage()
    assert "image_rect" in records[0].getMessage()

    other = wire(kinect_camera_info("warn_test_cam_b", d=(0.1, 0, 0, 0, 0)))
    camera_info_to_intrinsics(other, rectified=False)
    camera_info_to_intrinsics(wire(kinect_camera_info("warn_test_cam_c")), rectified=False)
    records = [r for r in caplog.records if r.name == "mafr_ros.conversions"]
    assert [("warn_test_cam_b" in r.getMessage()) for r in records] == [False, True]


def test_stamp_written_into_serialised_images_reads_back():
    """The test camera's pre-serialised publishing (test/procs/node_camera.py): the stamp is
    written into the CDR bytes of an already serialised Image / CameraInfo and nothing else
    changes."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent / "procs"))
    from node_camera import _with_stamp

    from builtin_interfaces.msg import Time

    for msg in (array_to_image(random_array((3, 4, 3), np.uint8), "rgb8",
                               Header(frame_id="camera_color_optical_frame")),
                array_to_image(random_array((5, 2), np.uint16), "16UC1", Header(frame_id="f")),
                CameraInfo(header=Header(frame_id="odd-length id"), width=4, height=3)):
        stamp = Time(sec=1_764_615_600, nanosec=987_654_321)
        read = deserialize_message(_with_stamp(bytearray(serialize_message(msg)), stamp),
                                   type(msg))
        assert (read.header.stamp.sec, read.header.stamp.nanosec) == (stamp.sec, stamp.nanosec)
        msg.header.stamp = stamp
        assert read == msg
    with pytest.raises(ValueError, match="little-endian"):
        _with_stamp(bytearray(b"\x00\x00\x00\x00" + bytes(8)), Time())


# -- serialised (CDR) views of Image and PointCloud2 ---------------------------------------------
from mafr_ros.ros.conversions import CdrImage, CdrPointCloud2  # noqa: E402


def _stamped(sec=1_700_000_000, nanosec=123_456_789, frame="camera_color_optical_frame"):
    header = Header(frame_id=frame)
    header.stamp.sec, header.stamp.nanosec = sec, nanosec
    return header


def _same_image_fields(view, msg):
    assert (view.header.stamp.sec, view.header.stamp.nanosec, view.header.frame_id) == \
        (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id)
    assert (view.height, view.width, view.encoding, view.is_bigendian, view.step) == \
        (msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step)
    assert bytes(view.data) == bytes(msg.data)


@pytest.mark.parametrize("encoding,dtype,channels,pad", [
    ("rgb8", np.uint8, 3, 0), ("bgr8", np.uint8, 3, 5), ("mono8", np.uint8, 1, 3),
    ("16UC1", np.uint16, 1, 0), ("16UC1", np.uint16, 1, 6), ("32FC1", np.float32, 1, 4),
    ("32FC1", np.float32, 1, 0)])
def test_cdr_image_view_reads_what_rclpy_deserialises(encoding, dtype, channels, pad):
    # Odd sizes and row padding (step > width x bpp), frame ids of every length mod 4 (they move
    # the alignment of every later field).
    height, width = 7, 13
    shape = (height, width) if channels == 1 else (height, width, channels)
    pixels = random_array(shape, dtype)
    row = width * channels * np.dtype(dtype).itemsize
    for frame in ("c", "ca", "cam", "cam0", ""):
        msg = array_to_image(pixels, encoding, _stamped(frame=frame), step=row + pad)
        blob = serialize_message(msg)
        view, expected = CdrImage(blob), deserialize_message(blob, Image)
        _same_image_fields(view, expected)
        np.testing.assert_array_equal(image_to_array(view), image_to_array(expected))
        np.testing.assert_array_equal(image_to_array(view), pixels)
    if encoding in ("rgb8", "bgr8", "mono8"):
        np.testing.assert_array_equal(rgb_from_image(view), rgb_from_image(expected))
    else:
        depth, scale = depth_from_image(view)
        np.testing.assert_array_equal(depth, depth_from_image(expected)[0])
        assert scale == depth_from_image(expected)[1]


def test_cdr_image_view_keeps_a_big_endian_payload_and_reads_big_endian_cdr():
    import array
    import struct

    depth = RNG.integers(1, 60000, (5, 9)).astype(np.uint16)
    msg = array_to_image(depth, "16UC1", _stamped(nanosec=7))
    msg.data = array.array("B", depth.astype(">u2").tobytes())  # a big-endian camera's payload
    msg.is_bigendian = 1
    view = CdrImage(serialize_message(msg))
    assert view.is_bigendian == 1 and view.data.nbytes == depth.nbytes
    np.testing.assert_array_equal(image_to_array(view), depth)
    # The same image written by a big-endian CDR writer (encapsulation 0x0000), by hand.
    frame = b"cam\0"
    body = struct.pack(">iI", -5, 7) + struct.pack(">I", len(frame)) + frame \
        + struct.pack(">II", 5, 9) + struct.pack(">I", 6) + b"16UC1\0"
    body += b"\1" + b"\0" * ((-(len(body) + 1)) % 4) + struct.pack(">I", 18)
    payload = depth.astype(">u2").tobytes()
    body += struct.pack(">I", len(payload)) + payload
    view = CdrImage(b"\0\0\0\0" + body)
    assert (view.header.stamp.sec, view.header.stamp.nanosec, view.header.frame_id) == \
        (-5, 7, "cam")
    assert (view.height, view.width, view.encoding, view.step) == (5, 9, "16UC1", 18)
    np.testing.assert_array_equal(image_to_array(view), depth)


def test_cdr_views_refuse_truncated_or_foreign_buffers_clearly():
    blob = serialize_message(array_to_image(random_array((4, 6, 3), np.uint8), "rgb8", _stamped()))
    for cut in (0, 3, 10, 30, len(blob) - 1):
        with pytest.raises(InputError, match="truncated"):
            CdrImage(blob[:cut])
    with pytest.raises(InputError, match="encapsulation"):
        CdrImage(b"\x00\x07" + blob[2:])  # XCDR2
    with pytest.raises(InputError, match="bytes-like"):
        CdrImage(12)
    cloud = serialize_message(xyz_to_pointcloud2(random_array((3, 4, 3), np.float32), _stamped()))
    for cut in (8, 40, len(cloud) - 20, len(cloud) - 1):
        with pytest.raises(InputError, match="truncated|corrupt"):
            CdrPointCloud2(cloud[:cut])
    # A data length that disagrees with step x height passes the CDR view (it is a valid
    # message) and is refused by the image reader, as for a deserialised message.
    short = array_to_image(random_array((4, 6, 3), np.uint8), "rgb8", _stamped())
    short.data = short.data[:-6]
    with pytest.raises(InputError, match="truncated or its step"):
        image_to_array(CdrImage(serialize_message(short)))


@pytest.mark.parametrize("organised", [True, False])
def test_cdr_pointcloud2_view_reads_what_rclpy_deserialises(organised):
    xyz = random_array((6, 5, 3), np.float32)
    xyz[0, 0] = np.nan
    intensity = random_array((6, 5), np.float32)
    points = xyz if organised else xyz.reshape(1, -1, 3)
    cloud = xyz_to_pointcloud2(points, _stamped(frame="lidar"),
                               fields={"intensity": intensity.reshape(points.shape[:2])})
    blob = serialize_message(cloud)
    view, expected = CdrPointCloud2(blob), deserialize_message(blob, PointCloud2)
    assert (view.height, view.width, view.point_step, view.row_step, view.is_bigendian,
            view.is_dense) == (expected.height, expected.width, expected.point_step,
                               expected.row_step, expected.is_bigendian, expected.is_dense)
    assert [(f.name, f.offset, f.datatype, f.count) for f in view.fields] == \
        [(f.name, f.offset, f.datatype, f.count) for f in expected.fields]
    assert view.header.frame_id == "lidar" and bytes(view.data) == bytes(expected.data)
    np.testing.assert_array_equal(pointcloud2_to_xyz(view, organised=organised),
                                  pointcloud2_to_xyz(expected, organised=organised))
    got, want = pointcloud2_to_array(view), pointcloud2_to_array(expected)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()  # NaN != NaN field-wise
