"""The algorithm registry: its errors, the config sections it derives, and a new algorithm added as files +
one registry line (a toy learner defined here, registered for the test only, trained by the real Runner)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import numpy as np
import pytest
import yaml

from metarl_robot.algos import registry
from metarl_robot.algos.base import Algorithm, Collection, IterationReport
from metarl_robot.algos.context_mbrl import ContextMBRL
from metarl_robot.algos.pearl import PEARL
from metarl_robot.envs.rollout import Rollout, collect, make_vector_env, random_policy
from metarl_robot.runtime.kinds import bundle_kind
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.family import Task
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError
from metarl_robot.train.config import build_config, load_config
from metarl_robot.train.loop_config import LoopConfig, RunConfig

# ---- a toy algorithm: random actions, a linear least-squares model of the reward ---------------------


@dataclass
class ToyConfig:
    """Settings of the toy learner."""

    action_scale: float = 0.5
    """Random actions are drawn from this fraction of the action box."""


@dataclass
class ToyTrainConfig(RunConfig):
    """A toy run: the shared sections plus ``toy``."""

    algo: Literal["toy"]
    """Learning algorithm."""
    toy: ToyConfig = field(default_factory=ToyConfig)
    """The toy's own section."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """The oracle's planner."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """The outer loop."""

    def validate(self, where: str) -> None:
        self._validate_shared(where, [])


@dataclass
class ToyEpisodes(Collection):
    """One random episode per task."""

    rollout: Rollout | None = None
    """One row per task."""

    def take_rows(self, index: np.ndarray) -> dict[str, Any]:
        return {"rollout": self.rollout.take(index)}


class ToyLinear(Algorithm):
    """Collects random episodes; its update fits reward ≈ w · [obs, 1] by least squares on everything stored."""

    name = "toy"
    config_class = ToyTrainConfig
    sections = ("toy",)
    bundle_kind = None
    initial_sampler = "toy_initial"
    store_file = "toy.npz"

    def __init__(self, robot: RobotSpec, cfg: ToyConfig, seed: int) -> None:
        self.robot, self.cfg, self.seed = robot, cfg, seed
        self.weights = np.zeros(robot.obs_dim + 1)
        self.updates = 0
        self.obs = np.zeros((0, robot.obs_dim))
        self.rewards = np.zeros(0)

    @classmethod
    def create(cls, cfg: ToyTrainConfig, robot: RobotSpec) -> ToyLinear:
        return cls(robot, cfg.toy, cfg.seed)

    def collect(self, tasks: list[Task], iteration: int, seed: int, starts: list[int] | None = None) -> ToyEpisodes:
        envs = make_vector_env(self.family, len(tasks), self.run_cfg.loop.vector)
        try:
            low, high = self.robot.action_low * self.cfg.action_scale, self.robot.action_high * self.cfg.action_scale
            rollout = collect(envs, self.family, random_policy(low, high, seed), tasks, 1,
                              seed=seed if starts is None else starts)
        finally:
            envs.close()
        return ToyEpisodes(rollout.episode_returns()[:, 0], episodes_per_task=1, rollout=rollout)

    def store(self, tasks: list[Task], collection: ToyEpisodes) -> dict[str, Any]:
        valid = collection.rollout.valid
        self.obs = np.concatenate([self.obs, collection.rollout.obs[valid]])
        self.rewards = np.concatenate([self.rewards, collection.rollout.rewards[valid]])
        return {"toy_transitions": int(valid.sum())}

    def update(self) -> dict[str, float]:
        features = np.concatenate([self.obs, np.ones((len(self.obs), 1))], axis=1)
        self.weights = np.linalg.lstsq(features, self.rewards, rcond=None)[0]
        self.updates += 1
        return {"reward_mse": float(np.mean((features @ self.weights - self.rewards) ** 2))}

    def report(self, iteration: int, collection: ToyEpisodes, fit: dict[str, float], graded_return: float | None,
               counters: dict[str, float]) -> IterationReport:
        mean_return = float(collection.graded_returns.mean())
        metrics = {"episode_return": mean_return, "transitions": float(len(self.rewards)), **counters,
                   **{f"fit_{k}": v for k, v in fit.items()}}
        return IterationReport(metrics, f"return {mean_return:.1f}", {})

    def state_dict(self) -> dict:
        return {"weights": self.weights.copy(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.weights, self.updates = state["weights"], state["updates"]

    def save_store(self, run_dir: Path) -> None:
        np.savez(run_dir / self.store_file, obs=self.obs, rewards=self.rewards)

    def load_store(self, run_dir: Path) -> None:
        data = np.load(run_dir / self.store_file)
        self.obs, self.rewards = data["obs"], data["rewards"]


@pytest.fixture
def toy_registered(monkeypatch):
    """The one registry line a new algorithm adds, for this test only."""
    monkeypatch.setitem(registry.ALGORITHMS, "toy", ToyLinear)


def _toy_config(tmp_path: Path, **extra: Any) -> Path:
    data = {"schema_version": 1, "algo": "toy", "family": "cartpole_swingup", "name": "toy",
            "loop": {"iterations": 2, "random_episodes": 2, "tasks_per_iteration": 2}, **extra}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---- the registry --------------------------------------------------------------------------------
def test_unknown_algorithm_names_the_registered_ones():
    with pytest.raises(registry.UnknownAlgorithmError) as err:
        registry.get_algorithm("maml")
    assert str(err.value) == ("unknown algorithm 'maml'; registered: 'context_mbrl', 'pearl', 'online_mbrl', 'mbmpo', "
                              "'macaw'")
    with pytest.raises(SpecError, match="got 'maml'; allowed: 'context_mbrl', 'pearl'") as err:
        build_config({"schema_version": 1, "algo": "maml", "family": "cartpole_swingup"}, "x.yaml")
    assert err.value.field == "algo"


def test_each_algorithm_declares_its_name_config_and_bundle_kind():
    assert registry.get_algorithm("context_mbrl") is ContextMBRL and registry.get_algorithm("pearl") is PEARL
    for name, algorithm in registry.ALGORITHMS.items():
        assert algorithm.name == name
        assert get_args(get_type_hints(algorithm.config_class)["algo"]) == (name,)
        config_fields = {f.name for f in fields(algorithm.config_class)}
        assert set(algorithm.sections) <= config_fields, name
    assert (ContextMBRL.bundle_kind, PEARL.bundle_kind) == ("model_based", "context_policy")
    for algorithm in registry.ALGORITHMS.values():  # kinds the robot-side runtime runs
        assert algorithm.bundle_kind in algorithm.exporters or (algorithm.bundle_kind is None
                                                                and not algorithm.exporters)
        assert all(bundle_kind(kind).kind == kind for kind in algorithm.exporters)
    assert (ContextMBRL.store_file, PEARL.store_file) == ("buffer.npz", "replay.npz")
    assert registry.with_capability("differentiable_model") == ["context_mbrl"]
    assert registry.with_capability("offline") == ["macaw"]  # the runner collects nothing for it


def test_section_readers_are_derived_from_the_algorithms():
    assert registry.section_readers() == {"model": ("context_mbrl", "online_mbrl", "mbmpo"),
                                          "training": ("context_mbrl", "online_mbrl", "mbmpo"),
                                          "online": ("online_mbrl",), "pearl_net": ("pearl",), "pearl": ("pearl",),
                                          "pearl_schedule": ("pearl",), "mbmpo": ("mbmpo",), "dataset": ("macaw",),
                                          "macaw_net": ("macaw",), "macaw": ("macaw",)}


def test_algorithms_may_share_a_section(monkeypatch, tmp_path):
    class Sharer(ToyLinear):
        sections = ("toy", "model")

    monkeypatch.setitem(registry.ALGORITHMS, "toy", Sharer)
    assert registry.section_readers()["model"] == ("context_mbrl", "online_mbrl", "mbmpo", "toy")


def test_a_registered_algorithms_sections_are_refused_elsewhere(toy_registered, tmp_path):
    with pytest.raises(SpecError, match="is read by algo toy only, this config is for algo 'pearl'") as err:
        load_config("configs/pearl_cartpole_swingup.yaml", {"toy.action_scale": 0.3})
    assert err.value.field == "toy"
    with pytest.raises(SpecError, match="is read by algo context_mbrl, online_mbrl, mbmpo only, this config is for "
                       "algo 'toy'"):
        load_config(_toy_config(tmp_path, model={"hidden": 8}))


def test_the_reward_gradient_needs_a_differentiable_model(toy_registered, tmp_path):
    config = _toy_config(tmp_path, loop={"task_sampler": "adversarial",
                                         "adversary": {"reward_gradient": True}})
    with pytest.raises(SpecError, match="dynamics model: algo context_mbrl only") as err:
        load_config(config)
    assert err.value.field == "loop.adversary.reward_gradient"


# ---- a new algorithm trained by the real runner ------------------------------------------------------
@pytest.mark.slow
def test_a_new_algorithm_is_files_plus_one_registry_line(toy_registered, tmp_path):
    from metarl_robot.export.bundle_writer import export_run
    from metarl_robot.train.runner import load_checkpoint, load_trained, train

    train(_toy_config(tmp_path), tmp_path / "runs", progress=False)
    run = tmp_path / "runs" / "toy"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert list(rows[0]) == ["iteration", "episode_return", "transitions", "adversary_env_steps",
                             "oracle_env_steps", "fit_reward_mse", "seconds"]
    assert [int(float(r["transitions"])) for r in rows] == [500, 1000]  # 2 tasks x 250 steps per iteration
    lines = [json.loads(line) for line in (run / "tasks.jsonl").read_text().splitlines()]
    assert [line["sampler"] for line in lines] == ["toy_initial", "uniform"]
    assert all(line["toy_transitions"] == 500 and len(line["tasks"]) == 2 for line in lines)
    assert lines[0]["tasks"] != lines[1]["tasks"]
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert state["algo_kind"] == "toy" and state["algo"]["updates"] == 2 and (run / "toy.npz").is_file()

    # Resume: weights, counters and the store carry over.
    train(run, overrides={"loop.iterations": 3}, resume=True, progress=False)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(float(r["transitions"])) for r in rows] == [500, 1000, 1500]
    _, _, algo = load_trained(run / "checkpoints" / "latest.pt")
    assert isinstance(algo, ToyLinear) and algo.updates == 3 and len(algo.rewards) == 0  # weights, not the store
    algo.load_store(run)
    assert len(algo.rewards) == 1500  # the resumed update saw the episodes collected before the resume
    features = np.concatenate([algo.obs, np.ones((1500, 1))], axis=1)
    assert np.allclose(algo.weights, np.linalg.lstsq(features, algo.rewards, rcond=None)[0])

    with pytest.raises(SpecError, match="cannot export 'toy' runs to a bundle; exportable: context_mbrl, macaw, "
                       "mbmpo, online_mbrl, pearl"):
        export_run(run, tmp_path / "bundle")
