"""The training loop: run folder, resume, versioned checkpoints, config errors; and the CLI pipeline."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from metarl_robot.spec.schema import SpecError
from metarl_robot.train.config import load_config
from metarl_robot.train.runner import CHECKPOINT_SCHEMA_VERSION, Runner, load_checkpoint, train

CONFIG = "configs/mb_cartpole_swingup.yaml"
TINY = {"loop.iterations": 2, "loop.random_episodes": 2, "loop.tasks_per_iteration": 2, "training.grad_steps": 5,
        "planner.samples": 8, "planner.horizon": 4, "planner.iterations": 1, "model.hidden": 16,
        "model.ensemble_size": 2}


@pytest.mark.slow
def test_run_folder_resume_and_checkpoint_versions(tmp_path):
    summary = train(CONFIG, tmp_path, overrides={**TINY, "name": "r"}, progress=False)
    run = tmp_path / "r"
    assert summary["run_dir"] == str(run)
    for name in ("config.yaml", "run.json", "metrics.csv", "tasks.jsonl", "buffer.npz", "summary.json",
                 "checkpoints/latest.pt", "checkpoints/ckpt_0000.pt", "checkpoints/ckpt_0001.pt"):
        assert (run / name).exists(), name
    assert any((run / "tb").iterdir())
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["loop"]["iterations"] == 2 and resolved["planner"]["noise_correlation"] == 0.9
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["iteration"] for r in rows] == ["0", "1"]
    assert float(rows[0]["policy"]) == 0.0 and float(rows[1]["policy"]) == 1.0
    assert len((run / "tasks.jsonl").read_text().splitlines()) == 2

    # Resume for one more iteration: history and data carry over.
    train(run, overrides={"loop.iterations": 3}, resume=True, progress=False)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["iteration"] for r in rows] == ["0", "1", "2"]
    assert int(float(rows[2]["episodes"])) == int(float(rows[1]["episodes"])) + 2

    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=False)
    state["schema_version"] = CHECKPOINT_SCHEMA_VERSION + 1
    torch.save(state, run / "checkpoints" / "latest.pt")
    with pytest.raises(SpecError, match=f"checkpoint schema {CHECKPOINT_SCHEMA_VERSION + 1} is not supported"):
        load_checkpoint(run / "checkpoints" / "latest.pt")
    with pytest.raises(FileExistsError, match="resume it with --resume"):
        Runner(load_config(CONFIG, {**TINY, "name": "r"}), run)
    data = (run / "checkpoints" / "ckpt_0001.pt").read_bytes()
    (run / "checkpoints" / "cut.pt").write_bytes(data[: len(data) // 2])  # a copy cut off half-way
    with pytest.raises(SpecError, match=r"cut.pt: not a readable metarl checkpoint \(truncated"):
        load_checkpoint(run / "checkpoints" / "cut.pt")
    # weights_only: numpy arrays load (an algorithm's state may hold them), a pickled object of any other class
    # (which could run code on load) does not
    state["schema_version"] = CHECKPOINT_SCHEMA_VERSION
    torch.save({**state, "extra": np.arange(3.0)}, run / "checkpoints" / "arrays.pt")
    assert load_checkpoint(run / "checkpoints" / "arrays.pt")["extra"].tolist() == [0.0, 1.0, 2.0]
    torch.save({**state, "extra": argparse.Namespace(x=1)}, run / "checkpoints" / "object.pt")
    with pytest.raises(SpecError, match=r"(?s)not a readable metarl checkpoint .*Unsupported global"):
        load_checkpoint(run / "checkpoints" / "object.pt")


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [({"loop.iterationz": 3}, "loop.iterationz", "unknown key 'iterationz'"),
     ({"planner.method": "ilqr"}, "planner.method", "allowed: 'mppi', 'cem'"),
     ({"loop.iterations": 0}, "loop.iterations", "must be >= 1"),
     ({"planner.noise_correlation": 1.5}, "planner", "planner.noise_correlation = 1.5")],
)
def test_bad_configs_name_the_field(overrides, field, fragment):
    with pytest.raises(SpecError) as err:
        load_config(CONFIG, overrides)
    assert err.value.field == field and fragment in str(err.value)


@pytest.mark.slow
@pytest.mark.integration
def test_cli_train_export_eval(tmp_path):
    def metarl(*args):
        result = subprocess.run([sys.executable, "-m", "metarl_robot.cli", *args], capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    out = metarl("train", CONFIG, "--out", str(tmp_path), "--name", "cli", *sets)
    assert "run folder:" in out
    metarl("export", str(tmp_path / "cli"), "--out", str(tmp_path / "bundle"))
    assert (tmp_path / "bundle" / "bundle.yaml").is_file()
    out = metarl("eval", str(tmp_path / "bundle"), "--tasks", "2", "--out", str(tmp_path / "eval"),
                 "--set", "samples=8", "--set", "horizon=4", "--set", "iterations=1")
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["source_kind"] == "bundle" and len(report["tasks"]) == 2
    for key in ("return_adapted", "return_unadapted", "return_oracle", "gap", "pred_err_ratio_after_k",
                "success_rate_adapted", "success_rate_oracle"):
        assert key in report["summary"], key
    assert len(report["prediction_error_by_step"]["adapted"]) == 250
    for png in ("eval_returns.png", "eval_prediction_error.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    assert "adapted" in out and "gap" in out


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("configs/*.yaml")))
def test_every_shipped_config_loads_and_names_a_shipped_family(path):
    from metarl_robot.paths import family_names

    cfg = load_config(path)
    assert cfg.family in family_names()


def test_there_is_a_config_for_every_family():
    from pathlib import Path

    from metarl_robot.paths import family_names

    configured = {load_config(p).family for p in Path("configs").glob("*.yaml")}
    assert configured == set(family_names())


@pytest.mark.slow
def test_metrics_csv_rows_align_with_the_header(tmp_path):
    train(CONFIG, tmp_path, overrides={**TINY, "name": "m", "loop.iterations": 3}, progress=False)
    lines = (tmp_path / "m" / "metrics.csv").read_text().splitlines()
    assert len({len(line.split(",")) for line in lines}) == 1
    rows = list(csv.DictReader((tmp_path / "m" / "metrics.csv").open()))
    assert all(float(r["seconds"]) > 0 for r in rows)
    assert rows[0]["online_pred_err_after_k"] == "nan" and rows[2]["online_pred_err_after_k"] != "nan"
