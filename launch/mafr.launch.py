"""Launch the mafr anomaly-detection node (and optionally RViz2) for one camera.

    ros2 launch mafr_ros mafr.launch.py namespace:=cell1 \
        rgb:=/camera/color/image_raw depth:=/camera/aligned_depth_to_color/image_raw \
        camera_info:=/camera/color/camera_info checkpoint:=/models/part_a.safetensors rviz:=true

Arguments:
  namespace      namespace of the node (and of RViz2); outputs are <namespace>/mafr/...
  params_file    parameters YAML (default: this package's config/mafr.yaml)
  checkpoint     overrides the params file's checkpoint when not empty
  rgb, depth, camera_info, points
                 topics to remap the node's inputs to (defaults: the node's own relative names,
                 i.e. no remapping)
  use_sim_time   true for bag replay with `ros2 bag play --clock`
  rviz           true starts RViz2 with config/mafr.rviz (overlay image, markers, points)
  fixed_frame    RViz2 fixed frame: the camera's optical frame, or any frame TF connects to it
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "mafr_ros"
# The node's relative input names (mafr_ros.ros.node.TOPIC_*), in launch-argument order.
INPUTS = (("rgb", "rgb/image_rect_color"), ("depth", "depth_registered/image_rect"),
          ("camera_info", "rgb/camera_info"), ("points", "points"))


def _node(context):
    """The node, built once the arguments are known: an empty checkpoint argument must not
    override the params file, and remappings to the same name are left out."""
    value = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    use_sim_time = value("use_sim_time").lower() in ("true", "1", "yes")
    overrides = {"use_sim_time": use_sim_time}
    if value("checkpoint"):
        overrides["checkpoint"] = value("checkpoint")
    remappings = [(name, value(arg)) for arg, name in INPUTS if value(arg) and value(arg) != name]
    return [Node(
        package=PACKAGE, executable="mafr_node", name="mafr", namespace=value("namespace"),
        parameters=[value("params_file"), overrides], remappings=remappings,
        output="screen", emulate_tty=True)]


def generate_launch_description():
    share = FindPackageShare(PACKAGE)
    arguments = [
        DeclareLaunchArgument("namespace", default_value="",
                              description="namespace of the node and of RViz2"),
        DeclareLaunchArgument("params_file",
                              default_value=PathJoinSubstitution([share, "config", "mafr.yaml"]),
                              description="parameters YAML file"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="checkpoint file; empty = the params file's value"),
        *[DeclareLaunchArgument(arg, default_value=name,
                                description=f"topic for the node's '{name}' input")
          for arg, name in INPUTS],
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use /clock (bag replay with --clock)"),
        DeclareLaunchArgument("rviz", default_value="false",
                              description="start RViz2 with config/mafr.rviz"),
        DeclareLaunchArgument("fixed_frame", default_value="camera_color_optical_frame",
                              description="RViz2 fixed frame"),
    ]
    rviz = Node(
        package="rviz2", executable="rviz2", name="rviz2",
        namespace=LaunchConfiguration("namespace"),
        arguments=["-d", PathJoinSubstitution([share, "config", "mafr.rviz"]),
                   "-f", LaunchConfiguration("fixed_frame")],
        parameters=[{"use_sim_time": LaunchConfiguration("use_sim_time")}],
        condition=IfCondition(LaunchConfiguration("rviz")), output="screen")
    return LaunchDescription([*arguments, OpaqueFunction(function=_node), rviz])
