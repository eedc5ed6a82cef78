"""Shared fixtures: the shipped robots and families, a scratch copy of ``sim/`` for broken inputs, tiny trained
runs (PEARL, context_mbrl, online_mbrl, mbmpo) and a bundle of every registered bundle kind (one per test session:
every consumer of a kind shares it; :data:`KIND_BUNDLES`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
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
MB_CONFIG = REPO_ROOT / "configs" / "mb_cartpole_swingup.yaml"
MB_TINY = {"loop.iterations": 2, "training.grad_steps": 30, "name": "tiny", "planner.samples": 16, "planner.horizon": 5,
           "model.context_window": 16, "model.context_dim": 8, "model.ensemble_size": 4}
"""``--set`` overrides of the tiny context_mbrl run: random data, then one MPC iteration (seconds)."""
ONLINE_CONFIG = REPO_ROOT / "configs" / "online_cartpole_swingup.yaml"
MBMPO_CONFIG = REPO_ROOT / "configs" / "mbmpo_cartpole_swingup.yaml"
MBMPO_TINY = {"loop.iterations": 2, "loop.random_episodes": 4, "loop.tasks_per_iteration": 2, "training.grad_steps": 20,
              "mbmpo.meta_steps": 2, "mbmpo.imagined_tasks": 4, "mbmpo.rollouts_per_task": 4,
              "mbmpo.imagined_horizon": 12, "name": "tiny"}
"""``--set`` overrides of the tiny mbmpo run: random data, then one iteration of the meta-policy (seconds)."""
SHIPPED_MODEL_BASED = REPO_ROOT / "policies" / "cartpole_mb"
MACAW_CONFIG = REPO_ROOT / "configs" / "macaw_cartpole_swingup.yaml"
MACAW_TINY = {"macaw.meta_steps": 2, "macaw.meta_batch": 2, "macaw.query_batch": 16, "macaw_net.hidden": [16],
              "loop.iterations": 2, "name": "tiny"}
"""Overrides of a tiny macaw run (add ``dataset``): two iterations of two meta-steps."""


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


def train_tiny_mb_run(runs: Path) -> Path:
    """A context_mbrl run folder (config, checkpoints, buffer.npz) of :data:`MB_TINY` in ``runs``."""
    return train_single_threaded(MB_CONFIG, runs, MB_TINY)


@pytest.fixture(scope="session")
def pearl_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny PEARL run folder (do not modify: copy it first)."""
    return train_tiny_pearl_run(tmp_path_factory.mktemp("pearl_runs"))


@pytest.fixture(scope="session")
def pearl_bundle(pearl_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny PEARL run exported as a ``context_policy`` bundle folder (do not modify: copy it first)."""
    from metarl_robot.export.bundle_writer import export_run

    return export_run(pearl_run, tmp_path_factory.mktemp("pearl_bundles") / "pearl_tiny")


@pytest.fixture(scope="session")
def mb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny context_mbrl run folder (do not modify: copy it first)."""
    return train_tiny_mb_run(tmp_path_factory.mktemp("mb_runs"))


@pytest.fixture(scope="session")
def unadapted_bundle(mb_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny context_mbrl run exported as an ``unadapted`` bundle folder (do not modify: copy it first)."""
    from metarl_robot.export.bundle_writer import export_run

    return export_run(mb_run, tmp_path_factory.mktemp("unadapted_bundles") / "unadapted_tiny", kind="unadapted")


@pytest.fixture(scope="session")
def online_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny online_mbrl run folder (:data:`MB_TINY` sizes; do not modify: copy it first)."""
    return train_single_threaded(ONLINE_CONFIG, tmp_path_factory.mktemp("online_runs"), MB_TINY)


@pytest.fixture(scope="session")
def online_bundle(online_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny online_mbrl run exported as an ``online_model`` bundle folder (do not modify: copy it first)."""
    from metarl_robot.export.bundle_writer import export_run

    return export_run(online_run, tmp_path_factory.mktemp("online_bundles") / "online_tiny")


@pytest.fixture(scope="session")
def mbmpo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny mbmpo run folder (:data:`MBMPO_TINY`; do not modify: copy it first)."""
    return train_single_threaded(MBMPO_CONFIG, tmp_path_factory.mktemp("mbmpo_runs"), MBMPO_TINY)


@pytest.fixture(scope="session")
def meta_policy_bundle(mbmpo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny mbmpo run exported as a ``meta_policy`` bundle folder (do not modify: copy it first)."""
    from metarl_robot.export.bundle_writer import export_run

    return export_run(mbmpo_run, tmp_path_factory.mktemp("meta_policy_bundles") / "meta_policy_tiny")


def synthetic_dataset(folder: Path, family_name: str = "cartpole_swingup", tasks: int = 2, episodes: int = 3,
                      steps: int = 12, seed: int = 0, sign: tuple[float, ...] = (1.0, -1.0)) -> Path:
    """A dataset folder of random states and uniform commands where task ``i`` rewards ``sign[i % len(sign)] * u``
    (``u`` the first command in normalised units, uniform in the box): two tasks that want opposite actions."""
    from metarl_robot.replay.dataset import DatasetReport, EpisodeProvenance, OfflineDataset
    from metarl_robot.spec.family import load_family
    from metarl_robot.spec.robot import load_robot

    family = load_family(family_name)
    robot = load_robot(family.spec.robot)
    rng = np.random.default_rng(seed)
    n_eps = tasks * episodes
    offsets = np.arange(n_eps + 1, dtype=np.int64) * steps
    t = n_eps * steps
    states = rng.normal(size=(n_eps, steps + 1, robot.obs_dim)) * robot.obs_scale
    obs, next_obs = states[:, :-1].reshape(t, -1), states[:, 1:].reshape(t, -1)
    u = rng.uniform(-1.0, 1.0, size=(t, robot.action_dim))
    actions = robot.action_low + (u + 1.0) / 2.0 * (robot.action_high - robot.action_low)
    task_ids = np.repeat(np.arange(tasks, dtype=np.int64), episodes)
    rewards = np.array([sign[task_ids[i // steps] % len(sign)] * u[i, 0] for i in range(t)])
    truncations = np.isin(np.arange(t), offsets[1:] - 1)
    values = np.stack([family.to_vector(task) for task in family.sample(rng, "train", tasks)])[task_ids]
    provenance = [EpisodeProvenance(source="synthetic", source_sha256="", first_step=0, transitions=steps,
                                    policy="random", policy_sha256="", robot_interface_sha256=robot.interface_hash,
                                    family=family.name, label_source="sim", fit="",
                                    task=dict(zip(family.names, map(float, values[e]), strict=True)), flags=[])
                  for e in range(n_eps)]
    data = OfflineDataset(observations=obs.astype(np.float32), actions=actions.astype(np.float32),
                          rewards=rewards.astype(np.float32), next_observations=next_obs.astype(np.float32),
                          terminations=np.zeros(t, bool), truncations=truncations, episode_offsets=offsets,
                          task_values=values, task_ids=task_ids, label_sources=np.array(["sim"] * n_eps),
                          task_names=family.names, robot=robot, family=family, episodes=provenance,
                          report=DatasetReport())
    return data.save(folder)


@pytest.fixture(scope="session")
def macaw_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny macaw run folder on a synthetic two-task dataset (:data:`MACAW_TINY`; do not modify: copy it)."""
    root = tmp_path_factory.mktemp("macaw_runs")
    dataset = synthetic_dataset(root / "dataset", steps=24)
    return train_single_threaded(MACAW_CONFIG, root, {**MACAW_TINY, "dataset": str(dataset)})


@pytest.fixture(scope="session")
def awr_policy_bundle(macaw_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny macaw run exported as an ``awr_policy`` bundle folder (do not modify: copy it first)."""
    from metarl_robot.export.bundle_writer import export_run

    return export_run(macaw_run, tmp_path_factory.mktemp("awr_policy_bundles") / "awr_policy_tiny")


@pytest.fixture(scope="session")
def model_based_bundle() -> Path:
    """The shipped ``model_based`` bundle (read-only: copy it first)."""
    return SHIPPED_MODEL_BASED


KIND_BUNDLES: dict[str, tuple[str, bool]] = {
    "model_based": ("model_based_bundle", False),
    "context_policy": ("pearl_bundle", True),
    "unadapted": ("unadapted_bundle", True),
    "online_model": ("online_bundle", True),
    "meta_policy": ("meta_policy_bundle", True),
    "awr_policy": ("awr_policy_bundle", True),
}
"""Registered bundle kind → (the session fixture giving a bundle of it, whether that fixture trains a run). A new
kind adds its line here, and the conformance tests (tests/runtime/test_kind_conformance.py) and the node's test
against the twin (tests/ros/test_node.py) then run it."""


def kind_params() -> list:
    """One ``pytest.param`` per registered bundle kind, marked slow where its bundle needs a training run."""
    from metarl_robot.runtime.kinds import kind_names

    return [pytest.param(kind, marks=[pytest.mark.slow] if KIND_BUNDLES.get(kind, ("", False))[1] else [], id=kind)
            for kind in kind_names()]


def bundle_path_of_kind(request: pytest.FixtureRequest, kind: str) -> Path:
    """A bundle folder of ``kind`` (from its :data:`KIND_BUNDLES` fixture)."""
    if kind not in KIND_BUNDLES:
        pytest.fail(f"bundle kind {kind!r} is registered but tests/conftest.py KIND_BUNDLES names no fixture for it")
    return request.getfixturevalue(KIND_BUNDLES[kind][0])


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
