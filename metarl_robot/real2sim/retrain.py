"""The loop from hardware logs back to training: identify, re-centre the family, fine-tune, re-export, compare.

``metarl retrain LOG... --run RUN --bundle BUNDLE --out DIR`` (docs/retrain.md):

1. **Identify** every log with ``metarl identify`` (the sensor noise from robot.yaml or ``--noise-std``): each
   gives a task, intervals (when the family explains the log), a verdict and the command-to-effect delay.
2. **A family centred on what was identified** (:func:`identified_family`): per searched dynamics parameter, the
   train range is the hull over the logs of the estimate ± ``widen`` x its 95 % half-interval (search
   coordinates: log space for log-uniform scales); an estimate without an interval (a fit the family does not
   explain, or an unconstrained parameter) gets ± ``fallback_fraction`` of the parameter's box width instead.
   Clipped to the family's own bounds (train and test ranges together): the family's physics is what the
   simulator can vary. The nominal and the test range stay the family's (the nominal is the MJCF robot, which
   the family's absolute effects require), so training tasks come from around the robot. A delay found in
   any log becomes the family's ``action_delay`` parameter (added as ``command_delay`` if it has none), its train
   range the delays found. Reward parameters are kept. Written to ``DIR/<family>_identified.yaml``.
3. **Fine-tune** the run on it: a new run folder ``DIR/run`` whose config is the run's with that family and
   ``--iterations``/``--random-episodes``, starting from the run's latest weights and keeping its data.
4. **Re-export** ``DIR/bundle`` and **evaluate** the old and the new bundle in sim on the identified tasks (one per
   log; ``metarl eval --task-file`` style, the adapted controller and the oracle, whose returns are computed once
   into ``DIR/oracle_cache.json``), into ``DIR/eval_old`` and ``DIR/eval_new``;
   ``DIR/retrain.json`` holds everything and the comparison.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from metarl_robot.real2sim.identify import IdentifyConfig, IdentifyResult, identify
from metarl_robot.spec.family import TaskFamily, load_family
from metarl_robot.spec.schema import to_plain

DELAY_PARAM = "command_delay"
"""Name of the action-delay parameter added to a family that has none, when a log showed a delay."""


def identified_family(family: TaskFamily, results: Sequence[IdentifyResult], widen: float = 2.0,
                      fallback_fraction: float = 0.1, name: str | None = None) -> dict[str, Any]:
    """The family YAML (plain data) centred on ``results`` (see the module docstring)."""
    if not results:
        raise ValueError("identified_family: no identification results (give at least one log)")
    if not (math.isfinite(widen) and widen > 0):
        raise ValueError(f"--widen: a number > 0 (times each 95 % half-interval), got {widen}")
    if not 0 < fallback_fraction <= 1:
        raise ValueError(f"fallback_fraction: in (0, 1] of the box width, got {fallback_fraction}")
    spec = to_plain(family.spec)
    spec["name"] = name or f"{family.name}_identified"
    spec["description"] = (f"{family.name} centred on what metarl identify found in {len(results)} log(s) "
                           f"(train ranges: estimate +- {widen:g} x 95 % half-interval); written by metarl retrain")
    delay_param = None
    for p in family.params:
        if p.effect and p.effect.get("action_delay"):
            delay_param = p.name
        if p.kind != "dynamics" or p.name == delay_param:
            continue
        estimates = [next(e for e in r.params if e.name == p.name) for r in results]
        log_space = p.sampling == "log_uniform"
        to_x = np.log if log_space else (lambda v: v)
        bounds_lo, bounds_hi = p.bounds
        x_lo, x_hi = float(to_x(bounds_lo)), float(to_x(bounds_hi))
        lows, highs = [], []
        for e in estimates:
            x = float(to_x(e.value))
            if e.interval is not None and all(math.isfinite(v) for v in e.interval):
                half = widen * (float(to_x(e.interval[1])) - float(to_x(e.interval[0]))) / 2.0
            else:
                half = fallback_fraction * (x_hi - x_lo)
            lows.append(x - half)
            highs.append(x + half)
        lo, hi = max(min(lows), x_lo), min(max(highs), x_hi)
        back = np.exp if log_space else (lambda v: v)
        spec["params"][p.name]["train"] = [float(back(lo)), float(back(hi))]
    delays = sorted(r.delay for r in results)
    if delay_param is not None or delays[-1] > 0:
        name_ = delay_param or DELAY_PARAM
        entry = spec["params"].setdefault(name_, {
            "kind": "dynamics", "effect": {"action_delay": True}, "sampling": "integer", "units": "control steps",
            "doc": "commands reach the motors this many control periods late (found by metarl identify)",
            "test": [0, delays[-1] + 1]})
        entry.setdefault("nominal", 0)  # the MJCF robot, as every nominal
        entry["train"] = [delays[0], delays[-1]]
        test = entry.get("test", [0, delays[-1]])
        entry["test"] = [min(test[0], delays[0]), max(test[1], delays[-1])]
    return spec


def write_family(spec: Mapping[str, Any], folder: str | Path) -> Path:
    """Write ``spec`` as ``folder/<name>.yaml`` and check that it loads as a family."""
    path = Path(folder) / f"{spec['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by metarl retrain (docs/retrain.md): the family centred on identified logs.\n"
                    + yaml.safe_dump(dict(spec), sort_keys=False))
    load_family(path)
    return path


def fine_tune(run_dir: str | Path, out_dir: str | Path, family: str | Path | None = None, iterations: int = 5,
              random_episodes: int = 4, progress: bool = True) -> Path:
    """Steps 3 and 4's export: ``out_dir/run``, the run fine-tuned from its latest weights and data for ``iterations``
    iterations on ``family`` (``None``: its own, the control that separates what a new family gives from what
    more training gives), exported to ``out_dir/bundle``; returns the bundle folder."""
    from metarl_robot.export.bundle_writer import export_run
    from metarl_robot.train.config import load_config
    from metarl_robot.train.runner import Runner

    run_dir, out = Path(run_dir), Path(out_dir)
    overrides = {"loop.iterations": iterations, "loop.random_episodes": random_episodes, "name": "run",
                 **({"family": str(family)} if family is not None else {})}
    cfg = load_config(run_dir / "config.yaml", overrides)
    Runner(cfg, out / "run", progress=progress, init_from=run_dir).run()
    return export_run(out / "run", out / "bundle")


def retrain(logs: Sequence[str | Path], run_dir: str | Path, bundle: str | Path, out_dir: str | Path,
            iterations: int = 5, random_episodes: int = 4, widen: float = 2.0,
            noise_std: float | Mapping[str, float] | None = None, identify_config: IdentifyConfig | None = None,
            eval_seed: int = 0, progress: bool = True, compare: bool = True) -> dict[str, Any]:
    """The whole loop (see the module docstring); returns what ``DIR/retrain.json`` holds. ``compare=False``
    skips step 4's evaluation (for a caller that grades the new bundle itself): no returns in the summary."""
    from metarl_robot.runtime.bundle import load_bundle
    from metarl_robot.train.config import load_config
    from metarl_robot.train.evaluate import evaluate

    started = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out_dir)
    if not logs:
        raise ValueError("metarl retrain: give at least one episode log")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ValueError(f"--iterations: a whole number >= 1 of fine-tuning iterations, got {iterations!r}")
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "checkpoints" / "latest.pt").is_file():
        raise FileNotFoundError(f"--run {run_dir}: not a run folder (config.yaml and checkpoints/latest.pt); give the "
                                "folder metarl train wrote for the bundle")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new folder")
    old = load_bundle(bundle)
    family = load_family(load_config(run_dir / "config.yaml").family)
    if old.family.name != family.name:
        raise ValueError(f"--bundle {bundle} was trained on family {old.family.name!r}, --run on {family.name!r}")

    results = [identify(log, family, identify_config, progress=progress, noise_std=noise_std) for log in logs]
    spec = identified_family(family, results, widen)
    family_path = write_family(spec, out)
    new_bundle = fine_tune(run_dir, out, family_path, iterations, random_episodes, progress)
    delay_name = next((n for n, p in spec["params"].items() if (p.get("effect") or {}).get("action_delay")), None)
    summary = {"logs": [str(p) for p in logs], "run": str(run_dir), "bundle_old": str(bundle),
               "bundle_new": str(new_bundle), "family": str(family_path), "widen": widen, "iterations": iterations}
    tasks = [load_family(family_path).validate({**{k: v for k, v in r.task.items() if k in spec["params"]},
                                                **({delay_name: r.delay} if delay_name else {})}) for r in results]
    per_log = [{"log": str(log), "verdict": result.fit.verdict if result.fit else None, "delay": result.delay,
                "task": task} for log, result, task in zip(logs, results, tasks, strict=True)]
    if compare:
        # Both bundles on the identified tasks of the new family (its delay included: the robot has it), the
        # adapted controller only (the comparison is of returns), the oracle computed once for both.
        reports = {label: evaluate(source, out / f"eval_{label}", family=str(family_path), tasks=tasks,
                                   seed=eval_seed, progress=progress, modes=(),
                                   oracle_cache=out / "oracle_cache.json")
                   for label, source in (("old", bundle), ("new", new_bundle))}
        for i, row in enumerate(per_log):
            row["return_old"] = reports["old"]["tasks"][i]["return_adapted"]
            row["return_new"] = reports["new"]["tasks"][i]["return_adapted"]
            row["improved"] = bool(row["return_new"] > row["return_old"])
        summary.update({"mean_return_old": float(np.mean([r["return_old"] for r in per_log])),
                        "mean_return_new": float(np.mean([r["return_new"] for r in per_log])),
                        "improved": sum(r["improved"] for r in per_log)})
    summary.update({"per_log": per_log, "seconds": round(time.perf_counter() - started, 1)})
    (out / "retrain.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


__all__ = ["DELAY_PARAM", "fine_tune", "identified_family", "retrain", "write_family"]
