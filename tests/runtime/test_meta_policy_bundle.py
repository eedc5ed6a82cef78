"""meta_policy bundles (MB-MPO): exported from a tiny trained run, loaded by the robot-side loader, acting (and
adapting across episodes) like the training run's own adapter, the ONNX mean equal to torch's, and every refusal
specific to the kind."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.models.meta_policy import functional_mean
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.kinds.meta_policy import PARAMS_FILE, POLICY_FILE, MetaPolicyBundle
from metarl_robot.runtime.manifest import sha256_file
from metarl_robot.runtime.meta_policy import PENDING_KEYS
from metarl_robot.runtime.policy_gradient import feature_dim, policy_features, policy_mean
from metarl_robot.spec.family import load_family
from metarl_robot.spec.schema import SpecError, to_plain
from metarl_robot.train.runner import load_trained
from tests.boundary import forbidden_after
from tests.conftest import edit_yaml
from tests.runtime.test_bundle import refused, rewrite_npz

HIDDEN = [32, 32]
"""``mbmpo.hidden`` of the shipped config, which the tiny run keeps."""
PARAMS = 2 * len(HIDDEN) + 3
"""Arrays in meta_params.npz: a weight and a bias per layer, then the log standard deviation."""


@pytest.fixture(scope="module")
def bundle_dir(meta_policy_bundle: Path) -> Path:
    """The session's tiny meta_policy bundle (tests/conftest.py)."""
    return meta_policy_bundle


@pytest.fixture(scope="module")
def trained(mbmpo_run: Path):
    """The tiny run's trained MBMPO, with its family (its adapters compute the family's reward)."""
    cfg, _, algo = load_trained(mbmpo_run / "checkpoints" / "latest.pt")
    algo.family = load_family(cfg.family)
    return algo


@pytest.fixture
def copy(bundle_dir: Path, tmp_path: Path) -> Path:
    """A scratch copy of the bundle to break."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def rewrite_params(bundle: Path, change) -> None:
    """Edit the parameter file's arrays (:func:`tests.runtime.test_bundle.rewrite_npz`)."""
    rewrite_npz(bundle, PARAMS_FILE, change)


def edit_section(bundle: Path, change) -> None:
    edit_yaml(bundle / "bundle.yaml", lambda d: change(d["meta_policy"]))


# ---- the happy path ----------------------------------------------------------------------------------------
def test_export_writes_a_meta_policy_bundle_that_loads(bundle_dir: Path, mbmpo_run: Path, trained):
    bundle = load_bundle(bundle_dir)
    assert isinstance(bundle, MetaPolicyBundle) and bundle.kind == "meta_policy"
    assert (bundle.name, bundle.robot.name, bundle.family.name) == ("meta_policy_tiny", "cartpole", "cartpole_swingup")
    m = bundle.manifest
    assert m["meta_policy"] == {"hidden": HIDDEN, "feature_dim": feature_dim(bundle.robot), "params_file": PARAMS_FILE,
                                "inner": to_plain(trained.mbmpo.inner)}
    assert m["meta_policy"]["inner"]["episodes_per_step"] == trained.mbmpo.inner.episodes_per_step == 1
    assert "planner" not in m and set(m["graphs"]) == {"policy"}
    assert list(m["graphs"]["policy"]["inputs"]) == ["features", *(f"param_{i}" for i in range(PARAMS - 1))]
    assert m["graphs"]["policy"]["outputs"] == {"mean": ["rows", bundle.robot.action_dim]}
    assert m["files"] == {POLICY_FILE: sha256_file(bundle_dir / POLICY_FILE),
                          PARAMS_FILE: sha256_file(bundle_dir / PARAMS_FILE)}
    provenance = m["provenance"]
    assert provenance["config"]["algo"] == "mbmpo" and provenance["run_dir"] == str(mbmpo_run.resolve())
    assert provenance["exporter"]["name"] == "onnx.helper"
    parity = provenance["parity"]
    assert set(parity) == {"tolerance", "criterion", "random", "real", "adapted", "real_samples"}
    assert all(parity[s]["max_abs_diff"]["mean"] <= 1e-5 for s in ("random", "real", "adapted"))
    # the meta-parameters are the checkpoint's, float32 as trained, bit for bit
    assert len(bundle.meta_params) == PARAMS
    for got, want in zip(bundle.meta_params, trained.policy.param_list(), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.detach().numpy())
    assert (bundle.plans, bundle.samples_actions, bundle.draws_noise(), bundle.has_dynamics_model) == (
        False, True, True, False)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "sampled"])
def test_the_bundle_adapter_acts_and_adapts_as_the_training_runs_adapter(bundle_dir: Path, trained, deterministic):
    bundle = load_bundle(bundle_dir)
    ours = bundle.make_adapter(batch=1, seed=5, deterministic=deterministic)
    theirs = trained.make_policy_adapter(1, seed=5, deterministic=deterministic)
    env = MetaMujocoEnv(bundle.family.name)
    try:
        for episode in range(3):  # the meta-policy, then after one and after two inner steps
            obs, _ = env.reset(seed=episode, options={"task": "test"})
            params = {k: np.array([v]) for k, v in env.reward_params.items()}
            for _ in range(30):
                action, diag = ours.act(obs[None], params)
                action_theirs, diag_theirs = theirs.act(obs[None], params)
                # onnxruntime float32 vs numpy float64: the same policy to float32 rounding
                np.testing.assert_allclose(action, action_theirs, rtol=0, atol=1e-5)
                np.testing.assert_allclose(diag["policy_sample"], diag_theirs["policy_sample"], rtol=0, atol=1e-5)
                assert diag["inner_steps"].tolist() == diag_theirs["inner_steps"].tolist() == [episode]
                next_obs, _, _, _, info = env.step(action[0])
                ours.observe(obs[None], info["applied_action"][None], next_obs[None])
                theirs.observe(obs[None], info["applied_action"][None], next_obs[None])
                obs = next_obs
            ours.reset()  # the next episode starts: each takes its inner step on the episode just ended
            theirs.reset()
            for p, q in zip(ours.params[0], theirs.params[0], strict=True):
                np.testing.assert_allclose(p, q, rtol=0, atol=1e-5)
    finally:
        env.close()
    assert ours.inner_steps.tolist() == [3]
    moved = max(float(np.abs(p - q).max()) for p, q in zip(ours.params[0], ours.meta_params, strict=True))
    # Sampled: the steps changed the weights acting. Deterministic: u = mean, so the log-probability's gradient is
    # -1 per step for each log-std and 0 for the rest, and normalised advantages sum to zero: no step to speak of.
    assert moved < 1e-8 if deterministic else moved > 1e-4, moved


def test_the_onnx_mean_equals_torch_at_meta_and_adapted_weights(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(0)
    scale = np.asarray(bundle.robot.obs_scale)
    feats = policy_features(bundle.robot, rng.standard_normal((200, bundle.robot.obs_dim)) * scale * 2)
    meta = [p.astype(np.float64) for p in bundle.meta_params]
    adapted = [p + 0.05 * rng.standard_normal(p.shape) for p in meta]  # weights an inner step may reach
    for params in (meta, adapted):
        got = bundle.mean(params, feats)
        with torch.no_grad():
            want = functional_mean([torch.as_tensor(p.astype(np.float32)).double() for p in params],
                                   torch.as_tensor(feats.astype(np.float32)).double()).numpy()
        assert got.shape == (200, bundle.robot.action_dim)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got, policy_mean(params, feats), rtol=0, atol=1e-5)


def test_adapt_false_is_the_meta_policy_throughout_and_forget_returns_to_it(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    frozen, adapting = bundle.make_adapter(adapt=False, seed=1), bundle.make_adapter(seed=1)
    rng = np.random.default_rng(0)
    for _ in range(2):
        obs = rng.normal(0, 0.5, (1, 4))
        for _ in range(20):
            for adapter in (frozen, adapting):
                action, _ = adapter.act(obs, {"target_x": 0.0})
                adapter.observe(obs, action, obs + rng.normal(0, 0.05, obs.shape))
            obs = obs + rng.normal(0, 0.05, obs.shape)
        frozen.reset()
        adapting.reset()
    assert frozen.inner_steps.tolist() == [0] and adapting.inner_steps.tolist() == [2]
    assert all(np.array_equal(p, q) for p, q in zip(frozen.params[0], frozen.meta_params, strict=True))
    state = adapting.carried_state()
    assert sorted(state) == sorted([*(f"param_{i}" for i in range(PARAMS)), "inner_steps", "episodes_started"])
    adapting.forget()
    assert adapting.inner_steps.tolist() == [0]
    assert all(np.array_equal(p, q) for p, q in zip(adapting.params[0], adapting.meta_params, strict=True))
    adapting.restore(state)  # what the replay does with the node's logged state
    assert adapting.inner_steps.tolist() == [2]


def test_planner_overrides_take_episodes_per_step_only(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    with pytest.raises(SpecError, match=r"planner_overrides: a meta_policy bundle does not plan.*takes only "
                                        r"episodes_per_step .*\['samples'\]"):
        bundle.make_adapter(planner_overrides={"samples": 16})
    with pytest.raises(SpecError, match=r"\['samples'\]"):
        bundle.make_adapter(planner_overrides={"episodes_per_step": 2, "samples": 16})
    with pytest.raises(SpecError, match=r"planner_overrides: episodes_per_step: must be an integer >= 1, got 0"):
        bundle.make_adapter(planner_overrides={"episodes_per_step": 0})
    assert bundle.make_adapter(planner_overrides={}).inner == bundle.inner  # nothing to override: fine
    # A bundle trained stepping on every episode may pool at run time (a deployment's choice).
    pooling = bundle.make_adapter(planner_overrides={"episodes_per_step": 4})
    assert pooling.inner.episodes_per_step == 4 and bundle.inner.episodes_per_step == 1
    assert {k: v for k, v in vars(pooling.inner).items() if k != "episodes_per_step"} == {
        k: v for k, v in vars(bundle.inner).items() if k != "episodes_per_step"}


def test_a_bundle_without_episodes_per_step_steps_on_every_episode(copy: Path):
    # A bundle exported before pooling existed has no episodes_per_step in its manifest: it steps every episode.
    edit_section(copy, lambda s: s["inner"].pop("episodes_per_step"))
    assert load_bundle(copy).inner.episodes_per_step == 1
    edit_section(copy, lambda s: s["inner"].__setitem__("episodes_per_step", 3))
    bundle = load_bundle(copy)
    assert bundle.inner.episodes_per_step == bundle.make_adapter().inner.episodes_per_step == 3


def test_loading_acting_and_adapting_pull_in_no_torch_mujoco_or_gymnasium(bundle_dir: Path):
    code = ("import numpy as np; from metarl_robot.runtime.bundle import load_bundle; "
            f"b = load_bundle({str(bundle_dir)!r}); a = b.make_adapter(); o = np.zeros((1, 4))\n"
            "for _ in range(12):\n"
            "    u, _ = a.act(o, {'target_x': 0.0}); a.observe(o, u, o + 0.01)\n"
            "a.reset(); assert a.inner_steps[0] == 1; a.act(o, {'target_x': 0.0})")
    assert forbidden_after(code) == []


# ---- refusals ----------------------------------------------------------------------------------------------
def test_refuses_an_altered_policy_graph(copy: Path):
    data = bytearray((copy / POLICY_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / POLICY_FILE).write_bytes(bytes(data))
    refused(copy, f"files.{POLICY_FILE}", "sha256 mismatch")


def test_refuses_a_missing_params_array(copy: Path):
    rewrite_params(copy, lambda a: a.pop(f"param_{PARAMS - 1}"))
    refused(copy, f"files.{PARAMS_FILE}", f"lacks param_{PARAMS - 1}", f"param_0 ... param_{PARAMS - 1}")


def test_refuses_an_extra_params_array(copy: Path):
    rewrite_params(copy, lambda a: a.__setitem__("param_99", np.zeros(1, np.float32)))
    refused(copy, f"files.{PARAMS_FILE}", "no parameter of this policy", "param_99")


def test_refuses_a_params_array_of_the_wrong_shape(copy: Path):
    rewrite_params(copy, lambda a: a.__setitem__("param_0", np.ascontiguousarray(a["param_0"].T)))
    refused(copy, f"files.{PARAMS_FILE}", "param_0 (hidden layer 0's weight)", "(32, 5)",
            "expected float32 (5, 32)")


def test_refuses_a_params_array_of_another_dtype(copy: Path):
    rewrite_params(copy, lambda a: a.__setitem__("param_1", a["param_1"].astype(np.float64)))
    refused(copy, f"files.{PARAMS_FILE}", "param_1 (hidden layer 0's bias) is a float64 array")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_refuses_non_finite_params(copy: Path, value):
    def change(arrays: dict) -> None:
        arrays["param_2"] = arrays["param_2"].copy()
        arrays["param_2"][3, 4] = value

    rewrite_params(copy, change)
    refused(copy, f"files.{PARAMS_FILE}", "param_2 (hidden layer 1's weight) holds non-finite values")


def test_refuses_a_log_std_whose_exponential_overflows(copy: Path):
    rewrite_params(copy, lambda a: a.__setitem__(f"param_{PARAMS - 1}", np.full_like(a[f"param_{PARAMS - 1}"], 1e3)))
    refused(copy, f"files.{PARAMS_FILE}", "log standard deviation", "overflows")


def test_refuses_an_object_array_that_needs_pickle(copy: Path):
    def change(arrays: dict) -> None:
        arrays["param_0"] = np.array([{"x": 1}], dtype=object)

    with np.load(copy / PARAMS_FILE) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    np.savez(copy / PARAMS_FILE, **arrays)  # savez pickles the object array
    edit_yaml(copy / "bundle.yaml", lambda d: d["files"].__setitem__(PARAMS_FILE, sha256_file(copy / PARAMS_FILE)))
    refused(copy, f"files.{PARAMS_FILE}", "not a numpy .npz archive of plain arrays")


@pytest.mark.parametrize(("key", "value", "words"), [
    ("step_size", 0.0, ("must be > 0", "got 0.0")),
    ("step_size", -0.01, ("must be > 0",)),
    ("discount", 1.5, ("(0, 1]",)),
    ("baseline_reg", 0.0, ("must be > 0",)),
    ("min_transitions", 1, ("must be >= 2",)),
    ("episodes_per_step", 0, ("must be an integer >= 1", "got 0")),
    ("episodes_per_step", 2.5, ("expected an integer", "2.5")),
    ("episodes_per_step", True, ("expected an integer",)),
])
def test_refuses_a_bad_inner_step(copy: Path, key, value, words):
    edit_section(copy, lambda s: s["inner"].__setitem__(key, value))
    refused(copy, f"meta_policy.inner.{key}", *words)


def test_refuses_an_inner_step_value_left_out(copy: Path):
    edit_section(copy, lambda s: s["inner"].pop("step_size"))
    refused(copy, "meta_policy.inner.step_size", "missing required key")


def test_refuses_hidden_sizes_the_params_do_not_have(copy: Path):
    edit_section(copy, lambda s: s.__setitem__("hidden", [32, 16]))
    refused(copy, f"files.{PARAMS_FILE}", "param_2", "expected float32 (32, 16)")
    edit_section(copy, lambda s: s.__setitem__("hidden", []))
    refused(copy, "meta_policy.hidden", "non-empty list")


# ---- export refusals -----------------------------------------------------------------------------------------
def test_export_refuses_a_torch_exporter_and_leaves_nothing(mbmpo_run: Path, tmp_path: Path):
    from metarl_robot.export.bundle_writer import export_run

    with pytest.raises(ValueError, match=r"written node by node with onnx\.helper"):
        export_run(mbmpo_run, tmp_path / "b", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_export_needs_the_runs_buffer(mbmpo_run: Path, tmp_path: Path):
    from metarl_robot.export.bundle_writer import export_run

    run = Path(shutil.copytree(mbmpo_run, tmp_path / "run"))
    (run / "buffer.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"buffer\.npz not found"):
        export_run(run, tmp_path / "out" / "b")
    assert list((tmp_path / "out").iterdir()) == []


# ---- the replay ------------------------------------------------------------------------------------------------
def test_a_logged_episode_after_adaptation_replays_from_the_carried_weights(bundle_dir: Path, tmp_path: Path):
    from metarl_robot.logs.reader import read_episode
    from metarl_robot.real2sim.sim_record import record_sim_episode
    from metarl_robot.replay.shadow import replay_episode

    bundle = load_bundle(bundle_dir)
    task = bundle.family.sample(np.random.default_rng(0), "test", 1)[0]
    # an adapter that took two steps: what the node carries into its third episode and logs at its start
    adapter = bundle.make_adapter(seed=4)
    rng = np.random.default_rng(1)
    for _ in range(2):
        obs = rng.normal(0, 0.5, (1, 4))
        for _ in range(15):
            action, _ = adapter.act(obs, {"target_x": 0.0})
            adapter.observe(obs, action, obs + rng.normal(0, 0.05, obs.shape))
        adapter.reset()
    carried = adapter.carried_state()
    log = record_sim_episode(bundle, task, tmp_path / "episode.mcap", steps=12, seed=2, carried=carried)
    episode = read_episode(log)
    assert episode.adapter_state["inner_steps"].tolist() == [2]
    replay = replay_episode(episode, bundle, candidate=bundle)
    assert replay.counterfactual.reproduced, replay.counterfactual
    # the candidate starts from the meta-parameters (nothing carried): it samples other actions
    assert not np.allclose(replay.candidate.actions, replay.logged.actions)
    assert not any("noise" in n for n in replay.notes)
    # a later episode of a node process: the noise was reseeded at its start from the count the carried state logs,
    # so it replays exactly too and the replay makes no excuse
    episode.extra["episode"] = 3
    later = replay_episode(episode, bundle)
    assert later.counterfactual.reproduced and not any("continued" in n for n in later.notes)


def test_a_half_full_pool_survives_the_log_and_the_restored_adapter_takes_the_same_step(copy: Path, tmp_path: Path):
    from metarl_robot.logs.reader import read_episode
    from metarl_robot.real2sim.sim_record import record_sim_episode
    from metarl_robot.replay.shadow import replay_episode

    edit_section(copy, lambda s: s["inner"].__setitem__("episodes_per_step", 2))
    bundle = load_bundle(copy)

    def episode(adapter, seed: int, steps: int = 15) -> None:
        noise = np.random.default_rng(seed)
        obs = noise.normal(0, 0.5, (1, 4))
        for _ in range(steps):
            action, _ = adapter.act(obs, {"target_x": 0.0})
            adapter.observe(obs, action, obs + noise.normal(0, 0.05, obs.shape))
            obs = obs + noise.normal(0, 0.05, obs.shape)

    node = bundle.make_adapter(seed=4)  # what the node carries into its second episode: one episode pooled of two
    episode(node, 3)
    node.reset()
    carried = node.carried_state()
    assert carried["pending_lengths"].tolist() == [[15]] and node.inner_steps.tolist() == [0]
    task = bundle.family.sample(np.random.default_rng(0), "test", 1)[0]
    log = read_episode(record_sim_episode(bundle, task, tmp_path / "episode.mcap", steps=12, seed=2, carried=carried))
    assert set(PENDING_KEYS) <= set(log.adapter_state)
    replay = replay_episode(log, bundle)
    assert replay.counterfactual.reproduced, replay.counterfactual
    # The pool came back from the log: the same second episode fills it and takes the node's step, bit for bit.
    restored = bundle.make_adapter(seed=4)
    restored.restore(log.adapter_state)
    for adapter in (node, restored):
        episode(adapter, 7)
        adapter.reset()
    assert restored.inner_steps.tolist() == node.inner_steps.tolist() == [1]
    for p, q, m in zip(restored.params[0], node.params[0], node.meta_params, strict=True):
        np.testing.assert_array_equal(p, q)
        assert p.shape == m.shape
    assert any(not np.array_equal(p, m) for p, m in zip(node.params[0], node.meta_params, strict=True))
