"""The ``metarl`` command. Subcommands import what they need lazily so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from metarl_robot.backend import Backend

EPILOG = """\
The three jobs of metarl-robot, and where they stand:
  1. train in sim          (families, robot, tasks, rollout, train, eval, demo)
  2. ros2 launch on robot  (export, calibrate-safety, sim-robot, keys; the node: ros2_ws/src/metarl_robot_ros)
  3. replay logged runs    (replay, identify, calibrate-noise, retrain, import-log, dataset; logs:
                           docs/episode_log.md, docs/replay.md, docs/datasets.md)
Robots live in sim/robots/<robot>/ (MJCF + robot.yaml); task families in sim/tasks/<family>.yaml.
See docs/robot_spec.md and docs/task_families.md.
"""

EFFECT_HELP = ("out-of-family effect, repeatable (evaluation only; docs/out_of_family.md): delay=K (commands reach "
               "the motors K more control periods late), damping=JOINT:V (+V N s/m or N m s/rad viscous damping), "
               "friction=JOINT:V (+V N or N m dry friction loss), obs_noise=S (Gaussian noise of std S x each field's "
               "robot.yaml scale on what the controller observes), integrator=Euler|RK4|implicit|implicitfast, "
               "bias=FIELD:V or FIELD[i]:V (+V on an observed field, in its units). Joints the task family changes "
               "are refused")
"""``--effect`` help, shared by sim-robot and eval (tests check it names every kind of envs.out_of_family)."""
EFFECTS_FILE_HELP = ("YAML mapping of out-of-family effects (delay_periods, joint_damping, joint_friction, obs_noise, "
                     "integrator, sensor_bias); --effect items apply on top")


EXTRA_OF_MODULE = {"torch": "train", "tensorboard": "train", "onnxscript": "train", "mujoco": "sim",
                   "gymnasium": "sim", "tqdm": "sim", "matplotlib": "replay", "rosbags": "replay", "rclpy": "ros",
                   "minari": "dataset", "h5py": "dataset"}
"""Optional third-party modules → the pyproject extra that installs them (``pip install metarl-robot`` alone is the
robot side: :func:`main` turns a missing one into a one-line hint instead of a traceback)."""
EXTRA_OF_COMMAND = {"robot": "sim", "rollout": "sim", "sim-robot": "sim", "identify": "sim", "calibrate-safety": "sim",
                    "train": "train", "eval": "train", "export": "train", "retrain": "train",
                    "demo": "train,ros,dev", "replay": "replay", "import-log": "replay", "dataset": "dataset"}
"""The extras a command needs in full, named instead of the missing module's own so one install is enough (a
command not listed runs on the robot side alone)."""
EXTRA_OF_OPTION_MODULE = {"ray": "cluster"}
"""Modules only an option needs (``--backend ray``): their own extra, whatever the command."""


def _missing_extra(command: str, exc: ModuleNotFoundError) -> str | None:
    """The one-line error for an optional module this install lacks, or None (a real bug: let it raise)."""
    module = (exc.name or "").partition(".")[0]
    if module in EXTRA_OF_OPTION_MODULE:
        extra = EXTRA_OF_OPTION_MODULE[module]
    elif module in EXTRA_OF_MODULE:
        extra = EXTRA_OF_COMMAND.get(command, EXTRA_OF_MODULE[module])
    else:
        return None
    return (f"metarl {command}: error: needs {module}, which is not installed: "
            f'pip install "metarl-robot[{extra}]"')


def _effects(args: argparse.Namespace):
    """The ``--effects`` file and ``--effect`` items as an OutOfFamily, or None."""
    from metarl_robot.envs.out_of_family import OutOfFamily

    return OutOfFamily.from_cli(args.effect, args.effects)


def _cmd_families(args: argparse.Namespace) -> int:
    from metarl_robot.paths import family_names
    from metarl_robot.spec.family import load_family

    names = [args.name] if args.name else family_names()
    for i, name in enumerate(names):
        if i:
            print()
        print(load_family(name).describe())
    return 0


def _cmd_robot(args: argparse.Namespace) -> int:
    from metarl_robot.envs.robot_model import load_model
    from metarl_robot.spec.robot import load_robot

    spec = load_robot(args.name)
    model = load_model(spec)  # raises with the offending field if robot.yaml and MJCF disagree
    print(f"{spec.name}: {spec.description}")
    print(f"  robot.yaml  {spec.source_path}")
    print(f"  MJCF        {spec.mjcf_path}  (nq={model.nq}, nv={model.nv}, nu={model.nu})")
    print(f"  control     ctrl_dt={spec.ctrl_dt} s ({1 / spec.ctrl_dt:g} Hz), substeps={spec.control.substeps}, "
          f"sim_dt={spec.sim_dt:g} s")
    print(f"  interface   sha256 {spec.interface_hash}")
    print(f"  observation ({spec.obs_dim} measured, {spec.privileged_dim} privileged):")
    for f in spec.observation:
        where = "privileged" if f.privileged else f"obs[{spec.obs_slices[f.name].start}:{spec.obs_slices[f.name].stop}]"
        print(f"    {f.name:<16} {where:<12} size={f.size:<2} units={f.units:<6} scale={f.scale:g}")
    print(f"  action ({spec.action_dim}):")
    for a in spec.action:
        print(f"    {a.name:<16} [{a.low:g}, {a.high:g}] {a.units}  max_rate={a.max_rate:g}/s  "
              f"safe={spec.safe_command[a.name]:g}")
    print("  OK: robot.yaml matches the MJCF")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    import numpy as np

    from metarl_robot.spec.family import load_family

    family = load_family(args.family)
    if args.grid is not None:
        names = args.params.split(",") if args.params else None
        tasks = family.grid(args.grid, args.split, names)
    else:
        tasks = family.sample(np.random.default_rng(args.seed), args.split, args.sample)
    rows = [{"task": t, "ood": family.is_ood(t)} for t in tasks]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("  ".join(f"{n:>14}" for n in family.names) + "    ood")
    for row in rows:
        print("  ".join(f"{row['task'][n]:>14.4g}" for n in family.names) + f"    {'yes' if row['ood'] else 'no'}")
    print(f"{len(rows)} task(s) from the {args.split} split of {family.name}")
    return 0


def _cmd_rollout(args: argparse.Namespace) -> int:
    import numpy as np

    from metarl_robot.envs.rollout import collect, make_vector_env, random_policy
    from metarl_robot.spec.family import load_family
    from metarl_robot.spec.robot import load_robot

    family = load_family(args.family)
    robot = load_robot(family.spec.robot)
    tasks = family.sample(np.random.default_rng(args.seed), args.split, args.tasks)
    num_envs = min(args.num_envs, len(tasks))
    returns = []
    envs = make_vector_env(family, num_envs, args.vector)
    try:
        for start in range(0, len(tasks), num_envs):
            chunk = tasks[start:start + num_envs]
            if len(chunk) < num_envs:  # the last chunk: pad with copies, drop their results
                chunk = chunk + [chunk[-1]] * (num_envs - len(chunk))
            policy = random_policy(robot.action_low, robot.action_high, args.seed + start)
            result = collect(envs, family, policy, chunk, args.episodes, seed=args.seed + start, progress=True)
            returns.extend(result.episode_returns()[: len(tasks) - start])
            if args.out:
                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                path = out.with_name(f"{out.stem}_{start // num_envs:03d}.npz") if len(tasks) > num_envs else out
                result.save(str(path))
                print(f"wrote {path}")
    finally:
        envs.close()
    print(f"random-policy returns on {len(tasks)} {args.split} task(s) of {family.name} "
          f"({args.episodes} episode(s) each, {args.vector} vector env x{num_envs}):")
    for task, ret in zip(tasks, returns, strict=True):
        shown = ", ".join(f"{k}={v:.3g}" for k, v in task.items())
        print(f"  return {np.mean(ret):9.2f}   {shown}{'  (OOD)' if family.is_ood(task) else ''}")
    return 0


def _parse_overrides(items: list[str]) -> dict:
    """``key.sub=value`` strings → {"key.sub": value}, values parsed as YAML (numbers, lists, true/false)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value (e.g. loop.iterations=3), got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _add_backend_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--backend``, ``--ray-address`` and ``--workers``: where ``what`` runs (metarl_robot/backend.py)."""
    from metarl_robot.backend import BACKENDS, RAY_ADDRESS_ENV

    g = p.add_argument_group("where the work runs (docs/scale_out.md)")
    g.add_argument("--backend", choices=BACKENDS, default="local", help=f"local: in this process, one job after "
                   f"another (default); ray: {what} as Ray tasks on a cluster, results identical to local")
    g.add_argument("--ray-address", metavar="HOST:PORT", help="with --backend ray: the running cluster's head "
                   f"(default: ${RAY_ADDRESS_ENV}; neither: a Ray started on this machine)")
    g.add_argument("--workers", type=int, metavar="N", help="with --backend ray and no cluster address: CPU cores of "
                   "the Ray started on this machine (default: all)")


def _backend(args: argparse.Namespace) -> Backend:
    from metarl_robot.backend import make_backend

    return make_backend(args.backend, args.ray_address, args.workers)


def _cmd_train(args: argparse.Namespace) -> int:
    from metarl_robot.train.runner import train, train_seeds

    if bool(args.config) == bool(args.resume):
        raise ValueError("give a config file, or --resume <run folder>, not both")
    overrides = _parse_overrides(args.set)
    if args.name:
        overrides["name"] = args.name
    if args.seeds:
        if args.resume:
            raise ValueError("--seeds starts new runs; resume each run folder with --resume")
        if "seed" in overrides:
            raise ValueError("--seeds and --set seed=... both choose the seed; give one")
        summaries = train_seeds(args.config, args.seeds, args.out, overrides, _backend(args))
        for seed, summary in zip(args.seeds, summaries, strict=True):
            print(f"seed {seed}: run folder {summary['run_dir']}: {summary.get('line', '')}")
        return 0
    summary = train(args.resume or args.config, args.out, resume=bool(args.resume), overrides=overrides,
                    backend=_backend(args))
    final = summary["final"]
    print(f"run folder: {summary['run_dir']}")
    if final and "posterior_return" in final:  # pearl
        print(f"last iteration {final['iteration']}: mean return {final['episode_return']:.2f} exploring, "
              f"{final['posterior_return']:.2f} under the posterior; {int(final['episodes'])} episodes collected, "
              f"{int(final['transitions'])} transitions of {int(final['tasks'])} tasks in the replay")
    elif final and "episode_return" in final:
        print(f"last iteration {final['iteration']}: mean episode return {final['episode_return']:.2f}, "
              f"{int(final['episodes'])} episodes / {int(final['transitions'])} transitions in the buffer")
    elif final:  # an offline algorithm (macaw): no episodes, its own summary line
        print(f"last iteration {final['iteration']}: {summary.get('line', '')}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from metarl_robot.train.evaluate import evaluate

    tasks = args.tasks
    if args.task_file:  # e.g. the task.yaml of metarl identify: that one task, as a list
        import yaml

        from metarl_robot.real2sim.identify import load_task_file
        from metarl_robot.spec.family import load_family

        data = yaml.safe_load(Path(args.task_file).read_text())
        name = args.family or (data.get("family") if isinstance(data, dict) else None)
        if not name:
            raise ValueError(f"{args.task_file}: names no family; give --family")
        tasks = [load_task_file(args.task_file, load_family(name))]
        args.family = name
    report = evaluate(args.source, args.out, family=args.family, split=args.split, tasks=tasks, grid=args.grid,
                      grid_params=args.params.split(",") if args.params else None, seed=args.seed,
                      oracle=not args.no_oracle, oracle_cache=args.oracle_cache, unadapted=not args.no_unadapted,
                      planner_overrides=_parse_overrides(args.set), effects=_effects(args),
                      adapt_from=args.adapt_from, backend=_backend(args), tasks_per_job=args.tasks_per_job)
    summ = report["summary"]
    print(f"{report['family']} ({report['split']}), {len(report['tasks'])} task(s), source: {report['source_kind']}")
    if report["out_of_family"]:
        print(f"out-of-family effects: {report['out_of_family']['label']}")
    meta_test = "exploration_episodes" in report
    if meta_test:  # returns after 0, 1, 2 exploration episodes (MB-MPO: 0, K, 2K), and their gaps
        after = [f"after_{k}" for k in report["exploration_episodes"]]
        columns = [f"return_{c}" for c in after] + ["return_oracle"] + [f"gap_{c}" for c in after]
        names = [*after, "oracle", *(f"gap_{k}" for k in report["exploration_episodes"])]
    else:  # every adaptation mode the kind has (adapted, ..., unadapted), the oracle and the gap
        names = [k.removeprefix("return_") for k in report["tasks"][0] if k.startswith("return_")] + ["gap"]
        columns = [f"return_{m}" for m in names[:-1]] + ["gap"]
    print(f"{'task':<5}{'ood':<5}" + "".join(f" {m:>12}" for m in names))
    for i, row in enumerate(report["tasks"]):
        cells = [row.get(c, float("nan")) for c in columns]
        print(f"{i:<5}{'yes' if row['ood'] else 'no':<5}" + "".join(f" {c:>12.2f}" for c in cells))
    for key, value in summ.items():
        print(f"  {key}: {value}")
    if "gap" in summ:
        worst = report["tasks"][summ["gap"]["worst_task"]]["task"]
        print(f"worst-case gap {summ['gap']['worst']:.2f} (task {summ['gap']['worst_task']}: "
              + ", ".join(f"{k}={v:.3g}" for k, v in worst.items()) + f"), mean gap {summ['gap']['mean']:.2f}")
    plots = ["eval_returns.png", *([] if meta_test else ["eval_prediction_error.png"]),
             *report.get("heatmaps", [])]
    print(f"wrote {Path(args.out) / 'eval.json'}, {', '.join(plots)} ({report['seconds']} s)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from metarl_robot.export.bundle_writer import export_run
    from metarl_robot.runtime.bundle import load_bundle

    out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, name=args.name, overwrite=args.overwrite,
                     exporter=args.exporter, kind=args.kind, adapter_settings=_parse_overrides(args.set))
    bundle = load_bundle(out)
    print(f"wrote {out}: {bundle.kind} bundle, robot {bundle.robot.name}, family {bundle.family.name}; the runtime "
          "loads and validates it")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from metarl_robot.demo import run_demo

    return run_demo(out_dir=Path(args.out), seed=args.seed, skip_train=args.skip_train,
                    episode_steps=args.episode_steps, speed=args.speed,
                    bundle=Path(args.bundle) if args.bundle else None, effects=[] if args.no_effects else args.effect)


def _cmd_sim_robot(args: argparse.Namespace) -> int:
    from metarl_robot.real2sim.twin import run_cli

    return run_cli(args)


def _cmd_retrain(args: argparse.Namespace) -> int:
    from metarl_robot.real2sim.identify import parse_noise_std
    from metarl_robot.real2sim.retrain import retrain

    summary = retrain(args.episodes, args.run, args.bundle, args.out, iterations=args.iterations,
                      random_episodes=args.random_episodes, widen=args.widen,
                      noise_std=parse_noise_std(args.noise_std), progress=True, compare=args.compare)
    for row in summary["per_log"]:
        returns = (f"; return on its identified task: old {row['return_old']:.1f}, new {row['return_new']:.1f}"
                   if args.compare else "")
        print(f"{row['log']}: fit {row['verdict']}, delay {row['delay']}{returns}")
    if args.compare:
        print(f"mean return old {summary['mean_return_old']:.1f}, new {summary['mean_return_new']:.1f}; improved on "
              f"{summary['improved']} of {len(summary['per_log'])} log(s).", end=" ")
    print(f"Family {summary['family']}, bundle {summary['bundle_new']}, report {Path(args.out) / 'retrain.json'}")
    return 0


def _cmd_calibrate_noise(args: argparse.Namespace) -> int:
    from metarl_robot.logs.reader import read_episode
    from metarl_robot.replay.calibration import sensor_noise_at_rest

    episode = read_episode(args.episode)
    noise = sensor_noise_at_rest(episode)
    units = {f.name: f.units for f in episode.robot.measured_fields}
    frames = len(set(episode.state_seq.tolist()))
    print(f"# sensor noise of robot {episode.robot.name!r} from {args.episode} ({frames} frames at rest): put each "
          "noise_std under its observation field in robot.yaml")
    for name, std in noise.items():
        print(f"{name}:\n  noise_std: {std:.4g}    # {units[name]}")
    return 0


def _cmd_calibrate_safety(args: argparse.Namespace) -> int:
    from metarl_robot.train.safety_calibration import PARAMS_FILE, REPORT_FILE, calibrate_safety

    report = calibrate_safety(args.bundle, args.out, episodes=args.episodes, split=args.split,
                              check_split=args.check_split, check_episodes=args.check_episodes, steps=args.steps,
                              quantile=args.quantile, margin=args.margin, seed=args.seed,
                              progress=sys.stderr.isatty())
    cal, check = report["calibration"], report["check"]
    print(f"prediction_error_threshold = {report['threshold']:.4g} (quantile {args.quantile} x margin {args.margin} "
          f"of the level held for {report['prediction_error_steps']} steps, {cal['episodes']} {cal['split']} "
          f"episodes; their highest: {cal['max_persistent_level']:.4g})")
    print(f"held-out check: {check['trips']} trip(s) on {check['episodes']} {check['split']} episodes "
          f"(highest level {check['max_persistent_level']:.4g})")
    print(f"wrote {Path(args.out) / PARAMS_FILE} (node parameters) and {Path(args.out) / REPORT_FILE}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from metarl_robot.telemetry.keys import main as keys_main

    return keys_main([args.dir, *(["--force"] if args.force else [])])


def _cmd_import_log(args: argparse.Namespace) -> int:
    from metarl_robot.replay.importers import run_cli

    return run_cli(args)


def _cmd_replay(args: argparse.Namespace) -> int:
    from metarl_robot.replay.report import run_cli

    return run_cli(args)


def _cmd_identify(args: argparse.Namespace) -> int:
    from metarl_robot.real2sim.identify import run_cli

    return run_cli(args)


def _dataset_output(args: argparse.Namespace, dataset) -> int:
    """Write a built dataset (Minari first, so a refused id leaves nothing half-written) and print what it holds."""
    from metarl_robot.replay.dataset import META_FILE, default_minari_id, write_minari

    out = Path(args.out)
    if not args.no_minari:
        dataset_id = args.minari_id or default_minari_id(dataset)
        folder = write_minari(dataset, dataset_id, args.minari_dir, overwrite=args.overwrite)
    dataset.save(out, overwrite=args.overwrite)
    print(dataset.report.summary())
    print(dataset.summary())
    print(f"wrote {out / 'dataset.npz'} and {out / META_FILE}")
    if not args.no_minari:
        print(f"wrote Minari dataset {dataset_id!r} to {folder} (minari.load_dataset({dataset_id!r}) with "
              f"MINARI_DATASETS_PATH={dataset.minari['root']})")
    return 0


def _cmd_dataset(args: argparse.Namespace) -> int:
    if args.dataset_command is None:
        args.dataset_parser.print_help()
        return 0
    from metarl_robot.replay.dataset import check_output, load_dataset

    if args.dataset_command == "info":
        dataset = load_dataset(args.folder)
        if args.json:
            from dataclasses import asdict

            print(json.dumps(asdict(dataset.report), indent=1))
            return 0
        print(dataset.summary())
        print(dataset.report.summary())
        if dataset.minari:
            print(f"  Minari copy: {dataset.minari['dataset_id']!r} under {dataset.minari['root']}")
        return 0
    check_output(args.out, args.overwrite)  # before the work: a build may take minutes
    if not args.no_minari:
        import minari  # noqa: F401 -- a missing extra fails here, before any work

        from metarl_robot.replay.dataset import check_minari_target

        if args.minari_id:
            check_minari_target(args.minari_id, args.minari_dir, args.overwrite)

    progress = print if args.verbose else None
    if args.dataset_command == "collect":
        from metarl_robot.real2sim.sim_dataset import collect_dataset

        logs = Path(args.logs) if args.logs else Path(args.out) / "logs"
        dataset = collect_dataset(args.policy, args.family, logs, tasks=args.tasks, episodes=args.episodes,
                                  steps=args.steps, split=args.split, seed=args.seed, adapt=not args.no_adapt,
                                  progress=progress, backend=_backend(args))
        return _dataset_output(args, dataset)
    from functools import partial

    from metarl_robot.replay.dataset import build_dataset

    identifier = None
    if args.label in ("identify", "auto"):
        from metarl_robot.real2sim.identify import IdentifyConfig, parse_noise_std
        from metarl_robot.real2sim.sim_dataset import identify_label, identify_labels
        from metarl_robot.spec.family import load_family

        config = IdentifyConfig(restarts=args.identify_restarts, iterations=args.identify_iterations,
                                population=args.identify_population, seed=args.seed)
        noise_std, backend = parse_noise_std(args.noise_std), _backend(args)
        if backend.in_process:  # one log at a time as the build reads it (--verbose reports each as it goes)
            identifier = partial(identify_label, config=config, noise_std=noise_std)
        else:  # every log's identification as a job, up front: the same labels
            identifier = identify_labels(args.logs, load_family(args.family), mode=args.label, config=config,
                                         noise_std=noise_std, backend=backend, progress=True)
    dataset = build_dataset(args.logs, args.family, robot=args.robot, label=args.label, identifier=identifier,
                            keep=args.keep, min_transitions=args.min_transitions, progress=progress)
    return _dataset_output(args, dataset)


def _add_dataset_parser(sub: argparse._SubParsersAction) -> None:
    """``metarl dataset {build,collect,info}``. The label modes and flags are named in the help, not imported: --help
    loads nothing (tests/replay/test_dataset.py checks the help names every one)."""
    p = sub.add_parser("dataset", help="offline datasets from episode logs and sim rollouts (ours + Minari)",
                       description="Build multi-task offline-RL datasets: flat transitions (observations, actions, "
                       "rewards from the family's reward, next observations, terminations, truncations) with episode "
                       "boundaries and each episode's task label and provenance, written as our format (OUT/"
                       "dataset.npz + OUT/dataset.json) and as a Minari dataset, which offline-RL tools read. "
                       "'build' reads episode logs (the node's, sim recordings; CSV, NPZ and rosbag2 recordings go "
                       "through 'metarl import-log' first), 'collect' runs a policy on tasks of a family in sim and "
                       "builds from its logs, 'info' prints a dataset's contents and report. Nothing is dropped "
                       "silently: every log is kept (perhaps flagged) or excluded with its reason, and the report "
                       "counts the transitions not kept by reason. See docs/datasets.md.")
    p.set_defaults(func=_cmd_dataset, dataset_parser=p)
    dsub = p.add_subparsers(dest="dataset_command", metavar="{build,collect,info}")

    def outputs(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", required=True, help="dataset folder to write (dataset.npz, dataset.json)")
        q.add_argument("--overwrite", action="store_true", help="replace a dataset in --out and the Minari dataset "
                       "of the same id")
        q.add_argument("--minari-id", metavar="ID", help="Minari dataset id, namespace/name-v<N> (default: "
                       "metarl/<family>-<policy>-v0, e.g. metarl/cartpole_swingup-random-v0; 'mixed' for several "
                       "policies)")
        q.add_argument("--minari-dir", metavar="DIR", help="root folder of Minari datasets (default: "
                       "$MINARI_DATASETS_PATH, else ~/.minari/datasets)")
        q.add_argument("--no-minari", action="store_true", help="write our format only (no minari needed)")
        q.add_argument("--verbose", action="store_true", help="a line per log")

    q = dsub.add_parser("build", help="a dataset from episode logs",
                        description="Read episode logs (MCAP, docs/episode_log.md; folders give their *.mcap) of one "
                        "robot, keep the transitions that are what they claim (the adapter's command went out and "
                        "ran, the next frame is the next one, one control period later, all finite), cut episodes at "
                        "the others, label each log's task, compute rewards with the family's reward and write the "
                        "dataset and its report. A log of another robot is an error naming both. Foreign recordings "
                        "(CSV, NPZ, rosbag2): convert them with 'metarl import-log' first.")
    q.add_argument("logs", nargs="+", help="episode logs (.mcap) or folders of them")
    q.add_argument("--family", required=True, help="task family of the labels and rewards, e.g. cartpole_swingup")
    q.add_argument("--robot", help="robot the logs must be of: a name or robot.yaml path (default: the first log's)")
    q.add_argument("--label", default="sim", help="task labels: sim (the task the log recorded, known in sim and "
                   "on the twin; logs without one are excluded, flag no_task), identify (identification from the "
                   "log, metarl identify; a log the family does not explain is excluded, flag not_explained), "
                   "unknown (NaN labels; rewards from the reward parameters the node logged), auto (sim where the "
                   "log recorded a task, identify elsewhere) (default: sim)")
    q.add_argument("--keep", action="append", default=[], metavar="FLAG", help="keep the logs with this flag "
                   "(flagged) instead of excluding them, repeatable: no_task (as unknown), not_explained, "
                   "no_reward_params (rewards NaN)")
    q.add_argument("--min-transitions", type=int, default=1, metavar="N",
                   help="shortest run of usable transitions kept as an episode (default: 1)")
    q.add_argument("--noise-std", action="append", metavar="STD|FIELD=STD", help="identification: the sensor noise "
                   "its fit is tested against, as metarl identify --noise-std (default: robot.yaml's)")
    q.add_argument("--identify-restarts", type=int, metavar="N", default=3,
                   help="identification: CEM restarts (default: 3)")
    q.add_argument("--identify-iterations", type=int, metavar="N", default=20,
                   help="identification: CEM iterations per restart (default: 20)")
    q.add_argument("--identify-population", type=int, metavar="N", default=48,
                   help="identification: candidates per iteration (default: 48)")
    q.add_argument("--seed", type=int, default=0, help="identification's seed (default: 0)")
    _add_backend_args(q, "identification (labels identify and auto), one log per job,")
    outputs(q)

    q = dsub.add_parser("collect", help="a dataset of sim rollouts: a policy on tasks of a family",
                        description="Draw TASKS tasks from a family's split with SEED, run the policy EPISODES "
                        "episodes on each in MuJoCo (one adapter per task through its episodes, reset at each start "
                        "as the ROS 2 node does), write every episode as an episode log with its true task "
                        "(OUT/logs by default) and build the dataset from them (labels: sim). The same arguments "
                        "give the same dataset.")
    q.add_argument("--policy", required=True, help="'random' (uniform random commands within the robot's limits) "
                   "or a bundle folder, e.g. policies/cartpole_mb")
    q.add_argument("--family", help="task family (default: the bundle's; required with --policy random)")
    q.add_argument("--split", choices=["train", "test"], default="train", help="task split (default: train)")
    q.add_argument("--tasks", type=int, default=4, help="tasks drawn (default: 4)")
    q.add_argument("--episodes", type=int, default=2, help="episodes per task (default: 2)")
    q.add_argument("--steps", type=int, help="control steps per episode (default: the family's episode length)")
    q.add_argument("--seed", type=int, default=0, help="seed of the tasks, initial states and policies (default: 0)")
    q.add_argument("--no-adapt", action="store_true", help="the bundle's adaptation off")
    q.add_argument("--logs", metavar="DIR", help="where the episode logs go (default: OUT/logs; must hold none)")
    _add_backend_args(q, "the tasks' episodes, one task per job (the cluster's workers write into --logs: a shared "
                      "filesystem),")
    outputs(q)

    q = dsub.add_parser("info", help="what a dataset holds, and its report",
                        description="Load a dataset folder (checking it) and print its episodes, tasks, labels, "
                        "policies, returns and the build report (kept, flagged and excluded logs).")
    q.add_argument("folder", help="dataset folder (dataset.npz + dataset.json)")
    q.add_argument("--json", action="store_true", help="print the report's totals as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metarl",
        description="metarl-robot: meta-RL from MuJoCo simulation to ROS 2 hardware.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("families", help="list the task families and their parameter boxes",
                       description="Print each task family: robot, gymnasium id, episode length, and every "
                       "parameter with its kind, nominal value, allowed range, train/test ranges and sampling.")
    p.add_argument("name", nargs="?", help="one family (default: all in sim/tasks)")
    p.set_defaults(func=_cmd_families)

    p = sub.add_parser("robot", help="check a robot.yaml against its MJCF and print its interface",
                       description="Load sim/robots/<name>/robot.yaml (or a path), check it against the MJCF "
                       "(names, sizes, limits, timestep) and print the observation/action layout and the "
                       "interface hash. Exits non-zero with the offending field on any mismatch.")
    p.add_argument("name", help="robot name (cartpole, half_cheetah, ant) or path to a robot.yaml")
    p.set_defaults(func=_cmd_robot)

    p = sub.add_parser("tasks", help="sample tasks or build an evaluation grid from a family",
                       description="Draw tasks from a split with the family's sampling rules, or build a "
                       "k-points-per-axis grid; each task is marked OOD when outside the training box.")
    p.add_argument("family", help="family name or path to a family YAML")
    p.add_argument("--split", choices=["train", "test"], default="train", help="which ranges (default: train)")
    p.add_argument("--sample", type=int, default=5, metavar="N", help="number of tasks to draw (default: 5)")
    p.add_argument("--grid", type=int, metavar="K", help="instead of sampling, K points per axis")
    p.add_argument("--params", help="with --grid: comma-separated parameters to vary (others stay nominal)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_tasks)

    p = sub.add_parser("rollout", help="collect random-policy episodes on sampled tasks (vectorised)",
                       description="Sample tasks from a family, run full episodes with uniform random actions "
                       "on a gymnasium vector env (one task per sub-env) and print the return per task. "
                       "The same --seed gives the same trajectories in sync and async mode.")
    p.add_argument("family", help="family name or path to a family YAML")
    p.add_argument("--split", choices=["train", "test"], default="train", help="task split (default: train)")
    p.add_argument("--tasks", type=int, default=4, help="number of tasks (default: 4)")
    p.add_argument("--episodes", type=int, default=1, help="episodes per task (default: 1)")
    p.add_argument("--num-envs", type=int, default=2, help="parallel sub-envs (default: 2)")
    p.add_argument("--vector", choices=["sync", "async"], default="async",
                   help="sync: one process; async: one process per sub-env (default: async)")
    p.add_argument("--seed", type=int, default=0, help="seed for tasks, resets and actions (default: 0)")
    p.add_argument("--out", help="write transitions to this .npz (one file per batch of num-envs tasks)")
    p.set_defaults(func=_cmd_rollout)

    p = sub.add_parser("train", help="meta-train an adaptive controller from a run config",
                       description="Meta-train over a task family as the config says (configs/*.yaml). algo "
                       "context_mbrl: random data, then iterations of MPC data collection on new tasks and model "
                       "refits (docs/model_based.md). algo online_mbrl: the same loop with a model whose last layer "
                       "is meta-trained to be fitted online, in closed form, to the robot's own transitions "
                       "(docs/online.md). algo mbmpo: context_mbrl's data and model, and a policy meta-learned in the "
                       "model's imagination so that one policy-gradient step on an episode adapts it; real data is "
                       "one episode of it and one after that step, per task (docs/mbmpo.md). algo pearl: iterations "
                       "of exploration rounds on new tasks and SAC updates of a context-conditioned policy "
                       "(docs/pearl.md). algo macaw: offline, no env: a value function and a policy meta-trained "
                       "with MAML on the config's dataset (metarl dataset) so that a few advantage-weighted "
                       "regression steps on a new task's trajectories adapt them (docs/macaw.md). Writes the run "
                       "folder: resolved config, metrics.csv, tasks.jsonl, TensorBoard events, versioned checkpoints, "
                       "the data (buffer.npz or replay.npz; macaw: dataset_ref.json). Resume an interrupted run with "
                       "--resume <run folder>.")
    p.add_argument("config", nargs="?", help="run config YAML, e.g. configs/mb_cartpole_swingup.yaml, "
                   "configs/online_cartpole_swingup.yaml, configs/mbmpo_cartpole_swingup.yaml, "
                   "configs/pearl_cartpole_swingup.yaml or configs/macaw_cartpole_swingup.yaml")
    p.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--name", help="run folder name (default: <algo>_<family>_s<seed>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this folder from its latest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set loop.iterations=3 --set planner.samples=64")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="one run per seed (folders <name>_s<seed>), "
                   "each a job: in parallel with --backend ray")
    _add_backend_args(p, "the seeds' runs (--seeds), else the adversary's oracle episodes (one task per job)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="grade a bundle or run on test tasks against an oracle",
                       description="Run the adaptive controller in MuJoCo on held-out and out-of-distribution "
                       "tasks, with adaptation on and off, and the same planner through the true physics "
                       "(oracle). Every episode starts from the state a reset with --seed gives. Reports returns, "
                       "the gap to the oracle (worst case and mean), success, and one-step prediction error "
                       "against time since reset; writes eval.json and PNG plots. A PEARL run or checkpoint, or a "
                       "context_policy bundle (run by its robot-side adapter), is graded by returns after 0, 1 and 2 "
                       "exploration episodes per task (belief kept across them), each with its gap to the oracle "
                       "(docs/pearl.md); an MB-MPO meta_policy after 0, K and 2K episodes (docs/mbmpo.md), a MACAW "
                       "awr_policy after 0, 1, 3 and 5 episodes or, with --adapt-from, after adapting on that many "
                       "logged episodes of the task (docs/macaw.md).")
    p.add_argument("source", help="bundle folder (bundle.yaml), run folder (checkpoints/latest.pt) or a checkpoint "
                   "file (e.g. RUN/checkpoints/ckpt_0005.pt, for a learning curve)")
    p.add_argument("--family", help="family to evaluate on (default: the controller's own)")
    p.add_argument("--split", choices=["train", "test"], default="test", help="task split (default: test)")
    p.add_argument("--tasks", type=int, default=8, help="tasks drawn from the split (default: 8)")
    p.add_argument("--grid", type=int, metavar="K", help="instead of drawing, K points per axis of the split; "
                   "reports the worst-case and mean gap and writes a gap heat map per pair of varied parameters")
    p.add_argument("--params", help="with --grid: comma-separated parameters to vary (others nominal)")
    p.add_argument("--task-file", metavar="FILE", help="instead of drawing, the one task in FILE (a mapping of "
                   "parameters, or the task.yaml of metarl identify: the episode reproduced in sim)")
    p.add_argument("--seed", type=int, default=0, help="seed for tasks, resets and planner noise (default: 0)")
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle (much faster; no gap)")
    p.add_argument("--no-unadapted", action="store_true", help="skip the unadapted (empty-context) episodes "
                   "(model-based only)")
    p.add_argument("--oracle-cache", metavar="FILE", help="JSON file of oracle returns reused across evaluations "
                   "with the same family, planner and seed (created if missing): the oracle runs once per task")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a planner setting, e.g. --set samples=64 --set horizon=30 (for PEARL, MB-MPO and "
                   "MACAW: the oracle's planner); for MB-MPO also --set episodes_per_step=K (episodes pooled per "
                   "inner step), for MACAW --set adapt_episodes=K (its last K episodes, 1 to 5, one adaptation reads)")
    p.add_argument("--effect", action="append", default=[], metavar="KIND=VALUE", help=EFFECT_HELP + "; every "
                   "episode (adapted, unadapted, oracle) runs with them, and eval.json records them")
    p.add_argument("--effects", metavar="FILE", help=EFFECTS_FILE_HELP)
    p.add_argument("--adapt-from", metavar="DATASET", help="MACAW (awr_policy) only: adapt from logged episodes of "
                   "each task in this dataset (metarl dataset collect/build; e.g. another controller's logs on the "
                   "same tasks) instead of the controller's own: returns after adapting on the first 1, 3 and 5 "
                   "logged episodes of the task (MACAW's meta-test, docs/macaw.md)")
    p.add_argument("--out", default="runs/eval", help="output folder (default: runs/eval)")
    p.add_argument("--tasks-per-job", type=int, metavar="N", help="the controller's episodes in jobs of N tasks "
                   "(default: all tasks in one job); the tasks of a job share the planner's noise draws, so N is part "
                   "of what decides the returns (eval.json records it), the backend is not")
    _add_backend_args(p, "the jobs of --tasks-per-job tasks and the oracle's episodes (one task per job)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="export a training run as a robot bundle (bundle.yaml + ONNX graphs)",
                       description="Export a run's graphs to ONNX (normalisers baked in), check them (onnx full "
                       "check; torch vs onnxruntime parity on random and real inputs) and write bundle.yaml with the "
                       "robot spec, layouts, adaptation settings, provenance and the sha256 of every file. The run's "
                       "algorithm picks the kind: a context_mbrl run becomes a model_based bundle (encoder, dynamics "
                       "ensemble, the ensemble chained over the planner's horizon; planner defaults), a pearl run a "
                       "context_policy bundle (per-transition belief factors, z-conditioned policy); --kind "
                       "unadapted makes a context_mbrl run the non-adaptive baseline (the same ensemble with the "
                       "empty-window context frozen into the manifest, no encoder). See docs/bundle_format.md.")
    p.add_argument("run_dir", help="run folder (with checkpoints/)")
    p.add_argument("--out", required=True, help="bundle folder to create, e.g. policies/cartpole_mb")
    p.add_argument("--checkpoint", default="latest", help="'latest' or an iteration number (default: latest)")
    p.add_argument("--name", help="bundle name (default: the output folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
                   help="torch ONNX exporter (default: auto = TorchScript, dynamo if that fails; pearl runs: "
                   "TorchScript only)")
    p.add_argument("--kind", help="bundle kind to write, one the run's algorithm exports (context_mbrl: model_based, "
                   "unadapted; pearl: context_policy); default: the algorithm's own (model_based / context_policy)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a deployment setting the bundle records instead of the run's, where its kind has any: "
                   "meta_policy (mbmpo runs) takes episodes_per_step=K (the robot's inner step pools K episodes)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="the whole chain on the cart-pole family: train, ROS 2 node vs twin, replay, "
                       "identify",
                       description="Train a bundle with a tiny budget and export it (or use the shipped "
                       "policies/cartpole_online with --skip-train), show open-loop how an out-of-distribution task "
                       "changes the motion, colcon-build ros2_ws, start the digital twin (metarl sim-robot) on a "
                       "held-out OOD task with out-of-family effects (physics no family parameter models), run the "
                       "installed ROS 2 adapt_node against it over ZeroMQ for one logged episode, run it again "
                       "with the node's adaptation off and print both, replay the adapted episode's log into a "
                       "report and identify the twin's hidden parameters from it. Writes everything (logs, report, "
                       "plots, task.yaml, demo_summary.json) to --out.")
    from metarl_robot.demo import DEMO_EFFECTS

    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--skip-train", action="store_true",
                   help="use the shipped bundle policies/cartpole_online instead of training one (a tiny "
                   "training budget checks the pipeline but does not learn a swing-up)")
    p.add_argument("--bundle", metavar="PATH", help="run this bundle of the cart-pole family instead of training "
                   "one, of any kind (model_based, online_model, context_policy, unadapted); its kind picks the "
                   "node's adapter, as bundle:=PATH does on a robot")
    p.add_argument("--episode-steps", type=int, default=250,
                   help="control steps of the node's episode against the twin (default: 250 = 10 s)")
    p.add_argument("--speed", type=float, default=0.5,
                   help="twin speed, robot seconds per wall second (default: 0.5, room for a slow CPU)")
    effects = p.add_mutually_exclusive_group()
    effects.add_argument("--effect", action="append", metavar="KIND=VALUE",
                         help="the twin's out-of-family effects instead of the default ones (repeatable; as "
                         "metarl sim-robot --effect; default: " + " ".join(DEMO_EFFECTS) + ")")
    effects.add_argument("--no-effects", action="store_true", help="the twin without out-of-family effects")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("sim-robot", help="run a MuJoCo digital twin of a robot behind the ZeroMQ telemetry protocol",
                       description="Simulate one task of a family in real time (or --speed times real time) and "
                       "talk to a controller exactly as the hardware would (docs/telemetry.md): handshake, state "
                       "frames each control period, commands in, and a robot-side watchdog that applies the safe "
                       "command of robot.yaml when no fresh valid command arrives. The task stays hidden from the "
                       "controller. Faults can be injected for tests, and out-of-family effects (--effect, "
                       "--effects) make the simulated robot differ from every task of its family. Prints a JSON "
                       "'ready' line with the bound endpoints, and on exit (--duration, Ctrl-C, SIGTERM) a 'done' "
                       "line and the --summary file.")
    p.add_argument("--robot", default="cartpole", help="robot name (default: cartpole)")
    p.add_argument("--task", default="nominal",
                   help="params YAML/JSON file, inline JSON, 'nominal', a split 'train'/'test', or 'family:split' "
                   "(drawn with --seed) (default: nominal)")
    p.add_argument("--family", help="task family (default: the robot's only family)")
    p.add_argument("--speed", type=float, default=1.0, help="robot seconds per wall second (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for the task draw, initial state, faults (default: 0)")
    p.add_argument("--watchdog-ms", type=float,
                   help="no fresh valid command for this long (robot clock) -> safe command (default: 5 periods)")
    p.add_argument("--fault", action="append", default=[], metavar="KIND=VALUE",
                   help="inject telemetry faults (repeatable): drop=P, burst=START:DUR, freeze=START:DUR, "
                   "delay=MS, corrupt=P, nan=P, oversize=P, stop=S (times in robot seconds)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind with --port-base (default: 127.0.0.1; "
                   "0.0.0.0 for all interfaces, which needs --curve-keys or --insecure)")
    p.add_argument("--port-base", type=int, help="state=N, command=N+1, handshake=N+2; 0 = free ports "
                   "(default: 47100)")
    p.add_argument("--endpoints", help="explicit 'state=URL,command=URL,handshake=URL' (tcp:// or ipc://)")
    p.add_argument("--duration", type=float, help="stop after this many robot seconds (default: run until stopped)")
    p.add_argument("--apply-at-boundary", action="store_true",
                   help="apply the newest command at each period boundary (one period of delay) instead of as "
                   "soon as it answers the newest state")
    p.add_argument("--curve-keys", metavar="DIR", help="enable CURVE: DIR/robot.key_secret and "
                   "DIR/authorized_clients/ (python -m metarl_robot.telemetry.keys DIR)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain (no CURVE) endpoints that other machines can reach, e.g. --host 0.0.0.0: "
                   "unencrypted, and anyone who reaches them can command the twin. Without it such endpoints are "
                   "refused unless --curve-keys is given; loopback (127.0.0.1, ::1, localhost) and ipc:// never need "
                   "it (docs/telemetry.md, CURVE)")
    p.add_argument("--summary", help="write the run summary JSON here on exit")
    p.add_argument("--trace", help="write the per-period trace (.npz) here on exit")
    p.add_argument("--effect", action="append", default=[], metavar="KIND=VALUE", help=EFFECT_HELP + "; the summary "
                   "records them")
    p.add_argument("--effects", metavar="FILE", help=EFFECTS_FILE_HELP)
    p.set_defaults(func=_cmd_sim_robot)

    p = sub.add_parser("keys", help="generate CURVE keys for an encrypted, authenticated telemetry link",
                       description="Generate CURVE key pairs for the robot and the controller of a telemetry link "
                       "and authorise the controller: the robot keeps robot.key_secret and authorized_clients/, the "
                       "controller keeps controller.key_secret and robot.key. Use it for any link that leaves the "
                       "machine. See docs/telemetry.md (CURVE).")
    p.add_argument("dir", help="folder to write the keys into (created if missing)")
    p.add_argument("--force", action="store_true", help="replace existing keys (every peer then needs the new ones)")
    p.set_defaults(func=_cmd_keys)

    p = sub.add_parser("calibrate-safety", help="calibrate a bundle's prediction-error threshold for the safety layer",
                       description="Run the bundle's adapter in MuJoCo on tasks of its training range, record every "
                       "step's prediction error, and set the safety layer's prediction_error_threshold to MARGIN x "
                       "the QUANTILE of the level the error holds for STEPS periods in a row; then count how often "
                       "it would trip on held-out (by default out-of-distribution) episodes. Writes "
                       "safety_params.yaml for the ROS 2 node and safety_calibration.json. See docs/safety.md.")
    p.add_argument("bundle", help="bundle folder, e.g. policies/cartpole_mb")
    p.add_argument("--out", default="runs/safety", help="output folder (default: runs/safety)")
    p.add_argument("--episodes", type=int, default=8, help="calibration episodes (default: 8)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="calibration tasks (default: train)")
    p.add_argument("--check-episodes", type=int, default=8, help="held-out check episodes (default: 8)")
    p.add_argument("--check-split", default="test", choices=["train", "test"],
                   help="held-out check tasks (default: test)")
    p.add_argument("--steps", type=int, help="periods in a row above the threshold that trip the fallback "
                   "(default: the safety layer's prediction_error_steps)")
    p.add_argument("--quantile", type=float, default=0.99, help="quantile in [0.5, 1) (default: 0.99)")
    p.add_argument("--margin", type=float, default=2.0, help="multiplier in [1, 100] (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_calibrate_safety)

    p = sub.add_parser("retrain", help="from hardware logs back to training: identify, re-centre the family, "
                       "fine-tune, re-export, compare", description="Identify every log (metarl identify, with the "
                       "sensor noise from robot.yaml or --noise-std), write a task family centred on what was found "
                       "(each train range the estimates +- WIDEN x their 95 %% half-intervals, the delay found as an "
                       "action delay), fine-tune the bundle's run on it for ITERATIONS iterations from its latest "
                       "weights and data, export the new bundle, and evaluate the old and the new bundle in sim on "
                       "the identified tasks. Writes OUT/<family>_identified.yaml, OUT/run, OUT/bundle, OUT/eval_old, "
                       "OUT/eval_new and OUT/retrain.json. See docs/retrain.md.")
    p.add_argument("episodes", nargs="+", help="episode log(s) (.mcap) of the robot running the bundle")
    p.add_argument("--run", required=True, help="the run folder the bundle was exported from (metarl train's)")
    p.add_argument("--bundle", required=True, help="the bundle the logs ran, e.g. policies/cartpole_online")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--iterations", type=int, default=5, help="fine-tuning iterations (default: 5)")
    p.add_argument("--random-episodes", type=int, default=4,
                   help="random-action episodes of the first fine-tuning iteration (default: 4)")
    p.add_argument("--widen", type=float, default=2.0,
                   help="train range = estimate +- WIDEN x its 95%% half-interval (default: 2)")
    p.add_argument("--noise-std", action="append", metavar="STD|FIELD=STD", help="as metarl identify --noise-std")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the sim comparison of the old and the new bundle (OUT/eval_*; grade it yourself)")
    p.set_defaults(func=_cmd_retrain)

    p = sub.add_parser("calibrate-noise", help="each sensor's noise from a log of the robot at rest (robot.yaml "
                       "noise_std)", description="Read an episode log of the robot standing still (motors at their "
                       "safe command; the node's, or one brought in with metarl import-log) and print each "
                       "observation field's sensor noise standard deviation in its units, as the noise_std lines to "
                       "put under the fields of robot.yaml. metarl identify tests its fits against them. A field that "
                       "moves during the log is refused, named. See docs/robot_spec.md.")
    p.add_argument("episode", help="episode log (.mcap) of the robot at rest, at least 50 frames")
    p.set_defaults(func=_cmd_calibrate_noise)

    p = sub.add_parser("replay", help="shadow-replay logged episodes through a bundle and report what happened",
                       description="Feed each logged episode (MCAP, docs/episode_log.md) through the bundle's "
                       "adapter step by step exactly as the ROS 2 node did, and report: one-step and N-step "
                       "prediction error with adaptation on vs off against steps since reset, the inferred context "
                       "over time and when it settles, the bundle's actions vs the logged commands (the same bundle "
                       "must reproduce them; --candidate compares another bundle), and link health (loop period, "
                       "jitter, dropped frames, stale/safe periods, safety events). Writes report.md, PNG plots and "
                       "metrics.json to --out and prints a summary. See docs/replay.md.")
    p.add_argument("episodes", nargs="+", help="episode log(s) (.mcap) written by the node")
    p.add_argument("--bundle", required=True, help="bundle folder the episodes ran with, e.g. policies/cartpole_mb")
    p.add_argument("--candidate", help="another bundle folder: its actions on the same states vs the logged commands")
    p.add_argument("--out", default="runs/replay", help="report folder (default: runs/replay)")
    p.add_argument("--horizon", type=int, default=10, help="open-loop steps of the multi-step error (default: 10)")
    p.add_argument("--settle", type=float, default=10.0, metavar="PCT",
                   help="the context has settled once it stays within PCT%% of its final value (default: 10)")
    p.add_argument("--seed", type=int, help="planner seed (default: the one the log records, else 0)")
    p.add_argument("--calibration", metavar="JSON", help="the bundle's safety_calibration.json (metarl "
                   "calibrate-safety): each episode then gets a verdict, within the training distribution or outside "
                   "it and in which observation fields, from the log's own prediction errors")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("import-log", help="convert a hardware log (CSV, NPZ, rosbag2 MCAP) into an episode log",
                       description="Read a log not recorded by the metarl node -- CSV or NPZ columns, or a rosbag2 "
                       "MCAP file with sensor_msgs/JointState -- map it onto the robot.yaml observation and action "
                       "fields and write an episode log (MCAP) that metarl replay and metarl identify read. "
                       "Malformed input is an error naming the field; recoverable problems (NaN rows, duplicate "
                       "timestamps) are dropped with a warning and listed in OUT.import.json. See docs/log_import.md.")
    p.add_argument("file", help="the log to import (.csv, .npz, or a rosbag2 .mcap file or bag folder)")
    p.add_argument("--robot", required=True, help="robot name (sim/robots/<robot>/robot.yaml) or a robot.yaml path")
    p.add_argument("--mapping", help="column/topic mapping YAML (required for csv and npz; optional for rosbag2)")
    p.add_argument("--format", choices=["csv", "npz", "rosbag2"], help="input format (default: from the extension)")
    p.add_argument("--out", required=True, help="episode log to write (.mcap; must not exist)")
    p.set_defaults(func=_cmd_import_log)

    _add_dataset_parser(sub)

    p = sub.add_parser("identify", help="identify a family's dynamics parameters from a logged episode (real-to-sim)",
                       description="Replay the logged commands in MuJoCo from the logged states (multiple shooting: "
                       "reset to the log every WINDOW steps) and search the family's dynamics-parameter box with CEM "
                       "(several restarts, then a local refinement) for the physics that matches the log best. "
                       "Then tests the fit against the sensor noise (robot.yaml observation noise_std, or "
                       "--noise-std): EXPLAINED or NOT EXPLAINED by this family, with the p-value and the fields that "
                       "carry the misfit. Prints the parameters with standard errors and 95 % intervals (none when "
                       "the family does not explain the log), the parameters the data does not identify and those "
                       "on a face of the family's box; writes "
                       "OUT/task.yaml (for metarl sim-robot --task) and OUT/identify.json. See docs/identify.md.")
    p.add_argument("episode", help="episode log (.mcap) written by the node, metarl import-log or record_sim_episode")
    p.add_argument("--family", required=True, help="task family whose parameters to identify, e.g. cartpole_swingup")
    p.add_argument("--out", default="runs/identify", help="output folder (default: runs/identify)")
    p.add_argument("--restarts", type=int, default=3, help="independent CEM runs (default: 3)")
    p.add_argument("--iterations", type=int, default=20, help="CEM iterations per restart (default: 20)")
    p.add_argument("--population", type=int, default=48, help="candidates per iteration (default: 48)")
    p.add_argument("--window", type=int, default=5, help="control steps per shooting segment (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (default: 0)")
    p.add_argument("--max-delay", type=int, default=2, help="largest command-to-effect delay tried, in control "
                   "periods: the search runs once per delay and the closest fit's delay is the answer (default: 2)")
    p.add_argument("--delay", type=int, default=None, help="the delay in control periods, when known (only it is "
                   "tried)")
    p.add_argument("--noise-std", action="append", metavar="STD|FIELD=STD",
                   help="sensor noise the fit is tested against: one standard deviation in robot.yaml scale units "
                   "for every field (e.g. 0.01), or FIELD=STD in the field's units, once per observation field "
                   "(default: each field's noise_std in the log's robot.yaml, else the installed one's; without "
                   "it the fit is not tested)")
    p.set_defaults(func=_cmd_identify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from metarl_robot.backend import JobFailed, WorkerMismatch
    from metarl_robot.spec.schema import SpecError

    try:
        return args.func(args)
    except ModuleNotFoundError as exc:
        if (message := _missing_extra(args.command, exc)) is None:
            raise
        print(message, file=sys.stderr)
        return 2
    except (SpecError, FileNotFoundError, KeyError, ValueError, JobFailed, WorkerMismatch) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))  # e.g. which backend job failed
        print(f"metarl {args.command}: error: {message}{notes}", file=sys.stderr)
        return 2
    except OSError as exc:  # ours (a run folder that exists) or the system's: a read-only, full or missing folder
        message = exc if exc.errno is None else (f"{exc.filename}: {exc.strerror} (the output must go to a folder "
                                                 "that can be made, is writable and has space)")
        print(f"metarl {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
