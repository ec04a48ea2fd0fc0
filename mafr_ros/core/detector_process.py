"""The Detector in a child process of its own, with frames passed through shared memory.

Why: parts of the detector can hold the GIL for a whole call (Open3D's FPFH, an option of the
lite 3D extractor and its default before descriptor version 2: 70-250 ms). In a thread of the ROS node that stalls the executor, and DDS overwrites messages in
its KEEP_LAST history meanwhile. In a child process the node's interpreter never waits for it.

Data path per frame, without copies across the process boundary: the caller writes the inputs
(rgb uint8 HxWx3, xyz float32 HxWx3) straight into shared-memory buffers (``input_buffers``), the
child reads them in place, runs ``Detector.detect`` with the normalised map computed straight
into its shared-memory output, and copies the other maps there only when the caller asks for them
(the node reads the normalised map alone: ``maps=("normalized_map",)`` saves 2.6 MB of copies per
640x480 frame); the parent returns views of those (valid until the next ``detect``). Only small
values (scores, timings, thresholds) go over the pipe. The parent owns (creates and unlinks) every
segment, so a crashed child leaks nothing; a new child attaches to the same segments.

The child exits when the parent asks it to, or when the pipe reaches EOF (the parent died).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import traceback
from multiprocessing import shared_memory

import numpy as np

from ..errors import CheckpointError, DatasetError, InputError, MafrError

__all__ = ["DetectorProcess", "DetectorCrashed", "MAPS"]

#: The maps of a Detection, in the order of the shared-memory outputs.
MAPS = ("anomaly_map", "normalized_map", "grid_map")

#: Exception types that cross the process boundary as themselves (the child's message kept).
_PASSED_ERRORS = {cls.__name__: cls for cls in (CheckpointError, InputError, DatasetError,
                                                MafrError, FileNotFoundError, ValueError)}


#: Set in the child's environment at its start unless the user set them. numpy's OpenBLAS (used by
#: the child for small matmuls: map_to_input, plane fits) keeps a worker thread per extra core
#: that polls for a while after every BLAS call; in the child that is exactly when the node does
#: its post-detector work (regions, result), so on a 2-core machine the node's critical path
#: shared a core with a spinning thread: measured 4 ms of the child's CPU in the 5 ms after a
#: reply and 20-80 ms per 200 ms between frames, none with one OpenBLAS thread. torch's own
#: intra-op threads (OMP_NUM_THREADS, torch.set_num_threads) are not affected.
CHILD_ENVIRONMENT = {"OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def _child_environment(values: dict):
    """os.environ with ``values`` added (where not set) while the child is spawned: a spawned
    child inherits the environment of that moment, and OpenBLAS reads it when numpy loads."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class DetectorCrashed(MafrError):
    """The child process died (killed, out of memory, segfault) before answering a frame."""


class _Segment:
    """One shared-memory array, created by the parent, attached by the child."""

    def __init__(self, shape: tuple, dtype, name: str | None = None):
        nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        self.shm = shared_memory.SharedMemory(name=name, create=name is None, size=nbytes)
        self.array = np.ndarray(shape, dtype=dtype, buffer=self.shm.buf)
        self.spec = (self.shm.name, tuple(shape), np.dtype(dtype).str)

    def close(self, unlink: bool) -> None:
        del self.array
        try:
            self.shm.close()
        except BufferError:  # a caller still holds a view: the mapping goes when that view does
            pass
        if unlink:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


# -------------------------------------------------------------------------------------- child side
def _child_main(conn, checkpoint, device, backbone_weights, precision) -> None:
    try:
        from .detector import Detector
        detector = Detector.from_checkpoint(checkpoint, device=device,
                                            backbone_weights=backbone_weights, precision=precision)
        smoothed = detector.warmup()
        grid_shape = tuple(smoothed[0].shape[-2:])
    except BaseException as error:  # every load problem goes to the parent, typed
        conn.send(("error", type(error).__name__, str(error) or traceback.format_exc()))
        conn.close()
        return
    conn.send(("ready", {"model_id": detector.model_id, "device": str(detector.device),
                         "precision": detector.precision,
                         "thresholds": detector.thresholds, "metadata": detector.metadata,
                         "grid_shape": grid_shape}))
    attached: dict[str, _Segment] = {}

    def segment(spec) -> np.ndarray:
        name, shape, dtype = spec
        seg = attached.get(name)
        if seg is None:
            seg = attached[name] = _Segment(shape, dtype, name=name)
        return seg.array

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the parent is gone: nothing to answer any more
            break
        if request[0] == "close":
            break
        if request[0] == "forget":  # the parent re-created its buffers (new frame size)
            for name in request[1]:
                seg = attached.pop(name, None)
                if seg is not None:
                    seg.close(unlink=False)
            continue
        _, inputs, outputs, thresholds, wanted = request
        try:
            if detector.thresholds != thresholds:
                detector.thresholds = thresholds
            normalized_out = segment(outputs[1]) if "normalized_map" in wanted else None
            detection = detector.detect(segment(inputs[0]), segment(inputs[1]),
                                        normalized_out=normalized_out)
            if "anomaly_map" in wanted:
                np.copyto(segment(outputs[0]), detection.anomaly_map)
            if "grid_map" in wanted:
                np.copyto(segment(outputs[2]), detection.grid_map)
            reply = ("ok", detection.score, detection.normalized_score,
                     bool(detection.is_anomalous), detection.valid_fraction, detection.timings_ms)
        except Exception as error:
            reply = ("error", type(error).__name__, str(error) or traceback.format_exc())
        try:
            conn.send(reply)
        except (EOFError, OSError):
            break
    for seg in attached.values():
        seg.close(unlink=False)
    conn.close()


# ------------------------------------------------------------------------------------- parent side
def _raise_from_child(kind: str, message: str):
    raise _PASSED_ERRORS.get(kind, RuntimeError)(
        message if kind in _PASSED_ERRORS else f"{kind} in the detector process: {message}")


class DetectorProcess:
    """``Detector.from_checkpoint(checkpoint, device, backbone_weights, precision)`` + ``warmup()`` in a
    child process ('spawn': safe with CUDA). Load errors are raised here with the child's type
    and message. ``detect(rgb, xyz, maps)`` returns a Detection whose maps are views of shared
    memory, valid until the next call (the maps not in ``maps`` are None); inputs already in
    ``input_buffers`` are not copied."""

    def __init__(self, checkpoint, device: str = "auto", backbone_weights: dict | None = None,
                 precision: str = "auto"):
        self._args = (str(checkpoint), device, backbone_weights, precision)
        self._context = mp.get_context("spawn")
        self._process = None
        self._conn = None
        self._inputs: list[_Segment] = []
        self._outputs: list[_Segment] = []
        self.restarts = 0
        info = self._launch()
        self.model_id = info["model_id"]
        self.device = info["device"]
        self.precision = info["precision"]
        self.thresholds = info["thresholds"]
        self.metadata = info["metadata"]
        self.grid_shape = info["grid_shape"]

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _launch(self) -> dict:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(target=_child_main, args=(child_conn, *self._args),
                                        name="mafr_detector", daemon=True)
        with _child_environment(CHILD_ENVIRONMENT):
            process.start()
        child_conn.close()  # only the child holds that end now: its death is EOF here
        try:
            message = parent_conn.recv()
        except (EOFError, OSError):
            process.join(5)
            parent_conn.close()
            raise DetectorCrashed(f"the detector process died while loading {self._args[0]} "
                                  f"(exit code {process.exitcode})") from None
        if message[0] == "error":
            process.join(5)
            parent_conn.close()
            _raise_from_child(message[1], message[2])
        self._process, self._conn = process, parent_conn
        return message[1]

    # -- buffers --------------------------------------------------------------------------------
    def input_buffers(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(rgb uint8 (H,W,3), xyz float32 (H,W,3)) in shared memory for a frame of this size:
        fill them in place and pass them to ``detect`` to avoid any copy."""
        shape = (int(height), int(width), 3)
        if not self._inputs or self._inputs[0].array.shape != shape:
            self._release_buffers()
            self._inputs = [_Segment(shape, np.uint8), _Segment(shape, np.float32)]
            self._outputs = [_Segment(shape[:2], np.float32), _Segment(shape[:2], np.float32),
                             _Segment(self.grid_shape, np.float32)]
        return self._inputs[0].array, self._inputs[1].array

    def _release_buffers(self) -> None:
        segments = self._inputs + self._outputs
        if not segments:
            return
        if self._conn is not None:
            try:
                self._conn.send(("forget", [seg.spec[0] for seg in segments]))
            except (EOFError, OSError):
                pass
        for seg in segments:
            seg.close(unlink=True)
        self._inputs, self._outputs = [], []

    # -- frames ---------------------------------------------------------------------------------
    def detect(self, rgb: np.ndarray, xyz: np.ndarray, maps: tuple = MAPS) -> Detection:
        unknown = set(maps) - set(MAPS)
        if unknown:
            raise ValueError(f"unknown maps {sorted(unknown)}; a Detection has {', '.join(MAPS)}")
        if self._conn is None:  # a previous restart failed: try again now
            self._restart()
        if rgb.ndim != 3 or xyz.shape != rgb.shape:
            raise InputError(f"rgb {rgb.shape} and xyz {xyz.shape} must both be (H, W, 3)")
        rgb_buf, xyz_buf = self.input_buffers(rgb.shape[0], rgb.shape[1])
        if not _same_array(rgb, rgb_buf):
            np.copyto(rgb_buf, rgb, casting="unsafe")
        if not _same_array(xyz, xyz_buf):
            np.copyto(xyz_buf, xyz, casting="same_kind")
        request = ("detect", [s.spec for s in self._inputs], [s.spec for s in self._outputs],
                   self.thresholds, tuple(maps))
        try:
            self._conn.send(request)
            reply = self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            code = self._reap()
            try:
                self._restart()
                restarted = "restarted it"
            except Exception as error:  # retried on the next frame
                restarted = f"restarting it failed ({type(error).__name__}: {error})"
            raise DetectorCrashed(f"the detector process died on this frame (exit code "
                                  f"{code}); {restarted}") from None
        if reply[0] == "error":
            _raise_from_child(reply[1], reply[2])
        _, score, normalized_score, is_anomalous, valid_fraction, timings = reply
        from .detector import Detection  # here: the node imports this module without torch
        views = {name: seg.array if name in maps else None
                 for name, seg in zip(MAPS, self._outputs)}
        return Detection(score=score, normalized_score=normalized_score, is_anomalous=is_anomalous,
                         valid_fraction=valid_fraction, timings_ms=timings, **views)

    def _reap(self):
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is not None:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
            return process.exitcode
        return None

    def _restart(self) -> None:
        self._launch()
        self.restarts += 1

    # -- shutdown -------------------------------------------------------------------------------
    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child and unlink every shared-memory segment."""
        if self._conn is not None:
            try:
                self._conn.send(("close",))
            except (EOFError, OSError):
                pass
        if self._process is not None:
            self._process.join(timeout_s)
        self._reap()
        self._release_buffers()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if self._process is not None or self._inputs:
                self.close(timeout_s=1.0)
        except Exception:
            pass


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])

