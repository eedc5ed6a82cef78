"""ament_python package of the metarl-robot ROS 2 node (built by colcon; see ros2_ws/README.md).

Installs the node executable (``lib/metarl_robot_ros/adapt_node``), the parameter file
(``share/metarl_robot_ros/config/adapt.yaml``) and the launch files, which live at the repository
root in ``launch/`` (the layout of DESIGN.md), into ``share/metarl_robot_ros/launch`` so that
``ros2 launch metarl_robot_ros adapt.launch.py bundle:=...`` finds them.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

PACKAGE = "metarl_robot_ros"
HERE = Path(__file__).resolve().parent
# ros2_ws/src/metarl_robot_ros -> the repository root, which holds launch/.
LAUNCH_DIR = HERE.parents[2] / "launch"
LAUNCH_FILES = ("adapt.launch.py", "sim_robot.launch.py")


def _relative(path: Path) -> str:
    """setuptools wants data files relative to this folder; the launch files sit two levels up."""
    return str(Path("..", "..", "..", path.relative_to(HERE.parents[2])))


missing = [name for name in LAUNCH_FILES if not (LAUNCH_DIR / name).is_file()]
if missing:
    raise SystemExit(f"{PACKAGE}: launch files {missing} not found in {LAUNCH_DIR}; build from a full checkout of "
                     "metarl-robot (the package installs the repository's launch/ folder)")

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[PACKAGE],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/config", ["config/adapt.yaml"]),
        (f"share/{PACKAGE}/launch", [_relative(LAUNCH_DIR / name) for name in LAUNCH_FILES]),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="metarl-robot maintainers",
    maintainer_email="maintainers@metarl-robot.invalid",
    description="ROS 2 lifecycle node running a metarl-robot bundle over ZeroMQ telemetry or ros2_control topics, "
                "with a safety layer.",
    license="Apache-2.0",
    entry_points={"console_scripts": [f"adapt_node = {PACKAGE}.adapt_node:main"]},
)
