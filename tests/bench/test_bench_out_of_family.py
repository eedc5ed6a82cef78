"""Smoke run of bench/out_of_family.py on the tiny online bundle with a tiny planner: each effect alone and all
together, every mode of the kind, the oracle cached per effect, evaluations reused on a second run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = ["--set", "samples=8", "--set", "horizon=4", "--set", "iterations=1"]


@pytest.mark.slow
def test_out_of_family_grades_each_effect_alone_and_together_and_reuses_its_evaluations(online_bundle: Path,
                                                                                         tmp_path: Path):
    cmd = [sys.executable, "bench/out_of_family.py", "--bundles", str(online_bundle), "--tasks", "1",
           "--effect", "delay=1", "--effect", "obs_noise=0.02", "--out", str(tmp_path), *SMALL]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert list(doc["grid"]) == ["delay", "obs_noise", "all"]
    row = doc["bundles"][online_bundle.name]
    assert row["kind"] == "online_model" and set(row["effects"]) == {"delay", "obs_noise", "all"}
    for label, effect in row["effects"].items():
        assert set(effect) >= {"adapted", "context_only", "online_only", "unadapted", "oracle"}, label
        assert effect["tasks"] == 1 and effect["adapted"]["swung_up"] in (0, 1)
        report = json.loads((tmp_path / online_bundle.name / label / "eval.json").read_text())
        assert report["out_of_family"]["effects"] == doc["grid"][label] and report["planner"]["samples"] == 8
        assert (tmp_path / f"oracle_{label}.json").is_file()
    assert set(row["swung_up_fraction"]) >= {"adapted", "oracle"}
    # Run again: every evaluation is reused (nothing re-graded), the same figures come out.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"[{online_bundle.name}]" not in again.stderr, again.stderr[-2000:]
    assert json.loads(again.stdout)["bundles"] == doc["bundles"]


def test_an_effect_outside_the_grid_is_refused(tmp_path: Path):
    result = subprocess.run([sys.executable, "bench/out_of_family.py", "--bundles", "policies/cartpole_mb", "--only",
                             "wobble", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--only wobble: not in the grid" in result.stderr
