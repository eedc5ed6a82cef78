from __future__ import annotations

import numpy as np
import pytest

from metarl_robot.algos.buffer import EpisodeBuffer
from metarl_robot.envs.rollout import Rollout


def _rollout(envs=3, steps=20, episodes=2):
    t = np.arange(envs * steps * episodes, dtype=float).reshape(envs, steps * episodes)
    obs = np.stack([t, -t], axis=-1)  # obs encodes (env, step) so windows can be checked
    start = np.zeros(steps * episodes, dtype=bool)
    start[::steps] = True
    return Rollout(obs=obs, actions=t[..., None] * 10, next_obs=obs + 0.5, rewards=np.zeros_like(t),
                   valid=np.ones_like(t, dtype=bool), episode_start=start, tasks=[{} for _ in range(envs)])


def test_episodes_are_split_and_held_out():
    buf = EpisodeBuffer(2, 1, holdout_every=5)
    buf.add(_rollout(), np.zeros((3, 1)))
    buf.add(_rollout(), np.zeros((3, 1)))
    assert len(buf) == 12 and buf.transitions == 240
    assert buf.split(True).tolist() == [4, 9]
    assert len(buf.split(False)) == 10


def test_context_windows_come_from_the_same_episode_just_before_the_target():
    buf = EpisodeBuffer(2, 1)
    buf.add(_rollout(), np.zeros((3, 1)))
    batch = buf.sample(np.random.default_rng(0), 500, window=6)
    target_step = batch.obs[:, 0]
    sizes = batch.ctx_mask.sum(axis=1)
    for i in range(500):
        c = int(sizes[i])
        assert c <= 6
        if c:
            steps = batch.ctx_obs[i, -c:, 0]
            np.testing.assert_array_equal(steps, target_step[i] - np.arange(c, 0, -1))  # oldest first, contiguous
            assert np.all(batch.ctx_mask[i, -c:] == 1) and np.all(batch.ctx_mask[i, :-c] == 0)
    assert sizes.min() == 0 and sizes.max() == 6  # every size is trained on
    exact = buf.sample(np.random.default_rng(0), 200, window=6, context_size=4)
    step_in_episode = exact.obs[:, 0] % 20
    np.testing.assert_array_equal(exact.ctx_mask.sum(1), np.minimum(step_in_episode, 4))


def test_save_and_load(tmp_path):
    buf = EpisodeBuffer(2, 1)
    buf.add(_rollout(), np.ones((3, 1)))
    buf.save(tmp_path / "b.npz")
    back = EpisodeBuffer.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(back.obs, buf.obs)
    assert back.holdout_every == buf.holdout_every


def test_sampling_an_empty_part_is_an_error():
    with pytest.raises(ValueError, match="no episodes"):
        EpisodeBuffer(2, 1).sample(np.random.default_rng(0), 4, 3)
