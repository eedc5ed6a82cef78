"""Task samplers (issue 6): the adversary finds the worst task of a known gap; Gaussian and uniform
baselines; config errors; and the samplers wired through ``metarl train`` / ``metarl eval --grid``."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from metarl_robot.paths import REPO_ROOT
from metarl_robot.spec.family import ParamBox, load_family
from metarl_robot.spec.schema import SpecError
from metarl_robot.train.config import load_config
from metarl_robot.train.runner import Runner, train
from metarl_robot.train.task_sampler import (
    AdversaryConfig,
    CEMAdversary,
    GaussianSampler,
    GaussianSamplerConfig,
    ReplayAdversary,
    UniformSampler,
    make_sampler,
)

CONFIG = "configs/mb_cartpole_swingup.yaml"
PEAK = 10.0
"""Height of the synthetic gap at its known worst task."""


@pytest.fixture(scope="module")
def family():
    return load_family("cartpole_swingup")


def bump_gap(family, names: list[str], worst: np.ndarray, width: float = 0.2):
    """A synthetic gap over the train box: a Gaussian bump of height PEAK at the unit point ``worst`` of ``names``."""
    box = ParamBox(family, names, "train")

    def gap(tasks):
        u = box.to_unit(np.array([[t[n] for n in names] for t in tasks]))
        return PEAK * np.exp(-np.sum((u - worst) ** 2, axis=1) / (2 * width**2))
    return gap


def search(sampler, gap, iterations: int = 30, n: int = 4) -> tuple[list[float], float]:
    """Drive a sampler the way the runner does; returns the mean gap of the trained tasks per iteration and
    the largest gap of any graded candidate."""
    trained, best = [], -np.inf
    for _ in range(iterations):
        tasks = sampler.candidates(n)
        gaps = gap(tasks)
        chosen = sampler.select(tasks, gaps if sampler.needs_gap else None, n)
        trained.append(float(gaps[chosen].mean()))
        best = max(best, float(gaps.max()))
    return trained, best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("worst", "tolerance"), [([0.8, 0.25, 0.7, 0.3, 0.6], 0.1),  # interior point
                                                   ([1.0, 0.0, 1.0, 0.0, 1.0], 0.2)])  # a corner of the box
def test_adversary_finds_the_known_worst_task(family, seed, worst, tolerance):
    worst = np.array(worst)
    gap = bump_gap(family, family.names, worst)
    population, n = 16, 4
    adversary = CEMAdversary(family, seed, AdversaryConfig(search="cem", population=population))
    trained, best = search(adversary, gap, n=n)
    # The search mean sits at the worst task (a corner: inside it by about the std floor, 0.1, per axis).
    assert np.abs(adversary.mean - worst).max() < tolerance, adversary.mean
    assert adversary.std == pytest.approx(np.full(5, 0.1))  # shrunk to the floor around it
    assert np.mean(trained[-10:]) > np.mean(trained[:5])  # the trained tasks get worse for the learner
    if tolerance <= 0.1:
        assert np.mean(trained[-10:]) > 0.7 * PEAK and best > 0.9 * PEAK
    else:
        assert np.mean(trained[-10:]) > 0.2 * PEAK and best > 0.6 * PEAK
    # A uniform sampler with the same budget of graded episodes finds less and trains on far less.
    uniform_trained, uniform_best = search(UniformSampler(family, seed), gap, n=population)
    assert best > uniform_best
    assert np.mean(trained[-10:]) > 3 * np.mean(uniform_trained[-10:])
    described = adversary.describe()
    assert described["searched"] == family.names
    assert adversary.box.to_unit(np.array(described["mean"])) == pytest.approx(adversary.mean)


def test_adversary_searches_only_its_params_and_the_others_vary(family):
    names = ["pole_length", "target_x"]
    worst = np.array([0.8, 0.2])
    adversary = make_sampler("adversarial", family, 3,
                             adversary=AdversaryConfig(search="cem", population=16, params=names))
    assert isinstance(adversary, CEMAdversary) and adversary.searched == names
    trained, best = search(adversary, bump_gap(family, names, worst))
    assert np.abs(adversary.mean - worst).max() < 0.1, adversary.mean
    assert adversary.mean.shape == (2,) and best > 0.9 * PEAK and np.mean(trained[-10:]) > 0.7 * PEAK
    tasks = adversary.candidates(4)
    assert len(tasks) == 16
    for other in ("pole_mass_scale", "cart_friction", "motor_gain_scale"):
        values = np.array([t[other] for t in tasks])
        lo, hi = family.param(other).train
        assert len(np.unique(values)) == 16 and lo <= values.min() and values.max() <= hi, other
        assert values.max() - values.min() > 0.3 * (hi - lo), other  # drawn over the box, not at nominal
    assert not any(family.is_ood(t) for t in tasks)


class ShrinkingGapLearner:
    """A synthetic learner over pole length: two equally bad regions (the shortest and the longest poles, the
    cart-pole's measured pattern) whose gap shrinks where it has trained, as a real learner's does."""

    def __init__(self, family, seed: int) -> None:
        self.box = ParamBox(family, ["pole_length"], "train")
        self.trained: list[float] = []
        self.rng = np.random.default_rng(seed)

    def gap_at(self, x: np.ndarray) -> np.ndarray:
        base = PEAK * np.maximum(np.exp(-x**2 / (2 * 0.2**2)), np.exp(-(1 - x) ** 2 / (2 * 0.2**2)))
        near = np.exp(-(x[:, None] - np.array(self.trained)[None]) ** 2 / (2 * 0.1**2)).sum(axis=1)
        return base * np.exp(-near / 4)

    def unit(self, tasks) -> np.ndarray:
        return self.box.to_unit(np.array([[t["pole_length"]] for t in tasks]))[:, 0]

    def train(self, sampler, iterations: int = 20, n: int = 4) -> None:
        for it in range(iterations):
            tasks = sampler.candidates(n)
            sampler.starts(tasks, it)
            gaps = self.gap_at(self.unit(tasks)) + self.rng.normal(0.0, 0.05 * PEAK, len(tasks))  # episode noise
            chosen = sampler.select(tasks, gaps if sampler.needs_gap else None, n)
            self.trained += [float(self.unit([tasks[c]])[0]) for c in chosen]

    def worst_gap(self) -> float:
        return float(self.gap_at(np.linspace(0.0, 1.0, 41)).max())


def test_replay_adversary_shrinks_the_worst_gap_of_a_learner_with_two_bad_regions(family):
    def trained(sampler, seed):
        learner = ShrinkingGapLearner(family, seed)
        learner.train(sampler)
        return learner
    worst = {"replay": [], "uniform": [], "cem": []}
    for seed in range(5):
        replay = trained(ReplayAdversary(family, seed, AdversaryConfig(population=8)), seed)
        x = np.array(replay.trained)
        assert (x < 0.25).mean() > 0.2 and (x > 0.75).mean() > 0.2, seed  # both bad regions trained on
        worst["replay"].append(replay.worst_gap())
        worst["uniform"].append(trained(UniformSampler(family, seed), seed).worst_gap())
        worst["cem"].append(trained(CEMAdversary(family, seed, AdversaryConfig(search="cem", population=8)), seed
                                    ).worst_gap())
    mean = {k: float(np.mean(v)) for k, v in worst.items()}
    assert mean["replay"] < 0.5 * mean["uniform"] and mean["replay"] < 0.5 * mean["cem"], worst
    assert all(r < u for r, u in zip(worst["replay"], worst["uniform"], strict=True)), worst


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replay_adversary_climbs_to_the_known_worst_task(family, seed):
    # A static gap is CEM's home ground (the test above); the archive's mutations get there more slowly.
    worst = np.array([0.8, 0.25, 0.7, 0.3, 0.6])
    adversary = ReplayAdversary(family, seed, AdversaryConfig(population=16))
    trained, best = search(adversary, bump_gap(family, family.names, worst))
    assert best > 0.65 * PEAK and np.mean(trained[-10:]) > 0.35 * PEAK > np.mean(trained[:3])


def test_replay_adversary_regrades_from_the_archived_start_and_keeps_the_worst(family):
    adversary = ReplayAdversary(family, 0, AdversaryConfig(population=4, archive_size=4, uniform_fraction=0.25,
                                                            mutation_fraction=0.0))
    first = adversary.candidates(2)
    assert adversary.starts(first, 100) == [100] * 4  # an empty archive: all new
    adversary.select(first, np.array([1.0, 4.0, 3.0, 2.0]), 2)
    second = adversary.candidates(2)
    starts = adversary.starts(second, 200)
    assert starts[0] == 200 and second[0] not in first  # one new task from this iteration's start
    assert all(t in first for t in second[1:]) and starts[1:] == [100] * 3  # replays from their own start
    adversary.select(second, np.array([10.0, 0.5, 0.5, 0.5]), 2)
    kept = sorted(e["gap"] for e in adversary.archive)  # capacity 4: the smallest gaps went
    assert len(kept) == 4 and kept[-1] == 10.0 and min(kept) >= 0.5
    restored = ReplayAdversary(family, 9, AdversaryConfig(population=4, archive_size=4, mutation_fraction=0.0))
    restored.load_state(json.loads(json.dumps(adversary.state())))
    assert restored.candidates(2) == adversary.candidates(2)
    with pytest.raises(ValueError, match="the last candidates were 4"):
        adversary.starts(second[:2], 300)


def test_select_trains_on_the_worst_candidates_and_a_diverged_episode_is_worst(family):
    adversary = CEMAdversary(family, 0, AdversaryConfig(search="cem", population=5))
    tasks = adversary.candidates(2)
    assert adversary.select(tasks, np.array([1.0, 5.0, -2.0, 3.0, 4.0]), 2) == [1, 4]
    assert adversary.select(tasks, np.array([1.0, np.nan, 7.0, 3.0, 4.0]), 3) == [1, 2, 4]
    assert adversary.select(tasks, np.array([1.0, 2.0, np.inf, 3.0, -np.inf]), 1) == [2]
    assert adversary.describe()["candidate_gaps"][:2] == [1.0, 2.0]
    with pytest.raises(ValueError, match="one gap per candidate"):
        adversary.select(tasks, np.array([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="one gap per candidate"):
        adversary.select(tasks, None, 1)


def test_uniform_and_gaussian_train_on_every_candidate(family):
    for sampler in (UniformSampler(family, 0), GaussianSampler(family, 0, GaussianSamplerConfig())):
        assert not sampler.needs_gap
        tasks = sampler.candidates(3)
        assert len(tasks) == 3 and sampler.select(tasks, None, 3) == [0, 1, 2]


def test_state_round_trip_reproduces_the_next_candidates(family):
    gap = bump_gap(family, family.names, np.full(5, 0.7))
    a = CEMAdversary(family, 0, AdversaryConfig(search="cem", population=8))
    search(a, gap, iterations=5)
    state = json.loads(json.dumps(a.state()))  # the checkpoint holds it as plain data
    b = CEMAdversary(family, 99, AdversaryConfig(search="cem", population=8))
    assert b.candidates(4) != a.candidates(4)  # (a moved on: compare from the saved state below)
    b.load_state(state)
    a.load_state(state)
    assert b.candidates(4) == a.candidates(4)
    np.testing.assert_array_equal(b.mean, a.mean)
    np.testing.assert_array_equal(b.std, a.std)
    assert not np.allclose(b.mean, 0.5)  # the searched state, not the initial one
    # Uniform and Gaussian samplers resume their draws too.
    for make in (lambda s: UniformSampler(family, s), lambda s: GaussianSampler(family, s, GaussianSamplerConfig())):
        u, v = make(0), make(1)
        u.candidates(3)
        v.load_state(json.loads(json.dumps(u.state())))
        assert v.candidates(3) == u.candidates(3)


def test_adversary_resumes_another_samplers_run_and_refuses_another_search(family):
    # A run started uniform and resumed adversarial: the draws continue, the search starts at the centre.
    uniform = UniformSampler(family, 0)
    uniform.candidates(3)
    adversary = CEMAdversary(family, 5, AdversaryConfig(search="cem", population=4))
    adversary.load_state(json.loads(json.dumps(uniform.state())))
    assert adversary.rng.bit_generator.state == uniform.rng.bit_generator.state
    assert adversary.mean == pytest.approx(np.full(5, 0.5)) and adversary.std == pytest.approx(np.full(5, 0.3))
    assert len(adversary.candidates(2)) == 4
    # A checkpointed search over other parameters does not fit this one.
    other = CEMAdversary(family, 0, AdversaryConfig(search="cem", population=4, params=["target_x", "pole_length"]))
    with pytest.raises(ValueError, match=r"searched \['target_x', 'pole_length'\], loop\.adversary\.params now "
                                         r"names \['pole_mass_scale', "):
        adversary.load_state(other.state())
    swapped = CEMAdversary(family, 0, AdversaryConfig(search="cem", population=4, params=["pole_length", "target_x"]))
    with pytest.raises(ValueError, match=r"loop\.adversary\.params"):
        swapped.load_state(other.state())


def test_gaussian_sampler_stays_in_the_train_box_and_concentrates_at_its_centre(family):
    box = ParamBox(family, family.names, "train")
    gaussian = box.to_unit(np.array([[t[n] for n in family.names]
                                     for t in GaussianSampler(family, 0, GaussianSamplerConfig(std=0.2)).candidates(
                                         2000)]))
    uniform = box.to_unit(np.array([[t[n] for n in family.names] for t in UniformSampler(family, 0).candidates(2000)]))
    assert gaussian.min() >= 0 and gaussian.max() <= 1
    central = lambda u: np.mean(np.all(np.abs(u - 0.5) < 0.25, axis=1))  # noqa: E731
    # Per axis a N(0.5, 0.2) truncated to [0, 1] lands in the central half ~80 % of the time: ~0.33 over 5 axes,
    # against 0.5^5 = 0.03 for uniform draws.
    assert central(gaussian) > 0.25 and central(uniform) < 0.06
    assert np.abs(gaussian.mean(axis=0) - 0.5).max() < 0.03
    assert gaussian.std(axis=0) == pytest.approx(np.full(5, 0.19), abs=0.02)


def test_unknown_sampler_is_refused(family):
    with pytest.raises(SpecError, match="unknown task sampler 'worst'; allowed: uniform, gaussian, adversarial"):
        make_sampler("worst", family, 0)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [({"population": 3}, "loop.adversary.population (3) must be >= loop.tasks_per_iteration (4)"),
     ({"elite_frac": 0.0}, "loop.adversary.elite_frac = 0.0 is outside its allowed range (0, 1]"),
     ({"smoothing": 1.5}, "loop.adversary.smoothing = 1.5 is outside its allowed range (0, 1]"),
     ({"uniform_fraction": 1.0}, "loop.adversary.uniform_fraction = 1.0 is outside its allowed range [0, 1)"),
     ({"min_std": 0.5}, "0 < min_std <= init_std, got 0.5 and 0.3"),
     ({"oracle_threads": 0}, "loop.adversary.oracle_threads must be >= 1"),
     ({"params": ["pole_length", "pole_lenght"]}, "loop.adversary.params: ['pole_lenght'] not in cartpole_swingup"),
     ({"params": []}, "loop.adversary.params: empty list"),
     ({"search": "ga"}, "loop.adversary.search = 'ga'; allowed: replay, cem"),
     ({"uniform_fraction": 0.0}, "loop.adversary.uniform_fraction must be > 0 with search: replay"),
     ({"archive_size": 4}, "loop.adversary.archive_size (4) must be >= population (8)"),
     ({"rank_temperature": 0.0}, "loop.adversary.rank_temperature must be > 0"),
     ({"staleness_weight": 1.5}, "loop.adversary.staleness_weight = 1.5 is outside [0, 1]"),
     ({"mutation_fraction": 1.5}, "loop.adversary.mutation_fraction = 1.5 is outside [0, 1]"),
     ({"mutation_std": 0.0}, "loop.adversary.mutation_std must be > 0")],
)
def test_adversary_config_errors_name_the_field(family, change, fragment):
    with pytest.raises(ValueError) as err:
        AdversaryConfig(**change).validate(family, 4)
    assert fragment in str(err.value)


def test_run_config_errors_name_the_adversary_field(tmp_path):
    with pytest.raises(SpecError) as err:
        load_config(CONFIG, {"loop.adversary.population": 2})  # below the config's 4 tasks per iteration
    assert err.value.field == "loop.adversary" and "loop.adversary.population (2)" in str(err.value)
    with pytest.raises(SpecError) as err:
        load_config(CONFIG, {"loop.task_sampler": "hardest"})
    assert err.value.field == "loop.task_sampler"
    # A parameter the family lacks is caught when the family is known (the runner), naming the config field.
    cfg = load_config(CONFIG, {"loop.task_sampler": "adversarial", "loop.adversary.params": ["pole_lenght"],
                               "name": "bad"})
    with pytest.raises(SpecError) as err:
        Runner(cfg, tmp_path / "bad")
    assert err.value.field == "loop.adversary" and "loop.adversary.params: ['pole_lenght']" in str(err.value)


# ---- through the CLI: a tiny run on a 20-step cart-pole -------------------------------------------------------------

TINY = {"loop.iterations": 2, "loop.random_episodes": 2, "loop.tasks_per_iteration": 2, "training.grad_steps": 5,
        "planner.samples": 8, "planner.horizon": 4, "planner.iterations": 1, "model.hidden": 16,
        "model.ensemble_size": 2}
STEPS = 20


@pytest.fixture(scope="module")
def short_sim(tmp_path_factory):
    """A copy of sim/ whose cart-pole episodes last 20 steps (subprocesses find it through METARL_SIM_DIR)."""
    dst = tmp_path_factory.mktemp("short") / "sim"
    shutil.copytree(REPO_ROOT / "sim", dst)
    path = dst / "tasks" / "cartpole_swingup.yaml"
    text = path.read_text()
    assert "episode_steps: 250" in text
    path.write_text(text.replace("episode_steps: 250", f"episode_steps: {STEPS}"))
    return dst


def metarl(sim, *args):
    env = {**os.environ, "METARL_SIM_DIR": str(sim)}
    result = subprocess.run([sys.executable, "-m", "metarl_robot.cli", *args], capture_output=True, text=True,
                            timeout=600, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _sets(overrides):
    return [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]


@pytest.mark.slow
@pytest.mark.integration
def test_adversarial_training_logs_resumes_and_grades_on_a_grid(tmp_path, short_sim, monkeypatch):
    adv = {**TINY, "loop.task_sampler": "adversarial", "loop.adversary.population": 4}
    metarl(short_sim, "train", CONFIG, "--out", str(tmp_path), "--name", "adv", *_sets(adv))
    monkeypatch.setenv("METARL_SIM_DIR", str(short_sim))
    train(CONFIG, tmp_path, overrides={**TINY, "name": "uni"}, progress=False)  # in process: one start-up less
    run = tmp_path / "adv"

    lines = [json.loads(line) for line in (run / "tasks.jsonl").read_text().splitlines()]
    assert [r["sampler"] for r in lines] == ["random", "adversarial"]
    it = lines[1]
    assert len(it["candidates"]) == 4 and len(it["candidate_gaps"]) == 4 and len(it["chosen"]) == 2
    gaps = np.array(it["candidate_gaps"])
    np.testing.assert_allclose(gaps, np.array(it["oracle_returns"]) - np.array(it["candidate_returns"]))
    # The trained tasks are the candidates with the largest gaps, worst first.
    assert it["chosen"] == [int(i) for i in np.argsort(-gaps, kind="stable")[:2]]
    assert it["tasks"] == [it["candidates"][i] for i in it["chosen"]]
    assert it["searched"] == load_family("cartpole_swingup").names and it["archive_size"] == 4
    assert it["starts"] == [it["starts"][0]] * 4  # all new: every candidate from the iteration's start

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [float(r["adversary_env_steps"]) for r in rows] == [0.0, 2 * STEPS]  # 4 graded, 2 trained on
    assert [float(r["oracle_env_steps"]) for r in rows] == [0.0, 4 * STEPS]
    assert float(rows[1]["transitions"]) == 4 * STEPS  # the same training data as a uniform run
    uniform = list(csv.DictReader((tmp_path / "uni" / "metrics.csv").open()))
    assert [float(r["adversary_env_steps"]) for r in uniform] == [0.0, 0.0]
    assert [float(r["oracle_env_steps"]) for r in uniform] == [0.0, 0.0]
    assert float(uniform[1]["transitions"]) == 4 * STEPS
    assert "candidates" not in json.loads((tmp_path / "uni" / "tasks.jsonl").read_text().splitlines()[1])
    # A uniform run resumed with the adversary: it grades and chooses from there on.
    train(tmp_path / "uni", overrides={"loop.iterations": 3, "loop.task_sampler": "adversarial",
                                       "loop.adversary.population": 4}, resume=True, progress=False)
    switched = json.loads((tmp_path / "uni" / "tasks.jsonl").read_text().splitlines()[2])
    assert switched["sampler"] == "adversarial" and len(switched["candidates"]) == 4 and len(switched["tasks"]) == 2

    # Resume: the adversary continues from its checkpointed search, and its step counts carry over.
    saved = torch.load(run / "checkpoints" / "ckpt_0001.pt", weights_only=False)
    expected = make_sampler("adversarial", load_family("cartpole_swingup"), 12345, adversary=AdversaryConfig(
        population=4))
    expected.load_state(saved["sampler"])
    train(run, overrides={"loop.iterations": 3}, resume=True, progress=False)
    lines = [json.loads(line) for line in (run / "tasks.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    assert lines[2]["candidates"] == expected.candidates(2)  # floats survive JSON exactly
    # 1 new and 2 mutated candidates from iteration 2's start; 1 re-graded from the start it was graded from.
    replayed = [c for c in lines[2]["candidates"] if c in lines[1]["candidates"]]
    assert len(replayed) == 1
    assert lines[2]["starts"][3] == it["starts"][0] != lines[2]["starts"][0]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [float(r["adversary_env_steps"]) for r in rows] == [0.0, 2 * STEPS, 4 * STEPS]
    # The replayed task's oracle return came from the run folder's cache (kept across the resume).
    assert [float(r["oracle_env_steps"]) for r in rows] == [0.0, 4 * STEPS, 7 * STEPS]
    assert (run / "oracle_returns.json").is_file()

    # Grade a checkpoint on a 2x2 grid of the train box: the worst gap and its heat map.
    out, cache = tmp_path / "eval", tmp_path / "oracle.json"
    metarl(short_sim, "eval", str(run / "checkpoints" / "ckpt_0001.pt"), "--grid", "2", "--params",
           "pole_length,pole_mass_scale", "--split", "train", "--no-unadapted", "--oracle-cache", str(cache),
           "--out", str(out))
    report = json.loads((out / "eval.json").read_text())
    assert report["source_kind"] == "run" and len(report["tasks"]) == 4
    task_gaps = [r["gap"] for r in report["tasks"]]
    assert report["summary"]["gap"]["worst"] == max(task_gaps)
    assert report["summary"]["gap"]["worst_task"] == int(np.argmax(task_gaps))
    assert report["summary"]["gap"]["mean"] == pytest.approx(np.mean(task_gaps))
    assert "return_unadapted" not in report["summary"]
    assert report["heatmaps"] == ["eval_gap_pole_length_pole_mass_scale.png"]
    assert (out / "eval_gap_pole_length_pole_mass_scale.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads(cache.read_text())["records"]) == 4
