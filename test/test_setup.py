"""The set-up promise of the README: after `make setup`, the venv works from a fresh shell with
nothing sourced, and the package is a valid ROS 2 package."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.prefix) / "bin"


def _clean_env():
    # What a new login shell has: no ROS variables, no LD_LIBRARY_PATH, no PYTHONPATH.
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    for keep in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID"):
        env[keep] = os.environ[keep]
    return env


def test_message_import_in_fresh_shell(tmp_path):
    out = subprocess.run(
        [str(VENV_BIN / "python"), "-c",
         "from mafr_ros.msg import AnomalyResult, AnomalyRegion; print(AnomalyResult().threshold)"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.0"


def test_mafr_help_in_fresh_shell(tmp_path):
    out = subprocess.run([str(VENV_BIN / "mafr"), "--help"], cwd=tmp_path, env=_clean_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: mafr" in out.stdout
    for command in ("synth", "preprocess", "train", "eval", "demo", "node"):
        assert command in out.stdout


def test_mafr_node_help_lists_topics_and_parameters(tmp_path):
    out = subprocess.run([str(VENV_BIN / "mafr"), "node", "-h"], cwd=tmp_path, env=_clean_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rgb/image_rect_color" in out.stdout and "checkpoint" in out.stdout


def test_package_xml_is_format_3_with_real_dependencies():
    from catkin_pkg.package import parse_package

    package = parse_package(str(REPO / "package.xml"))
    assert package.package_format == 3
    assert package.name == "mafr_ros"
    package.validate()
    depends = {d.name for d in package.build_depends + package.exec_depends}
    for needed in ("sensor_msgs", "std_msgs", "geometry_msgs", "builtin_interfaces", "rclpy",
                   "visualization_msgs", "diagnostic_msgs", "rosidl_default_runtime"):
        assert needed in depends, needed
    assert "rosidl_interface_packages" in [g.name for g in package.member_of_groups]


def test_layout_of_the_design_card():
    for path in ("mafr_ros", "launch", "config", "msg", "models", "test", "package.xml", "setup.py",
                 "README.md", "CMakeLists.txt", "Makefile", "bench", ".ci/run"):
        assert (REPO / path).exists(), path
