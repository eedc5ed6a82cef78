"""PEARL's algorithm: the Bellman update, where the encoder's gradients come from, where context comes
from (the reference bug), meta-evaluation before training, checkpoints, and a tiny task-inference check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl_robot.algos.pearl import PEARL, PEARLConfig
from metarl_robot.algos.pearl_controller import PEARLController, family_reward_fn
from metarl_robot.algos.pearl_exploration import CollectionSchedule, explore_tasks
from metarl_robot.algos.task_replay import Context, TaskReplay
from metarl_robot.envs.rollout import Rollout, collect, make_vector_env
from metarl_robot.models.pearl import PEARLNetConfig
from metarl_robot.spec.family import load_family
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import load_robot

torch.set_num_threads(1)
ROBOT = load_robot("cartpole")  # 4 obs (one angle), 1 action in [-1, 1]
SMALL_NET = PEARLNetConfig(latent_dim=3, hidden=32, layers=2, encoder_hidden=32, encoder_layers=2)


def _algo(seed=0, **cfg):
    base = {"meta_batch": 4, "batch_size": 32, "context_batch": 16, "grad_steps": 2}
    return PEARL(ROBOT, SMALL_NET, PEARLConfig(**{**base, **cfg}), seed=seed)


def _transitions(rng, n, sign):
    """Random cart-pole-shaped transitions whose reward is ``sign * action`` (the task is the sign)."""
    obs = rng.normal(size=(n, 4)) * 0.5
    act = rng.uniform(-1, 1, (n, 1))
    return obs, act, sign * act[:, 0], obs + 0.05 * rng.normal(size=(n, 4)), np.zeros(n)


def _replay(rng, signs=(1.0, -1.0), n=200):
    replay = TaskReplay(4, 1)
    for task_id, sign in enumerate(signs):
        replay.begin_exploration(task_id, np.array([sign]))
        replay.add(task_id, *_transitions(rng, n, sign), encoder=True)
    return replay


def test_critic_update_lowers_the_bellman_loss_on_a_fixed_batch():
    # a near-zero fixed temperature: the target's entropy term would otherwise add noise that the fit cannot remove
    algo = _algo(discount=0.5, critic_lr=3e-3, encoder_lr=3e-3, auto_entropy=False, init_alpha=1e-4)
    replay = _replay(np.random.default_rng(0), signs=(1.0, 1.0))  # the critic alone can fit it (no inference needed)
    algo.agent.inputs.fit(*replay.training_arrays(algo.rng, 10_000))
    rng = np.random.default_rng(1)
    ids = np.array([0, 1, 0, 1])
    context, batch = replay.sample_context(rng, ids, 16), replay.sample_batch(rng, ids, 32)

    def loss() -> float:
        torch.manual_seed(123)  # the same z and next-action noise each time
        with torch.no_grad():
            mean, var = algo.posterior_tensors(context)
            return float(algo.critic_loss(batch, mean + var.sqrt() * torch.randn_like(mean)))

    before = loss()
    for _ in range(40):
        algo.train_step(context, batch)
    after = loss()
    assert after < 0.5 * before, (before, after)


def test_encoder_learns_from_the_critic_loss_and_not_from_the_actor_loss():
    algo = _algo()
    replay = _replay(np.random.default_rng(2))
    algo.agent.inputs.fit(*replay.training_arrays(algo.rng, 10_000))
    rng = np.random.default_rng(3)
    context, batch = replay.sample_context(rng, [0, 1], 16), replay.sample_batch(rng, [0, 1], 8)
    encoder = list(algo.agent.encoder.parameters())

    mean, var = algo.posterior_tensors(context)
    z = mean + var.sqrt() * torch.randn_like(mean)  # differentiable: a leak would reach the encoder
    algo.agent.zero_grad()
    actor_loss, _ = algo.actor_loss(torch.as_tensor(batch.obs, dtype=torch.float32),
                                    z.unsqueeze(1).expand(2, 8, z.shape[-1]))
    actor_loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in encoder)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in algo.agent.actor.parameters())

    mean, var = algo.posterior_tensors(context)
    z = mean + var.sqrt() * torch.randn_like(mean)
    algo.agent.zero_grad()
    algo.critic_loss(batch, z).backward()
    assert sum(float(p.grad.abs().sum()) for p in encoder if p.grad is not None) > 0

    # and one full step moves the encoder (critic + KL), the actor and the critics
    before = [p.detach().clone() for p in encoder]
    algo.train_step(context, batch)
    assert any(not torch.equal(b, p) for b, p in zip(before, encoder, strict=True))


def test_context_comes_only_from_the_current_tasks_current_exploration():
    """Regression test for the reference bug (garage#1365): context from replay instead of exploration."""
    rng = np.random.default_rng(4)
    replay = TaskReplay(4, 1)
    obs, act, _, nxt, done = _transitions(rng, 50, 1.0)
    replay.begin_exploration(0)
    replay.add(0, obs, act, np.full(50, 100.0), nxt, done, encoder=True)  # an earlier round on task 0
    replay.begin_exploration(0)  # a new round: the earlier exploration is stale
    replay.add(0, obs, act, np.full(50, 1.0), nxt, done, encoder=True)
    replay.add(0, obs, act, np.full(50, 50.0), nxt, done, encoder=False)  # posterior RL-only episodes
    replay.begin_exploration(1)
    replay.add(1, obs, act, np.full(50, -1.0), nxt, done, encoder=True)
    replay.begin_exploration(2)
    replay.add(2, obs, act, np.full(50, 7.0), nxt, done, encoder=False)  # RL data, no exploration yet

    context = replay.sample_context(rng, [0, 1, 0, 1], 64)
    assert set(context.reward[0]) | set(context.reward[2]) == {1.0}
    assert set(context.reward[1]) | set(context.reward[3]) == {-1.0}
    assert set(replay.sample_batch(rng, [0], 2000).reward.ravel()) == {100.0, 1.0, 50.0}  # RL keeps everything
    assert replay.trainable_tasks().tolist() == [0, 1]
    with pytest.raises(ValueError, match="task 2 has no exploration data"):
        replay.sample_context(rng, [2], 4)

    # the algorithm's own sampling path: task 2 is never drawn for a meta-batch
    algo = _algo(meta_batch=8, grad_steps=3)
    metrics = algo.update(replay)
    assert np.isfinite(list(metrics.values())).all()


def test_variable_context_sizes_are_masked():
    replay = _replay(np.random.default_rng(5))
    context = replay.sample_context(np.random.default_rng(6), [0, 1] * 20, 10, min_size=3)
    sizes = context.mask.sum(1)
    assert sizes.min() >= 3 and sizes.max() <= 10 and len(set(sizes)) > 2
    assert np.all(np.diff(context.mask, axis=1) <= 0)  # filled slots first


def test_add_rollout_stores_valid_steps_with_terminal_flags_and_skips_non_finite():
    steps = 6
    obs = np.arange(2 * 2 * steps * 4, dtype=float).reshape(2, 2 * steps, 4)
    start = np.zeros(2 * steps, bool)
    start[[0, steps]] = True
    valid = np.ones((2, 2 * steps), bool)
    valid[1, 3:steps] = False  # sub-env 1 diverged at step 2 of its first episode
    rewards = np.ones((2, 2 * steps))
    rewards[0, 8] = np.nan
    rollout = Rollout(obs, np.zeros((2, 2 * steps, 1)), obs + 1, rewards, valid, start, [{}, {}])
    replay = TaskReplay(4, 1)
    counts = replay.add_rollout([7, 9], rollout, encoder=False)
    assert counts == {"added": 2 * 2 * steps - 3 - 1, "dropped_non_finite": 1}
    assert replay.rl[9].done.tolist() == [0, 0, 1] + [0] * steps  # the diverged step ends its episode
    assert not replay.rl[7].done.any()  # episode ends at the time limit are bootstrapped
    assert len(replay.encoder[7]) == 0


def test_meta_evaluation_works_before_any_training():
    family = load_family("cartpole_swingup")
    tasks = family.sample(np.random.default_rng(7), "test", 2)
    algo = _algo()
    params = {n: np.array([t[n] for t in tasks]) for n in family.reward_names}
    reward_fn = family_reward_fn(get_reward(family.spec.reward), ROBOT, params)
    prior = algo.infer_posterior(Context.empty(2, 4, 1))
    np.testing.assert_array_equal(prior.mean, 0.0)
    np.testing.assert_array_equal(prior.var, 1.0)
    controller = PEARLController(algo, 2, deterministic=False, reward_fn=reward_fn, keep_context=True, seed=1)
    np.testing.assert_array_equal(controller.posterior().var, 1.0)
    envs = make_vector_env(family, 2, "sync")
    try:
        rollout = collect(envs, family, controller, tasks, episodes=1, seed=3)
        steps = family.spec.episode_steps
        assert controller.context_size == steps and not controller.skipped.any()
        belief = controller.posterior()
        assert np.all(belief.var < 1.0) and np.isfinite(belief.mean).all()
        # the incremental belief is the batch posterior of the whole episode (what training computes)
        whole = algo.infer_posterior(Context(rollout.obs, rollout.actions, rollout.rewards, rollout.next_obs,
                                             np.ones(rollout.rewards.shape)))
        np.testing.assert_allclose(belief.var, whole.var, rtol=1e-4)
        np.testing.assert_allclose(belief.mean, whole.mean, rtol=1e-3, atol=1e-5)
        # the context's rewards are the env's own
        np.testing.assert_allclose(reward_fn(rollout.obs[:, 5], rollout.actions[:, 5], rollout.next_obs[:, 5]),
                                   rollout.rewards[:, 5], rtol=1e-12)
        assert np.isfinite(rollout.rewards).all()
        assert np.all(np.abs(rollout.actions) <= 1.0)
        # the next episode's z comes from that posterior, not the prior (keep_context)
        controller.reset()
        assert controller.context_size == steps
        # online deterministic evaluation, context cleared at each reset
        online = PEARLController(algo, 2, deterministic=True, reward_fn=reward_fn)
        assert online.z_mode == "mean"
        first = collect(envs, family, online, tasks, episodes=1, seed=3)
        assert np.isfinite(first.episode_returns()).all()
        online.reset()
        assert online.context_size == 0
        np.testing.assert_array_equal(online.current_z(), 0.0)
    finally:
        envs.close()


def test_controller_window_explicit_rewards_and_non_finite_transitions():
    algo = _algo()
    rng = np.random.default_rng(11)
    obs, act, rew, nxt, _ = _transitions(rng, 5, 1.0)
    controller = PEARLController(algo, 1, deterministic=True, context_window=3)
    with pytest.raises(ValueError, match="needs rewards"):
        controller.observe(obs[:1], act[:1], nxt[:1])
    for t in range(5):
        controller.observe(obs[t:t + 1], act[t:t + 1], nxt[t:t + 1], reward=rew[t:t + 1])
    last3 = algo.infer_posterior(Context(obs[None, 2:], act[None, 2:], rew[None, 2:], nxt[None, 2:], np.ones((1, 3))))
    np.testing.assert_allclose(controller.posterior().mean, last3.mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(controller.current_z(), last3.mean, rtol=1e-4, atol=1e-6)
    before = controller.posterior()
    bad = nxt[:1].copy()
    bad[0, 0] = np.nan
    controller.observe(obs[:1], act[:1], bad, reward=rew[:1])
    assert controller.skipped.tolist() == [1]
    assert np.isfinite(controller.posterior().mean).all()
    assert controller.context_size == 3
    assert not np.allclose(controller.posterior().var, before.var)  # the window moved on (transition 2 left)
    batched = PEARLController(algo, 1, deterministic=True)  # absorb(T at once) == T observes
    batched.absorb(obs[None], act[None], rew[None], nxt[None], valid=np.array([[True, True, False, True, True]]))
    stepwise = PEARLController(algo, 1, deterministic=True)
    for t in (0, 1, 3, 4):
        stepwise.observe(obs[t:t + 1], act[t:t + 1], nxt[t:t + 1], reward=rew[t:t + 1])
    np.testing.assert_allclose(batched.posterior().mean, stepwise.posterior().mean, rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip_reproduces_actions_and_beliefs(tmp_path):
    replay = _replay(np.random.default_rng(8))
    a = _algo(seed=1)
    a.update(replay)
    b = _algo(seed=2)
    b.load_state_dict(a.state_dict())
    rng = np.random.default_rng(9)
    obs, z = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    np.testing.assert_array_equal(a.act(obs, z, True), b.act(obs, z, True))
    np.testing.assert_array_equal(a.act(obs, z, False, torch.Generator().manual_seed(0)),
                                  b.act(obs, z, False, torch.Generator().manual_seed(0)))
    context = replay.sample_context(rng, [0, 1], 16)
    pa, pb = a.infer_posterior(context), b.infer_posterior(context)
    np.testing.assert_array_equal(pa.mean, pb.mean)
    np.testing.assert_array_equal(pa.var, pb.var)
    assert not np.array_equal(a.act(obs, z, True), _algo(seed=2).act(obs, z, True))  # the check can fail
    replay.save(tmp_path / "replay.npz")
    back = TaskReplay.load(tmp_path / "replay.npz")
    assert list(back.rl) == [0, 1] and np.array_equal(back.encoder[1].reward, replay.encoder[1].reward)
    np.testing.assert_array_equal(back.task_vectors[1], [-1.0])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="context_size_min"):
        PEARLConfig(context_batch=8, context_size_min=9).validate()
    with pytest.raises(ValueError, match="discount"):
        PEARLConfig(discount=1.0).validate()


@pytest.mark.slow
def test_posterior_separates_tasks_whose_reward_sign_differs():
    """A bandit in disguise (discount 0, reward = sign * action): after training, context from the +1 task
    and from the -1 task give clearly different beliefs, and the policy pushes the action the right way."""
    rng = np.random.default_rng(10)
    signs = (1.0, -1.0, 1.0, -1.0)
    replay = _replay(rng, signs, n=300)
    algo = _algo(seed=10, discount=0.0, meta_batch=4, batch_size=64, context_batch=8, grad_steps=700,
                 critic_lr=3e-3, encoder_lr=3e-3, actor_lr=3e-3, kl_weight=0.01)
    algo.update(replay)  # ~6 s on one core; the beliefs split after ~400 steps
    beliefs = algo.infer_posterior(replay.sample_context(rng, [0, 1, 2, 3], 8))
    spread = np.sqrt(beliefs.var.max())
    opposite = min(np.abs(beliefs.mean[0] - beliefs.mean[1]).max(), np.abs(beliefs.mean[2] - beliefs.mean[3]).max())
    same = max(np.abs(beliefs.mean[0] - beliefs.mean[2]).max(), np.abs(beliefs.mean[1] - beliefs.mean[3]).max())
    assert opposite > 2 * spread and same < opposite / 2, beliefs
    obs = rng.normal(size=(4, 4)) * 0.5
    actions = algo.act(obs, beliefs.mean, deterministic=True)[:, 0]
    assert np.all(np.sign(actions) == np.array(signs)), actions


@pytest.mark.slow
def test_exploration_rounds_fill_the_buffers_as_scheduled_and_meta_testing_runs_after_training():
    """The schedule the runner will drive: rounds of prior / posterior / RL-only episodes, an update, a meta-test."""
    family = load_family("cartpole_swingup")
    tasks = family.sample(np.random.default_rng(12), "train", 2)
    algo = _algo(grad_steps=5)
    replay = TaskReplay(4, 1)
    envs = make_vector_env(family, 2, "sync")
    try:
        first = explore_tasks(algo, replay, envs, family, tasks, [0, 1], CollectionSchedule(1, 0, 1), seed=0)
        assert set(first) == {"prior", "extra_rl"}
        prior_steps, extra_steps = first["prior"].valid.sum(1), first["extra_rl"].valid.sum(1)
        assert [len(replay.encoder[i]) for i in (0, 1)] == prior_steps.tolist()
        assert [len(replay.rl[i]) for i in (0, 1)] == (prior_steps + extra_steps).tolist()
        np.testing.assert_array_equal(replay.task_vectors[1], family.to_vector(tasks[1]))
        metrics = algo.update(replay)
        assert np.isfinite(list(metrics.values())).all()

        second = explore_tasks(algo, replay, envs, family, tasks, [0, 1], CollectionSchedule(1, 1, 0), seed=1)
        fresh = second["prior"].valid.sum(1) + second["posterior"].valid.sum(1)
        assert [len(replay.encoder[i]) for i in (0, 1)] == fresh.tolist()  # the earlier round's context is gone
        assert [len(replay.rl[i]) for i in (0, 1)] == (prior_steps + extra_steps + fresh).tolist()
        algo.update(replay)

        params = {n: np.array([t[n] for t in tasks]) for n in family.reward_names}
        meta_test = PEARLController(algo, 2, reward_fn=family_reward_fn(get_reward(family.spec.reward), ROBOT, params),
                                    keep_context=True, seed=3)
        returns = collect(envs, family, meta_test, tasks, episodes=2, seed=5).episode_returns()
        assert returns.shape == (2, 2) and np.isfinite(returns).all()  # after 0 and after 1 exploration episode
    finally:
        envs.close()
