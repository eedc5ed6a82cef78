"""What may run on a robot computer stays free of torch and MuJoCo."""

from __future__ import annotations

import subprocess
import sys

import pytest

ROBOT_SIDE_MODULES = ["metarl_robot.spec.schema", "metarl_robot.spec.robot", "metarl_robot.spec.family",
                      "metarl_robot.spec.rewards", "metarl_robot.paths", "metarl_robot.runtime.planner",
                      "metarl_robot.runtime.ensemble_rollout", "metarl_robot.runtime.bundle",
                      "metarl_robot.runtime.adapter", "metarl_robot.runtime.context",
                      "metarl_robot.runtime.context_policy",
                      "metarl_robot.runtime.safety", "metarl_robot.telemetry", "metarl_robot.telemetry.protocol",
                      "metarl_robot.telemetry.transport", "metarl_robot.telemetry.keys",
                      "metarl_robot.telemetry.robot_client", "metarl_robot.telemetry.controller",
                      "metarl_robot.logs.writer", "metarl_robot.logs.reader", "metarl_robot.provenance",
                      "metarl_robot.machine",
                      "metarl_robot.replay.shadow", "metarl_robot.replay.report"]
FORBIDDEN = ["torch", "mujoco", "gymnasium"]


@pytest.mark.parametrize("module", ROBOT_SIDE_MODULES)
def test_robot_side_modules_do_not_import_torch_or_mujoco(module):
    code = (f"import sys, {module}; bad = [m for m in {FORBIDDEN!r} if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{module} pulled in: {result.stdout.strip()} {result.stderr}"


def test_cli_help_imports_nothing_heavy():
    heavy = [*FORBIDDEN, "matplotlib"]
    code = ("import sys; from metarl_robot import cli; cli.build_parser().format_help(); "
            f"bad = [m for m in {heavy!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
