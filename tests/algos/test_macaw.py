"""MACAW through the algorithm interface: its config's refusals, the dataset as it reads it (returns, bootstrap tails,
task splits), the meta-loss falling on a synthetic two-task dataset, the runner driving it offline (no env made), a
dataset of another robot or family refused naming the field, and ``metarl train`` writing, checkpointing and
resuming a run (a tiny dataset made with ``metarl dataset collect``)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metarl_robot.algos.macaw import MACAW, OfflineTasks
from metarl_robot.paths import REPO_ROOT
from metarl_robot.replay.dataset import DATA_FILE, load_dataset
from metarl_robot.runtime.policy_gradient import policy_features, to_env_action
from metarl_robot.spec.family import load_family
from metarl_robot.spec.robot import load_robot
from metarl_robot.spec.schema import SpecError
from metarl_robot.train.config import load_config
from metarl_robot.train.runner import Runner, load_trained, train
from tests.conftest import MACAW_CONFIG, MACAW_TINY, synthetic_dataset

torch.set_num_threads(1)
CONFIG = MACAW_CONFIG
TINY = MACAW_TINY


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("macaw") / "two_tasks")


# ---- the config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "field", "fragment"), [
    ({"dataset": ""}, "dataset", "must name an offline dataset folder"),
    ({"macaw.adapt_episodes": 0}, "macaw.adapt_episodes", "must be >= 1"),
    ({"macaw.discount": 1.0}, "macaw.discount", "must be in [0, 1)"),
    ({"macaw.inner_policy_lr": 0}, "macaw.inner_policy_lr", "must be a finite number > 0"),
    ({"macaw.advantage_weight": -0.1}, "macaw.advantage_weight", "0: no advantage head"),
    ({"macaw_net.hidden": []}, "macaw_net.hidden", "non-empty list"),
    ({"macaw_net.action_std": 0}, "macaw_net.action_std", "> 0"),
    ({"macaw.inner_stepz": 2}, "macaw.inner_stepz", "unknown key"),
    ({"loop.task_sampler": "adversarial"}, "loop.task_sampler", "learns from its dataset alone (offline)"),
])
def test_bad_configs_name_the_field(overrides, field, fragment):
    with pytest.raises(SpecError) as err:
        load_config(CONFIG, overrides)
    assert err.value.field == field and fragment in str(err.value)


def test_its_sections_are_refused_in_other_algorithms_configs():
    for section, config in (("macaw", "mb_cartpole_swingup.yaml"), ("dataset", "pearl_cartpole_swingup.yaml")):
        with pytest.raises(SpecError, match="is read by algo macaw only") as err:
            load_config(REPO_ROOT / "configs" / config, {section: {} if section == "macaw" else "x"})
        assert err.value.field == section


# ---- the dataset as MACAW reads it -----------------------------------------------------------------------------
def test_returns_bootstrap_tails_and_splits(two_tasks):
    data = load_dataset(two_tasks)
    gamma = 0.9
    tasks = OfflineTasks.from_dataset(data, gamma)
    rewards = data.rewards.astype(np.float64)
    steps = 12
    by_hand = [sum(gamma ** (k - t) * rewards[steps + k] for k in range(t, steps)) for t in range(steps)]
    np.testing.assert_allclose(tasks.returns[steps:2 * steps].numpy(), by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tasks.tail_discount[:steps].numpy(), gamma ** np.arange(steps, 0, -1), rtol=1e-6)
    np.testing.assert_allclose(tasks.tail_feats[1].numpy(), policy_features(data.robot, data.next_observations[2 * steps
                                                                                                      - 1]), rtol=1e-6)
    assert tasks.return_scale == pytest.approx(np.std(tasks.returns.numpy()), rel=1e-5)
    batch = tasks.batch(np.arange(steps))
    np.testing.assert_allclose(batch.returns.numpy(), tasks.returns[:steps].numpy() / tasks.return_scale, rtol=1e-6)
    np.testing.assert_allclose(batch.tail_feats.numpy(), np.repeat(tasks.tail_feats[:1].numpy(), steps, 0))
    assert [e.tolist() for e in tasks.task_episodes] == [[0, 1, 2], [3, 4, 5]] and tasks.task_ids == [0, 1]
    # commands in normalised units, back to the robot's with the policy's own mapping
    np.testing.assert_allclose(to_env_action(data.robot, tasks.actions.numpy()), data.actions, rtol=1e-5, atol=1e-6)

    # a split: K whole episodes to adapt on (at most all but one), queries drawn from the task's other episodes
    rng = np.random.default_rng(0)
    for adapt, query in tasks.sample(rng, 4, adapt_episodes=5, query=7):
        assert len(adapt) == 2 * steps and len(query) == 7
        adapt_rows = {tuple(r) for r in adapt.feats.numpy().round(5)}
        assert not adapt_rows & {tuple(r) for r in query.feats.numpy().round(5)}

    # a terminated episode has nothing after it; an episode of unknown rewards and a task left with one episode go
    data.terminations[steps - 1], data.truncations[steps - 1] = True, False
    data.rewards[3 * steps] = np.nan  # episode 3 (task 1): unknown rewards
    data.rewards[4 * steps] = np.nan  # episode 4 too: task 1 keeps one episode
    tasks = OfflineTasks.from_dataset(data, gamma)
    assert not tasks.tail_discount[:steps].numpy().any()
    assert tasks.unknown_reward_episodes == 2 and tasks.small_tasks == 1 and tasks.task_ids == [0]
    assert OfflineTasks.from_dataset(data, gamma, min_episodes=1).task_ids == [0, 1]


# ---- meta-training -------------------------------------------------------------------------------------------------
def _build(dataset: Path, **overrides) -> MACAW:
    cfg = load_config(CONFIG, {**TINY, "dataset": str(dataset), **overrides})
    family = load_family(cfg.family)
    return MACAW.build(cfg, load_robot(family.spec.robot), family)


def _meta_loss(algo: MACAW, tasks) -> float:
    total = 0.0
    for adapt, query in tasks:
        adapted, _ = algo.nets.adapt(algo.nets.meta_params(), adapt, algo.weighting, True, create_graph=False)
        value_loss, policy_loss, _ = algo.nets.query_losses(adapted, query, algo.weighting, True)
        total += float((value_loss + policy_loss).detach()) / len(tasks)
    return total


@pytest.mark.parametrize("first_order", [False, True])
def test_the_outer_step_lowers_the_meta_loss_on_two_tasks(two_tasks, first_order):
    algo = _build(two_tasks, **{"macaw.value_lr": 3e-3, "macaw.policy_lr": 3e-3, "macaw.first_order": first_order})
    tasks = algo.data.sample(np.random.default_rng(1), 2, 1, 32)
    before = _meta_loss(algo, tasks)
    lrs = algo.nets.inner_policy_lr().detach().clone()
    for _ in range(15):
        metrics = algo.meta_step(tasks)
    assert _meta_loss(algo, tasks) < 0.8 * before
    assert algo.meta_steps_taken == 15 and set(metrics) >= {"value_loss", "policy_loss", "value_loss_unadapted",
                                                           "inner_policy_lr", "advantage_weight"}
    assert not torch.equal(lrs, algo.nets.inner_policy_lr().detach())  # the inner rates are meta-learned too


def test_the_runner_trains_offline_and_never_makes_an_env(two_tasks, tmp_path, monkeypatch, capsys):
    import gymnasium

    from metarl_robot.envs import meta_env, rollout

    def no_env(*args, **kwargs):
        raise AssertionError("an offline algorithm made an env")

    monkeypatch.setattr(meta_env.MetaMujocoEnv, "__init__", no_env)
    monkeypatch.setattr(rollout, "make_vector_env", no_env)
    monkeypatch.setattr(gymnasium, "make", no_env)
    summary = train(CONFIG, tmp_path, overrides={**TINY, "dataset": str(two_tasks)}, progress=False)
    run = tmp_path / "tiny"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["iteration"] for r in rows] == ["0", "1"] and rows[1]["meta_steps"] == "4.0"
    assert float(rows[0]["tasks"]) == 2 and float(rows[0]["episodes"]) == 6
    assert not (run / "tasks.jsonl").exists()  # no tasks drawn
    assert "query value loss" in summary["line"]
    with pytest.raises(NotImplementedError, match="offline"):
        _build(two_tasks).collect([], 0, 0)
    # The run's controller is the robot's (numpy adaptation over the run's weights): metarl eval grades it in MuJoCo.
    from metarl_robot import cli

    monkeypatch.undo()
    assert cli.main(["eval", str(run), "--no-oracle", "--tasks", "2", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["bundle_kind"] == "awr_policy" and report["exploration_episodes"] == [0, 1, 3, 5]
    assert report["controller"]["runtime"].startswith("AWRPolicyAdapter (the run's policy")


def test_a_dataset_of_another_robot_or_family_is_refused_naming_the_field(tmp_path):
    cheetah = synthetic_dataset(tmp_path / "cheetah", "half_cheetah_vel", steps=4)
    cfg = load_config(CONFIG, {**TINY, "dataset": str(cheetah)})
    with pytest.raises(SpecError) as err:
        Runner(cfg, tmp_path / "run")
    assert err.value.field == "dataset" and "robot: " in str(err.value)
    assert "'half_cheetah'" in str(err.value) and "'cartpole'" in str(err.value)
    cfg = load_config(CONFIG, {**TINY, "dataset": str(cheetah), "family": "half_cheetah_vel_reward"})
    with pytest.raises(SpecError) as err:
        Runner(cfg, tmp_path / "run")
    assert err.value.field == "dataset" and "family: " in str(err.value)
    assert "'half_cheetah_vel'" in str(err.value) and "'half_cheetah_vel_reward'" in str(err.value)
    single = synthetic_dataset(tmp_path / "single", episodes=1, steps=4)
    with pytest.raises(SpecError, match="no task has 2 or more episodes") as err:
        Runner(load_config(CONFIG, {**TINY, "dataset": str(single)}), tmp_path / "run")
    with pytest.raises(SpecError, match=r"dataset\.json: missing") as err:
        Runner(load_config(CONFIG, {**TINY, "dataset": str(tmp_path / "nothing")}), tmp_path / "run")
    assert err.value.field == "dataset"
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


# ---- the command -------------------------------------------------------------------------------------------------
def metarl(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "metarl_robot.cli", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_metarl_train_writes_checkpoints_and_resumes(tmp_path):
    dataset = tmp_path / "ds"
    metarl("dataset", "collect", "--policy", "random", "--family", "cartpole_swingup", "--tasks", "2", "--episodes",
           "3", "--steps", "10", "--out", str(dataset), "--no-minari")
    sets = [x for k, v in {**TINY, "dataset": dataset}.items() if k != "name" for x in ("--set", f"{k}={v}")]
    out = metarl("train", str(CONFIG), "--out", str(tmp_path / "runs"), "--name", "m", *sets).stdout
    run = tmp_path / "runs" / "m"
    assert "last iteration 1: query value loss" in out
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"ckpt_0000.pt", "ckpt_0001.pt", "latest.pt"}
    assert any((run / "tb").iterdir())
    ref = json.loads((run / "dataset_ref.json").read_text())
    assert ref["episodes"] == 6 and ref["tasks_used"] == 2 and len(ref["sha256"]) == 64

    train(run, resume=True, overrides={"loop.iterations": 3}, progress=False)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["iteration"] for r in rows] == ["0", "1", "2"] and rows[2]["meta_steps"] == "6.0"
    cfg, robot, algo = load_trained(run / "checkpoints" / "latest.pt")
    assert cfg.algo == "macaw" and algo.meta_steps_taken == 6 and algo.data is None  # weights only
    # meta-test: adapt on two trajectories of a task, act with the adapted mean inside the robot's box
    data = load_dataset(dataset)
    policy = algo.adapt_to(data, [0, 1], steps=2)
    actions = algo.act(data.observations[:5], policy)
    assert actions.shape == (5, 1) and (np.abs(actions) <= robot.action_high).all()
    assert not np.allclose(actions, algo.act(data.observations[:5]))  # adapting moved the policy

    # the dataset changed since: resuming on it is refused, naming the field
    with np.load(dataset / DATA_FILE) as npz:
        arrays = dict(npz)
    arrays["rewards"] = arrays["rewards"] + np.float32(1.0)
    np.savez_compressed(dataset / DATA_FILE, **arrays)
    with pytest.raises(SpecError, match="holds other data") as err:
        train(run, resume=True, overrides={"loop.iterations": 4}, progress=False)
    assert err.value.field == "dataset"


def test_eval_adapts_from_logged_episodes_of_each_task_and_refuses_too_few(macaw_run, tmp_path):
    from metarl_robot.replay.dataset import load_dataset
    from metarl_robot.train.evaluate import evaluate

    logs = synthetic_dataset(tmp_path / "logs", tasks=2, episodes=5, steps=24, seed=3)
    data = load_dataset(logs)
    family = load_family("cartpole_swingup")
    tasks = [family.from_vector(data.task_values[e]) for e in (0, 5)]
    report = evaluate(macaw_run, tmp_path / "eval", tasks=tasks, oracle=False, progress=False, adapt_from=logs)
    assert report["adapt_from"] == str(logs) and "logged episodes" in report["controller"]["adapts"]
    assert report["controller"]["runtime"].startswith("AWRPolicyAdapter")
    returns = [[row[f"return_after_{k}"] for k in (0, 1, 3, 5)] for row in report["tasks"]]
    assert all(len(set(r)) > 1 for r in returns)  # adapting on the logs changed what the policy did
    # "after 5" read all 5 logs (the run trained with K = 2): the same as an adapter told to keep 5, by hand
    from metarl_robot.algos.mbmpo import PolicyController
    from metarl_robot.train.evaluate import logged_episodes
    from metarl_robot.train.gap import run_episodes

    cfg, robot, algo = load_trained(macaw_run / "checkpoints" / "latest.pt")
    algo.family = family
    assert cfg.macaw.adapt_episodes == 2
    adapter = algo.make_policy_adapter(2, 0, {"adapt_episodes": 5})
    for b, episodes in enumerate(logged_episodes(logs, family, robot, tasks, 5)):
        adapter.adapt_on(b, episodes)
    params = {k: np.array([t[k] for t in tasks]) for k in family.reward_names}
    by_hand = run_episodes(family, robot, tasks, [0, 0], PolicyController(adapter, params)).returns
    np.testing.assert_allclose([row["return_after_5"] for row in report["tasks"]], by_hand)
    few = synthetic_dataset(tmp_path / "few", tasks=1, episodes=3, steps=24, seed=3)
    with pytest.raises(ValueError, match=r"task 0 .* has 3 logged episode\(s\), 5 needed"):
        evaluate(macaw_run, tmp_path / "eval2", tasks=[family.from_vector(load_dataset(few).task_values[0])],
                 oracle=False, progress=False, adapt_from=few)
    with pytest.raises(ValueError, match="does not adapt from logged episodes"):
        evaluate(REPO_ROOT / "policies" / "cartpole_mbmpo", tmp_path / "eval3", tasks=tasks[:1], oracle=False,
                 progress=False, adapt_from=logs)
