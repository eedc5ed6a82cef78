"""Shared fixtures: the shipped robots and families, a scratch copy of ``sim/`` for broken inputs, and a tiny
trained PEARL run and its ``context_policy`` bundle (one per test session: every consumer of the kind shares it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from metarl_robot.paths import REPO_ROOT, family_names

FAMILIES = family_names()
ROBOTS = sorted(p.name for p in (REPO_ROOT / "sim" / "robots").iterdir() if (p / "robot.yaml").is_file())

PEARL_CONFIG = REPO_ROOT / "configs" / "pearl_cartpole_swingup.yaml"
# Sizes pinned here, so the shipped config can be retuned without touching the tests.
PEARL_TINY = {"name": "tiny", "loop.iterations": 1, "loop.random_episodes": 2, "loop.tasks_per_iteration": 2,
              "pearl.grad_steps": 3, "pearl.meta_batch": 2, "pearl.batch_size": 16, "pearl.context_batch": 8,
              "pearl.context_size_min": 2, "pearl_net.hidden": 16, "pearl_net.encoder_hidden": 16,
              "pearl_net.latent_dim": 3}
"""``--set`` overrides of the tiny PEARL run: one iteration of tiny networks (seconds)."""
PEARL_LATENT_DIM = 3
"""``pearl_net.latent_dim`` of :data:`PEARL_TINY`."""


def train_single_threaded(config: Path, runs: Path, overrides: dict) -> Path:
    """``metarl train`` in process with one torch thread (tiny ops on shared CPUs: more threads only contend);
    returns the run folder (``runs / overrides["name"]``)."""
    import torch

    from metarl_robot.train.runner import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config, runs, overrides=overrides, progress=False)
    finally:
        torch.set_num_threads(threads)
    return runs / overrides["name"]


def train_tiny_pearl_run(runs: Path) -> Path:
    """A PEARL run folder (config, checkpoints, replay.npz) from a one-iteration run of tiny networks."""
    return train_single_threaded(PEARL_CONFIG, runs, PEARL_TINY)


@pytest.fixture(scope="session")
def pearl_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny PEARL run folder (do not modify: copy it first)."""
    return train_tiny_pearl_run(tmp_path_factory.mktemp("pearl_runs"))


@pytest.fixture(scope="session")
def pearl_bundle(pearl_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny PEARL run exported as a ``context_policy`` bundle folder (do not modify: copy it first)."""
    from metarl_robot.export.bundle_writer import export_run

    return export_run(pearl_run, tmp_path_factory.mktemp("pearl_bundles") / "pearl_tiny")


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
