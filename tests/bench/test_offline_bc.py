"""bench/offline_bc.py (the non-meta offline baseline beside MACAW): from a fresh clone it clones a dataset that
`metarl dataset collect` made, grades the clone and, per task, its copies fine-tuned on that task's logged episodes
(the same logs `metarl eval --adapt-from` reads); logs without the graded tasks are refused naming the task."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-command episodes of the 2 test tasks the bench grades (same split, count and seed): 5 per task."""
    out = tmp_path_factory.mktemp("offline_bc") / "test2"
    result = run("-m", "metarl_robot.cli", "dataset", "collect", "--policy", "random", "--family", "cartpole_swingup",
                 "--split", "test", "--tasks", "2", "--episodes", "5", "--steps", "15", "--seed", "0", "--out",
                 str(out), "--no-minari")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_clones_grades_and_fine_tunes_per_task(logs: Path):
    result = run("bench/offline_bc.py", "--dataset", str(logs), "--seeds", "0", "--steps", "30", "--tasks", "2",
                 "--finetune-from", str(logs), "--finetune-steps", "5", "--hidden", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert doc["tasks"] == 2 and doc["transitions"] == 2 * 5 * 14 and doc["hidden"] == [8]
    seed = doc["seeds"]["0"]
    assert len(seed["returns"]) == 2 and math.isfinite(seed["mean_return"]) and seed["fit_mse"] > 0
    assert sorted(seed["finetuned"]) == ["1", "3", "5"]
    for k in ("1", "3", "5"):
        tuned = seed["finetuned"][k]
        assert len(tuned["returns"]) == 2 and tuned["mean_return"] == pytest.approx(sum(tuned["returns"]) / 2, abs=0.01)
    assert doc["finetuned_mean_over_seeds"]["5"] == pytest.approx(seed["finetuned"]["5"]["mean_return"])
    # Fine-tuning changed the policy: its returns are not the pooled clone's.
    assert [seed["finetuned"][k]["returns"] for k in "135"] != [seed["returns"]] * 3


@pytest.mark.slow
def test_logs_without_the_graded_tasks_are_refused_naming_the_task(logs: Path):
    result = run("bench/offline_bc.py", "--dataset", str(logs), "--seeds", "0", "--steps", "5", "--tasks", "3",
                 "--finetune-from", str(logs), "--finetune-steps", "1", "--hidden", "8")
    assert result.returncode != 0
    assert "has 0 logged episode(s), 5 needed" in result.stderr
