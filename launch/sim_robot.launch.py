"""Digital twin + node: the MuJoCo twin (``metarl sim-robot``) and the adaptation node, on loopback.

    ros2 launch metarl_robot_ros sim_robot.launch.py bundle:=policies/cartpole_mb task:=test target_x:=0.3

The twin simulates one task of the robot's family, hidden from the node, in real time (``speed:=0.5``
for half speed on a slow computer); the node adapts to it. ``metarl`` (the metarl-robot command)
must be on PATH. ``target_x`` is the cart-pole family's reward parameter given to the node (the
twin's own target is part of its task); for other families put ``task.<name>`` in a params file.
``effects:=FILE.yaml`` gives the twin out-of-family effects (``metarl sim-robot --effects``,
docs/out_of_family.md); the default '' is none.
Every name used here is checked against the colcon install and the node's parameters by
tests/ros/test_launch_files.py. See docs/ros2_node.md.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "metarl_robot_ros"
EXECUTABLE = "adapt_node"
TWIN_COMMAND = "metarl"


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("bundle", description="policy bundle folder (required), of either kind (its kind picks "
                              "the adapter), e.g. policies/cartpole_mb"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution(
            [FindPackageShare(PACKAGE), "config", "adapt.yaml"]), description="node parameters (YAML)"),
        DeclareLaunchArgument("robot", default_value="cartpole", description="the twin's robot"),
        DeclareLaunchArgument("task", default_value="nominal",
                              description="the twin's hidden task: nominal, train, test, inline JSON or a file"),
        DeclareLaunchArgument("twin_seed", default_value="0", description="seed of the twin's task draw"),
        DeclareLaunchArgument("speed", default_value="1.0", description="twin robot seconds per wall second"),
        DeclareLaunchArgument("effects", default_value="", description="the twin's out-of-family effects: a YAML "
                              "file (metarl sim-robot --effects, docs/out_of_family.md); '' = none"),
        DeclareLaunchArgument("port_base", default_value="47100", description="loopback ports: base, +1, +2"),
        DeclareLaunchArgument("target_x", default_value="0.0",
                              description="the node's task.target_x (cart-pole reward parameter)"),
        DeclareLaunchArgument("adapt", default_value="true", description="online adaptation on (true) or off"),
        DeclareLaunchArgument("log_dir", default_value="~/.ros/metarl/episodes",
                              description="folder for the MCAP episode logs ('' = none)"),
        ExecuteProcess(
            cmd=[TWIN_COMMAND, "sim-robot", "--robot", LaunchConfiguration("robot"),
                 "--task", LaunchConfiguration("task"), "--seed", LaunchConfiguration("twin_seed"),
                 "--speed", LaunchConfiguration("speed"), "--effects", LaunchConfiguration("effects"),
                 "--host", "127.0.0.1",
                 "--port-base", LaunchConfiguration("port_base")],
            name="sim_robot",
            output="screen",
        ),
        Node(
            package=PACKAGE,
            executable=EXECUTABLE,
            name="metarl_adapt",
            output="screen",
            emulate_tty=True,
            parameters=[
                LaunchConfiguration("params_file"),
                {
                    "bundle": ParameterValue(LaunchConfiguration("bundle"), value_type=str),
                    "host": "127.0.0.1",
                    "port_base": ParameterValue(LaunchConfiguration("port_base"), value_type=int),
                    "task.target_x": ParameterValue(LaunchConfiguration("target_x"), value_type=float),
                    "adapt": ParameterValue(LaunchConfiguration("adapt"), value_type=bool),
                    "log_dir": ParameterValue(LaunchConfiguration("log_dir"), value_type=str),
                    # The twin loads MuJoCo for a few seconds before it answers the handshake.
                    "handshake_timeout_s": 30.0,
                },
            ],
        ),
    ])
