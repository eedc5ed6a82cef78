"""Every bundle shipped in policies/ loads on the robot side and still matches the robot it was made for."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.paths import REPO_ROOT, family_names
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.spec.robot import load_robot

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


@pytest.fixture(scope="module")
def context_policy_bundle(tmp_path_factory: pytest.TempPathFactory):
    """No context_policy bundle ships yet: one exported from a tiny PEARL run stands in, so the kind is covered."""
    from metarl_robot.export.bundle_writer import export_run
    from tests.runtime.test_context_policy_bundle import train_tiny_pearl_run

    run = train_tiny_pearl_run(tmp_path_factory.mktemp("runs"))
    return export_run(run, tmp_path_factory.mktemp("bundles") / "pearl_tiny")


@pytest.mark.parametrize("name", [*BUNDLES, pytest.param("<context_policy fixture>", marks=pytest.mark.slow)])
def test_shipped_bundle_controls_its_robot_within_limits(name, request):
    path = (request.getfixturevalue("context_policy_bundle") if name == "<context_policy fixture>"
            else REPO_ROOT / "policies" / name)
    bundle = load_bundle(path)
    env = MetaMujocoEnv(bundle.family.name)
    obs, _ = env.reset(seed=0, options={"task": "test"})
    model_based = bundle.kind == "model_based"
    overrides = {"samples": 16, "horizon": 5} if model_based else None  # a context policy does not plan
    adapter = bundle.make_adapter(batch=1, planner_overrides=overrides, seed=0)
    params = {k: np.array([v]) for k, v in env.reward_params.items()}
    for _ in range(10):
        action, diag = adapter.act(obs[None], params)
        assert np.all(action >= bundle.robot.action_low) and np.all(action <= bundle.robot.action_high)
        next_obs, _, _, _, info = env.step(action[0])
        assert not info["action_clipped"]  # the planner / the policy's box already obeyed the limits
        if model_based:  # the planner also obeys the rate limit; a context policy leaves that to the safety layer
            assert not info["action_rate_limited"]
        adapter.observe(obs[None], info["sent_action"][None], next_obs[None])
        obs = next_obs
    if model_based:
        assert diag["context_size"][0] == min(9, bundle.manifest["adaptation"]["context_window"])
        assert np.isfinite(diag["prediction_error"]).all()
    else:
        assert diag["context_size"][0] == 9
        assert np.isfinite(diag["context_mean"]).all() and np.all(diag["context_var"] > 0)


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
