"""Where the project's data lives: ``sim/robots``, ``sim/tasks``, ``policies``.

The data folders sit at the repository root (they are data, not code). An installed copy of the
package finds them through ``METARL_SIM_DIR`` (the folder holding ``robots/`` and ``tasks/``).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout this package was imported from (editable installs)."""


def sim_dir() -> Path:
    """The folder holding ``robots/`` and ``tasks/``: ``$METARL_SIM_DIR`` or ``<repo>/sim``."""
    env = os.environ.get("METARL_SIM_DIR")
    path = Path(env) if env else REPO_ROOT / "sim"
    if not (path / "robots").is_dir():
        hint = "set METARL_SIM_DIR to the folder holding robots/ and tasks/"
        raise FileNotFoundError(f"robot and task data not found at {path} ({hint})")
    return path


def _is_path(name_or_path: str | Path) -> bool:
    """A bare name (``cartpole``) is looked up in sim/; anything with a separator or suffix is a path.

    So a folder that happens to be called ``cartpole`` in the working directory never shadows the
    robot of that name.
    """
    text = str(name_or_path)
    return isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml"))


def robot_yaml_path(name_or_path: str | Path) -> Path:
    """A robot name (``cartpole``) or a path to a robot.yaml or to its folder → the robot.yaml path."""
    path = Path(name_or_path)
    if _is_path(name_or_path):
        return path / "robot.yaml" if path.is_dir() else path
    candidate = sim_dir() / "robots" / str(name_or_path) / "robot.yaml"
    if not candidate.is_file():
        known = sorted(p.name for p in (sim_dir() / "robots").iterdir() if (p / "robot.yaml").is_file())
        raise FileNotFoundError(f"unknown robot {name_or_path!r}; robots in {sim_dir() / 'robots'}: {known}")
    return candidate


def family_yaml_path(name_or_path: str | Path) -> Path:
    """A family name (``cartpole_swingup``) or a path to its YAML → the YAML path."""
    if _is_path(name_or_path):
        return Path(name_or_path)
    candidate = sim_dir() / "tasks" / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise FileNotFoundError(f"unknown task family {name_or_path!r}; families: {family_names()}")
    return candidate


def family_names() -> list[str]:
    """Names of the task families shipped in ``sim/tasks``."""
    return sorted(p.stem for p in (sim_dir() / "tasks").glob("*.yaml"))
