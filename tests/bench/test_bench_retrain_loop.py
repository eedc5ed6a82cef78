"""Smoke run of bench/retrain_loop.py on the tiny online run: one effect, one short log, one fine-tuning iteration."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_retrain_loop_grades_old_and_new_on_the_twin(online_run: Path, online_bundle: Path, tmp_path: Path):
    result = subprocess.run([sys.executable, "bench/retrain_loop.py", "--run", str(online_run), "--bundle",
                             str(online_bundle), "--out", str(tmp_path / "loop"), "--effect", "delay=1", "--logs", "1",
                             "--steps", "60", "--iterations", "1",
                             "--twin-starts", "2", "--control"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    row = doc["effects"]["delay=1"]
    assert math.isfinite(row["twin_return_old"]) and math.isfinite(row["twin_return_new"])
    assert len(row["twin_returns_old"]) == len(row["twin_returns_new"]) == 2
    assert row["twin_return_old"] == pytest.approx(sum(row["twin_returns_old"]) / 2)
    assert row["improved"] == (row["twin_return_new"] > row["twin_return_old"])
    assert len(row["twin_returns_control"]) == 2 and math.isfinite(row["twin_return_control"])  # same twin, no logs
    assert len(row["twin_returns_unadapted"]) == 2 and math.isfinite(row["twin_return_unadapted"])  # the old bundle
    assert doc["improved"] == int(row["improved"])
    assert row["delays"] == [1] and doc["target_improved"] is None  # one effect: no verdict against the target
    assert (tmp_path / "loop" / "delay_1" / "retrain" / "retrain.json").is_file()
