"""The offline baseline without meta-learning beside MACAW (issue 20): behaviour cloning on a dataset's pooled
transitions (every task together), graded on the same tasks as ``metarl eval`` (split, count, seed: the same draw and
the same start state), acting with the cloned mean. With ``--finetune-from`` also the non-meta answer to MACAW's
``metarl eval --adapt-from``: per task a copy of the cloned policy fine-tuned by BC on the first K logged episodes of
that task (the same logs MACAW adapts on), graded after K = 1, 3, 5. Prints JSON.

    .venv/bin/python bench/offline_bc.py --dataset runs/datasets/cartpole_expert_partial --seeds 0 1 2 \
        --finetune-from runs/datasets/cartpole_expert_test8

The policy is MACAW's (tanh MLP over the robot's policy features, linear mean in normalised units); BC regresses the
logged commands in normalised units (clipped to [-1, 1]) by mean squared error with Adam.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Cloned:
    """The cloned policy's mean as a controller of ``run_episodes`` (it never adapts)."""

    def __init__(self, robot, policy) -> None:
        self.robot, self.policy = robot, policy

    def reset(self) -> None: ...

    def act(self, obs):
        from metarl_robot.runtime.policy_gradient import policy_features, policy_mean, to_env_action

        return to_env_action(self.robot, policy_mean(self.policy, policy_features(self.robot, obs)))

    def observe(self, *_: object) -> None: ...


def fit(params: list, x, y, steps: int, lr: float, batch: int | None = None) -> None:
    """``steps`` Adam steps of the mean squared error of the MLP ``params`` (in place) from features ``x`` to
    normalised commands ``y``: on ``batch`` random rows per step, or on all of them (``None``)."""
    import torch

    from metarl_robot.models.meta_policy import mlp_forward

    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        rows = torch.randint(len(x), (batch,)) if batch else slice(None)
        loss = ((mlp_forward(params, x[rows])[1] - y[rows]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def bc_data(robot, obs, actions):
    """Features and normalised commands (clipped to [-1, 1]) as float32 tensors: what BC regresses."""
    import numpy as np
    import torch

    from metarl_robot.runtime.policy_gradient import policy_features

    return (torch.as_tensor(policy_features(robot, obs), dtype=torch.float32),
            torch.as_tensor(np.clip(actions, -1.0, 1.0), dtype=torch.float32))


def as_policy(params: list, action_dim: int) -> list:
    """Torch MLP weights as the robot's numpy policy (a zero log std: the mean acts)."""
    import numpy as np

    return [p.detach().double().numpy() for p in params] + [np.zeros(action_dim)]


def finetuned_returns(args: argparse.Namespace, params: list, tasks: list, family, robot) -> dict:
    """Per K in 1, 3, 5: each task's copy of the cloned policy fine-tuned on the task's first K logged episodes
    (``--finetune-steps`` full-batch Adam steps), graded on that task."""
    import numpy as np

    from metarl_robot.train.evaluate import logged_episodes
    from metarl_robot.train.gap import run_episodes

    logged = logged_episodes(args.finetune_from, family, robot, tasks, 5)
    out = {}
    for k in (1, 3, 5):
        returns = []
        for i, task in enumerate(tasks):
            x, y = bc_data(robot, np.concatenate([e.obs for e in logged[i][:k]]),
                           np.concatenate([e.sample for e in logged[i][:k]]))
            tuned = [p.detach().clone().requires_grad_(True) for p in params]
            fit(tuned, x, y, args.finetune_steps, args.lr)
            episode = run_episodes(family, robot, [task], [args.eval_seed], Cloned(robot, as_policy(tuned,
                                                                                                   robot.action_dim)))
            returns.append(float(episode.returns[0]))
        out[str(k)] = {"mean_return": float(np.mean(returns)), "returns": np.round(returns, 2).tolist()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="dataset folder (metarl dataset collect/build)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--steps", type=int, default=20000, help="Adam steps (default: 20000)")
    p.add_argument("--batch", type=int, default=512, help="rows per step (default: 512)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam step size (default: 1e-3)")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="hidden widths (default: 64 64)")
    p.add_argument("--split", choices=["train", "test"], default="test", help="task split graded (default: test)")
    p.add_argument("--tasks", type=int, default=8, help="tasks drawn (default: 8)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the task draw and start state (default: 0)")
    p.add_argument("--finetune-from", metavar="DATASET", help="logged episodes of the graded tasks (as metarl eval "
                   "--adapt-from): also grade BC fine-tuned per task on the first 1, 3, 5 of them")
    p.add_argument("--finetune-steps", type=int, default=200, help="full-batch Adam steps of a fine-tuning "
                   "(default: 200)")
    args = p.parse_args()

    import numpy as np
    import torch

    from metarl_robot.models.meta_policy import mlp_forward, mlp_params
    from metarl_robot.replay.dataset import load_dataset
    from metarl_robot.runtime.policy_gradient import from_env_action
    from metarl_robot.train.gap import run_episodes

    torch.set_num_threads(1)
    data = load_dataset(args.dataset)
    robot, family = data.robot, data.family
    x, y = bc_data(robot, data.observations, from_env_action(robot, data.actions))
    tasks = family.sample(np.random.default_rng(args.eval_seed), args.split, args.tasks)
    out = {"dataset": args.dataset, "transitions": len(x), "split": args.split, "tasks": len(tasks),
           "eval_seed": args.eval_seed, "steps": args.steps, "hidden": args.hidden, "seeds": {}}
    for seed in args.seeds:
        started = time.perf_counter()
        torch.manual_seed(seed)
        params = mlp_params([x.shape[1], *args.hidden, y.shape[1]])
        fit(params, x, y, args.steps, args.lr, args.batch)
        with torch.no_grad():
            mse = float(((mlp_forward(params, x)[1] - y) ** 2).mean())
        returns = run_episodes(family, robot, tasks, [args.eval_seed] * len(tasks),
                               Cloned(robot, as_policy(params, robot.action_dim))).returns
        out["seeds"][seed] = {"mean_return": float(returns.mean()), "returns": returns.round(2).tolist(),
                              "fit_mse": mse}
        if args.finetune_from:
            out["seeds"][seed]["finetuned"] = finetuned_returns(args, params, tasks, family, robot)
        out["seeds"][seed]["seconds"] = round(time.perf_counter() - started, 1)
    means = [s["mean_return"] for s in out["seeds"].values()]
    out["mean_over_seeds"] = float(np.mean(means))
    if args.finetune_from:
        tuned = [s["finetuned"] for s in out["seeds"].values()]
        out["finetuned_mean_over_seeds"] = {k: float(np.mean([t[k]["mean_return"] for t in tuned])) for k in "135"}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
