"""Robot launch: the metarl-robot adaptation node against a robot (or a twin) speaking the telemetry protocol.

    ros2 launch metarl_robot_ros adapt.launch.py bundle:=/path/to/policies/cartpole_mb host:=192.168.1.20 \
        curve_keys:=/path/to/keys     # a robot off this machine: CURVE (docs/telemetry.md), or insecure:=true
    ros2 launch metarl_robot_ros adapt.launch.py bundle:=/path/to/policies/cartpole_mb link:=ros2_control \
        state_topic:=/cartpole/joint_states command_topic:=/cartpole/effort_controller/commands

``link:=zmq`` (the default) talks the telemetry protocol to ``host``/``port_base`` or ``endpoints``;
``link:=ros2_control`` reads sensor_msgs/JointState from ``state_topic`` and publishes the commands
(std_msgs/Float64MultiArray) to ``command_topic``, a forward_command_controller's (both remappings of the
node's ``joint_states`` and ``/forward_command_controller/commands``).

Parameters come from the installed ``config/adapt.yaml`` (or ``params_file:=``), then the launch
arguments below override them. Task/reward parameters (``task.<name>``) and the safety limits go in
a copy of adapt.yaml given as ``params_file:=``. Every name used here is checked against the colcon
install and the node's parameters by tests/ros/test_launch_files.py. See docs/ros2_node.md.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "metarl_robot_ros"
EXECUTABLE = "adapt_node"


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("bundle", description="policy bundle folder (required), of either kind (its kind picks "
                              "the adapter), e.g. policies/cartpole_mb"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution(
            [FindPackageShare(PACKAGE), "config", "adapt.yaml"]), description="node parameters (YAML)"),
        DeclareLaunchArgument("link", default_value="zmq", description="how the node talks to the robot: zmq "
                              "(telemetry protocol) or ros2_control (joint_states in, forward_command_controller out)"),
        DeclareLaunchArgument("state_topic", default_value="joint_states",
                              description="ros2_control link: the sensor_msgs/JointState topic "
                              "(joint_state_broadcaster's)"),
        DeclareLaunchArgument("command_topic", default_value="/forward_command_controller/commands",
                              description="ros2_control link: the std_msgs/Float64MultiArray topic of the "
                              "forward_command_controller (e.g. /effort_controller/commands)"),
        DeclareLaunchArgument("host", default_value="127.0.0.1", description="the robot's address"),
        DeclareLaunchArgument("port_base", default_value="47100",
                              description="state port; command = +1, handshake = +2"),
        DeclareLaunchArgument("endpoints", default_value="",
                              description="explicit 'state=URL,command=URL,handshake=URL' (overrides host/port_base)"),
        DeclareLaunchArgument("curve_keys", default_value="",
                              description="folder with controller.key_secret and robot.key ('' = plain link)"),
        DeclareLaunchArgument("insecure", default_value="false",
                              description="allow a plain link to a robot off this machine (no CURVE); refused "
                              "otherwise, and /diagnostics warns while on"),
        DeclareLaunchArgument("adapt", default_value="true", description="online adaptation on (true) or off"),
        DeclareLaunchArgument("seed", default_value="0", description="planner seed (model_based bundles)"),
        DeclareLaunchArgument("log_dir", default_value="~/.ros/metarl/episodes",
                              description="folder for the MCAP episode logs ('' = none)"),
        DeclareLaunchArgument("node_name", default_value="metarl_adapt", description="ROS node name"),
        Node(
            package=PACKAGE,
            executable=EXECUTABLE,
            name=LaunchConfiguration("node_name"),
            output="screen",
            emulate_tty=True,
            remappings=[
                ("joint_states", LaunchConfiguration("state_topic")),
                ("/forward_command_controller/commands", LaunchConfiguration("command_topic")),
            ],
            parameters=[
                LaunchConfiguration("params_file"),
                {
                    "bundle": ParameterValue(LaunchConfiguration("bundle"), value_type=str),
                    "link": ParameterValue(LaunchConfiguration("link"), value_type=str),
                    "host": ParameterValue(LaunchConfiguration("host"), value_type=str),
                    "port_base": ParameterValue(LaunchConfiguration("port_base"), value_type=int),
                    "endpoints": ParameterValue(LaunchConfiguration("endpoints"), value_type=str),
                    "curve_keys": ParameterValue(LaunchConfiguration("curve_keys"), value_type=str),
                    "insecure": ParameterValue(LaunchConfiguration("insecure"), value_type=bool),
                    "adapt": ParameterValue(LaunchConfiguration("adapt"), value_type=bool),
                    "seed": ParameterValue(LaunchConfiguration("seed"), value_type=int),
                    "log_dir": ParameterValue(LaunchConfiguration("log_dir"), value_type=str),
                },
            ],
        ),
    ])
