"""The loop from hardware logs back to training (metarl_robot/real2sim/retrain.py): the family centred on what was
identified, and the whole chain (identify, fine-tune from the run's weights, re-export, compare) on a tiny run."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from metarl_robot.envs.out_of_family import OutOfFamily
from metarl_robot.real2sim.identify import IdentifyResult, ParamEstimate
from metarl_robot.real2sim.retrain import DELAY_PARAM, identified_family, write_family
from metarl_robot.spec.family import load_family

FAMILY = "cartpole_swingup"


def result(values: dict[str, float], half: dict[str, float | None], delay: int = 0) -> IdentifyResult:
    """An identification answer with these values and 95 % half-intervals (None: no interval)."""
    family = load_family(FAMILY)
    params = []
    for p in family.params:
        value = values.get(p.name, p.nominal)
        h = half.get(p.name)
        interval = None if h is None else (value - h, value + h)
        params.append(ParamEstimate(p.name, p.kind, value, None, None, interval, None, None, p.bounds,
                                    interval is not None))
    return IdentifyResult(FAMILY, "log.mcap", {p.name: p.value for p in params}, params, 0.0, 0.0, 0.0, 0.01, 100,
                          {}, {}, [], 10, 100, 101, 10, 1.0, delay=delay)


def test_the_family_is_centred_on_the_estimates_and_widened_by_their_intervals(tmp_path):
    a = result({"pole_length": 0.80, "cart_friction": 0.30}, {"pole_length": 0.01, "cart_friction": 0.02})
    b = result({"pole_length": 0.84, "cart_friction": 0.34}, {"pole_length": 0.01, "cart_friction": None})
    spec = identified_family(load_family(FAMILY), [a, b], widen=2.0)
    length, friction = spec["params"]["pole_length"], spec["params"]["cart_friction"]
    assert length["train"] == pytest.approx([0.78, 0.86]) and length["nominal"] == 1.0  # the MJCF robot stays
    # No interval for the second friction estimate: +-10 % of the box (0..1 N) instead.
    assert friction["train"] == pytest.approx([0.24, 0.44]) and friction["test"] == [0.0, 1.0]
    # Log-uniform scales are widened in log space; clipped to the family's bounds; reward parameters kept.
    mass = spec["params"]["pole_mass_scale"]
    assert mass["train"][0] >= 0.33 and mass["train"][1] <= 3.0
    assert spec["params"]["target_x"]["train"] == [-0.5, 0.5] and DELAY_PARAM not in spec["params"]
    family = load_family(write_family(spec, tmp_path))
    assert family.name == "cartpole_swingup_identified" and family.spec.robot == "cartpole"


def test_a_delay_found_becomes_an_action_delay_parameter(tmp_path):
    spec = identified_family(load_family(FAMILY), [result({}, {}, delay=1), result({}, {}, delay=2)])
    delay = spec["params"][DELAY_PARAM]
    assert delay["effect"] == {"action_delay": True} and delay["sampling"] == "integer"
    assert delay["train"] == [1, 2] and delay["test"] == [0, 3] and delay["nominal"] == 0
    family = load_family(write_family(spec, tmp_path))
    assert family.sample(np.random.default_rng(0), "train", 4)[0][DELAY_PARAM] in (1, 2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="no identification results"):
        identified_family(load_family(FAMILY), [])
    with pytest.raises(ValueError, match="--widen: a number > 0"):
        identified_family(load_family(FAMILY), [result({}, {})], widen=0.0)


@pytest.mark.slow
def test_retrain_runs_the_whole_loop_on_a_tiny_run(online_run: Path, online_bundle: Path, tmp_path: Path):
    from metarl_robot.real2sim.sim_record import record_sim_episode
    from metarl_robot.runtime.bundle import load_bundle

    run = tmp_path / "run"
    shutil.copytree(online_run, run)  # the fixture is shared: fine-tuning reads it, but copy to be safe
    bundle = load_bundle(online_bundle)
    task = {"pole_mass_scale": 1.6, "pole_length": 0.8, "cart_friction": 0.3, "motor_gain_scale": 0.8,
            "target_x": 0.0}
    logs = [record_sim_episode(bundle, task, tmp_path / f"log{i}.mcap", 80, seed=i, obs_noise=0.002,
                               effects=OutOfFamily(delay_periods=1)) for i in range(2)]
    out = tmp_path / "retrain"
    result_ = subprocess.run([sys.executable, "-m", "metarl_robot.cli", "retrain", *map(str, logs), "--run", str(run),
                              "--bundle", str(online_bundle), "--out", str(out), "--iterations", "1",
                              "--random-episodes", "2", "--noise-std", "0.002"],
                             capture_output=True, text=True, timeout=1800)
    assert result_.returncode == 0, result_.stderr[-3000:]
    summary = json.loads((out / "retrain.json").read_text())
    assert len(summary["per_log"]) == 2 and all(r["delay"] == 1 for r in summary["per_log"]), summary["per_log"]
    family = yaml.safe_load((out / "cartpole_swingup_identified.yaml").read_text())
    assert family["params"][DELAY_PARAM]["train"] == [1, 1]
    assert json.loads((out / "run" / "run.json").read_text())["init_from"]["run"] == str(run)
    new = load_bundle(out / "bundle")
    assert new.family.name == "cartpole_swingup_identified" and new.kind == bundle.kind
    for row in summary["per_log"]:
        assert row["task"][DELAY_PARAM] == 1  # both bundles are graded on the robot as found: late motors too
        assert math.isfinite(row["return_old"]) and math.isfinite(row["return_new"])
        assert row["improved"] == (row["return_new"] > row["return_old"])
    assert "improved on" in result_.stdout
    assert (out / "oracle_cache.json").is_file()  # one oracle for both bundles
    graded = json.loads((out / "eval_new" / "eval.json").read_text())["tasks"][0]
    assert {k for k in graded if k.startswith("return_")} == {"return_adapted", "return_oracle"}
