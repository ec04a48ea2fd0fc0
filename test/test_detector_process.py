"""DetectorProcess: the Detector in a child process gives exactly the in-process results, reports
load errors with their own type, survives a killed child and leaves nothing in /dev/shm."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from mafr_ros.core.detector import Detector, default_model_path
from mafr_ros.core.detector_process import DetectorCrashed, DetectorProcess
from mafr_ros.data.mvtec import MVTecDataset
from mafr_ros.errors import CheckpointError, InputError
from mafr_ros.geometry import CameraIntrinsics, depth_to_xyz

KINECT_STEM = "frame_20121214T142255.814212"
_OPENBLAS_ENV = os.environ.get("OPENBLAS_NUM_THREADS")
_OPENBLAS_AT_IMPORT = _OPENBLAS_ENV or "1"  # what the child gets: the user's value, else 1
KINECT = CameraIntrinsics(fx=525.0, fy=525.0, cx=320.0, cy=240.0, width=640, height=480)


def _shm_names() -> set:
    return {p.name for p in Path("/dev/shm").iterdir()}


@pytest.fixture(scope="module")
def frames(cable_gland, kinect_dir):
    sample = MVTecDataset(cable_gland.parent, "cable_gland", "test")[0]
    rgb_k = tifffile.imread(kinect_dir / f"{KINECT_STEM}_rgb.tiff")
    depth = tifffile.imread(kinect_dir / f"{KINECT_STEM}_depth.tiff")
    return [(sample.rgb, sample.xyz.astype(np.float32)),
            (np.ascontiguousarray(rgb_k[..., :3]), depth_to_xyz(depth, KINECT))]


@pytest.fixture(scope="module")
def shm_before():
    return _shm_names()


@pytest.fixture(scope="module")
def child(shm_before):
    process = DetectorProcess(default_model_path(), device="cpu")
    yield process
    process.close()


def _assert_same(a, b):
    for name in ("anomaly_map", "normalized_map", "grid_map"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert (a.score, a.normalized_score, a.is_anomalous, a.valid_fraction) == \
        (b.score, b.normalized_score, b.is_anomalous, b.valid_fraction)


def test_identical_detections_and_zero_copy_buffers(child, frames):
    local = Detector.from_checkpoint(default_model_path(), device="cpu")
    local.warmup()
    assert (child.model_id, child.device, child.thresholds) == \
        (local.model_id, str(local.device), local.thresholds)
    for rgb, xyz in frames:
        expected = local.detect(rgb, xyz)
        _assert_same(child.detect(rgb, xyz), expected)  # inputs copied into shared memory
        rgb_buf, xyz_buf = child.input_buffers(*rgb.shape[:2])
        rgb_buf[:] = rgb
        xyz_buf[:] = xyz
        got = child.detect(rgb_buf, xyz_buf)  # filled in place: no copy
        _assert_same(got, expected)
        assert got.anomaly_map.shape == rgb.shape[:2]
    # Threshold overrides travel with each request.
    raised = type(child.thresholds)(**{**child.thresholds.__dict__,
                                       "image": child.thresholds.image * 10})
    child.thresholds = local.thresholds = raised
    _assert_same(child.detect(*frames[0]), local.detect(*frames[0]))


def test_only_the_requested_maps_cross_over_and_normalized_out_is_written_in_place(child, frames):
    local = Detector.from_checkpoint(default_model_path(), device="cpu")
    rgb, xyz = frames[1]
    expected = local.detect(rgb, xyz)
    into = np.full(rgb.shape[:2], -1.0, np.float32)
    direct = local.detect(rgb, xyz, normalized_out=into)
    assert direct.normalized_map is into and np.array_equal(into, expected.normalized_map)
    assert np.array_equal(direct.anomaly_map, expected.anomaly_map)
    with pytest.raises(InputError, match="normalized_out"):
        local.detect(rgb, xyz, normalized_out=np.zeros((4, 4), np.float32))
    got = child.detect(rgb, xyz, maps=("normalized_map",))
    assert got.anomaly_map is None and got.grid_map is None
    assert np.array_equal(got.normalized_map, expected.normalized_map)
    assert got.score == expected.score and got.valid_fraction == expected.valid_fraction
    with pytest.raises(ValueError, match="unknown maps"):
        child.detect(rgb, xyz, maps=("heatmap",))


def test_child_is_idle_between_frames_with_one_openblas_thread(child, frames):
    # numpy's OpenBLAS worker threads polled after every BLAS call in the child, right when the
    # node does its own work (see CHILD_ENVIRONMENT): one thread there, and no CPU between frames.
    environ = dict(item.split(b"=", 1) for item in
                   Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    assert environ[b"OPENBLAS_NUM_THREADS"] == _OPENBLAS_AT_IMPORT.encode()
    assert os.environ.get("OPENBLAS_NUM_THREADS") == _OPENBLAS_ENV  # the parent's is unchanged

    def child_cpu_ns():
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{child.pid}/task").iterdir())

    child.detect(*frames[1], maps=("normalized_map",))
    before = child_cpu_ns()
    time.sleep(0.3)
    assert (child_cpu_ns() - before) / 1e6 < 5.0  # ms; a polling BLAS thread took 20-80


def test_bad_input_keeps_its_type(child):
    with pytest.raises(InputError):
        child.detect(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.float32))


def test_killed_child_fails_the_frame_and_is_restarted(child, frames):
    old_pid = child.pid
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(DetectorCrashed, match="died on this frame.*restarted"):
        child.detect(*frames[0])
    assert child.pid != old_pid and child.restarts == 1
    child.detect(*frames[0])  # answers the next frame


def test_load_errors_reach_the_parent_with_their_type(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint" * 20)
    with pytest.raises(CheckpointError, match=str(garbage)):
        DetectorProcess(garbage, device="cpu")
    if not torch.cuda.is_available():  # the child sees the same machine
        with pytest.raises(InputError, match="no CUDA GPU"):
            DetectorProcess(default_model_path(), device="cuda")


def test_no_shared_memory_left_after_close(child, frames, shm_before):
    child.detect(*frames[1])
    child.detect(*frames[0])  # another size: buffers re-created, the old ones unlinked
    child.close()
    assert _shm_names() - shm_before == set()
    assert child.pid is None


def test_child_and_shared_memory_go_when_the_parent_is_killed():
    shm_before = _shm_names()
    script = ("import sys, time\n"
              "from mafr_ros.core.detector_process import DetectorProcess\n"
              "from mafr_ros.core.detector import default_model_path\n"
              "d = DetectorProcess(default_model_path(), device='cpu')\n"
              "d.input_buffers(48, 64)\n"
              "print(d.pid, flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        child_pid = int(parent.stdout.readline())
        assert _shm_names() - shm_before  # the buffers exist while the parent lives
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child_pid), "the detector process outlived its parent"
    while _shm_names() - shm_before and time.monotonic() < deadline:  # the resource tracker
        time.sleep(0.1)
    assert _shm_names() - shm_before == set()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
