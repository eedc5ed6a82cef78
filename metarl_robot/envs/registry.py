"""Gymnasium registration: every family YAML in ``sim/tasks`` becomes ``gym.make(<env_id>)``."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from metarl_robot.paths import family_names
from metarl_robot.spec.family import TaskFamily, load_family

ENTRY_POINT = "metarl_robot.envs.meta_env:MetaMujocoEnv"


def register_families() -> dict[str, str]:
    """Register every shipped family (idempotent); returns ``{family name: env id}``."""
    out = {}
    for name in family_names():
        env_id = load_family(name).spec.env_id
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=ENTRY_POINT, kwargs={"family": name})
        out[name] = env_id
    return out


def make_env(family: str | TaskFamily, **kwargs: Any) -> gym.Env:
    """``gym.make`` for a family name, a family YAML path or a loaded family (extra kwargs go to the env)."""
    if isinstance(family, TaskFamily) or str(family).endswith((".yaml", ".yml")):
        # A family outside sim/tasks has no registered id: build the env class through gymnasium's
        # passive checker and order enforcing all the same.
        loaded = family if isinstance(family, TaskFamily) else load_family(family)
        return gym.make(gym.envs.registration.EnvSpec(
            id=f"metarl/{loaded.name}-custom", entry_point=ENTRY_POINT, kwargs={"family": loaded, **kwargs}))
    env_id = register_families().get(str(family), str(family))
    return gym.make(env_id, **kwargs)
