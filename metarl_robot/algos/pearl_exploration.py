"""PEARL's data collection: one exploration round per task, as the collection schedule says."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from metarl_robot.algos.pearl_controller import LatentPolicy, PEARLController, family_reward_fn
from metarl_robot.algos.task_replay import TaskReplay
from metarl_robot.envs.rollout import Rollout, collect
from metarl_robot.spec.family import Task, TaskFamily
from metarl_robot.spec.rewards import get_reward


@dataclass
class CollectionSchedule:
    """Episodes per task in one exploration round (the reference counts steps; one episode = episode_steps)."""

    prior_episodes: int = 1
    """Episodes with z drawn from the prior at each episode start; to the encoder and RL buffers."""
    posterior_episodes: int = 0
    """Episodes with z sampled from the posterior of the round so far; to the encoder and RL buffers."""
    extra_rl_episodes: int = 1
    """Episodes with z sampled from the posterior of the round so far; to the RL buffer only (the
    reference's ``num_extra_rl_steps_posterior``: policy data under inferred beliefs, kept out of the
    context so the encoder trains on the same kind of context it gets at meta-test time)."""

    def validate(self) -> None:
        for name in ("prior_episodes", "posterior_episodes", "extra_rl_episodes"):
            if getattr(self, name) < 0:
                raise ValueError(f"CollectionSchedule.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.prior_episodes + self.posterior_episodes == 0:
            raise ValueError("CollectionSchedule: prior_episodes + posterior_episodes must be >= 1, or the round "
                             "leaves the encoder buffer empty")


def explore_tasks(algo: LatentPolicy, replay: TaskReplay, envs: gym.vector.VectorEnv, family: TaskFamily,
                  tasks: Sequence[Task], task_ids: Sequence[int], schedule: CollectionSchedule,
                  seed: int | Sequence[int]) -> dict[str, Rollout]:
    """One exploration round on ``tasks`` (sub-env ``i`` runs ``tasks[i]``, stored as ``task_ids[i]``).

    Each task's encoder buffer is emptied first, then: ``prior_episodes`` with z from the prior,
    ``posterior_episodes`` and ``extra_rl_episodes`` with z resampled at each episode start from the
    posterior of everything this round has collected so far on the task. Every transition goes to
    the RL buffer; only prior and posterior episodes go to the encoder buffer. Actions are sampled
    from the policy (exploration). Returns the rollout of each non-empty phase by name
    (``prior``, ``posterior``, ``extra_rl``) for logging.

    ``seed``: an int resets sub-env ``i`` with ``seed + i`` (``seed + 1 + i`` and ``seed + 2 + i`` for the
    posterior and RL-only phases); a list gives each sub-env its own reset seed, and ``[s] * n`` starts
    every task's first episode of each phase from the same state (``s``, ``s + 1``, ``s + 2``), as a gap
    measurement against an oracle episode from that state needs.
    """
    schedule.validate()
    if len(tasks) != envs.num_envs or len(task_ids) != envs.num_envs:
        raise ValueError(f"got {len(tasks)} tasks and {len(task_ids)} ids for {envs.num_envs} sub-envs")
    params = {n: np.array([t[n] for t in tasks]) for n in family.reward_names}
    reward_fn = family_reward_fn(get_reward(family.spec.reward), algo.robot, params)
    for task_id, task in zip(task_ids, tasks, strict=True):
        replay.begin_exploration(task_id, family.to_vector(task))
    one_seed = isinstance(seed, int | np.integer)
    if not one_seed and len(seed) != envs.num_envs:
        raise ValueError(f"got {len(seed)} reset seeds for {envs.num_envs} sub-envs")

    def phase_seed(k: int) -> int | list[int]:
        return int(seed) + k if one_seed else [int(s) + k for s in seed]
    policy_seed = int(seed) if one_seed else int(seed[0])
    out: dict[str, Rollout] = {}
    if schedule.prior_episodes:
        prior = PEARLController(algo, envs.num_envs, reward_fn=reward_fn, keep_context=False, seed=policy_seed)
        out["prior"] = collect(envs, family, prior, tasks, schedule.prior_episodes, seed=phase_seed(0))
        replay.add_rollout(task_ids, out["prior"], encoder=True)
    # Posterior phases: one controller that keeps its context, primed with the prior episodes.
    posterior = PEARLController(algo, envs.num_envs, reward_fn=reward_fn, keep_context=True, seed=policy_seed + 1)
    if "prior" in out:
        r = out["prior"]
        posterior.absorb(r.obs, r.actions, r.rewards, r.next_obs, r.valid)
    for name, episodes, to_encoder, k in (("posterior", schedule.posterior_episodes, True, 1),
                                          ("extra_rl", schedule.extra_rl_episodes, False, 2)):
        if episodes:
            out[name] = collect(envs, family, posterior, tasks, episodes, seed=phase_seed(k))
            replay.add_rollout(task_ids, out[name], encoder=to_encoder)
    return out
