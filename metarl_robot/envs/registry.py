"""Gymnasium registration: every family YAML in ``sim/tasks`` becomes ``gym.make(<env_id>)``."""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym

from metarl_robot.paths import family_names
from metarl_robot.spec.family import TaskFamily, load_family
from metarl_robot.spec.schema import SpecError

ENTRY_POINT = "metarl_robot.envs.meta_env:MetaMujocoEnv"


def register_families() -> dict[str, str]:
    """Register every family in ``sim/tasks`` (idempotent); returns ``{family name: env id}``.

    A family whose YAML does not load is skipped with a warning naming the file and the problem,
    so one broken file does not stop the others (loading it by name raises the full error).
    """
    out: dict[str, str] = {}
    for name in family_names():
        try:
            env_id = load_family(name).spec.env_id
        except SpecError as exc:
            warnings.warn(f"task family {name!r} not registered: {exc}", stacklevel=2)
            continue
        owner = next((other for other, other_id in out.items() if other_id == env_id), None)
        if owner is not None:
            raise SpecError(f"sim/tasks/{name}.yaml", "env_id", f"{env_id!r} is already the id of family {owner!r}; "
                            "give every family its own id")
        registered = gym.registry.get(env_id)
        if registered is None:
            gym.register(id=env_id, entry_point=ENTRY_POINT, kwargs={"family": name})
        elif registered.kwargs.get("family") != name:
            raise SpecError(f"sim/tasks/{name}.yaml", "env_id", f"{env_id!r} is already registered by "
                            f"{registered.entry_point} for {registered.kwargs.get('family')!r}")
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
