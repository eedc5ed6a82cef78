"""Smoke run of bench/identify_fit.py: two short in-family logs and one with hinge damping, identified and tested."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_identify_fit_counts_false_alarms_coverage_and_detection():
    result = subprocess.run([sys.executable, "bench/identify_fit.py", "--in-family", "2", "--per-effect", "1",
                             "--effect", "damping=hinge:0.02", "--steps", "60"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    s = doc["summary"]
    assert s["in_family_logs"] == 2 and s["out_of_family_logs"] == 1 and s["coverage_parameters"] <= 8
    verdicts = [r["verdict"] for r in doc["logs"]["in_family"]]
    assert s["false_alarms"] == verdicts.count("not explained")
    assert s["delays_found"]["0"] == [r["delay"] for r in doc["logs"]["in_family"]]
    damped = doc["logs"]["damping=hinge:0.02"][0]
    assert s["detection_by_effect"] == {"damping=hinge:0.02": float(damped["verdict"] == "not explained"
                                                                    or damped["delay"] > 0)}
    for row in doc["logs"]["in_family"]:
        assert set(row["params"]) == {"pole_mass_scale", "pole_length", "cart_friction", "motor_gain_scale"}
        assert 0.0 <= row["p_value"] <= 1.0
