"""Smoke run of bench/adversarial_tasks.py with a tiny budget (no learning claims, no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TINY = ["loop.random_episodes=2", "loop.tasks_per_iteration=2", "training.grad_steps=5", "planner.samples=8",
        "planner.horizon=4", "planner.iterations=1", "model.hidden=16", "model.ensemble_size=2",
        "loop.adversary.population=3"]


@pytest.mark.slow
@pytest.mark.integration
def test_adversarial_benchmark_compares_every_sampler(tmp_path):
    cmd = [sys.executable, "bench/adversarial_tasks.py", "--out", str(tmp_path), "--seeds", "0", "--iterations", "2",
           "--eval-at", "0", "1", "--grid", "2", "--params", "pole_length", "pole_mass_scale", "--jobs", "1"]
    for s in TINY:
        cmd += ["--set", s]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert set(doc["samplers"]) == {"uniform", "gaussian", "adversarial"}
    for sampler, entry in doc["samplers"].items():
        assert [c["iteration"] for c in entry["curve"]] == [0, 1]
        last = entry["curve"][-1]
        assert last["worst_gap"]["mean"] >= last["mean_gap"]["mean"]
        assert 0.0 <= last["success_rate"]["mean"] <= 1.0 and len(last["worst_tasks_succeeded"]) == 1
        # Equal training budgets: every sampler added the same number of transitions.
        assert last["transitions"] == doc["samplers"]["uniform"]["curve"][-1]["transitions"]
        assert (last["adversary_env_steps"] > 0) == (sampler == "adversarial")
    assert set(doc["comparison"]) >= {"worst_gap_reduction_vs_uniform", "mean_gap_increase_vs_uniform", "met"}
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    # The grid's oracle ran once and every evaluation reused it.
    cache = json.loads((tmp_path / "oracle_cache.json").read_text())
    assert len(cache["records"]) == 4

    # Interrupted after its last checkpoint (no summary.json), a run goes on from there when asked for more.
    (tmp_path / "runs" / "uniform_s0" / "summary.json").unlink()
    more = [*cmd[:cmd.index("--iterations") + 1], "3", *cmd[cmd.index("--iterations") + 2:]]
    more[more.index("--eval-at") + 1:more.index("--eval-at") + 3] = ["1", "2"]
    result = subprocess.run([*more, "--samplers", "uniform"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "logs").glob("train_uniform_s0_resumed_*.log"))
    metrics = (tmp_path / "runs" / "uniform_s0" / "metrics.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in metrics[1:]] == ["0", "1", "2"]


def _bench_module():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("adversarial_tasks", Path("bench/adversarial_tasks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gradient_proposals_are_ranked_among_the_candidates_they_were_graded_with(tmp_path):
    # Iteration 1 proposes v = 3.0 from its worst candidate; iteration 2 grades it first among 4 candidates
    # (the second worst, trained on). Iteration 2's proposal is never graded (the run ended): not counted.
    step = {"projected": 1.0, "cg_negative_curvature": 1.0, "cg_relative_residual": 2.0, "correction_v": 40.0,
            "oracle_term_v": -20.0, "direct_term_v": -25.0}
    healthy = {**step, "projected": 0.0, "cg_negative_curvature": 0.0, "cg_relative_residual": 0.1, "correction_v": 1.0}
    rows = [{"iteration": 0, "sampler": "random"},
            {"iteration": 1, "candidates": [{"v": 2.0}, {"v": 1.0}], "candidate_gaps": [5.0, 1.0], "chosen": [0],
             "reward_gradient": {"from": {"v": 2.0}, "proposal": {"v": 3.0}, "steps": [step]}},
            {"iteration": 2, "candidates": [{"v": 3.0}, {"v": 0.1}, {"v": 2.5}, {"v": 1.5}],
             "candidate_gaps": [8.0, 0.5, 9.0, 2.0], "chosen": [2, 0],
             "reward_gradient": {"from": {"v": 2.5}, "proposal": {"v": 3.0}, "steps": [healthy]}}]
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = _bench_module()._gradient_proposals(tmp_path)
    assert out["graded"] == 1 and out["mean_rank"] == 2 and out["uniform_mean_rank"] == 2.5
    assert out["trained_fraction"] == 1.0 and out["clipped_fraction"] == 1.0
    assert out["mean_gap_minus_median"] == 8.0 - 5.0
    # Estimator health over both steps taken: one met negative curvature, one's correction term (40) outweighed
    # the envelope terms (|-20 - -25| = 5), the other's (1) did not.
    assert out["steps"] == 2 and out["cg_negative_curvature_fraction"] == 0.5
    assert out["median_cg_relative_residual"] == pytest.approx(1.05) and out["correction_dominates_fraction"] == 0.5
    # A run without the gradient adversary has nothing to report.
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n")
    assert _bench_module()._gradient_proposals(tmp_path) is None


def test_training_spread_counts_the_sampler_chosen_tasks_in_thirds_of_the_train_range(tmp_path):
    from metarl_robot.spec.family import ParamBox, load_family

    # target_velocity trains on [0, 3] (uniform): thirds [0, 1), [1, 2), [2, 3]; iteration 0 is not counted.
    rows = [{"iteration": 0, "tasks": [{"target_velocity": 0.1}] * 8},
            {"iteration": 1, "tasks": [{"target_velocity": 2.9}, {"target_velocity": 2.5}]},
            {"iteration": 2, "tasks": [{"target_velocity": 1.5}, {"target_velocity": 3.0}]}]
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    box = ParamBox(load_family("half_cheetah_vel_reward"), ["target_velocity"], "train")
    assert _bench_module()._training_spread(tmp_path, box) == {"target_velocity": [0.0, 0.25, 0.75]}
