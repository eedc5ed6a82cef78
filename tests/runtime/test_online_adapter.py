"""The robot's online adapter over an ``online_model`` bundle: the last layer fits the transitions it observes, keeps
what it learned across episodes until forgotten, never lets a refused update reach the planner, and is the plain
model-based adapter when its updates are off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.last_layer import LastLayerConfig, LastLayerPosterior
from metarl_robot.runtime.safety import EventCode, SafetyLayer

pytestmark = pytest.mark.slow  # the tiny online run and its export (seconds)

SMALL_PLAN = {"samples": 16, "horizon": 5}


def drive(adapter, bundle, steps: int, seed: int = 0, task: str = "test"):
    """``steps`` steps of ``adapter`` on the bundle's family (each observed); returns the last diagnostics."""
    env = MetaMujocoEnv(bundle.family.name)
    obs, _ = env.reset(seed=seed, options={"task": task})
    params = {k: np.array([v]) for k, v in env.reward_params.items()}
    diag = {}
    for _ in range(steps):
        action, diag = adapter.act(obs[None], params)
        next_obs, _, _, _, info = env.step(action[0])
        adapter.observe(obs[None], info["sent_action"][None], next_obs[None])
        obs = next_obs
    env.close()
    return diag


def test_the_last_layer_fits_the_robots_transitions_and_persists_until_forgotten(online_bundle: Path):
    bundle = load_bundle(online_bundle)
    adapter = bundle.make_adapter(planner_overrides=SMALL_PLAN, seed=0)
    diag = drive(adapter, bundle, 20)
    assert diag["online_updates"][0] == 19  # reported at the 20th act, before its transition
    assert diag["online_shift"][0] > 0 and diag["update_refused"][0] == 0
    learned = adapter.posterior.weights.copy()
    adapter.reset()  # a new episode: the context window empties, the last layer stays
    np.testing.assert_array_equal(adapter.posterior.weights, learned)
    assert adapter.window.size[0] == 0 and adapter.posterior.updates[0] == 20
    adapter.forget()  # the operator's reset: back to the meta-trained prior
    np.testing.assert_array_equal(adapter.posterior.weights[0], bundle.prior_head)
    assert adapter.posterior.updates[0] == 0


def test_with_updates_off_it_is_the_prior_model(online_bundle: Path):
    bundle = load_bundle(online_bundle)
    frozen = bundle.make_adapter(planner_overrides=SMALL_PLAN, seed=1, online=False)
    diag = drive(frozen, bundle, 12)
    assert diag["online_updates"][0] == 0 and diag["online_shift"][0] == 0
    np.testing.assert_array_equal(frozen.posterior.weights[0], bundle.prior_head)


def test_adaptation_off_as_the_node_asks_for_it_switches_off_the_context_and_the_last_layer(online_bundle: Path):
    # The node's `adapt: false` means no adaptation of any kind, not only no context.
    bundle = load_bundle(online_bundle)
    assert bundle.adapter_switches(False) == {"adapt": False, "online": False}
    assert bundle.adapter_switches(True) == {"adapt": True, "online": True}
    off = bundle.make_adapter(planner_overrides=SMALL_PLAN, seed=1, **bundle.adapter_switches(False))
    diag = drive(off, bundle, 12)
    assert diag["online_updates"][0] == 0
    np.testing.assert_allclose(diag["context"][0], bundle.empty_context(off), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(off.posterior.weights[0], bundle.prior_head)


def test_a_refused_update_keeps_the_last_good_model_and_is_reported(online_bundle: Path):
    bundle = load_bundle(online_bundle)
    adapter = bundle.make_adapter(planner_overrides=SMALL_PLAN, seed=0)
    drive(adapter, bundle, 5)
    good = adapter.posterior.weights.copy()
    # Any move of the last layer now counts as diverging: every update is refused from here on.
    adapter.posterior = _strict(adapter.posterior)
    diag = drive(adapter, bundle, 4, seed=3)
    assert diag["update_refused"][0] == 1.0 and "diverging" in adapter.posterior.last_failure[0]
    np.testing.assert_array_equal(adapter.posterior.weights, good)
    # The node hands the flag to the safety layer: a WARN event, counted, and the action is still used.
    layer = SafetyLayer(bundle.robot)
    layer.on_handshake(True, 0.0)
    layer.on_frame(1, 1, 0.01, np.zeros(bundle.robot.obs_dim))
    decision = layer.filter(bundle.robot.safe_action, None, 0.02, update_refused=True)
    assert EventCode.MODEL_UPDATE_REFUSED in [e.code for e in decision.events]
    assert layer.counters.model_updates_refused == 1 and decision.source == "adapter"


def _strict(posterior: LastLayerPosterior) -> LastLayerPosterior:
    strict = LastLayerPosterior(posterior.prior, LastLayerConfig(posterior.config.prior_precision, 1e-12),
                                posterior.batch)
    strict.weights, strict.covariance, strict.updates = (posterior.weights.copy(), posterior.covariance.copy(),
                                                         posterior.updates.copy())
    return strict


def test_what_an_episode_started_from_is_logged_and_replayed_exactly(online_bundle: Path, tmp_path: Path):
    """A second episode on the same robot starts from the first's fit: the log records it, the replay restores it
    and reproduces every action; replayed from the prior instead, the actions differ."""
    from metarl_robot.logs.reader import read_episode
    from metarl_robot.real2sim.sim_record import record_sim_episode
    from metarl_robot.replay.shadow import replay_episode, shadow_pass

    bundle = load_bundle(online_bundle)
    first = bundle.make_adapter(seed=0)
    drive(first, bundle, 25)
    carried = first.carried_state()
    assert sorted(carried) == ["last_layer_covariance", "last_layer_updates", "last_layer_weights",
                               "latency_delay", "latency_error", "latency_seen"]
    task = bundle.family.sample(np.random.default_rng(1), "test", 1)[0]
    log = record_sim_episode(bundle, task, tmp_path / "second.mcap", steps=15, seed=4, carried=carried)
    episode = read_episode(log)
    for key, value in carried.items():
        np.testing.assert_array_equal(episode.adapter_state[key], value)
    replay = replay_episode(episode, bundle)
    assert replay.counterfactual.reproduced, replay.counterfactual
    assert any("carried" in note for note in replay.notes)
    from_prior = shadow_pass(episode, bundle, adapt=True, seed=4)
    assert not np.allclose(from_prior.actions[episode.adapted], replay.logged.actions[episode.adapted])
    # an adapter that carries nothing refuses a state from another kind rather than ignoring it
    with pytest.raises(ValueError, match="carries nothing across episodes"):
        load_bundle("policies/cartpole_mb").make_adapter().restore(carried)


@pytest.mark.parametrize("delay", [0, 1, 2])
def test_the_adapter_tells_the_actuator_latency_and_plans_for_it(delay: int):
    # The shipped bundle (a model that predicts), driven on a twin whose motors apply each command `delay` periods
    # late: no family models that; the hypothesis whose last layer predicts best wins, and is planned for.
    from metarl_robot.envs.out_of_family import OutOfFamily

    bundle = load_bundle("policies/cartpole_online")
    adapter = bundle.make_adapter(planner_overrides={"samples": 32, "horizon": 20}, seed=0)
    env = MetaMujocoEnv(bundle.family.name, effects=OutOfFamily(delay_periods=delay))
    obs, _ = env.reset(seed=0, options={"task": "test"})
    params = {k: np.array([v]) for k, v in env.reward_params.items()}
    delays = []
    for _ in range(75):
        action, diag = adapter.act(obs[None], params)
        delays.append(diag["command_delay"][0])
        next_obs, _, _, _, info = env.step(action[0])
        adapter.observe(obs[None], info["sent_action"][None], next_obs[None])
        obs = next_obs
    env.close()
    assert delays[-1] == delay and all(d == 0 for d in delays[:adapter.latency.config.min_transitions])
    errors = adapter.latency.error[0]
    margin = adapter.latency.config.margin
    assert errors.argmin() == delay and errors.min() < np.log1p(-margin) + np.delete(errors, delay).min(), errors
    if delay:
        # The commands on their way are rolled out first, and the next transition is predicted with the oldest.
        np.testing.assert_array_equal(adapter.pending_commands()[0], adapter.latency.sent[0, -delay:])
        np.testing.assert_array_equal(adapter.next_applied(np.zeros((1, 1)))[0], adapter.latency.sent[0, -delay])
    else:
        assert adapter.pending_commands()[0].shape == (0, 1)


def test_an_episode_the_node_ran_with_adaptation_off_replays_exactly(online_bundle: Path, tmp_path: Path):
    # adapt: false means no context and no last-layer updates, in the node, in sim recordings and in the replay.
    from metarl_robot.logs.reader import read_episode
    from metarl_robot.real2sim.sim_record import record_sim_episode
    from metarl_robot.replay.shadow import replay_episode

    bundle = load_bundle(online_bundle)
    task = bundle.family.sample(np.random.default_rng(2), "test", 1)[0]
    episode = read_episode(record_sim_episode(bundle, task, tmp_path / "off.mcap", steps=15, seed=5, adapt=False))
    assert np.nanmax(episode.adaptation["online_updates"]) == 0
    replay = replay_episode(episode, bundle)
    assert replay.counterfactual.reproduced, replay.counterfactual
