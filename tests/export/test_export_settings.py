"""metarl export --set: a deployment setting the bundle records instead of the run's (meta_policy's
episodes_per_step), refused for keys its kind does not take and for kinds that take none."""

from __future__ import annotations

from pathlib import Path

import pytest

from metarl_robot import cli
from metarl_robot.export.bundle_writer import export_run
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.spec.schema import SpecError


def test_a_meta_policy_bundle_records_the_pooling_it_was_exported_with(mbmpo_run: Path, tmp_path: Path):
    assert cli.main(["export", str(mbmpo_run), "--out", str(tmp_path / "k3"), "--set", "episodes_per_step=3"]) == 0
    pooled = load_bundle(tmp_path / "k3")
    assert pooled.inner.episodes_per_step == 3
    assert pooled.make_adapter().inner.episodes_per_step == 3
    plain = load_bundle(export_run(mbmpo_run, tmp_path / "k1"))
    assert plain.inner.episodes_per_step == 1  # the run's own (trained with 1)
    # Only the recorded setting differs: the step as trained is the same.
    assert {**vars(pooled.inner), "episodes_per_step": 1} == vars(plain.inner)


def test_settings_a_kind_does_not_take_are_refused_naming_what_it_takes(mbmpo_run: Path, mb_run: Path,
                                                                         tmp_path: Path):
    with pytest.raises(SpecError, match=r"a meta_policy bundle takes episodes_per_step; got \['samples'\]"):
        export_run(mbmpo_run, tmp_path / "a", adapter_settings={"samples": 64})
    with pytest.raises(SpecError, match="a model_based bundle takes no deployment settings"):
        export_run(mb_run, tmp_path / "b", adapter_settings={"episodes_per_step": 2})
    with pytest.raises(SpecError, match="episodes_per_step"):
        export_run(mbmpo_run, tmp_path / "c", adapter_settings={"episodes_per_step": 0})
    assert not any((tmp_path / name).exists() for name in "abc")
