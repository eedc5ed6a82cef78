"""Shared fixtures: the shipped robots and families, and a scratch copy of ``sim/`` for broken inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from metarl_robot.paths import REPO_ROOT, family_names

FAMILIES = family_names()
ROBOTS = sorted(p.name for p in (REPO_ROOT / "sim" / "robots").iterdir() if (p / "robot.yaml").is_file())


@pytest.fixture
def sim_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A writable copy of sim/ that the loaders use (METARL_SIM_DIR) for the length of one test."""
    dst = tmp_path / "sim"
    shutil.copytree(REPO_ROOT / "sim", dst)
    monkeypatch.setenv("METARL_SIM_DIR", str(dst))
    return dst


def edit_yaml(path: Path, change) -> Path:
    """Load a YAML file, let ``change(data)`` modify it in place, write it back."""
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
