"""The robot boundary: what may run on a robot computer stays free of torch and MuJoCo, and of the sim side.

Modules are discovered by walking the folders, so a new module is covered the day it is added. The layout
(docs/architecture.md):

- robot side: :data:`ROBOT_SIDE_PACKAGES` and :data:`ROBOT_SIDE_MODULES`; no torch, MuJoCo or gymnasium, and
  nothing from the sim side or the offline tools;
- offline tools (``replay/``): no torch or MuJoCo (they run on a robot computer today), nothing from the sim side;
- the ROS 2 node: like the robot side.
"""

from __future__ import annotations

import pytest

from metarl_robot.paths import REPO_ROOT
from tests.boundary import FORBIDDEN, assert_robot_side, forbidden_after, forbidden_imports

PACKAGE = REPO_ROOT / "metarl_robot"
ROBOT_SIDE_PACKAGES = ("spec", "runtime", "telemetry", "logs")
"""Folders of ``metarl_robot`` whose every module runs on the robot."""
ROBOT_SIDE_MODULES = ("provenance", "machine", "paths")
"""Top-level modules of ``metarl_robot`` that run on the robot."""
OFFLINE_PACKAGES = ("replay",)
"""Offline tools on logs: torch- and MuJoCo-free, but they may import anything robot-side."""
SIM_SIDE = tuple(f"metarl_robot.{p}" for p in ("envs", "models", "algos", "train", "export", "real2sim"))
"""MuJoCo/torch-side packages: nothing on the robot side or in the offline tools may import them."""
NOT_INSTALLED_ON_A_ROBOT = ("matplotlib", "tqdm", "rosbags", "tensorboard", "onnxscript")
"""Modules of pyproject's extras (replay, sim, train) that ``pip install metarl-robot`` alone lacks: the robot side and
the offline tools import them only where they are used (tests/packaging runs a real robot-only install)."""
NODE_SRC = REPO_ROOT / "ros2_ws" / "src" / "metarl_robot_ros"
NODE_PACKAGE = NODE_SRC / "metarl_robot_ros"


def modules_under(folder: str) -> list[str]:
    """Every module of ``metarl_robot/<folder>`` (the package itself included), by walking the folder."""
    return sorted(".".join(("metarl_robot", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
                  for p in (PACKAGE / folder).rglob("*.py"))


def test_the_walk_finds_the_robot_side_folders():
    """A renamed folder must not leave the boundary test walking an empty one."""
    for folder in (*ROBOT_SIDE_PACKAGES, *OFFLINE_PACKAGES):
        assert len(modules_under(folder)) > 1, folder
    assert {p.stem for p in PACKAGE.glob("*.py")} >= set(ROBOT_SIDE_MODULES)


@pytest.mark.parametrize("folder", ROBOT_SIDE_PACKAGES)
def test_robot_side_modules_import_neither_torch_nor_mujoco_nor_the_sim_side(folder):
    assert_robot_side(modules_under(folder),
                      forbidden=[*FORBIDDEN, *NOT_INSTALLED_ON_A_ROBOT, *SIM_SIDE, "metarl_robot.replay"])


def test_robot_side_top_level_modules_import_neither_torch_nor_mujoco():
    assert_robot_side([f"metarl_robot.{m}" for m in ROBOT_SIDE_MODULES],
                      forbidden=[*FORBIDDEN, *NOT_INSTALLED_ON_A_ROBOT, *SIM_SIDE, "metarl_robot.replay"])


@pytest.mark.parametrize("folder", OFFLINE_PACKAGES)
def test_offline_tools_import_neither_torch_nor_mujoco(folder):
    """Shadow replay, reports and importers run on a robot computer too (next to its logs)."""
    assert_robot_side(modules_under(folder), forbidden=[*FORBIDDEN, *NOT_INSTALLED_ON_A_ROBOT, *SIM_SIDE])


def node_modules() -> list[str]:
    return sorted(f"metarl_robot_ros.{p.stem}" for p in NODE_PACKAGE.glob("*.py") if p.stem != "__init__")


@pytest.mark.integration  # imports rclpy
def test_node_modules_import_neither_torch_nor_mujoco_nor_the_sim_side():
    """The node runs on the robot computer: its modules may not pull in torch, MuJoCo or gymnasium."""
    assert len(node_modules()) > 2
    assert_robot_side(node_modules(), forbidden=[*FORBIDDEN, *NOT_INSTALLED_ON_A_ROBOT, *SIM_SIDE],
                      sys_path=[NODE_SRC])


@pytest.mark.integration  # imports rclpy
def test_node_imports_no_offline_tools():
    pulled = forbidden_imports(node_modules(), forbidden=["metarl_robot.replay"], sys_path=[NODE_SRC])
    assert not any(pulled.values()), pulled


def test_cli_help_imports_nothing_heavy():
    code = "from metarl_robot import cli; cli.build_parser().format_help()"
    assert forbidden_after(code, forbidden=[*FORBIDDEN, *NOT_INSTALLED_ON_A_ROBOT]) == []
