"""MuJoCo gymnasium envs for the task families in ``sim/tasks`` (registered on import)."""

from __future__ import annotations

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.envs.registry import make_env, register_families

FAMILY_ENV_IDS: dict[str, str] = register_families()
"""Family name → registered gymnasium id."""

__all__ = ["FAMILY_ENV_IDS", "MetaMujocoEnv", "make_env", "register_families"]
