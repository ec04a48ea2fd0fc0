"""The launch file, the shipped parameters YAML and the RViz2 configuration.

`launch` / `launch_ros` have no build in this environment, so the launch file is checked here by
reading it (ast): every executable, file, parameter and remapped topic it names must exist in the
package. Where launch_ros is importable (a ROS 2 install), the launch description is also run
through LaunchService and the node must come up.
"""
import ast
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from mafr_ros.ros import node as mafr_node

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "mafr.launch.py"
CONFIG = REPO / "config" / "mafr.yaml"
RVIZ = REPO / "config" / "mafr.rviz"
DECLARED = {spec.name: spec for spec in mafr_node.PARAMETERS}


def _calls(tree, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, "id", getattr(n.func, "attr", None)) == name]


def _kwarg(call, name):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _strings(node):
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_launch_file_names_only_things_that_exist():
    tree = ast.parse(LAUNCH.read_text())
    module_constants = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign)
                        for t in n.targets if isinstance(t, ast.Name)}
    package = ast.literal_eval(module_constants["PACKAGE"])
    assert package == "mafr_ros"
    assert re.search(r"<name>\s*mafr_ros\s*</name>", (REPO / "package.xml").read_text())

    # Arguments the brief promises.
    declared_args = {ast.literal_eval(c.args[0]) for c in _calls(tree, "DeclareLaunchArgument")
                     if isinstance(c.args[0], ast.Constant)}
    inputs = ast.literal_eval(module_constants["INPUTS"])
    declared_args |= {arg for arg, _ in inputs}  # declared in a comprehension over INPUTS
    for arg in ("namespace", "params_file", "checkpoint", "rgb", "depth", "camera_info", "points",
                "use_sim_time", "rviz"):
        assert arg in declared_args, arg
    # Every LaunchConfiguration refers to a declared argument.
    for call in _calls(tree, "LaunchConfiguration"):
        if isinstance(call.args[0], ast.Constant):
            assert call.args[0].value in declared_args, call.args[0].value

    # Remapped names are the node's input names.
    assert dict(inputs) == {"rgb": mafr_node.TOPIC_RGB, "depth": mafr_node.TOPIC_DEPTH,
                            "camera_info": mafr_node.TOPIC_CAMERA_INFO,
                            "points": mafr_node.TOPIC_POINTS}

    # Our executable exists, is executable, runs our main, and CMake installs it for ros2 run.
    nodes = _calls(tree, "Node")
    ours = [c for c in nodes if isinstance(_kwarg(c, "package"), ast.Name)]
    assert len(ours) == 1
    executable = ast.literal_eval(_kwarg(ours[0], "executable"))
    script = REPO / "scripts" / executable
    assert script.is_file() and os.access(script, os.X_OK)
    assert "from mafr_ros.ros.node import main" in script.read_text()
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert re.search(rf"install\(PROGRAMS[^)]*scripts/{executable}\b[^)]*DESTINATION lib/\$\{{PROJECT_NAME\}}", cmake)
    assert ast.literal_eval(_kwarg(ours[0], "name")) == mafr_node.NODE_NAME

    # Parameter overrides set from the launch file are declared by the node.
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_node")
    overridden = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Dict):
            overridden |= {ast.literal_eval(k) for k in node.keys}
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                and getattr(node.value, "id", None) == "overrides":
            overridden.add(node.slice.value)
    assert overridden == {"use_sim_time", "checkpoint"}
    assert overridden - {"use_sim_time"} <= set(DECLARED)

    # Files named with FindPackageShare exist in the source tree and are installed by CMake.
    for call in _calls(tree, "PathJoinSubstitution"):
        parts = [ast.literal_eval(e) for e in call.args[0].elts if isinstance(e, ast.Constant)]
        path = REPO.joinpath(*parts)
        assert path.is_file(), path
        assert re.search(rf"install\(DIRECTORY[^)]*\b{parts[0]}\b[^)]*DESTINATION share", cmake)


def test_shipped_parameters_file_is_complete_and_valid():
    data = yaml.safe_load(CONFIG.read_text())
    assert list(data) == ["/**"] and list(data["/**"]) == ["ros__parameters"]
    params = data["/**"]["ros__parameters"]
    assert set(params) == set(DECLARED), set(params) ^ set(DECLARED)
    for name, value in params.items():
        spec = DECLARED[name]
        assert type(value) is type(spec.default), (name, value)
        assert value == spec.default, (name, value, spec.default)
        assert mafr_node.validate_parameter(name, value) is None


def test_parameters_file_loads_through_rcl(tmp_path):
    """rcl's YAML parser (not PyYAML) reads the file: a copy with changed values reaches the node,
    including dotted names and the integer-array roi."""
    import rclpy

    text = CONFIG.read_text()
    text = re.sub(r"regions\.min_area: \d+", "regions.min_area: 7", text)
    text = re.sub(r"roi: \[0, 0, 0, 0\]", "roi: [10, 20, 300, 200]", text)
    text = re.sub(r'qos\.input\.reliability: "best_effort"', 'qos.input.reliability: "reliable"', text)
    changed = tmp_path / "mafr.yaml"
    changed.write_text(text)
    context = rclpy.Context()
    rclpy.init(args=["mafr_node", "--ros-args", "--params-file", str(changed),
                     "-r", "__ns:=/params_file_test"], context=context)
    try:
        node = mafr_node.MafrNode(context=context)  # declares and validates; no model is loaded
        try:
            assert node.get_parameter("regions.min_area").value == 7
            assert list(node.get_parameter("roi").value) == [10, 20, 300, 200]
            assert node.get_parameter("qos.input.reliability").value == "reliable"
            assert node.get_parameter("sync.slop").value == pytest.approx(0.015)
            assert node.get_fully_qualified_name() == "/params_file_test/mafr"
        finally:
            node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def test_rviz_config_shows_the_node_outputs():
    config = yaml.safe_load(RVIZ.read_text())
    manager = config["Visualization Manager"]
    displays = {d["Class"]: d for d in manager["Displays"]}
    expected = {"rviz_default_plugins/Image": "overlay",
                "rviz_default_plugins/MarkerArray": "markers",
                "rviz_default_plugins/PointCloud2": "anomaly_points"}
    for cls, output in expected.items():
        display = displays[cls]
        assert display["Enabled"] is True
        # relative to the namespace RViz2 is launched in, as the node's ~/<output>
        assert display["Topic"]["Value"] == f"{mafr_node.NODE_NAME}/{output}"
        assert display["Topic"]["Reliability Policy"] == "Reliable"  # the node's default output QoS
    assert set(displays["rviz_default_plugins/MarkerArray"]["Namespaces"]) == {
        "anomaly_boxes", "anomaly_labels"}
    assert displays["rviz_default_plugins/PointCloud2"]["Channel Name"] == "score"
    assert manager["Global Options"]["Fixed Frame"]
    source = (REPO / "mafr_ros" / "ros" / "node.py").read_text()
    for output in expected.values():
        assert f'"~/{output}"' in source


def test_launch_description_runs_in_launch_service():
    pytest.importorskip(
        "launch_ros", reason="launch_ros has no build in this environment (no PyPI wheel); this "
                             "test runs on a ROS 2 install where the package is built with colcon")
    import threading

    from diagnostic_msgs.msg import DiagnosticArray
    from launch import LaunchDescription, LaunchService
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    sys.path.insert(0, str(Path(__file__).resolve().parent / "procs"))
    from node_harness import Observer, diagnostic_values

    namespace = f"launch_test_{os.getpid()}"
    service = LaunchService()
    service.include_launch_description(LaunchDescription([IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(LAUNCH)),
        launch_arguments={"namespace": namespace, "params_file": str(CONFIG),
                          "rviz": "false"}.items())]))
    observer = Observer("launch_test_observer")
    observer.subscribe(DiagnosticArray, "/diagnostics")
    codes = []
    runner = threading.Thread(target=lambda: codes.append(service.run()), daemon=True)
    runner.start()

    def ready(msg):
        found = diagnostic_values(msg, f"/{namespace}/mafr: detector")
        return found is not None and found[2].get("state") == "ready"

    try:
        observer.wait_for("/diagnostics", ready, timeout=300)
    finally:
        service.shutdown()
        runner.join(60)
        observer.close()
    assert codes == [0]
