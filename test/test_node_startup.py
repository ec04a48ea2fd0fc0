"""Start-up of the node process: an unusable checkpoint or parameter ends it at once with an error
naming the file / parameter and the problem, and a non-zero exit code; nothing is subscribed,
so no result can come from a half-loaded model."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
NODE = REPO / "scripts" / "mafr_node"

pytestmark = pytest.mark.ros


def _start(*ros_args):
    # -X faulthandler: a process that hangs is ended with SIGABRT, which makes it print the stack
    # of every thread, so a failure says where it stopped (once in CI: no output at all in 180 s).
    return subprocess.Popen([sys.executable, "-X", "faulthandler", str(NODE), "--ros-args", *ros_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def _finish(proc, timeout=180):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        raise AssertionError(f"the node did not exit on its own within {timeout} s; its stacks:\n{out}")
    return proc.returncode, out


def test_unusable_checkpoints_and_parameters_stop_the_node(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a checkpoint at all, just text" * 10)
    missing = tmp_path / "nowhere" / "model.safetensors"
    cases = {
        "garbage": (["-p", f"checkpoint:={garbage}"], [str(garbage), "corrupt"]),
        "missing": (["-p", f"checkpoint:={missing}"], [str(missing), "does not exist"]),
        "reliability": (["-p", "qos.input.reliability:=fastest"],
                        ["qos.input.reliability", "best_effort, reliable, system_default"]),
        "roi": (["-p", "roi:=[10,10,-20,30]"], ["roi", "positive"]),
        "device": (["-p", "device:=tpu"], ["device", "tpu"]),
        "isolation": (["-p", "detector.isolation:=fork"], ["detector.isolation", "process, thread"]),
        "precision": (["-p", "precision:=fp16"], ["precision", "auto, fp32, bf16"]),
        # The default loads in a child process; the in-process loader reports the same way.
        "garbage_in_thread": (["-p", f"checkpoint:={garbage}", "-p", "detector.isolation:=thread"],
                              [str(garbage), "corrupt"]),
    }
    # Four at a time (the parameter cases stop before torch is even imported): eight DDS
    # participants starting at once on a loaded 2-core machine is a test of Fast DDS, not of us.
    names = list(cases)
    for first in range(0, len(names), 4):
        batch = names[first:first + 4]
        procs = {name: _start(*cases[name][0], "-r", f"__ns:=/startup_{name}") for name in batch}
        for name, proc in procs.items():
            code, out = _finish(proc)
            assert code == 1, (name, code, out)
            assert "cannot start" in out, (name, out)
            for text in cases[name][1]:
                assert text in out, (name, text, out)
            assert "ready" not in out and "Traceback" not in out, (name, out)


def test_help_lists_every_parameter_and_bad_arguments_are_refused():
    from mafr_ros.ros.node import PARAMETERS

    out = subprocess.run([sys.executable, str(NODE), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for spec in PARAMETERS:
        assert f"  {spec.name} (" in out.stdout
    bad = subprocess.run([sys.executable, str(NODE), "--frobnicate"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "--frobnicate" in bad.stderr


def test_incompatible_checkpoint_leaves_the_node_without_inputs(tmp_path):
    """In process: the start-up fails before any subscription exists, so a node whose model did
    not load can never receive a frame, let alone publish a result."""
    import rclpy

    from mafr_ros.errors import CheckpointError
    from mafr_ros.ros.node import MafrNode

    foreign = tmp_path / "foreign.safetensors"  # a real safetensors file, but not a MAFR model
    save_file({"weight": torch.zeros(3, 3)}, str(foreign))
    context = rclpy.Context()
    rclpy.init(args=["mafr_node", "--ros-args", "-p", f"checkpoint:={foreign}",
                     "-r", "__ns:=/startup_foreign"], context=context)
    try:
        node = MafrNode(context=context)
        try:
            with pytest.raises(CheckpointError, match="not a MAFR checkpoint") as error:
                node.start()
            assert str(foreign) in str(error.value)
            assert list(node.subscriptions) == []
            assert node.diagnostics.snapshot()["state"] == "loading"
        finally:
            node.stop()
            node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
