"""Smoke run of bench/context_policy_latency.py: one JSON document with every field and finite figures, the two
sides doing the same work (equal actions); no timing asserts (the machine is shared)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "context_policy_latency.py"
SIDES = {"onnx", "torch", "ort_floor", "ort_floor_bound"}
PARTS = {"step", "observe", "act"}


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.mark.slow
@pytest.mark.integration
def test_smoke_run_prints_every_field_with_finite_figures(tmp_path):
    proc = run_bench("--family", "cartpole_swingup", "--steps", "30", "--warmup", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # stdout holds the JSON document and nothing else

    assert doc["benchmark"] == "context_policy_latency" and doc["family"] == "cartpole_swingup"
    assert set(doc["results"]) == SIDES
    for side, parts in doc["results"].items():
        assert set(parts) == PARTS, side
        for part, row in parts.items():
            figures = [row[k] for k in ("p50_us", "p90_us", "p99_us", "max_us", "mean_us")]
            assert all(math.isfinite(x) and x > 0 for x in figures), (side, part, row)
            assert row["p50_us"] <= row["p90_us"] <= row["p99_us"] <= row["max_us"], (side, part, row)
        assert parts["step"]["n"] == 30 and parts["act"]["n"] == 30, side  # the warm-up steps are left out
        assert 0 < parts["observe"]["n"] < 30, side  # an episode's first step has nothing to observe
    assert all(math.isfinite(v) and v > 0 for v in doc["ratios"].values())
    assert doc["control_period_us"] == pytest.approx(40_000.0)  # cart-pole: 25 Hz control
    assert doc["target"]["p99_us_max"] == 1000.0
    assert isinstance(doc["target"]["onnx_met"], bool) and isinstance(doc["target"]["torch_met"], bool)
    # equal work: the robot-side graphs and the torch controller chose the same actions from the same beliefs
    assert doc["agreement"]["max_abs_action_diff_onnx_torch"] <= 1e-5
    assert doc["agreement"]["max_abs_belief_mean_diff_onnx_torch"] <= 1e-5
    assert doc["agreement"]["max_abs_action_diff_bound_floor_onnx"] == 0.0  # the floors run the adapter's inputs
    machine = doc["machine"]
    assert machine["cpu_model"] and machine["python"] and machine["torch"] and machine["onnxruntime"]
    assert any("does not depend on the weight values" in note for note in doc["notes"])

    saved = tmp_path / "out.json"
    saved.write_text(proc.stdout)
    table = run_bench("--table", str(saved))
    assert table.returncode == 0, table.stderr[-2000:]
    assert table.stdout.count("\n| ") == 12  # a row per side (4) and part (3) under the header


@pytest.mark.integration
def test_bad_options_are_refused_by_name():
    proc = run_bench("--steps", "0")
    assert proc.returncode == 2 and "--steps must be >= 1, got 0" in proc.stderr
    proc = run_bench("--config", "configs/mb_cartpole_swingup.yaml", "--steps", "1")
    assert proc.returncode == 2 and "this benchmark times 'pearl' configs" in proc.stderr
