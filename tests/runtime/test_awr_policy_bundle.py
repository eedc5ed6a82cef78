"""awr_policy bundles (MACAW): exported from a tiny trained run, loaded by the robot-side loader, acting and adapting
across episodes like the training run's own adapter, carrying its window of episodes through an episode log, and
every refusal specific to the kind (the bundle's and the export's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.runtime.awr_policy import AWRBatch, AWRPolicyAdapter, AWRStepConfig, awr_adapt
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.kinds.awr_policy import PARAMS_FILE, AWRPolicyBundle, awr_param_shapes
from metarl_robot.runtime.kinds.meta_policy import POLICY_FILE
from metarl_robot.runtime.manifest import sha256_file
from metarl_robot.runtime.policy_gradient import feature_dim
from metarl_robot.spec.family import load_family
from metarl_robot.spec.schema import SpecError, to_plain
from metarl_robot.train.runner import load_trained
from tests.boundary import forbidden_after
from tests.conftest import MACAW_CONFIG, MACAW_TINY, edit_yaml, synthetic_dataset, train_single_threaded
from tests.runtime.test_bundle import refused, rewrite_npz

HIDDEN = list(MACAW_TINY["macaw_net.hidden"])
"""``macaw_net.hidden`` of the tiny run."""
HEAD_HIDDEN = 32
"""``macaw_net.advantage_head_hidden`` of the shipped config, which the tiny run keeps."""
K = 2
"""``macaw.adapt_episodes`` of the shipped config: the episodes one adaptation reads."""
POLICY_ARRAYS = 2 * (len(HIDDEN) + 1) + 1
"""param_* arrays: a weight and a bias per layer, then the log standard deviation."""
STEPS = 30
"""Control steps of an episode in MuJoCo (29 transitions observed: enough to adapt on, min_transitions 10)."""


@pytest.fixture(scope="module")
def bundle_dir(awr_policy_bundle: Path) -> Path:
    """The session's tiny awr_policy bundle (tests/conftest.py)."""
    return awr_policy_bundle


@pytest.fixture(scope="module")
def loaded(macaw_run: Path):
    """The tiny run's config and trained MACAW, with its family (its adapters compute the family's reward)."""
    cfg, _, algo = load_trained(macaw_run / "checkpoints" / "latest.pt")
    algo.family = load_family(cfg.family)
    return cfg, algo


@pytest.fixture(scope="module")
def trained(loaded):
    """The tiny run's trained MACAW (its family set)."""
    return loaded[1]


@pytest.fixture
def copy(bundle_dir: Path, tmp_path: Path) -> Path:
    """A scratch copy of the bundle to break."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def rewrite_params(bundle: Path, change) -> None:
    """Edit the parameter file's arrays (:func:`tests.runtime.test_bundle.rewrite_npz`)."""
    rewrite_npz(bundle, PARAMS_FILE, change)


def edit_section(bundle: Path, change) -> None:
    edit_yaml(bundle / "bundle.yaml", lambda d: change(d["awr_policy"]))


def synthetic_episodes(adapter: AWRPolicyAdapter, seed: int, episodes: int = 2, steps: int = 20) -> list[np.ndarray]:
    """Drive ``adapter`` through ``episodes`` episodes of drifting observations (no physics), resetting after each;
    the actions it chose."""
    rng = np.random.default_rng(seed)
    actions = []
    for _ in range(episodes):
        obs = rng.normal(0, 0.5, (1, 4))
        for _ in range(steps):
            action, _ = adapter.act(obs, {"target_x": 0.0})
            actions.append(action)
            next_obs = obs + rng.normal(0, 0.05, obs.shape)
            adapter.observe(obs, action, next_obs)
            obs = next_obs
        adapter.reset()
    return actions


# ---- the happy path ----------------------------------------------------------------------------------------
def test_export_writes_an_awr_policy_bundle_that_loads(bundle_dir: Path, macaw_run: Path, loaded):
    bundle = load_bundle(bundle_dir)
    assert isinstance(bundle, AWRPolicyBundle) and bundle.kind == "awr_policy"
    assert (bundle.name, bundle.robot.name, bundle.family.name) == ("awr_policy_tiny", "cartpole", "cartpole_swingup")
    m = bundle.manifest
    run_cfg, trained = loaded
    cfg = trained.cfg  # the run's macaw section
    assert list(run_cfg.macaw_net.hidden) == HIDDEN and run_cfg.macaw_net.advantage_head_hidden == HEAD_HIDDEN
    step = m["awr_policy"]["step"]
    assert m["awr_policy"] == {"hidden": HIDDEN, "feature_dim": feature_dim(bundle.robot),
                               "advantage_head_hidden": HEAD_HIDDEN, "params_file": PARAMS_FILE, "step": step}
    # the step is the run's meta-test step, its return scale the training data's, exactly (YAML keeps the float)
    assert step == to_plain(trained.robot_step())
    assert step["return_scale"] == trained.return_scale and trained.return_scale != 1.0
    assert (step["steps"], step["discount"], step["bootstrap"], step["adapt_episodes"]) == (
        cfg.test_inner_steps, cfg.discount, cfg.bootstrap, K)
    assert (step["temperature"], step["weight_clip"], step["normalize_advantages"]) == (
        cfg.temperature, cfg.weight_clip, cfg.normalize_advantages)
    assert bundle.awr_step == trained.robot_step() == AWRStepConfig(**step)
    assert "planner" not in m and set(m["graphs"]) == {"policy"}
    assert list(m["graphs"]["policy"]["inputs"]) == ["features", *(f"param_{i}" for i in range(POLICY_ARRAYS - 1))]
    assert m["graphs"]["policy"]["outputs"] == {"mean": ["rows", bundle.robot.action_dim]}
    assert m["files"] == {POLICY_FILE: sha256_file(bundle_dir / POLICY_FILE),
                          PARAMS_FILE: sha256_file(bundle_dir / PARAMS_FILE)}
    provenance = m["provenance"]
    assert provenance["config"]["algo"] == "macaw" and provenance["run_dir"] == str(macaw_run.resolve())
    assert provenance["exporter"]["name"] == "onnx.helper"
    parity = provenance["parity"]
    assert set(parity) == {"tolerance", "criterion", "random", "real", "adapted", "real_samples"}
    assert all(parity[s]["max_abs_diff"]["mean"] <= 1e-5 for s in ("random", "real", "adapted"))
    # the arrays are exactly the file's arrays: the checkpoint's, float32 as trained
    with np.load(bundle_dir / PARAMS_FILE) as data:
        assert {k: data[k].shape for k in data.files} == awr_param_shapes(
            feature_dim(bundle.robot), bundle.robot.action_dim, HIDDEN, HEAD_HIDDEN)
        assert all(data[k].dtype == np.float32 for k in data.files)
    theirs = trained.nets.numpy_networks()
    f32 = lambda x: np.asarray(x, dtype=np.float32).astype(np.float64)  # noqa: E731
    for name in ("policy", "value", "head"):
        got, want = getattr(bundle.nets, name), getattr(theirs, name)
        assert len(got) == len(want) > 0, name
        for g, w in zip(got, want, strict=True):
            assert g.dtype == np.float64
            np.testing.assert_array_equal(g, f32(w))
    np.testing.assert_array_equal(bundle.nets.value_rates, f32(theirs.value_rates))
    np.testing.assert_array_equal(bundle.nets.policy_rates, f32(theirs.policy_rates))
    assert bundle.nets.advantage_weight == np.float32(theirs.advantage_weight) > 0
    assert (bundle.plans, bundle.samples_actions, bundle.draws_noise(), bundle.has_dynamics_model) == (
        False, False, False, False)


def test_the_bundle_adapter_acts_and_adapts_as_the_training_runs_adapter(bundle_dir: Path, trained):
    bundle = load_bundle(bundle_dir)
    ours = bundle.make_adapter(batch=1, seed=5)
    theirs = trained.make_policy_adapter(1, seed=5)
    assert ours.step == theirs.step and ours.step.adapt_episodes == K
    env = MetaMujocoEnv(bundle.family.name)
    observed: list[np.ndarray] = []  # each episode's observations the adapters recorded
    try:
        for episode in range(4):  # the meta-policy, then adapted to 1, 2 and (the window sliding) 2 episodes
            obs, _ = env.reset(seed=episode, options={"task": "test"})
            params = {k: np.array([v]) for k, v in env.reward_params.items()}
            rows = []
            for _ in range(STEPS):
                action, diag = ours.act(obs[None], params)
                action_theirs, diag_theirs = theirs.act(obs[None], params)
                # onnxruntime float32 vs numpy float64 (and the run's float64 rates vs the bundle's float32)
                np.testing.assert_allclose(action, action_theirs, rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(diag["policy_sample"], diag_theirs["policy_sample"], rtol=1e-4, atol=1e-6)
                assert diag["inner_steps"].tolist() == diag_theirs["inner_steps"].tolist() == [episode]
                next_obs, _, _, _, info = env.step(action[0])
                ours.observe(obs[None], info["applied_action"][None], next_obs[None])
                theirs.observe(obs[None], info["applied_action"][None], next_obs[None])
                rows.append(obs)
                obs = next_obs
            observed.append(np.array(rows))
            ours.reset()  # the next episode starts: each adapts to its window from the meta-parameters
            theirs.reset()
            assert len(ours.window[0]) == len(theirs.window[0]) == min(episode + 1, K)
            for p, q in zip(ours.params[0], theirs.params[0], strict=True):
                np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-6)
            # The tiny run's rates (~0.001) move the weights by ~1e-5: compare the moves themselves. Acting with the
            # mean, the samples differ by float32 rounding (onnxruntime vs numpy), so do the moves, by ~1e-4 of them.
            ours_moves = [p - m for p, m in zip(ours.params[0], ours.meta_params, strict=True)]
            their_moves = [p - m for p, m in zip(theirs.params[0], theirs.meta_params, strict=True)]
            moved = max(float(np.abs(d).max()) for d in ours_moves)
            assert moved > 1e-6, moved
            for d, e in zip(ours_moves, their_moves, strict=True):
                np.testing.assert_allclose(d, e, rtol=0, atol=1e-3 * moved)
            # On the same window the run's step (its float64 torch-derived networks) reaches the bundle's weights to
            # round-off: the bundle carries the run's networks, rates, lambda and step.
            want = awr_adapt(theirs.nets, AWRBatch.of(bundle.robot, ours.window[0], theirs.step), theirs.step)
            for p, w, m in zip(ours.params[0][:-1], want[:-1], ours.meta_params[:-1], strict=True):
                np.testing.assert_allclose(p - m, w - m, rtol=1e-6, atol=1e-12)
            np.testing.assert_array_equal(ours.params[0][-1], np.float32(want[-1]))  # the log std is not adapted
    finally:
        env.close()
    assert ours.inner_steps.tolist() == theirs.inner_steps.tolist() == [4]
    # the window slid: it holds the last K episodes, oldest first
    for kept, want in zip(ours.window[0], observed[-K:], strict=True):
        np.testing.assert_array_equal(kept.obs, want)


def test_adapt_false_is_the_meta_policy_throughout_and_forget_returns_to_it(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    frozen, adapting = bundle.make_adapter(adapt=False, seed=1), bundle.make_adapter(seed=1)
    synthetic_episodes(frozen, seed=0, episodes=3)
    synthetic_episodes(adapting, seed=0, episodes=3)
    assert frozen.inner_steps.tolist() == [0] and frozen.window == [[]]
    assert all(np.array_equal(p, q) for p, q in zip(frozen.params[0], frozen.meta_params, strict=True))
    assert adapting.inner_steps.tolist() == [3] and len(adapting.window[0]) == K
    assert not all(np.array_equal(p, q) for p, q in zip(adapting.params[0], adapting.meta_params, strict=True))
    # the meta-parameters are the bundle's, untouched by the adaptations
    for p, q in zip(adapting.meta_params, bundle.nets.policy, strict=True):
        np.testing.assert_array_equal(p, q)
    state = adapting.carried_state()
    assert sorted(state) == sorted([*(f"param_{i}" for i in range(POLICY_ARRAYS)), "inner_steps", "episodes_started",
                                    "window_obs", "window_sample", "window_reward", "window_next_obs",
                                    "window_lengths"])
    assert state["window_lengths"].tolist() == [[20, 20]]
    adapting.forget()
    assert adapting.inner_steps.tolist() == [0] and adapting.window == [[]]
    assert all(np.array_equal(p, q) for p, q in zip(adapting.params[0], adapting.meta_params, strict=True))
    # forgotten, it acts as the frozen meta-policy again
    obs = np.array([[0.1, 0.2, -0.3, 0.05]])
    np.testing.assert_array_equal(adapting.act(obs, {"target_x": 0.0})[0], frozen.act(obs, {"target_x": 0.0})[0])
    adapting.restore(state)  # what the replay does with the node's logged state
    assert adapting.inner_steps.tolist() == [3] and len(adapting.window[0]) == K


def test_planner_overrides_take_adapt_episodes_only(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    assert bundle.awr_step.adapt_episodes == K
    wider = bundle.make_adapter(planner_overrides={"adapt_episodes": 3})
    assert wider.step.adapt_episodes == 3 and bundle.awr_step.adapt_episodes == K
    assert {k: v for k, v in vars(wider.step).items() if k != "adapt_episodes"} == {
        k: v for k, v in vars(bundle.awr_step).items() if k != "adapt_episodes"}
    synthetic_episodes(wider, seed=0, episodes=4)
    assert len(wider.window[0]) == 3  # it reads its own K
    assert bundle.make_adapter(planner_overrides={}).step == bundle.awr_step  # nothing to override: fine
    with pytest.raises(SpecError, match=r"planner_overrides: adapt_episodes: must be an integer in \[1, 5\].*got 6"):
        bundle.make_adapter(planner_overrides={"adapt_episodes": 6})
    with pytest.raises(SpecError, match=r"planner_overrides: an awr_policy bundle does not plan.*takes only "
                                        r"adapt_episodes .*\['samples'\]"):
        bundle.make_adapter(planner_overrides={"samples": 16})
    with pytest.raises(SpecError, match=r"awr_policy.*\['episodes_per_step'\]"):
        bundle.make_adapter(planner_overrides={"adapt_episodes": 3, "episodes_per_step": 2})


def test_loading_acting_and_adapting_pull_in_no_torch_mujoco_or_gymnasium(bundle_dir: Path):
    code = ("import numpy as np; from metarl_robot.runtime.bundle import load_bundle; "
            f"b = load_bundle({str(bundle_dir)!r}); a = b.make_adapter(); o = np.zeros((1, 4))\n"
            "for _ in range(12):\n"
            "    u, _ = a.act(o, {'target_x': 0.0}); a.observe(o, u, o + 0.01)\n"
            "a.reset(); assert a.inner_steps[0] == 1 and len(a.window[0]) == 1\n"
            "assert any(not np.array_equal(p, q) for p, q in zip(a.params[0], a.meta_params))\n"
            "a.act(o, {'target_x': 0.0}); a.restore(a.carried_state())")
    assert forbidden_after(code) == []


# ---- refusals ----------------------------------------------------------------------------------------------
def test_refuses_a_missing_params_array(copy: Path):
    rewrite_params(copy, lambda a: a.pop("value_0"))
    refused(copy, f"files.{PARAMS_FILE}", "lacks value_0", "expected exactly param_0")


def test_refuses_an_extra_params_array(copy: Path):
    rewrite_params(copy, lambda a: a.__setitem__("value_9", np.zeros(1, np.float32)))
    refused(copy, f"files.{PARAMS_FILE}", "no parameter of this policy", "value_9")


def test_refuses_a_params_array_of_the_wrong_shape(copy: Path):
    rewrite_params(copy, lambda a: a.__setitem__("value_0", np.ascontiguousarray(a["value_0"].T)))
    refused(copy, f"files.{PARAMS_FILE}", "value_0 (the value function's tensor 0)", f"({HIDDEN[0]}, 5)",
            f"expected float32 (5, {HIDDEN[0]})")


def test_refuses_a_params_array_of_another_dtype(copy: Path):
    rewrite_params(copy, lambda a: a.__setitem__("head_1", a["head_1"].astype(np.float64)))
    refused(copy, f"files.{PARAMS_FILE}", "head_1 (the advantage head's tensor 1) is a float64 array")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_refuses_non_finite_params(copy: Path, value):
    def change(arrays: dict) -> None:
        arrays["value_2"] = arrays["value_2"].copy()
        arrays["value_2"][3, 0] = value

    rewrite_params(copy, change)
    refused(copy, f"files.{PARAMS_FILE}", "value_2 (the value function's tensor 2) holds non-finite values")


@pytest.mark.parametrize("rate", [0.0, -0.01])
def test_refuses_a_non_positive_inner_rate(copy: Path, rate):
    def change(arrays: dict) -> None:
        arrays["policy_rates"] = arrays["policy_rates"].copy()
        arrays["policy_rates"][1] = rate

    rewrite_params(copy, change)
    refused(copy, f"files.{PARAMS_FILE}", "rates: every inner learning rate must be finite and > 0")


@pytest.mark.parametrize(("key", "value", "words"), [
    ("adapt_episodes", 9, ("an integer in [1, 5]", "got 9")),
    ("adapt_episodes", 0, ("an integer in [1, 5]", "got 0")),
    ("discount", 1.5, ("in [0, 1)", "got 1.5")),
    ("return_scale", 0, ("a finite number > 0", "got 0")),
    ("return_scale", -2.0, ("a finite number > 0",)),
    ("steps", 0, (">= 1",)),
    ("temperature", 0.0, ("a finite number > 0",)),
    ("weight_clip", -1.0, ("a finite number > 0",)),
    ("min_transitions", 1, (">= 2",)),
])
def test_refuses_a_bad_step(copy: Path, key, value, words):
    edit_section(copy, lambda s: s["step"].__setitem__(key, value))
    refused(copy, f"awr_policy.step.{key}", *words)


@pytest.mark.parametrize("key", ["return_scale", "adapt_episodes", "bootstrap"])
def test_refuses_a_step_value_left_out(copy: Path, key):
    edit_section(copy, lambda s: s["step"].pop(key))
    refused(copy, f"awr_policy.step.{key}", "missing required key")


def test_refuses_hidden_sizes_the_params_do_not_have(copy: Path):
    edit_section(copy, lambda s: s.__setitem__("hidden", [HIDDEN[0], 8]))
    refused(copy, f"files.{PARAMS_FILE}", "lacks param_5")
    edit_section(copy, lambda s: s.__setitem__("hidden", [HIDDEN[0] * 2]))
    refused(copy, f"files.{PARAMS_FILE}", "param_0 (the policy's tensor 0)", f"expected float32 (5, {HIDDEN[0] * 2})")
    edit_section(copy, lambda s: s.__setitem__("hidden", []))
    refused(copy, "awr_policy.hidden", "non-empty list")


def test_refuses_an_advantage_head_size_the_params_do_not_have(copy: Path):
    edit_section(copy, lambda s: s.__setitem__("advantage_head_hidden", 8))
    refused(copy, f"files.{PARAMS_FILE}", "head_0 (the advantage head's tensor 0)",
            f"expected float32 ({HIDDEN[-1] + 1}, 8)")
    edit_section(copy, lambda s: s.__setitem__("advantage_head_hidden", 0))  # no head: its arrays are extra
    refused(copy, f"files.{PARAMS_FILE}", "no parameter of this policy", "head_0")
    edit_section(copy, lambda s: s.__setitem__("advantage_head_hidden", -1))
    refused(copy, "awr_policy.advantage_head_hidden", "must be >= 0")


# ---- export refusals -----------------------------------------------------------------------------------------
def test_export_refuses_a_torch_exporter_and_leaves_nothing(macaw_run: Path, tmp_path: Path):
    from metarl_robot.export.bundle_writer import export_run

    with pytest.raises(ValueError, match=r"written node by node with onnx\.helper.*'torchscript'"):
        export_run(macaw_run, tmp_path / "b", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_export_needs_the_runs_dataset(macaw_run: Path, tmp_path: Path):
    from metarl_robot.export.bundle_writer import export_run

    run = Path(shutil.copytree(macaw_run, tmp_path / "run"))
    missing = tmp_path / "moved_away"
    # Point every record of the dataset at a folder that is not there: dataset_ref.json, the config and the
    # checkpoints' own copies of both (what the export reads).
    ref = json.loads((run / "dataset_ref.json").read_text())
    old = ref["path"]
    assert Path(old).is_dir()
    (run / "dataset_ref.json").write_text(json.dumps({**ref, "path": str(missing)}))
    edit_yaml(run / "config.yaml", lambda d: d.__setitem__("dataset", str(missing)))
    for ckpt in (run / "checkpoints").glob("*.pt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        assert state["algo"]["dataset"]["path"] == old
        state["algo"]["dataset"]["path"] = str(missing)
        config = yaml.safe_load(state["config"])
        config["dataset"] = str(missing)
        state["config"] = yaml.safe_dump(config, sort_keys=False)
        torch.save(state, ckpt)
    with pytest.raises(FileNotFoundError, match=r"the run's dataset \(.*moved_away, from its dataset_ref\) is needed"):
        export_run(run, tmp_path / "out" / "b")
    assert list((tmp_path / "out").iterdir()) == []


def test_export_refuses_a_run_with_weight_transform_layers(tmp_path: Path):
    from metarl_robot.export.bundle_writer import export_run

    dataset = synthetic_dataset(tmp_path / "dataset", steps=24)
    run = train_single_threaded(MACAW_CONFIG, tmp_path / "runs", {
        **MACAW_TINY, "dataset": str(dataset), "macaw_net.weight_transform_dim": 4, "name": "wt"})
    with pytest.raises(SpecError) as info:
        export_run(run, tmp_path / "out" / "b")
    assert info.value.field == "macaw_net.weight_transform_dim", str(info.value)
    assert "weight_transform_dim" in str(info.value) and "no robot-side adaptation" in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []


# ---- the carried state through an episode log ------------------------------------------------------------------
def test_the_carried_window_survives_the_log_and_the_restored_adapter_acts_the_same(bundle_dir: Path,
                                                                                    tmp_path: Path):
    from metarl_robot.logs.reader import read_episode
    from metarl_robot.real2sim.sim_record import record_sim_episode
    from metarl_robot.replay.shadow import replay_episode

    bundle = load_bundle(bundle_dir)
    task = bundle.family.sample(np.random.default_rng(0), "test", 1)[0]
    node = bundle.make_adapter(seed=4)  # the node's one adapter, through its episodes in MuJoCo
    for n in (1, 2):
        record_sim_episode(bundle, task, tmp_path / f"episode_{n}.mcap", steps=STEPS, seed=n, adapter=node,
                           episode=n)
    # the third episode starts: the node adapts to the two ended and logs what it carries
    third = read_episode(record_sim_episode(bundle, task, tmp_path / "episode_3.mcap", steps=STEPS, seed=3,
                                            adapter=node, episode=3))
    state = third.adapter_state
    assert state["inner_steps"].tolist() == [2] and state["window_lengths"].tolist() == [[STEPS - 1] * K]
    # a fresh adapter of the bundle, restored from the log, runs the same episode: the same commands, exactly
    restored = bundle.make_adapter(seed=4)
    restored.restore(state)
    for p, q in zip(restored.params[0], node.params[0], strict=True):
        np.testing.assert_array_equal(p, q)
    again = read_episode(record_sim_episode(bundle, task, tmp_path / "episode_3_again.mcap", steps=STEPS, seed=3,
                                            adapter=restored, episode=3))
    assert len(again.command) == len(third.command) == STEPS
    np.testing.assert_array_equal(again.command, third.command)
    # and the replay of the log reproduces them from the logged state alone
    replay = replay_episode(third, bundle)
    assert replay.counterfactual.reproduced, replay.counterfactual
    # both carried the same window into the next episode: the same adaptation, exactly
    node.reset()
    restored.reset()
    assert node.inner_steps.tolist() == restored.inner_steps.tolist() == [3]
    for p, q in zip(restored.params[0], node.params[0], strict=True):
        np.testing.assert_array_equal(p, q)
    for a, b in zip(restored.window[0], node.window[0], strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_a_carried_window_of_another_adapt_episodes_is_refused(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    node = bundle.make_adapter()
    synthetic_episodes(node, seed=0, episodes=2)
    state = node.carried_state()
    assert state["window_lengths"].shape == (1, K)
    wider = bundle.make_adapter(planner_overrides={"adapt_episodes": 3})
    with pytest.raises(ValueError, match=r"window_lengths.*\(1, 3\).*adapt_episodes 3"):
        wider.restore(state)
    # nothing changed: still the meta-parameters with an empty window
    assert wider.inner_steps.tolist() == [0] and wider.window == [[]]
    assert all(np.array_equal(p, q) for p, q in zip(wider.params[0], wider.meta_params, strict=True))
