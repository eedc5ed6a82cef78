"""``metarl demo``: the whole chain of the project on the cart-pole family, in one command.

Train a bundle with a tiny budget and export it (or take the shipped ``policies/cartpole_online`` with
``--skip-train``, or any bundle of the family with ``--bundle PATH``: a ``context_policy`` (PEARL) bundle runs
through the same node, replay and identification, its kind picking the adapter), show open-loop why
adaptation is needed, build the ROS 2 workspace with colcon,
start the MuJoCo digital twin (``metarl sim-robot``) on a held-out out-of-distribution task with
out-of-family effects (physics no family parameter models, :data:`DEMO_EFFECTS`), run the installed
``adapt_node`` against it over ZeroMQ for one logged episode, run the same episode again with the node's
adaptation off and print both, shadow-replay the adapted episode's log into a report, and identify the twin's
hidden parameters from the log alone. Every external
step runs as a real subprocess, exactly as a user would run it; a failing stage says which stage it
was and what to check.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# numpy and the rest are imported where used: `metarl --help` imports this module for DEMO_EFFECTS.
FAMILY = "cartpole_swingup"
BUNDLE = "policies/cartpole_online"
"""The shipped bundle ``--skip-train`` runs: the best one on out-of-distribution cart-poles (docs/BENCHMARKS.md)."""
CONFIG = "configs/mb_cartpole_swingup.yaml"
DEMO_EFFECTS = ("friction=hinge:0.01",)
"""The twin's default out-of-family effect (``--effect``; ``--no-effects``: none): dry friction in the hinge, which
a real cart-pole's bearing has and no family parameter models (docs/out_of_family.md). Under it the shipped online
bundle swings up 4 of 4 test tasks and the model-based one 2 (docs/BENCHMARKS.md, where the effects it does not yet
handle are measured too; ``--effect delay=1`` shows the online bundle's latency estimate through the node,
docs/online.md)."""
TINY_TRAINING = {"loop.iterations": 2, "loop.tasks_per_iteration": 1, "loop.random_episodes": 8,
                 "training.grad_steps": 100}
"""The ``--set`` overrides of the demo's training run: a pipeline check (minutes on a laptop), not a policy
that swings the pole up; that needs the config's full budget (hours), see docs/BENCHMARKS.md."""
STAGES = ["robot and task", "bundle", "open loop", "ROS 2 build", "digital twin", "ROS 2 node", "adaptation off",
          "replay", "identification"]
DEADLINE_S = 120.0
"""Generous deadline for a subprocess to start, hand-shake or exit on a busy machine."""


class StageError(RuntimeError):
    """A stage failed: what happened and what to do about it."""

    def __init__(self, problem: str, hint: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint


def _stage(i: int, text: str) -> None:
    print(f"[{i}/{len(STAGES)}] {text}", flush=True)


def _show(text: Any) -> str:
    """Paths as the user typed them: relative to the working folder where they lie under it."""
    return str(text).replace(f"{Path.cwd()}{os.sep}", "")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def pumping_policy(period: float, ctrl_dt: float, amplitude: float = 0.5):
    """Open loop: u(t) = amplitude * sin(2 pi t / period), the same for every sub-env."""
    import numpy as np

    step = 0

    def act(obs: np.ndarray) -> np.ndarray:
        nonlocal step
        u = amplitude * np.sin(2 * np.pi * step * ctrl_dt / period)
        step += 1
        return np.full((len(obs), 1), u)
    return act


def ood_task_the_bundle_swings_up(eval_json: Path) -> dict[str, float]:
    """From a bundle's own evaluation (``metarl eval``, either kind): the out-of-distribution test task it swings
    up most robustly.

    The planner samples and the twin hands over the pole at an arbitrary moment of its swing, so a
    marginal task succeeds on some runs only. A model-based evaluation: the tasks swung up with adaptation,
    those also swung up without it first (tests/ros/test_node.py runs its end-to-end test on that choice too).
    A context-policy (PEARL) evaluation: the node runs one episode from the prior belief, i.e. the evaluation's
    "after 0 exploration episodes"; the tasks swung up there, those also swung up after 1 and 2 first. Among
    them the best return of that episode wins.
    """
    rows = [r for r in json.loads(eval_json.read_text())["tasks"] if r["ood"]]
    if rows and "success_after_0" in rows[0]:
        # The later columns: after 1 and 2 episodes (an MB-MPO evaluation pooling K episodes per step: K and 2K).
        later = [k for k in rows[0] if k.startswith("success_after_") and k != "success_after_0"]
        rows = [r for r in rows if r["success_after_0"]]
        rows.sort(key=lambda r: (all(r[k] for k in later), r["return_after_0"]), reverse=True)
    else:
        rows = [r for r in rows if r["success_adapted"]]
        rows.sort(key=lambda r: (r["success_unadapted"], r["return_adapted"]), reverse=True)
    if not rows:
        raise StageError(f"{eval_json} lists no out-of-distribution task the bundle swings up",
                         "evaluate the bundle on OOD tasks with `metarl eval` first")
    return rows[0]["task"]


def watchdog_timing(twin_summary: dict[str, Any], trace: Any) -> dict[str, Any]:
    """The twin's watchdog engagements, split by when they happened relative to the node's commands.

    The twin's watchdog rightly sends the safe command once commands stop or expire; after the node's
    episode ends the node deactivates and commands stop, so one engagement after the last commanded
    period is the robot going safe as designed. An engagement before it is a gap in the commands while
    the node was running: a problem. Measured from the twin's trace (``safe`` per period) and the
    summary's engagement times (robot clock), not assumed."""
    import numpy as np

    events = twin_summary["watchdog"]["events"]
    commanded = np.flatnonzero(~np.asarray(trace["safe"], dtype=bool))
    t = np.asarray(trace["t"], dtype=np.float64)
    last_command_s = float(t[commanded[-1]]) if len(commanded) else None
    after = [e for e in events if last_command_s is not None and e["t_s"] > last_command_s]
    during = [e for e in events if e not in after]
    if not events:
        text = "watchdog: never engaged"
    elif last_command_s is None:
        text = f"watchdog: engaged {len(events)}x and no node command ever ran: see node.log and twin.log"
    elif not during:
        text = (f"watchdog: engaged {len(after)}x, at {after[0]['t_s']:.2f} s ({after[0]['reason']}), after the last "
                f"period a node command ran ({last_command_s:.2f} s): the node's episode had ended and it stopped "
                "commanding, so the robot went safe: expected")
    else:
        text = (f"watchdog: engaged {len(during)}x WHILE the node was commanding (at "
                + ", ".join(f"{e['t_s']:.2f} s ({e['reason']})" for e in during)
                + f"): a gap in the commands, see twin.log; {len(after)}x after its last command (expected)")
    return {"engagements": len(events), "while_commanding": len(during), "after_last_command": len(after),
            "last_command_s": last_command_s, "text": text}


class _Proc:
    """A subprocess of the demo in its own process group, its combined output going to a file."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> None:
        self.log = log
        self._file = open(log, "w")  # noqa: SIM115 -- closed in wait()/kill()
        self.proc = subprocess.Popen(cmd, stdout=self._file, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate: Callable[[str], bool], what: str, hint: str, timeout_s: float = DEADLINE_S,
                 tick: Callable[[], None] | None = None) -> str:
        end = time.monotonic() + timeout_s
        while True:
            text = self.output()
            if predicate(text):
                return text
            if self.proc.poll() is not None:
                raise StageError(f"{what}: the process ended (exit code {self.proc.returncode}) first; its log "
                                 f"{self.log} ends with:\n{_tail(text)}", hint)
            if time.monotonic() > end:
                raise StageError(f"{what}: not within {timeout_s:.0f} s; its log {self.log} ends with:\n"
                                 f"{_tail(text)}", hint)
            if tick is not None:
                tick()
            time.sleep(0.1)

    def stop(self, timeout_s: float = DEADLINE_S) -> int:
        """SIGINT (a clean shutdown: logs closed, summary written), then wait for the exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._file.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._file.close()


def ros_env(domain_id: int, **extra: str) -> dict[str, str]:
    """The environment of the node (and the twin): its own DDS domain, discovery on this machine only."""
    env = dict(os.environ)
    env.update(ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_LOCALHOST_ONLY="1",
               PYTHONUNBUFFERED="1", RCUTILS_COLORIZED_OUTPUT="0")
    env.update(extra)
    return env


def colcon_build(root: Path, repo: Path) -> subprocess.CompletedProcess:
    """``colcon build`` of ``repo``'s ros2_ws with --build-base/--install-base/--log-base under ``root`` (the
    repository stays clean), in a clean environment (no ROS or colcon variables inherited), with this Python."""
    keep = ("HOME", "PATH", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run(
        [sys.executable, "-m", "colcon", "--log-base", str(root / "log"), "build", "--build-base",
         str(root / "build"), "--install-base", str(root / "install"), "--event-handlers", "console_direct-"],
        cwd=repo / "ros2_ws", env=env, capture_output=True, text=True, timeout=600)


def _colcon_build(root: Path, repo: Path) -> Path:
    """:func:`colcon_build` as a demo stage; returns the install folder."""
    try:
        result = colcon_build(root, repo)
    except subprocess.TimeoutExpired as exc:
        raise StageError("colcon build did not finish within 600 s", "run it by hand in ros2_ws") from exc
    if result.returncode != 0:
        tail = _tail(result.stderr or result.stdout)
        raise StageError(f"colcon build failed (exit code {result.returncode}):\n{tail}",
                         f"check that colcon and the ROS 2 Python packages are installed in {sys.prefix} "
                         f"(make demo sets them up); the full log is under {root / 'log'}")
    return root / "install"


def _train_bundle(out_dir: Path, seed: int, repo: Path) -> Path:
    from metarl_robot.export.bundle_writer import export_run
    from metarl_robot.train.runner import train

    overrides = {**TINY_TRAINING, "seed": seed, "name": "demo"}
    print("      metarl train " + CONFIG + "".join(f" --set {k}={v}" for k, v in TINY_TRAINING.items()), flush=True)
    summary = train(repo / CONFIG, out_dir / "train", overrides=overrides)
    bundle = export_run(summary["run_dir"], out_dir / "cartpole_demo", overwrite=True, seed=seed)
    print(f"      exported {_show(summary['run_dir'])} -> {_show(bundle)} (ONNX graphs checked against torch)",
          flush=True)
    return Path(bundle)


def _given_bundle(path: Path) -> Path:
    """``--bundle``: a bundle of the demo's family (either kind), validated by the robot-side loader."""
    from metarl_robot.runtime.bundle import load_bundle

    try:
        bundle = load_bundle(path)
    except Exception as exc:
        raise StageError(f"--bundle {path}: {exc}", "give a bundle folder written by metarl export") from exc
    if bundle.family.name != FAMILY:
        raise StageError(f"--bundle {path} is a bundle of family {bundle.family.name!r}; the demo's twin runs the "
                         f"{FAMILY!r} family", f"export a run of a {FAMILY} config (e.g. configs/pearl_{FAMILY}.yaml)")
    print(f"      {bundle.kind} bundle {bundle.name!r} (bundle.yaml sha256 {bundle.sha256[:12]}): the node's adapter "
          f"{bundle.acts_by}", flush=True)
    return Path(path).resolve()


def check_effects(items: list[str]) -> None:
    """``--effect`` items the twin of the demo's family accepts, or a ValueError naming the item and what is
    allowed (before anything starts)."""
    from metarl_robot.envs.meta_env import MetaMujocoEnv
    from metarl_robot.envs.out_of_family import OutOfFamily
    from metarl_robot.spec.schema import SpecError

    try:
        MetaMujocoEnv(FAMILY, effects=OutOfFamily.parse(items)).close()
    except SpecError as exc:
        raise ValueError(str(exc)) from None


class _Drive:
    """One episode of the installed node against a fresh digital twin of the demo's task (both subprocesses, as a
    user runs them); every episode the same task, start, seed and out-of-family effects."""

    def __init__(self, out_dir: Path, robot: Any, task: dict[str, float], seed: int, speed: float,
                 episode_steps: int, twin_args: list[str], install: Path, executable: Path, bundle: Path,
                 procs: list[_Proc]) -> None:
        self.out_dir, self.robot, self.task, self.seed, self.speed = out_dir, robot, task, seed, speed
        self.episode_steps, self.twin_args = episode_steps, twin_args
        self.install, self.executable = install, executable
        self.bundle, self.procs = bundle, procs
        (out_dir / "twin_task.json").write_text(json.dumps(task))

    def episode(self, adapt: bool, before_node: Callable[[], None] | None = None) -> dict[str, Any]:
        """Run it; returns what the demo summary records (log, return, swung up, watchdog)."""
        import numpy as np
        import yaml
        from tqdm.auto import tqdm

        from metarl_robot.paths import REPO_ROOT

        out_dir, robot, speed, steps = self.out_dir, self.robot, self.speed, self.episode_steps
        tag = "" if adapt else "_unadapted"
        domain = random.Random(os.getpid() * 7919 + time.monotonic_ns()).randint(20, 100)
        env = ros_env(domain)
        twin_summary_path, twin_trace = out_dir / f"twin_summary{tag}.json", out_dir / f"twin_trace{tag}.npz"
        twin_summary_path.unlink(missing_ok=True)
        robot_seconds = steps * robot.ctrl_dt + 30.0  # room for the node's start-up; it is stopped earlier
        twin = _Proc([sys.executable, "-m", "metarl_robot.cli", "sim-robot", "--port-base", "0", "--task",
                      str(out_dir / "twin_task.json"), "--speed", f"{speed:g}", "--seed", str(self.seed),
                      "--duration", f"{robot_seconds:g}", "--summary", str(twin_summary_path), "--trace",
                      str(twin_trace), *self.twin_args], out_dir / f"twin{tag}.log", env, REPO_ROOT)
        self.procs.append(twin)
        text = twin.wait_for(lambda s: '"event": "ready"' in s, "twin ready line", "see twin.log; is pyzmq installed?")
        ready = json.loads(next(line for line in text.splitlines() if '"event": "ready"' in line))
        e = ready["endpoints"]
        endpoints = f"state={e['state']},command={e['command']},handshake={e['handshake']}"
        print(f"      twin: {endpoints}")
        if before_node is not None:
            before_node()
        log_dir = out_dir / ("logs" if adapt else "logs_unadapted")
        if log_dir.is_dir() and any(log_dir.glob("*.mcap")):
            import shutil

            print(f"      removing the episode logs of an earlier demo run in {_show(log_dir)}")
            shutil.rmtree(log_dir)
        params = {"bundle": str(self.bundle), "endpoints": endpoints, "log_dir": str(log_dir),
                  "episode_steps": steps, "seed": self.seed, "adapt": adapt, "diagnostics_rate_hz": 2.0,
                  "task": {"target_x": float(self.task["target_x"])}}
        params_path = out_dir / f"node_params{tag}.yaml"
        params_path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}, sort_keys=False))
        script = 'source "$1/setup.bash" && exec "$2" "${@:3}"'
        node = _Proc(["bash", "-c", script, "colcon-env", str(self.install), str(self.executable), "--ros-args",
                      "--params-file", str(params_path)], out_dir / f"node{tag}.log", env, REPO_ROOT)
        self.procs.append(node)
        node_hint = f"see {out_dir / f'node{tag}.log'} and {out_dir / f'twin{tag}.log'}"
        node.wait_for(lambda s: "episode 1 started" in s, "node start and handshake", node_hint)
        bar = tqdm(total=steps, unit="step", desc="episode 1" + (" (adaptation off)" if tag else ""), disable=None)
        episode_start = time.monotonic()

        def tick() -> None:
            bar.n = min(steps, int((time.monotonic() - episode_start) * speed / robot.ctrl_dt))
            bar.refresh()

        node.wait_for(lambda s: "episode 1 finished" in s, "the episode", node_hint,
                      timeout_s=steps * robot.ctrl_dt / speed + DEADLINE_S, tick=tick)
        bar.n = steps
        bar.close()
        if (rc := node.stop()) != 0:
            raise StageError(f"the node exited with code {rc}:\n{_tail(node.output())}", node_hint)
        if (rc := twin.stop()) != 0:
            raise StageError(f"the twin exited with code {rc}:\n{_tail(twin.output())}", node_hint)
        twin_summary = json.loads(twin_summary_path.read_text())
        logs = sorted(log_dir.glob("*_ep0001.mcap"))
        if len(logs) != 1:
            raise StageError(f"expected one episode log in {log_dir}, found {[p.name for p in logs]}", node_hint)
        trace = np.load(twin_trace)
        # Judged on the twin's true state: what the node saw may carry the effects' noise and bias.
        cos = np.cos(trace["true_obs"][:, robot.obs_slices["pole_angle"]][:, 0])
        last = cos[-round(2.0 / robot.ctrl_dt):]
        swung_up = bool(last.mean() >= 0.95 and last.min() > 0.5)
        commanded = ~trace["safe"]
        watchdog = watchdog_timing(twin_summary, trace)
        print(f"      twin: {twin_summary['commands']['accepted']} commands accepted, "
              f"{twin_summary['commands']['total_rejected']} rejected; pole "
              f"{'swung up and balanced' if swung_up else 'NOT upright'} over the last 2 s "
              f"(mean cos {last.mean():.2f})")
        print(f"      {watchdog['text']}")
        from metarl_robot.logs import read_episode

        delay = read_episode(logs[0]).adaptation.get("command_delay")
        if adapt and delay is not None and np.isfinite(delay).any():
            print(f"      the adapter's actuator-latency estimate at the end: {int(delay[np.isfinite(delay)][-1])} "
                  "control period(s) (docs/online.md#actuator-latency)")
        print(f"      episode log: {_show(logs[0])}")
        return {"log": str(logs[0]), "adapt": adapt, "swung_up": swung_up, "final_2s_mean_cos": float(last.mean()),
                "return": float(trace["reward"][commanded].sum()), "periods_commanded": int(commanded.sum()),
                "twin_summary": str(twin_summary_path),
                "watchdog": {k: v for k, v in watchdog.items() if k != "text"}}


def run_demo(out_dir: Path, seed: int = 0, skip_train: bool = False, episode_steps: int = 250,
             speed: float = 0.5, bundle: Path | None = None, effects: list[str] | None = None) -> int:
    """Run the demo into ``out_dir``; returns the exit code (0, or 1 after naming the failed stage).

    ``bundle``: run that bundle (any kind) instead of training one or taking the shipped one. ``effects``: the
    twin's out-of-family effects as ``--effect`` items (default :data:`DEMO_EFFECTS`; ``[]``: none)."""
    if not 75 <= episode_steps <= 10**6:
        raise ValueError(f"--episode-steps: must be in [75, 10^6] (3 s at 25 Hz, enough to swing up and identify), "
                         f"got {episode_steps}")
    if not 0.05 <= speed <= 10.0:
        raise ValueError(f"--speed: must be in [0.05, 10] robot seconds per wall second, got {speed}")
    effects = list(DEMO_EFFECTS if effects is None else effects)
    check_effects(effects)
    procs: list[_Proc] = []
    state = {"stage": 0}
    try:
        return _run(out_dir.resolve(), seed, skip_train, episode_steps, speed, procs, state, bundle, effects)
    except StageError as exc:
        i = state["stage"]
        print(f"\nstage {i}/{len(STAGES)} ({STAGES[i - 1]}) failed: {exc.problem}\nwhat to do: {exc.hint}",
              file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # any failure must still name its stage
        i = state["stage"]
        print(f"\nstage {i}/{len(STAGES)} ({STAGES[i - 1] if i else 'start'}) failed: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        raise
    finally:
        for proc in procs:
            proc.kill()


def _run(out_dir: Path, seed: int, skip_train: bool, episode_steps: int, speed: float, procs: list[_Proc],
         state: dict[str, int], given_bundle: Path | None = None, effects: list[str] | None = None) -> int:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metarl_robot.envs.robot_model import load_model
    from metarl_robot.envs.rollout import collect, make_vector_env
    from metarl_robot.paths import REPO_ROOT
    from metarl_robot.spec.family import load_family
    from metarl_robot.spec.robot import load_robot

    def stage(text: str) -> None:
        state["stage"] += 1
        _stage(state["stage"], text)

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"family": FAMILY, "seed": seed, "skip_train": skip_train or given_bundle is not None}
    summary_path = out_dir / "demo_summary.json"

    def save() -> None:
        summary["seconds"] = round(time.perf_counter() - started, 2)
        summary_path.write_text(json.dumps(summary, indent=1, default=float))

    # ---- 1: robot, family, the held-out task ------------------------------------------------------------
    family = load_family(FAMILY)
    robot = load_robot(family.spec.robot)
    stage(f"robot {robot.name} checked against {robot.mjcf_path.name}; held-out task of family {family.name}")
    model = load_model(robot)
    print(f"      {robot.obs_dim} observations, {robot.action_dim} action, {1 / robot.ctrl_dt:g} Hz control, "
          f"{model.nbody - 1} bodies; interface sha256 {robot.interface_hash[:16]}…")
    # The twin's task comes from the evaluation of the bundle that will run, when it has one (a shipped bundle's
    # eval/); a bundle without one (a fresh export) gets the shipped model-based bundle's choice.
    eval_json = REPO_ROOT / BUNDLE / "eval" / "eval.json"
    if given_bundle is not None and (given_bundle / "eval" / "eval.json").is_file():
        eval_json = given_bundle / "eval" / "eval.json"
    task = ood_task_the_bundle_swings_up(eval_json)
    if not family.is_ood(task):
        raise StageError(f"the chosen task {task} is not out of distribution", f"check {eval_json}")
    print("      twin task (out of distribution, hidden from the node; chosen from " + _show(eval_json) + "): "
          + ", ".join(f"{k}={v:.3g}" for k, v in task.items()))
    summary["task_chosen_from"] = str(eval_json)
    summary["robot"], summary["robot_interface_sha256"], summary["task"] = robot.name, robot.interface_hash, task

    # ---- 2: the bundle ----------------------------------------------------------------------------------
    if given_bundle is not None:
        stage(f"bundle: {_show(given_bundle)} (--bundle)")
        bundle = _given_bundle(given_bundle)
    elif skip_train:
        bundle = REPO_ROOT / BUNDLE
        stage(f"bundle: the shipped {BUNDLE} (--skip-train)")
    else:
        stage(f"bundle: train {CONFIG} with a tiny budget and export it (--skip-train uses the shipped {BUNDLE})")
        bundle = _train_bundle(out_dir, seed, REPO_ROOT)
        print("      a budget this small checks the pipeline; it does not learn a swing-up "
              f"({BUNDLE}: 47,000 transitions, ~45 min on 2 cores)")
    from metarl_robot.runtime.bundle import load_bundle

    loaded = load_bundle(bundle)
    summary["bundle"], summary["bundle_kind"] = str(bundle), loaded.kind
    save()

    # ---- 3: open loop: why adapt -----------------------------------------------------------------------
    rng = np.random.default_rng(seed)
    tasks = [family.nominal(), task, *family.sample(rng, "test", 3)]
    period = 2 * np.pi * np.sqrt(2 * 1.0 / (3 * 9.81))  # nominal pole: uniform rod pivoted at one end
    stage(f"open loop: u(t) = 0.5 sin(2 pi t / {period:.2f} s) on the nominal, the twin's and 3 more test tasks")
    envs = make_vector_env(family, len(tasks), "async")
    try:
        rollout = collect(envs, family, pumping_policy(period, robot.ctrl_dt), tasks, episodes=1, seed=seed,
                          progress=True)
    finally:
        envs.close()
    t = np.arange(rollout.obs.shape[1]) * robot.ctrl_dt
    angle = rollout.next_obs[..., robot.obs_slices["pole_angle"]][..., 0]
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, tk in enumerate(tasks):
        name = ["nominal", "twin (OOD)"][i] if i < 2 else f"test {i - 1}" + (" (OOD)" if family.is_ood(tk) else "")
        ax.plot(t, np.cos(angle[i]), label=f"{name}: m×{tk['pole_mass_scale']:.2f}, L={tk['pole_length']:.2f} m, "
                f"gain×{tk['motor_gain_scale']:.2f}", **({"color": "black", "linewidth": 2} if i == 0 else {}))
    ax.set_ylabel("cos(pole angle)  (1 = upright)")
    ax.set_xlabel("time (s)")
    ax.set_title(f"{family.name}: the same commands on five tasks")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    open_loop_png = out_dir / "demo_tasks.png"
    fig.savefig(open_loop_png, dpi=110)
    plt.close(fig)
    returns = rollout.episode_returns()[:, 0]
    summary["open_loop"] = [{"task": tk, "ood": family.is_ood(tk), "return": float(returns[i]),
                             "max_height_cos": float(np.max(np.cos(angle[i])))} for i, tk in enumerate(tasks)]
    print("      returns " + ", ".join(f"{r:.1f}" for r in returns) + f" -> {_show(open_loop_png)}")
    save()

    # ---- 4: colcon build ---------------------------------------------------------------------------------
    stage(f"ROS 2: colcon build of ros2_ws into {_show(out_dir / 'ros2')}")
    t0 = time.perf_counter()
    install = _colcon_build(out_dir / "ros2", REPO_ROOT)
    executable = install / "metarl_robot_ros" / "lib" / "metarl_robot_ros" / "adapt_node"
    if not executable.is_file():
        raise StageError(f"colcon build succeeded but {executable} is missing", "check ros2_ws/src/*/setup.cfg")
    print(f"      built in {time.perf_counter() - t0:.0f} s: {_show(executable)}")

    # ---- 5 and 6: digital twin and the ROS 2 node, adaptation on ----------------------------------------
    twin_args = [a for item in effects for a in ("--effect", item)]
    label = ", ".join(effects) if effects else "none (--no-effects)"
    summary["effects"] = list(effects)
    stage(f"digital twin: metarl sim-robot on the held-out task at {speed:g}x real time, ZeroMQ on loopback; "
          f"out-of-family effects: {label}")
    drive = _Drive(out_dir, robot, task, seed, speed, episode_steps, twin_args, install, executable, bundle, procs)
    adapted = drive.episode(adapt=True, before_node=lambda: stage(
        f"ROS 2 node: installed adapt_node, {loaded.kind} bundle {bundle.name}, {episode_steps} steps "
        f"({episode_steps * robot.ctrl_dt:g} s of robot time), adaptation on"))
    episode_log, swung_up = Path(adapted["log"]), adapted["swung_up"]
    twin_summary = json.loads(Path(adapted["twin_summary"]).read_text())
    summary["episode"] = adapted
    save()

    # ---- 6b: the same episode with adaptation off --------------------------------------------------------
    stage("adaptation off: the same twin, task, start and seed, the node with adapt:=false (no adaptation at all)")
    unadapted = drive.episode(adapt=False)
    summary["adaptation_off"] = unadapted
    for name, ep in (("on ", adapted), ("off", unadapted)):
        print(f"      adaptation {name}: return {ep['return']:6.1f} over {ep['periods_commanded']} commanded periods, "
              f"pole {'swung up and balanced' if ep['swung_up'] else 'NOT upright'} (mean cos over the last 2 s "
              f"{ep['final_2s_mean_cos']:.2f})")
    save()

    # ---- 7: replay -------------------------------------------------------------------------------------
    from metarl_robot.replay.report import terminal_summary, write_report
    from metarl_robot.replay.shadow import replay_episodes

    stage("replay: the logged telemetry through the bundle step by step" + (", adaptation on and off"
          if loaded.has_dynamics_model else " (no dynamics model: the actions and the belief are graded)"))
    replays = replay_episodes([episode_log], bundle)
    paths = write_report(replays, out_dir / "replay")
    print("      " + _show(terminal_summary(replays, paths)).replace("\n", "\n      "))
    metrics = replays[0].metrics()
    summary["replay"] = {"report": str(paths["report"]), "metrics": str(paths["metrics"]),
                         "plots": sorted(str(p) for p in paths.values() if p.suffix == ".png"),  # this run's only
                         "reproduced": replays[0].counterfactual.reproduced,
                         "prediction_error": metrics["prediction_error"]}
    save()

    # ---- 8: identification -------------------------------------------------------------------------------
    from metarl_robot.envs.out_of_family import OutOfFamily
    from metarl_robot.real2sim.identify import IdentifyConfig, identify_to_dir

    # metarl identify's defaults (~10 s per delay tried on a 10 s episode), trying delays of 0 and 1 periods.
    config = IdentifyConfig(seed=seed, max_delay=1)
    # The twin's sensors are exact unless an obs_noise effect is on: what a calibrated robot.yaml would say.
    sensor_noise = OutOfFamily.parse(list(effects)).obs_noise if effects else 0.0
    stage(f"identification from the log alone: CEM over the family's box ({config.restarts} x {config.iterations} x "
          f"{config.population} candidate tasks replaying the logged commands, for delays 0 and 1), then a local "
          f"refinement and a test of the fit against the twin's sensor noise ({sensor_noise:g} scale units)")
    result, task_path, json_path = identify_to_dir(episode_log, FAMILY, out_dir / "identify", config, progress=True,
                                                   noise_std=sensor_noise)
    true_task = twin_summary["task"]
    print(f"      residual {result.cost:.3g} (nominal task {result.nominal_cost:.3g}) in {result.seconds:.0f} s; "
          f"command-to-effect delay {result.delay} period(s)")
    print("      " + result.fit.line().replace("\n", "\n      "))
    print(f"      {'parameter':<20}{'identified':>11}{'std err':>10}  {'95% interval':<21}{'true (twin)':>12}")
    for p in result.params:
        if p.std_error is None or p.interval is None:
            cells = f"{'':>10}  {'':<21}"
        elif not np.isfinite(p.std_error):
            cells = f"{'inf':>10}  {'unconstrained':<21}"
        else:
            cells = f"{p.std_error:>10.2g}  {f'[{p.interval[0]:.4g}, {p.interval[1]:.4g}]':<21}"
        status = "" if p.identified else f"not identified: {p.note}"
        true = true_task.get(p.name, float("nan"))
        print(f"      {p.name:<20}{p.value:>11.4g}{cells}{true:>12.4g}  {status}".rstrip())
    covered = [p.name for p in result.params if p.identified and p.interval is not None
               and p.interval[0] <= true_task[p.name] <= p.interval[1]]
    identified = [p.name for p in result.params if p.identified]
    if result.fit.verdict == "not explained":
        print(f"      the twin's physics is outside the family ({', '.join(effects) or 'no effect given'}) and the fit "
              "says so: no intervals; the values above are the family's closest physics (docs/identify.md)")
    else:
        print(f"      the twin's true value lies in the 95% interval of {len(covered)} of the {len(identified)} "
              "identified parameters (docs/identify.md)")
    summary["identify"] = {"task_file": str(task_path), "json": str(json_path), "true_task": true_task,
                           "params": {p.name: {"value": p.value, "std_error": p.std_error,
                                               "interval_95": None if p.interval is None else list(p.interval),
                                               "identified": p.identified, "true": true_task.get(p.name)}
                                      for p in result.params},
                           "true_in_interval": covered, "cost": result.cost, "nominal_cost": result.nominal_cost,
                           "fit": {"verdict": result.fit.verdict, "p_value": result.fit.p_value,
                                   "misfit_fields": result.fit.misfit_fields}, "delay": result.delay}
    save()

    print(f"\nDone in {summary['seconds']:.0f} s: bundle {_show(bundle)} ran as a ROS 2 node against the twin's hidden "
          f"OOD task{' with out-of-family effects' if effects else ''} and "
          f"{'swung the pole up' if swung_up else 'did NOT swing the pole up'}.")
    print(f"  adaptation:  on {adapted['return']:.1f} ({'swung up' if adapted['swung_up'] else 'not upright'}), "
          f"off {unadapted['return']:.1f} ({'swung up' if unadapted['swung_up'] else 'not upright'}): the return over "
          "the node's episode on the twin")
    print(f"  episode log: {_show(episode_log)}")
    print(f"  report:      {_show(paths['report'])}  (metrics {_show(paths['metrics'])})")
    print("  plots:       " + ", ".join(_show(p) for p in [open_loop_png, *summary["replay"]["plots"]]))
    print(f"  identified:  {_show(task_path)}  (metarl sim-robot --task {_show(task_path)} reproduces the episode "
          "in sim)")
    print(f"  summary:     {_show(summary_path)}")
    if not skip_train and given_bundle is None and not swung_up:
        print(f"The bundle trained here had a budget of seconds; `metarl demo --skip-train` runs the same chain with "
              f"the shipped {BUNDLE}, which swings this task up without out-of-family effects (its eval/).")
    return 0
