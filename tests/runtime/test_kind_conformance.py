"""Every registered bundle kind behaves as the stack expects of a kind: a new kind is tested by registering it
(runtime/kinds) and naming a fixture that makes a bundle of it (tests/conftest.py ``KIND_BUNDLES``).

Per kind: the registry returns its class and the loader an instance of it; the adapter acts inside the robot's
limits on the family's MuJoCo env, reports the belief diagnostics the kind declares (and a prediction error iff it
has a dynamics model), resets to the context it declares empty, is deterministic given its seed, and takes planner
overrides iff the kind plans; the export's recorded torch-vs-onnxruntime parity passes; a simulated episode log
of it replays exactly, with prediction errors iff it has a dynamics model. The node's parameters
(tests/ros/test_params.py) and the node itself against the digital twin (tests/ros/test_node.py) are tested over
every kind too.
"""

from __future__ import annotations

import numpy as np
import pytest

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.kinds import BUNDLE_KINDS, UnknownKindError, bundle_kind, kind_names
from metarl_robot.runtime.manifest import LoadedBundle
from metarl_robot.spec.schema import SpecError
from tests.conftest import KIND_BUNDLES, bundle_path_of_kind, kind_params

KINDS = kind_params()


@pytest.fixture
def bundle(request: pytest.FixtureRequest) -> LoadedBundle:
    return load_bundle(bundle_path_of_kind(request, request.param))


def test_every_registered_kind_has_a_test_bundle():
    assert kind_names() == tuple(BUNDLE_KINDS)
    missing = sorted(set(kind_names()) - set(KIND_BUNDLES))
    assert not missing, f"registered kinds without a KIND_BUNDLES fixture in tests/conftest.py: {missing}"
    assert not sorted(set(KIND_BUNDLES) - set(kind_names())), "KIND_BUNDLES names a kind the registry lacks"


def test_the_registry_refuses_an_unknown_kind_naming_the_registered_ones():
    with pytest.raises(UnknownKindError, match=r"unknown bundle kind 'rl2'; this runtime runs: model_based, "):
        bundle_kind("rl2")


@pytest.mark.parametrize("kind", kind_names())
def test_each_registry_entry_loads_the_class_of_its_kind(kind):
    cls = bundle_kind(kind)
    assert issubclass(cls, LoadedBundle) and cls.kind == kind
    assert cls.acts_by, f"{kind}: acts_by is what the demo prints; it must say how the bundle acts"
    assert cls.meta_test_episodes or cls.has_dynamics_model, f"{kind}: metarl eval has no protocol for it"


@pytest.mark.parametrize("bundle", KINDS, indirect=True)
def test_the_loader_returns_the_kind_the_manifest_names(bundle):
    assert type(bundle) is bundle_kind(bundle.manifest["kind"]) and bundle.kind == bundle.manifest["kind"]


def drive(bundle: LoadedBundle, steps: int = 10, seed: int = 0, overrides: dict | None = None
           ) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]], object]:
    env = MetaMujocoEnv(bundle.family.name)
    obs, _ = env.reset(seed=seed, options={"task": "test"})
    adapter = bundle.make_adapter(batch=1, planner_overrides=overrides, seed=seed)
    params = {k: np.array([v]) for k, v in env.reward_params.items()}
    actions, diagnostics = [], []
    for _ in range(steps):
        action, diag = adapter.act(obs[None], params)
        actions.append(action)
        diagnostics.append(diag)
        assert np.all(action >= bundle.robot.action_low) and np.all(action <= bundle.robot.action_high)
        next_obs, _, _, _, info = env.step(action[0])
        assert not info["action_clipped"]  # the planner / the policy's box already obeyed the limits
        if bundle.plans:  # the planner also obeys the rate limit; a policy leaves that to the safety layer
            assert not info["action_rate_limited"]
        adapter.observe(obs[None], info["sent_action"][None], next_obs[None])
        obs = next_obs
    env.close()
    return actions, diagnostics, adapter


def small_plan(bundle: LoadedBundle) -> dict | None:
    return {"samples": 16, "horizon": 5} if bundle.plans else None


@pytest.mark.parametrize("bundle", KINDS, indirect=True)
def test_the_adapter_acts_within_limits_and_reports_what_the_kind_declares(bundle):
    _, diagnostics, adapter = drive(bundle, overrides=small_plan(bundle))
    last = diagnostics[-1]
    for key in bundle.belief_diagnostics:
        assert key in last and last[key].shape[0] == 1 and np.isfinite(last[key]).all(), key
    assert ("prediction_error" in last) == bundle.has_dynamics_model
    if bundle.has_dynamics_model:
        assert np.isfinite(last["prediction_error"]).all()
        one_step = bundle.step(*(np.zeros((bundle.ensemble_size, 2, n), np.float32) for n in (
            bundle.robot.obs_dim, bundle.robot.action_dim)), np.zeros((bundle.ensemble_size, 2,
                                                                       bundle.empty_context(adapter).size), np.float32))
        assert one_step.shape == (bundle.ensemble_size, 2, bundle.robot.obs_dim)
    else:
        with pytest.raises(TypeError, match="has no dynamics model"):
            bundle.step(np.zeros((1, 1, 1)), np.zeros((1, 1, 1)), np.zeros((1, 1, 1)))
    # reset: the context the adapter acts with is the one the kind declares empty
    adapter.reset()
    empty = bundle.empty_context(adapter)
    obs = np.zeros((1, bundle.robot.obs_dim))
    _, diag = adapter.act(obs, {k: np.array([v]) for k, v in bundle.family.nominal().items()
                                if k in bundle.family.reward_names})
    if bundle.belief_diagnostics:
        np.testing.assert_allclose(diag[bundle.belief_diagnostics[0]][0], empty, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bundle", KINDS, indirect=True)
def test_the_adapter_is_deterministic_given_its_seed(bundle):
    first, _, _ = drive(bundle, steps=4, seed=3, overrides=small_plan(bundle))
    again, _, _ = drive(bundle, steps=4, seed=3, overrides=small_plan(bundle))
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))


@pytest.mark.parametrize("bundle", KINDS, indirect=True)
def test_planner_overrides_apply_iff_the_kind_plans(bundle):
    if bundle.plans:
        assert bundle.make_adapter(planner_overrides={"samples": 8}).planner.cfg.samples == 8
        with pytest.raises(SpecError, match="planner_overrides"):
            bundle.make_adapter(planner_overrides={"no_such_setting": 1})
    else:
        with pytest.raises(SpecError, match=rf"planner_overrides: an? {bundle.kind} bundle does not plan"):
            bundle.make_adapter(planner_overrides={"samples": 8})


@pytest.mark.parametrize("bundle", KINDS, indirect=True)
def test_the_recorded_export_parity_passes(bundle):
    from metarl_robot.export.onnx_graphs import check_parity

    parity = bundle.manifest["provenance"]["parity"]
    reports = {name: value for name, value in parity.items() if isinstance(value, dict)}
    assert reports, "the export recorded no parity measurement"
    if all("onnxruntime_float32_error" in r for r in reports.values()):
        check_parity(reports, parity["tolerance"])
    else:  # exported before the float64 references were recorded: the criterion of its day, one float32 ULP
        excess = {f"{k}/{n}": v for k, r in reports.items() for n, v in r["max_excess_over_ulp"].items()}
        assert max(excess.values()) <= parity["tolerance"], excess


@pytest.mark.parametrize("bundle", KINDS, indirect=True)
def test_a_simulated_episode_of_the_kind_replays_exactly(bundle, tmp_path):
    from metarl_robot.real2sim.sim_record import record_sim_episode
    from metarl_robot.replay.shadow import replay_episode

    task = bundle.family.sample(np.random.default_rng(0), "test", 1)[0]
    log = record_sim_episode(bundle, task, tmp_path / "episode.mcap", steps=12, seed=2)
    replay = replay_episode(log, bundle)
    assert replay.counterfactual.reproduced, replay.counterfactual
    assert replay.logged.kind == bundle.kind and replay.metrics()["bundle_kind"] == bundle.kind
    assert (replay.errors is not None) == bundle.has_dynamics_model
    if bundle.has_dynamics_model:
        assert replay.metrics()["prediction_error"]["one_step"]["count"] > 0


@pytest.mark.parametrize("bundle", KINDS, indirect=True)
def test_adaptation_on_and_off_as_the_node_asks_build_the_kinds_adapter(bundle):
    # The node's `adapt` parameter goes through adapter_switches: every kind's make_adapter takes both.
    for adapt in (True, False):
        switches = bundle.adapter_switches(adapt)
        if bundle.adaptation_modes:
            assert switches == bundle.adaptation_modes["adapted" if adapt else "unadapted"]
        adapter = bundle.make_adapter(batch=1, planner_overrides=small_plan(bundle), **switches)
        action, _ = adapter.act(np.zeros((1, bundle.robot.obs_dim)), {
            k: np.array([v]) for k, v in bundle.family.nominal().items() if k in bundle.family.reward_names})
        assert action.shape == (1, bundle.robot.action_dim)
