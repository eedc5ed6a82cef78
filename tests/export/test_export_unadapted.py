"""``metarl export --kind unadapted``: the non-adaptive baseline bundle of a context_mbrl run plans exactly as the
run's model_based bundle does with adaptation off; its manifest refusals; the kinds each algorithm exports."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.export.bundle_writer import export_run
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.manifest import BundleError
from metarl_robot.spec.schema import SpecError
from tests.conftest import edit_yaml

pytestmark = pytest.mark.slow  # the tiny run and its exports (seconds)


@pytest.fixture(scope="module")
def model_based(mb_run: Path, tmp_path_factory: pytest.TempPathFactory):
    return load_bundle(export_run(mb_run, tmp_path_factory.mktemp("bundles") / "mb_tiny"))


def test_the_unadapted_bundle_keeps_the_model_and_drops_the_encoder(unadapted_bundle: Path, model_based):
    bundle = load_bundle(unadapted_bundle)
    assert bundle.kind == "unadapted" and sorted(bundle.manifest["graphs"]) == ["dynamics", "rollout"]
    assert sorted(bundle.manifest["files"]) == ["dynamics.onnx", "rollout.onnx"]
    assert not (unadapted_bundle / "encoder.onnx").exists()
    assert bundle.manifest["planner"] == model_based.manifest["planner"]
    adaptation = model_based.manifest["adaptation"]
    model = bundle.manifest["model"]
    assert (model["ensemble_size"], model["rollout_horizon"]) == (adaptation["ensemble_size"],
                                                                 adaptation["rollout_horizon"])
    assert len(model["context"]) == adaptation["context_dim"]
    # the frozen context is the model-based bundle's own empty-window context, to the bit
    adapter = model_based.make_adapter(batch=1, adapt=False)
    np.testing.assert_array_equal(bundle.context, model_based.empty_context(adapter).astype(np.float32))


def test_it_plans_exactly_as_the_model_based_bundle_with_adaptation_off(unadapted_bundle: Path, model_based):
    bundle = load_bundle(unadapted_bundle)
    env = MetaMujocoEnv(model_based.family.name)
    obs, _ = env.reset(seed=4, options={"task": "test"})
    params = {k: np.array([v]) for k, v in env.reward_params.items()}
    frozen = bundle.make_adapter(batch=1, seed=7)
    switched_off = model_based.make_adapter(batch=1, adapt=False, seed=7)
    for _ in range(12):
        action, diag = frozen.act(obs[None], params)
        reference, ref_diag = switched_off.act(obs[None], params)
        np.testing.assert_array_equal(action, reference)
        np.testing.assert_array_equal(diag["predicted_next_obs"], ref_diag["predicted_next_obs"])
        next_obs, _, _, _, info = env.step(action[0])
        for adapter in (frozen, switched_off):
            adapter.observe(obs[None], info["sent_action"][None], next_obs[None])
        obs = next_obs
    assert diag["context_size"][0] == 0 and np.isfinite(diag["prediction_error"]).all()
    env.close()


@pytest.mark.parametrize(("change", "field", "problem"), [
    (lambda m: m["model"].update(context=[]), "model.context", "must be >= 1, got 0"),
    (lambda m: m["model"].update(context=[math.nan] * len(m["model"]["context"])), "model.context[0]",
     "must be finite, got nan"),
    (lambda m: m["model"].update(ensemble_size=0), "model.ensemble_size", "must be >= 1, got 0"),
    (lambda m: m.update(adaptation={"context_window": 8}), "adaptation", "unknown key 'adaptation'"),
])
def test_a_broken_unadapted_manifest_is_refused_naming_the_field(unadapted_bundle: Path, tmp_path: Path, change,
                                                                  field, problem):
    copy = Path(shutil.copytree(unadapted_bundle, tmp_path / "copy"))
    edit_yaml(copy / "bundle.yaml", change)
    with pytest.raises(BundleError) as err:
        load_bundle(copy)
    assert err.value.field == field and problem in str(err.value)


def test_a_kind_the_algorithm_does_not_export_is_refused_with_the_allowed_ones(mb_run: Path, pearl_run: Path,
                                                                              tmp_path: Path):
    with pytest.raises(SpecError, match=r"kind: a context_mbrl run exports to model_based, unadapted; got 'rl2'"):
        export_run(mb_run, tmp_path / "x", kind="rl2")
    with pytest.raises(SpecError, match=r"kind: a pearl run exports to context_policy; got 'unadapted'"):
        export_run(pearl_run, tmp_path / "y", kind="unadapted")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
