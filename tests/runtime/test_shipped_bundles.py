"""Every bundle shipped in policies/ loads on the robot side and still matches the robot it was made for."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_robot.paths import REPO_ROOT, family_names
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.spec.robot import load_robot
from tests.runtime.test_kind_conformance import drive, small_plan

BUNDLES = sorted(p.parent.name for p in (REPO_ROOT / "policies").glob("*/bundle.yaml"))


def test_at_least_one_bundle_ships():
    assert BUNDLES, "policies/ holds no bundle"


@pytest.mark.parametrize("name", BUNDLES)
def test_shipped_bundle_matches_the_current_robot_and_family(name):
    bundle = load_bundle(REPO_ROOT / "policies" / name)
    current = load_robot(bundle.robot.name)
    assert bundle.robot.interface_hash == current.interface_hash, (
        f"policies/{name} was exported for another version of sim/robots/{bundle.robot.name}/robot.yaml; "
        "re-export it or restore the robot.yaml")
    assert bundle.family.name in family_names()
    report = REPO_ROOT / "policies" / name / "eval" / "eval.json"
    assert report.is_file(), f"policies/{name} ships without its eval report (policies/{name}/eval/eval.json)"


@pytest.mark.parametrize("name", BUNDLES)
def test_shipped_bundle_controls_its_robot_within_limits(name):
    """Each shipped bundle on its family's env, 10 steps within the robot's limits (a bundle of every kind, shipped
    or not, goes through the same drive in tests/runtime/test_kind_conformance.py)."""
    bundle = load_bundle(REPO_ROOT / "policies" / name)
    _, diagnostics, _ = drive(bundle, steps=10, overrides=small_plan(bundle))
    last = diagnostics[-1]
    if "context_size" in last:  # a kind that infers a context (a meta-policy adapts between episodes instead)
        # 9 transitions observed after 10 steps, as many as a model-based context window holds
        assert last["context_size"][0] == min(9, getattr(bundle, "context_window", 9))
    for key in (*bundle.belief_diagnostics, *(["prediction_error"] if bundle.has_dynamics_model else [])):
        assert np.isfinite(last[key]).all(), key


@pytest.mark.parametrize("name", BUNDLES)
def test_shipped_bundle_is_reproducible_from_a_shipped_config(name):
    from metarl_robot.spec.schema import to_plain
    from metarl_robot.train.config import build_config, load_config

    # Resolved through today's config classes: keys added since the bundle was trained take their defaults
    # (e.g. loop.gaussian / loop.adversary, which the uniform sampler it was trained with does not read).
    provenance = load_bundle(REPO_ROOT / "policies" / name).manifest["provenance"]["config"]
    trained = dict(to_plain(build_config(provenance, f"policies/{name} provenance")), name=None)
    shipped = [p.name for p in sorted((REPO_ROOT / "configs").glob("*.yaml"))
               if dict(to_plain(load_config(p)), name=None) == trained]
    assert shipped, f"no file in configs/ resolves to the config policies/{name} was trained with"
