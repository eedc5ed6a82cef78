"""The robot-side PEARL adapter: step-for-step equal to the torch online controller on a real cart-pole
episode, resets to the prior, and refuses corrupt graphs, wrong sizes and NaN inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from metarl_robot.algos.pearl import PEARL
from metarl_robot.algos.pearl_controller import PEARLController, family_reward_fn
from metarl_robot.algos.task_replay import TaskReplay
from metarl_robot.envs.registry import make_env
from metarl_robot.export.pearl_graphs import export_pearl_graphs
from metarl_robot.paths import REPO_ROOT
from metarl_robot.runtime.context_policy import (
    ContextPolicyAdapter,
    ContextPolicyError,
    load_graph,
    pearl_graph_interfaces,
)
from metarl_robot.spec.family import load_family
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import load_robot
from metarl_robot.train.config import build_config

torch.set_num_threads(1)
ROBOT = load_robot("cartpole")
FAMILY = load_family("cartpole_swingup")
REWARD = get_reward(FAMILY.spec.reward)
CONFIG = REPO_ROOT / "configs" / "pearl_cartpole_swingup.yaml"
STEPS = 120


def pearl_algo(seed: int = 0) -> tuple[PEARL, TaskReplay]:
    """The shipped cart-pole PEARL config's network sizes, untrained, normalisers fitted on random-policy episodes
    (so the baked-in statistics are not the identity), and the replay they came from."""
    cfg = build_config(yaml.safe_load(CONFIG.read_text()), str(CONFIG))
    algo = PEARL(ROBOT, cfg.pearl_net, cfg.pearl, seed=seed)
    rng = np.random.default_rng(seed)
    replay = TaskReplay(ROBOT.obs_dim, ROBOT.action_dim)
    env = make_env("cartpole_swingup")
    try:
        for task_id, task in enumerate(FAMILY.sample(rng, "train", 2)):
            env.unwrapped.set_task(task)
            obs, _ = env.reset(seed=task_id)
            rows = []
            for _ in range(80):
                action = rng.uniform(ROBOT.action_low, ROBOT.action_high)
                next_obs, reward, _, _, info = env.step(action)
                rows.append((obs, info["sent_action"], reward, next_obs))
                obs = next_obs
            o, a, r, n = (np.array(x) for x in zip(*rows, strict=True))
            replay.begin_exploration(task_id)
            replay.add(task_id, o, a, r, n, np.zeros(len(r)), encoder=True)
    finally:
        env.close()
    algo.agent.inputs.fit(*replay.training_arrays(rng, 10_000))
    algo.normalizers_fitted = True
    return algo, replay


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    algo, _ = pearl_algo()
    graphs = export_pearl_graphs(algo.agent, tmp_path_factory.mktemp("pearl"))
    return algo, graphs


def _adapter(graphs, batch: int = 1) -> ContextPolicyAdapter:
    return ContextPolicyAdapter.from_onnx(ROBOT, REWARD, graphs.factors, graphs.policy, batch=batch)


def test_onnx_adapter_matches_the_torch_online_controller_over_an_episode(exported):
    algo, graphs = exported
    task = FAMILY.sample(np.random.default_rng(3), "test", 1)[0]
    params = {n: np.array([task[n]]) for n in FAMILY.reward_names}
    controller = PEARLController(algo, 1, deterministic=True, z_mode="mean",
                                 reward_fn=family_reward_fn(REWARD, ROBOT, params))
    adapter = _adapter(graphs)
    env = make_env("cartpole_swingup")
    try:
        env.unwrapped.set_task(task)
        obs, _ = env.reset(seed=5)
        controller.reset()
        adapter.reset()
        worst_action = worst_mean = 0.0
        for step in range(STEPS):
            expected = controller.act(obs[None])
            action, diag = adapter.act(obs[None], params)
            assert action.shape == (1, ROBOT.action_dim) and diag["context_size"].tolist() == [step]
            belief = controller.posterior()
            np.testing.assert_allclose(diag["context_var"], belief.var, rtol=1e-5, atol=0, err_msg=f"step {step}")
            worst_mean = max(worst_mean, float(np.abs(diag["context_mean"] - belief.mean).max()))
            worst_action = max(worst_action, float(np.abs(action - expected).max()))
            next_obs, _, terminated, _, info = env.step(expected[0])  # both follow the torch trajectory
            assert not terminated
            controller.observe(obs[None], info["sent_action"][None], next_obs[None])
            adapter.observe(obs[None], info["sent_action"][None], next_obs[None])
            obs = next_obs
    finally:
        env.close()
    assert worst_mean <= 1e-5 and worst_action <= 1e-5, (worst_mean, worst_action)
    # the evidence moved the belief: the comparison was not prior vs prior
    assert adapter.posterior()[1].max() < 0.5 and np.abs(adapter.posterior()[0]).max() > 1e-3


def test_reward_argument_equals_the_reward_computed_from_task_params(exported):
    _, graphs = exported
    rng = np.random.default_rng(0)
    obs, act, nxt = rng.normal(size=(2, 4)), rng.uniform(-1, 1, (2, 1)), rng.normal(size=(2, 4))
    params = {n: np.array([0.5, 1.5]) for n in FAMILY.reward_names} | {"pole_mass": np.array([0.1, 0.2])}
    computed, given = _adapter(graphs, 2), _adapter(graphs, 2)
    with pytest.raises(ValueError, match="call act"):
        computed.observe(obs, act, nxt)  # no task parameters yet, no reward given
    computed.act(obs, params)
    computed.observe(obs, act, nxt)
    given.observe(obs, act, nxt, reward=REWARD(ROBOT, obs, act, nxt, params)[0])
    np.testing.assert_array_equal(computed.posterior()[0], given.posterior()[0])
    with pytest.raises(ValueError, match="lacks reward parameter"):
        computed.act(obs, {"pole_mass": 0.1})
    # A batch of one (the robot) computes its reward through the float path: the same belief as numpy's reward.
    computed, given = _adapter(graphs, 1), _adapter(graphs, 1)
    one = {n: v[:1] for n, v in params.items()}
    for _ in range(2):  # the second with a changed task parameter: the float path reads the latest act's values
        computed.act(obs[:1], one)
        computed.observe(obs[:1], act[:1], nxt[:1])
        given.observe(obs[:1], act[:1], nxt[:1], reward=REWARD(ROBOT, obs[:1], act[:1], nxt[:1], one)[0])
        np.testing.assert_array_equal(computed.posterior()[0], given.posterior()[0])
        one = {n: v[1:] for n, v in params.items()}


def test_reset_restores_the_prior_per_env(exported):
    _, graphs = exported
    adapter = _adapter(graphs, batch=2)
    rng = np.random.default_rng(1)
    for _ in range(5):
        adapter.observe(rng.normal(size=(2, 4)), rng.uniform(-1, 1, (2, 1)), rng.normal(size=(2, 4)),
                        reward=rng.random(2))
    moved_mean, moved_var = adapter.posterior()
    assert np.all(moved_var < 1.0)
    adapter.reset(np.array([True, False]))
    mean, var = adapter.posterior()
    np.testing.assert_array_equal(mean[0], 0.0)
    np.testing.assert_array_equal(var[0], 1.0)
    np.testing.assert_array_equal(mean[1], moved_mean[1])
    _, diag = adapter.act(np.zeros((2, 4)), {n: 1.0 for n in FAMILY.reward_names})
    assert diag["context_size"].tolist() == [0, 5]
    adapter.reset()
    _, diag = adapter.act(np.zeros((2, 4)), {n: 1.0 for n in FAMILY.reward_names})
    np.testing.assert_array_equal(diag["context_mean"], 0.0)
    np.testing.assert_array_equal(diag["context_var"], 1.0)
    assert diag["context_size"].tolist() == [0, 0]


def test_nan_inputs_are_refused_and_leave_the_belief_alone(exported):
    _, graphs = exported
    adapter = _adapter(graphs)
    bad = np.array([[0.0, np.nan, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"obs contains NaN or Inf \(env rows \[0\]\)"):
        adapter.act(bad, {n: 1.0 for n in FAMILY.reward_names})
    with pytest.raises(ValueError, match="next_obs contains NaN"):
        adapter.observe(np.zeros((1, 4)), np.zeros((1, 1)), bad, reward=np.zeros(1))
    with pytest.raises(ValueError, match="reward contains NaN"):
        adapter.observe(np.zeros((1, 4)), np.zeros((1, 1)), np.zeros((1, 4)), reward=np.array([np.nan]))
    with pytest.raises(ValueError, match="task_params"):
        adapter.act(np.zeros((1, 4)), {n: np.inf for n in FAMILY.reward_names})
    assert adapter.steps_observed.tolist() == [0]
    np.testing.assert_array_equal(adapter.posterior()[1], 1.0)


def test_wrong_sizes_and_corrupt_graphs_are_refused(exported, tmp_path):
    _, graphs = exported
    adapter = _adapter(graphs)
    with pytest.raises(ValueError, match=r"obs: expected shape \(1, 4\), got \(1, 5\)"):
        adapter.act(np.zeros((1, 5)), {n: 1.0 for n in FAMILY.reward_names})
    with pytest.raises(ValueError, match=r"action: expected shape \(1, 1\), got \(1, 2\)"):
        adapter.observe(np.zeros((1, 4)), np.zeros((1, 2)), np.zeros((1, 4)), reward=np.zeros(1))
    # a graph for a different robot (obs size 6) is refused at load, naming what differs
    wrong = pearl_graph_interfaces(6, ROBOT.action_dim, 5)["factors"]
    with pytest.raises(ContextPolicyError, match=r"factors graph inputs.obs: dimension 1 is 4, expected 6.*needs"):
        load_graph(graphs.factors, "factors", wrong)
    # the factors file where the policy is expected: different inputs
    with pytest.raises(ContextPolicyError, match="policy graph needs an input 'z'"):
        ContextPolicyAdapter.from_onnx(ROBOT, REWARD, graphs.factors, graphs.factors)
    corrupt = tmp_path / "corrupt.onnx"
    data = bytearray(graphs.factors.read_bytes())
    corrupt.write_bytes(bytes(data[: len(data) // 3]))  # a truncated copy
    with pytest.raises(ContextPolicyError, match=r"corrupt\.onnx: not a loadable ONNX factors graph"):
        ContextPolicyAdapter.from_onnx(ROBOT, REWARD, corrupt, graphs.policy)
    with pytest.raises(ContextPolicyError, match="not found"):
        ContextPolicyAdapter.from_onnx(ROBOT, REWARD, tmp_path / "missing.onnx", graphs.policy)


def _called_as_given(adapter: ContextPolicyAdapter) -> ContextPolicyAdapter:
    """The same graphs behind plain callables, which the adapter calls as given (its path for any functions)."""
    factors, policy = adapter.factors_fn, adapter.policy_fn
    return ContextPolicyAdapter(ROBOT, REWARD, lambda *x: factors(*x), lambda *x: policy(*x), adapter.latent_dim,
                                batch=adapter.batch)


def test_bound_graphs_give_exactly_the_numbers_of_the_graphs_called_as_given(exported):
    _, graphs = exported
    bound = _adapter(graphs, batch=2)
    called = _called_as_given(bound)
    assert bound._run_factors is not None and bound._run_policy is not None  # the IOBinding path is what's compared
    assert called._run_factors is None and called._run_policy is None
    rng = np.random.default_rng(7)
    params = {"target_x": np.array([0.3, -0.2])}
    precision_sum, weighted_sum = np.zeros((2, 5)), np.zeros((2, 5))  # the belief's arithmetic, written out
    obs, returned = rng.normal(size=(2, 4)), []
    for step in range(40):
        if step == 20:
            for adapter in (bound, called):
                adapter.reset(np.array([True, False]))
            precision_sum[0] = weighted_sum[0] = 0.0
        action, diag = bound.act(obs, params)
        action_called, diag_called = called.act(obs, params)
        np.testing.assert_array_equal(action, action_called)
        assert diag.keys() == diag_called.keys()
        for key in diag:
            np.testing.assert_array_equal(diag[key], diag_called[key], err_msg=f"{key} at step {step}")
        var = 1.0 / (1.0 + precision_sum)
        np.testing.assert_array_equal(diag["context_mean"], (var * weighted_sum).astype(np.float32))
        np.testing.assert_array_equal(diag["context_var"], var.astype(np.float32))
        returned.append((action, diag, action.copy(), {k: v.copy() for k, v in diag.items()}))
        sent, next_obs = rng.uniform(-1, 1, (2, 1)), obs + rng.normal(0, 0.3, (2, 4))
        bound.observe(obs, sent, next_obs)
        called.observe(obs, sent, next_obs)
        reward = REWARD(ROBOT, obs, sent, next_obs, params)[0]
        mean, logvar = bound.factors_fn(obs, sent, reward, next_obs)
        precision = np.exp(-logvar.astype(np.float64))
        precision_sum += precision
        weighted_sum += precision * mean.astype(np.float64)
        obs = next_obs
    np.testing.assert_array_equal(bound.precision_sum, precision_sum)
    np.testing.assert_array_equal(bound.weighted_mean_sum, weighted_sum)
    np.testing.assert_array_equal(called.precision_sum, precision_sum)
    # what act returned stays the caller's: the adapter's buffers are not handed out
    for action, diag, action_then, diag_then in returned:
        np.testing.assert_array_equal(action, action_then)
        for key in diag:
            np.testing.assert_array_equal(diag[key], diag_then[key])


def test_numbers_past_float32_range_reach_the_graphs_as_an_onnx_graph_call_would(exported):
    # finite float64, infinite once cast to the graphs' float32: not an input error (as before); whatever the graphs
    # make of it, both paths give the same outcome
    _, graphs = exported
    outcomes = []
    for adapter in (_adapter(graphs), _called_as_given(_adapter(graphs))):
        huge = np.array([[1e39, 0.0, 0.0, 0.0]])
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                action, diag = adapter.act(huge, {"target_x": 0.0})
                adapter.observe(huge, np.zeros((1, 1)), huge)
                outcomes.append((action.tolist(), diag["context_mean"].tolist(), adapter.posterior()[0].tolist()))
            except ValueError as exc:
                outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]


def test_a_plain_number_task_parameter_acts_as_its_array(exported):
    # the node passes floats; replays and simulations pass (B,) arrays
    _, graphs = exported
    plain, array = _adapter(graphs), _adapter(graphs)
    rng = np.random.default_rng(2)
    obs = rng.normal(size=(1, 4))
    for _ in range(5):
        action, diag = plain.act(obs, {"target_x": 0.4})
        action_array, diag_array = array.act(obs, {"target_x": np.array([0.4])})
        np.testing.assert_array_equal(action, action_array)
        np.testing.assert_array_equal(diag["context_mean"], diag_array["context_mean"])
        next_obs = obs + rng.normal(0, 0.3, (1, 4))
        plain.observe(obs, action, next_obs)
        array.observe(obs, action, next_obs)
        obs = next_obs
    with pytest.raises(ValueError, match=r"task_params\['target_x'\] contains NaN"):
        plain.act(obs, {"target_x": float("nan")})


def test_non_finite_graph_outputs_are_refused_and_leave_the_belief_alone(exported):
    _, graphs = exported
    good = _adapter(graphs)
    factors, policy = good.factors_fn, good.policy_fn

    def nan_mean(*x):
        mean, logvar = factors(*x)
        return [np.full_like(mean, np.nan), logvar]

    def overflowing_precision(*x):
        mean, _ = factors(*x)
        return [mean, np.full_like(mean, -np.inf)]

    rng = np.random.default_rng(4)
    transition = (rng.normal(size=(1, 4)), np.zeros((1, 1)), rng.normal(size=(1, 4)))
    for bad in (nan_mean, overflowing_precision):
        adapter = ContextPolicyAdapter(ROBOT, REWARD, bad, policy, good.latent_dim)
        with pytest.raises(ValueError, match="factors graph returned a non-finite mean or log-variance"):
            adapter.observe(*transition, reward=np.zeros(1))
        assert adapter.steps_observed.tolist() == [0]
        np.testing.assert_array_equal(adapter.posterior()[1], 1.0)
    adapter = ContextPolicyAdapter(ROBOT, REWARD, factors, lambda *x: [np.full((1, 1), np.nan)], good.latent_dim)
    with pytest.raises(ValueError, match=r"policy graph returned \(1, 1\) actions with non-finite values"):
        adapter.act(transition[0], {"target_x": 0.0})
