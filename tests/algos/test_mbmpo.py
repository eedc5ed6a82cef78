"""MB-MPO: the config, a run through the real runner (train, resume), the TRPO meta-step's trust region and its
gain on the imagined objective, and the collection's inner step being the robot's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl_robot.algos.buffer import EpisodeBuffer
from metarl_robot.algos.context_mbrl import ContextMBRL
from metarl_robot.algos.mbmpo import MBMPO, AdaptationEpisodes, MBMPOConfig
from metarl_robot.paths import REPO_ROOT
from metarl_robot.runtime.meta_policy import InnerStepConfig, MetaPolicyAdapter
from metarl_robot.runtime.policy_gradient import policy_features
from metarl_robot.spec.family import load_family
from metarl_robot.spec.robot import load_robot
from metarl_robot.spec.schema import SpecError
from metarl_robot.train.config import load_config
from metarl_robot.train.runner import load_trained, train
from tests.conftest import MBMPO_TINY

CONFIG = REPO_ROOT / "configs" / "mbmpo_cartpole_swingup.yaml"
TINY = MBMPO_TINY


@pytest.mark.parametrize(("overrides", "field", "fragment"), [
    ({"mbmpo.meta_steps": 0}, "mbmpo.meta_steps", "must be >= 1"),
    ({"mbmpo.hidden": []}, "mbmpo.hidden", "non-empty"),
    ({"mbmpo.max_kl": 0.0}, "mbmpo.max_kl", "must be > 0"),
    ({"mbmpo.visited_start_fraction": 1.5}, "mbmpo.visited_start_fraction", "[0, 1]"),
    ({"mbmpo.inner.step_size": -1.0}, "mbmpo.inner.step_size", "must be > 0"),
    ({"mbmpo.inner.discount": 1.5}, "mbmpo.inner.discount", "(0, 1]"),
    ({"mbmpo.inner.episodes_per_step": 0}, "mbmpo.inner.episodes_per_step", "must be an integer >= 1"),
    ({"mbmpo.inner.episodes_per_step": 1.5}, "mbmpo.inner.episodes_per_step", "expected an integer"),
    ({"mbmpo.innr": 1}, "mbmpo.innr", "unknown key"),
])
def test_bad_mbmpo_configs_name_the_field(overrides, field, fragment):
    with pytest.raises(SpecError) as err:
        load_config(CONFIG, overrides)
    assert err.value.field == field and fragment in str(err.value)


def _algo(seed: int = 0, **mbmpo) -> MBMPO:
    cfg = load_config(CONFIG, {f"mbmpo.{k}": v for k, v in mbmpo.items()} | {"training.grad_steps": 30})
    robot = load_robot("cartpole")
    return MBMPO.build(cfg, robot, load_family("cartpole_swingup"))


def _random_buffer(algo: MBMPO, episodes: int = 6) -> EpisodeBuffer:
    """Random-action episodes of real cart-pole tasks (iteration 0's data)."""
    tasks = algo.family.sample(np.random.default_rng(0), "train", episodes)
    collection = algo.collect(tasks, 0, seed=0)
    algo.store(tasks, collection)
    return algo.buffer


@pytest.mark.slow
def test_a_meta_step_stays_in_the_trust_region_and_raises_the_surrogate():
    algo = _algo(imagined_tasks=4, rollouts_per_task=8, imagined_horizon=20)
    buffer = _random_buffer(algo)
    ContextMBRL.update(algo, buffer)  # the model fit alone
    before = [p.detach().clone() for p in algo.policy.param_list()]
    accepted = 0
    for _ in range(3):
        metrics = algo.meta_step(algo.imagined_tasks(buffer))
        assert metrics["meta_kl"] <= algo.mbmpo.max_kl + 1e-6
        if metrics["accepted"]:
            accepted += 1
            assert metrics["surrogate_gain"] > 0
    assert accepted >= 2  # a fresh policy on a fitted model has a direction that helps
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.policy.param_list(), strict=True))


def test_imagined_tasks_take_contexts_and_reward_parameters_from_stored_episodes():
    algo = _algo(imagined_tasks=6, rollouts_per_task=5)
    buffer = _random_buffer(algo)
    tasks = algo.imagined_tasks(buffer)
    assert tasks.z.shape == (6, algo.model.cfg.context_dim) and tasks.starts.shape == (6, 5, algo.robot.obs_dim)
    stored = set(np.round(buffer.tasks[:, algo.family.names.index("target_x")], 12))
    assert set(np.round(tasks.reward_params["target_x"], 12)) <= stored
    rollouts = algo.imagine([algo.policy.numpy_params()] * 6, tasks)
    h = algo.mbmpo.imagined_horizon
    assert rollouts.feats.shape[:3] == (6, 5, h) and rollouts.rewards.shape == (6, 5, h)
    assert np.isfinite(rollouts.rewards).all() and np.isfinite(rollouts.feats).all()
    np.testing.assert_array_equal(rollouts.feats[:, :, 0], policy_features(algo.robot, tasks.starts))
    # Each task's rollouts run through its own member with its own context: the same starts and policy through
    # different (member, context) pairs diverge.
    assert not np.allclose(rollouts.feats[0, :, -1], rollouts.feats[1, :, -1])


def test_collection_runs_the_meta_policy_then_the_adapted_one_and_stores_both():
    algo = _algo()
    _random_buffer(algo)
    tasks = algo.family.sample(np.random.default_rng(1), "train", 2)
    collection = algo.collect(tasks, 1, seed=3)
    assert isinstance(collection, AdaptationEpisodes) and collection.episodes_per_task == 2
    assert collection.graded_start_offset == 1
    assert collection.pre.obs.shape == collection.rollout.obs.shape == (2, algo.family.spec.episode_steps, 4)
    np.testing.assert_allclose(collection.graded_returns, collection.rollout.episode_returns()[:, 0])
    assert not np.allclose(collection.pre.actions, collection.rollout.actions)
    kept = collection.take([1])
    np.testing.assert_array_equal(kept.pre.obs[0], collection.pre.obs[1])
    before = len(algo.buffer)
    assert algo.store(tasks, collection) == {} and len(algo.buffer) == before + 4  # both episodes are model data


def test_with_episodes_per_step_collection_pools_that_many_meta_policy_episodes(monkeypatch):
    algo = _algo(**{"inner.episodes_per_step": 2})
    _random_buffer(algo)
    pooled: list[list[int]] = []
    step_on = MetaPolicyAdapter.step_on

    def recording(self, params, episodes, step_size=None):
        pooled.append([len(e.reward) for e in episodes])
        return step_on(self, params, episodes, step_size)

    monkeypatch.setattr(MetaPolicyAdapter, "step_on", recording)
    tasks = algo.family.sample(np.random.default_rng(1), "train", 2)
    steps = algo.family.spec.episode_steps
    collection = algo.collect(tasks, 1, seed=3, starts=[10, 20])
    assert pooled == [[steps, steps]] * 2  # one step per task, on its two meta-policy episodes
    assert (collection.episodes_per_task, collection.graded_start_offset) == (3, 2)
    assert collection.pre.obs.shape == (2, 2 * steps, 4) and collection.pre.episode_returns().shape == (2, 2)
    assert collection.rollout.obs.shape == (2, steps, 4)
    # The task's episodes reset with s, s + 1 (the meta-policy's) and s + 2 (the adapted, graded one).
    once = _algo()
    once.policy.load_state_dict(algo.policy.state_dict())
    monkeypatch.setattr(MetaPolicyAdapter, "step_on", step_on)
    single = once.collect(tasks, 1, seed=3, starts=[11, 21])
    np.testing.assert_array_equal(collection.pre.obs[:, steps], single.pre.obs[:, 0])
    np.testing.assert_array_equal(collection.rollout.obs[:, 0], single.rollout.obs[:, 0])
    kept = collection.take([1])
    np.testing.assert_array_equal(kept.pre.obs[0], collection.pre.obs[1])
    before = len(algo.buffer)
    algo.store(tasks, collection)
    assert len(algo.buffer) == before + 6  # every episode is model data
    report = algo.report(1, collection, {}, None, {})
    assert report.metrics["pre_adaptation_return"] == pytest.approx(float(collection.pre.episode_returns().mean()))


def test_a_tiny_run_trains_resumes_and_logs_both_returns(tmp_path):
    torch.set_num_threads(1)
    train(CONFIG, tmp_path, overrides=TINY, progress=False)
    run = tmp_path / "tiny"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("pre_adaptation_return", "post_adaptation_return", "fit_imagined_pre_return",
                   "fit_imagined_post_return", "fit_meta_kl", "fit_accepted"):
        assert column in header
    _, _, algo = load_trained(run / "checkpoints" / "latest.pt")
    assert isinstance(algo, MBMPO)
    train(run, resume=True, overrides={"loop.iterations": 3}, progress=False)
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and rows[-1].startswith("2,")
    assert MBMPOConfig().inner == InnerStepConfig()  # the step meta-training takes is the robot adapter's


@pytest.mark.slow
def test_a_tiny_pooling_run_trains_and_its_bundle_records_episodes_per_step(tmp_path):
    from metarl_robot.export.bundle_writer import export_run
    from metarl_robot.runtime.bundle import load_bundle

    torch.set_num_threads(1)
    train(CONFIG, tmp_path, overrides={**TINY, "mbmpo.inner.episodes_per_step": 2, "name": "pooled"}, progress=False)
    run = tmp_path / "pooled"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + TINY["loop.iterations"]
    bundle = load_bundle(export_run(run, tmp_path / "bundle"))
    assert bundle.manifest["meta_policy"]["inner"]["episodes_per_step"] == 2
    assert bundle.inner.episodes_per_step == bundle.make_adapter().inner.episodes_per_step == 2
