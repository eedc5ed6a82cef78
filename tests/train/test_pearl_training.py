"""PEARL in the training runner and ``metarl eval``: the CLI pipeline (train, resume, eval of a checkpoint), the
adversarial sampler's grading, checkpoint versions and config errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from metarl_robot.algos.pearl import PEARL
from metarl_robot.envs.registry import make_env
from metarl_robot.spec.schema import SpecError, to_plain
from metarl_robot.train.config import PEARLTrainConfig, load_config
from metarl_robot.train.runner import MODEL_BASED_ONLY_SCHEMA, load_checkpoint, load_trained, train

CONFIG = "configs/pearl_cartpole_swingup.yaml"
TINY = {"loop.iterations": 2, "loop.random_episodes": 2, "loop.tasks_per_iteration": 2, "pearl.grad_steps": 3,
        "pearl.meta_batch": 2, "pearl.batch_size": 16, "pearl.context_batch": 8, "pearl.context_size_min": 2,
        "pearl_net.hidden": 16, "pearl_net.encoder_hidden": 16, "planner.samples": 8, "planner.horizon": 4,
        "planner.iterations": 1}
EPISODE = 250
"""Steps of a cart-pole episode (sim/tasks/cartpole_swingup.yaml)."""


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def metarl(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "metarl_robot.cli", *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_cli_trains_resumes_and_evaluates_a_pearl_checkpoint(tmp_path):
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={'null' if v is None else v}")]
    out = metarl("train", CONFIG, "--out", str(tmp_path), "--name", "cli", *sets)
    run = tmp_path / "cli"
    assert "under the posterior" in out and "run folder:" in out
    assert "iteration 1/1: return" in out  # one line per iteration when stderr is not a terminal
    for name in ("config.yaml", "replay.npz", "metrics.csv", "tasks.jsonl", "checkpoints/ckpt_0001.pt"):
        assert (run / name).exists(), name
    assert not (run / "buffer.npz").exists()

    out = metarl("train", "--resume", str(run), "--set", "loop.iterations=3")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["iteration"] for r in rows] == ["0", "1", "2"]
    # Every iteration explores 2 new tasks, one prior and one RL-only episode each.
    assert [float(r["tasks"]) for r in rows] == [2, 4, 6]
    assert [float(r["episodes"]) for r in rows] == [4, 8, 12]
    assert [float(r["transitions"]) for r in rows] == [4 * EPISODE, 8 * EPISODE, 12 * EPISODE]
    lines = [json.loads(line) for line in (run / "tasks.jsonl").read_text().splitlines()]
    assert [line["task_ids"] for line in lines] == [[0, 1], [2, 3], [4, 5]]  # the counter survives the resume
    assert lines[0]["sampler"] == "initial" and lines[1]["sampler"] == "uniform"
    assert lines[0]["tasks"] != lines[1]["tasks"]  # iteration 0 draws from its own stream

    cfg, _, algo = load_trained(run / "checkpoints" / "ckpt_0001.pt")
    assert cfg.algo == "pearl" and isinstance(algo, PEARL) and algo.normalizers_fitted
    out = metarl("eval", str(run / "checkpoints" / "ckpt_0001.pt"), "--tasks", "2", "--out", str(tmp_path / "eval"),
                 "--set", "samples=8", "--set", "horizon=4", "--set", "iterations=1")
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["algo"] == "pearl" and report["exploration_episodes"] == [0, 1, 2] and len(report["tasks"]) == 2
    for k in (0, 1, 2):
        assert f"return_after_{k}" in report["summary"] and f"gap_after_{k}" in report["summary"]
    for row in report["tasks"]:
        for k in (0, 1, 2):
            assert row[f"gap_after_{k}"] == pytest.approx(row["return_oracle"] - row[f"return_after_{k}"])
        # The first episode runs on the prior; the later ones on a belief the earlier episodes sharpened.
        assert row["belief_var_after_0"] == 1.0 > row["belief_var_after_1"] > row["belief_var_after_2"]
    assert (tmp_path / "eval" / "eval_returns.png").read_bytes()[:4] == b"\x89PNG"
    assert "after_2" in out and "gap_2" in out and "worst-case gap" in out



@pytest.mark.slow
def test_the_half_cheetah_vel_config_trains_at_its_real_network_sizes(tmp_path):
    # The paper-task config as shipped (networks 3 x 300, encoder 3 x 200, meta-batch 16 x 256, context 100,
    # its exploration schedule), with only the loop and the number of gradient steps cut: it runs end to end.
    overrides = {"loop.iterations": 2, "loop.random_episodes": 1, "loop.tasks_per_iteration": 1, "pearl.grad_steps": 2}
    train("configs/pearl_half_cheetah_vel_reward.yaml", tmp_path, overrides={**overrides, "name": "hc"},
          progress=False)
    rows = list(csv.DictReader((tmp_path / "hc" / "metrics.csv").open()))
    # prior 2 + RL-only 3 episodes of 200 steps per task, one task per iteration
    assert [float(r["transitions"]) for r in rows] == [1000, 2000]
    cfg, _, algo = load_trained(tmp_path / "hc" / "checkpoints" / "ckpt_0001.pt")
    assert cfg.family == "half_cheetah_vel_reward" and algo.net_cfg.hidden == 300 and algo.cfg.meta_batch == 16


@pytest.mark.slow
def test_adversarial_sampler_grades_the_first_posterior_episode_from_the_oracles_start(tmp_path):
    overrides = {**TINY, "name": "adv", "loop.task_sampler": "adversarial", "loop.adversary.population": 3}
    summary = train(CONFIG, tmp_path, overrides=overrides, progress=False)
    run = tmp_path / "adv"
    line = [json.loads(x) for x in (run / "tasks.jsonl").read_text().splitlines()][1]
    assert line["graded_phase"] == "extra_rl" and len(line["candidates"]) == 3
    gaps = np.array(line["oracle_returns"]) - np.array(line["candidate_returns"])
    np.testing.assert_allclose(line["candidate_gaps"], gaps)
    chosen = line["chosen"]
    assert sorted(chosen) == sorted(np.argsort(-gaps)[:2].tolist())  # trains on the worst two
    assert line["tasks"] == [line["candidates"][i] for i in chosen] and line["task_ids"] == [2, 3]

    from metarl_robot.algos.task_replay import TaskReplay

    replay = TaskReplay.load(run / "replay.npz")
    assert sorted(replay.rl) == [0, 1, 2, 3]  # the discarded candidate's round never reached the replay
    seed0 = 0 * 100_003 + 1 * 101  # the runner's reset seed of iteration 1
    env = make_env("cartpole_swingup", task=line["tasks"][0])
    prior_start, start = env.reset(seed=seed0)[0], env.reset(seed=seed0 + 2)[0]
    env.close()
    assert not np.allclose(prior_start, start)
    for j, task_id in enumerate(line["task_ids"]):
        store = replay.rl[task_id]
        assert len(store) == 2 * EPISODE and len(replay.encoder[task_id]) == EPISODE  # prior to the encoder only
        # The graded (RL-only, posterior) episode is the one stored, and every candidate started it where
        # the oracle did.
        np.testing.assert_allclose(store.obs[EPISODE], start, rtol=1e-6)
        np.testing.assert_allclose(store.obs[0], prior_start, rtol=1e-6)  # explore_tasks(seed=[s] * n), each phase
        assert float(store.reward[EPISODE:].sum()) == pytest.approx(line["candidate_returns"][chosen[j]], rel=1e-4)
        np.testing.assert_allclose(replay.task_vectors[task_id], [line["tasks"][j][n] for n in line["tasks"][j]])
    final = summary["final"]
    assert final["adversary_env_steps"] == 1 * 2 * EPISODE and final["oracle_env_steps"] == 3 * EPISODE
    assert final["graded_episode_return"] == pytest.approx(np.mean(line["candidate_returns"]))

    # Checkpoints name their algorithm; schema 1 (before PEARL) reads as context_mbrl.
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=False)
    assert state["algo_kind"] == "pearl"
    del state["algo_kind"]
    state["schema_version"] = MODEL_BASED_ONLY_SCHEMA
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["algo_kind"] == "context_mbrl"
    with pytest.raises(SpecError, match="holds 'context_mbrl' weights but its config says algo 'pearl'"):
        load_trained(tmp_path / "old.pt")


@pytest.mark.parametrize(
    ("config", "overrides", "field", "fragment"),
    [(CONFIG, {"pearl.meta_batch": 0}, "pearl.meta_batch", "must be > 0"),
     (CONFIG, {"pearl.metabatch": 3}, "pearl.metabatch", "unknown key 'metabatch'"),
     (CONFIG, {"pearl_net.hidden": 0}, "pearl_net.hidden", "must be >= 1"),
     (CONFIG, {"pearl_schedule.prior_episodes": 0}, "pearl_schedule",
      "prior_episodes + posterior_episodes must be >= 1"),
     (CONFIG, {"loop.task_sampler": "adversarial", "pearl_schedule.extra_rl_episodes": 0}, "pearl_schedule",
      "posterior_episodes + extra_rl_episodes must be >= 1"),
     (CONFIG, {"loop.task_sampler": "adversarial", "loop.adversary.reward_gradient": True},
      "loop.adversary.reward_gradient", "algo context_mbrl only"),
     (CONFIG, {"model.hidden": 64}, "model", "read by algo context_mbrl, online_mbrl, mbmpo only"),
     ("configs/mb_cartpole_swingup.yaml", {"pearl.meta_batch": 4}, "pearl", "read by algo pearl only"),
     (CONFIG, {"algo": "rma"}, "algo", "'context_mbrl', 'pearl'")],
)
def test_pearl_config_errors_name_the_field(config, overrides, field, fragment):
    with pytest.raises(SpecError) as err:
        load_config(config, overrides)
    assert err.value.field == field and fragment in str(err.value)


def test_each_algorithm_resolves_only_its_own_sections():
    cfg = load_config(CONFIG)
    plain = to_plain(cfg)
    assert isinstance(cfg, PEARLTrainConfig) and "model" not in plain and "training" not in plain
    assert plain["pearl"]["meta_batch"] == 8 and plain["pearl_net"]["hidden"] == 128
    # The model-based resolved config (and so a bundle's provenance) is what it was before PEARL.
    assert list(to_plain(load_config("configs/mb_cartpole_swingup.yaml"))) == [
        "schema_version", "algo", "family", "seed", "name", "model", "training", "planner", "loop"]
    half_cheetah = load_config("configs/pearl_half_cheetah_vel.yaml")
    assert half_cheetah.pearl.reward_scale == 5.0 and not half_cheetah.pearl.auto_entropy


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_describes_pearl(command, capsys):
    from metarl_robot.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0 and "PEARL" in capsys.readouterr().out.replace("pearl", "PEARL")
