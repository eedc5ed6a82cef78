"""The job backends: this process, and a real Ray cluster of two nodes (a head and a worker started with ``ray
start`` on loopback, one CPU each), whose results must equal this process's."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from metarl_robot.backend import (
    Job,
    JobFailed,
    LocalBackend,
    RayBackend,
    WorkerMismatch,
    _job_in_worker,
    make_backend,
    run_all,
)

pytestmark = pytest.mark.integration


AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
"""Token authentication, as a cluster of machines should run (docs/scale_out.md): the nodes, this process and the
commands the tests start all hold the cluster's token. Explicit, because Ray's default depends on whether
~/.ray/auth_token exists (a local ray.init() writes one) and its ``ray status`` ignores that file."""
_SAVED: dict[str, str | None] = {}


def setup_module() -> None:
    """Before Ray is imported here (it reads its authentication settings once): the token. And the job functions
    below travel by value: the cluster's workers cannot import this test module."""
    _SAVED.update({key: os.environ.get(key) for key in AUTH})
    os.environ.update(AUTH)
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def teardown_module() -> None:
    for key, value in _SAVED.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)

RAY = str(Path(sys.executable).parent / "ray")
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_node(*args: str, tmp: Path, name: str) -> subprocess.Popen:
    """``ray start --block``: the node lives as long as this process (its session ends every Ray process it made)."""
    log = (tmp / f"{name}.log").open("w")
    return subprocess.Popen([RAY, "start", "--block", "--num-cpus=1", "--object-store-memory=100000000",
                             "--disable-usage-stats", f"--dashboard-agent-listen-port={_free_port()}", *args],
                            stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head and a worker node on this machine, 1 CPU each; yields the head's address; this process is connected."""
    import ray

    tmp = tmp_path_factory.mktemp("ray")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    assert os.environ.get("RAY_AUTH_TOKEN") == AUTH["RAY_AUTH_TOKEN"], "setup_module sets the cluster's token"
    nodes = [_ray_node("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
                       f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
                       f"--temp-dir={tmp / 'session'}", tmp=tmp, name="head")]
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, timeout=30).returncode:
            assert nodes[0].poll() is None, (tmp / "head.log").read_text()
            assert time.monotonic() < deadline, "the Ray head did not come up in 60 s"
            time.sleep(0.5)
        nodes.append(_ray_node(f"--address={address}", "--node-ip-address=127.0.0.1", tmp=tmp, name="worker"))
        backend = RayBackend(address)
        while ray.cluster_resources().get("CPU", 0) < 2:  # the worker node joined
            assert nodes[1].poll() is None, (tmp / "worker.log").read_text()
            assert time.monotonic() < deadline, "the Ray worker node did not join in 60 s"
            time.sleep(0.5)
        yield address, backend, tmp
    finally:
        ray.shutdown()
        for node in reversed(nodes):  # each node's processes are its session's group; SIGTERM takes ~30 s, so KILL
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(30)


def _square_with_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def _square_with_node(x: int) -> tuple[int, str]:
    import ray

    time.sleep(0.3)  # long enough that both nodes' single CPUs are needed at once
    return x * x, ray.get_runtime_context().get_node_id()


def _dies_once(marker: str, value: int) -> int:
    """Kills its worker process the first time (a crash, not an exception), succeeds when retried."""
    if not os.path.exists(marker):
        Path(marker).write_text("died once")
        os._exit(1)
    return value


def _always_dies(value: int) -> int:
    os._exit(1)


def _bad_input(value: int) -> int:
    raise ValueError(f"value {value} is not allowed")


def test_ray_runs_jobs_on_both_nodes_and_returns_them_in_order(cluster) -> None:
    _, backend, _ = cluster
    jobs = [Job(f"square {i}", (i,)) for i in range(6)]
    remote = run_all(backend, _square_with_node, jobs)
    assert [r[0] for r in remote] == [r[0] for r in run_all(LocalBackend(), _square_with_pid, jobs)] == \
        [i * i for i in range(6)]
    assert len({r[1] for r in remote}) == 2, "the jobs did not run on both nodes"
    assert backend.describe()["cluster_cpus"] == 2.0


def test_a_jobs_own_error_is_raised_with_the_job_named(cluster) -> None:
    _, backend, _ = cluster
    for where in (LocalBackend(), backend):
        with pytest.raises(ValueError, match="value 3 is not allowed") as info:
            run_all(where, _bad_input, [Job("check 3", (3,))])
        assert any("check 3" in note for note in info.value.__notes__)


def test_a_dead_worker_is_retried_and_one_that_always_dies_is_reported(cluster, tmp_path: Path) -> None:
    _, backend, _ = cluster
    assert run_all(backend, _dies_once, [Job("flaky", (str(tmp_path / "marker"), 7))]) == [7]
    assert (tmp_path / "marker").is_file()  # it did die once
    with pytest.raises(JobFailed, match="the doomed job: its worker died on all 3 attempt"):
        run_all(backend, _always_dies, [Job("the doomed job", (1,))])


def test_a_worker_with_other_code_is_refused() -> None:
    with pytest.raises(WorkerMismatch, match="runs other metarl-robot code or sim data"):
        _job_in_worker(_square_with_pid, (2,), "0" * 64, os.getcwd())


def test_backend_choices_are_checked() -> None:
    with pytest.raises(ValueError, match="allowed: local, ray"):
        make_backend("dask")
    with pytest.raises(ValueError, match="for --backend ray"):
        make_backend("local", workers=2)
    with pytest.raises(ValueError, match="--workers sizes a Ray started on this machine"):
        RayBackend("127.0.0.1:1", workers=2)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metarl_robot.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env=env)


def test_eval_on_the_cluster_equals_eval_in_this_process(cluster, tmp_path: Path) -> None:
    """``metarl eval`` of a shipped bundle, controller jobs of 2 tasks and one oracle episode per job: every return,
    gap and prediction error the same on the two-node cluster as locally."""
    address, _, _ = cluster
    common = ["eval", "policies/cartpole_mb", "--tasks", "3", "--tasks-per-job", "2", "--set", "samples=16",
              "--set", "horizon=6", "--no-unadapted"]
    reports = {}
    for name, extra in (("local", []), ("ray", ["--backend", "ray", "--ray-address", address])):
        done = _cli(*common, "--out", str(tmp_path / name), *extra)
        assert done.returncode == 0, done.stderr
        reports[name] = json.loads((tmp_path / name / "eval.json").read_text())
    local, remote = reports["local"], reports["ray"]
    assert remote["jobs"]["backend"] == "ray" and local["jobs"]["backend"] == "local"
    assert local["jobs"]["tasks_per_job"] == remote["jobs"]["tasks_per_job"] == 2
    assert local["tasks"] == remote["tasks"]  # returns, gaps, successes, prediction errors: exactly
    assert local["prediction_error_by_task"] == remote["prediction_error_by_task"]
    assert np.isfinite([t["gap"] for t in local["tasks"]]).all()


def test_seeds_and_adversary_grading_on_the_cluster_train_like_this_process(cluster, tmp_path: Path) -> None:
    """``metarl train --seeds 0 1`` as Ray jobs writes the same adversarial runs (tasks chosen, oracle returns,
    metrics) as one run per seed: seed 0's with the adversary's oracle episodes on the cluster, seed 1's here."""
    address, _, _ = cluster
    ray = ["--backend", "ray", "--ray-address", address]
    tiny = ["--set", "loop.iterations=2", "--set", "loop.random_episodes=2", "--set", "loop.tasks_per_iteration=2",
            "--set", "loop.task_sampler=adversarial", "--set", "loop.adversary.population=3",
            "--set", "planner.samples=16", "--set", "planner.horizon=5", "--set", "training.grad_steps=5"]
    done = _cli("train", "configs/mb_cartpole_swingup.yaml", "--seeds", "0", "1", "--name", "tiny",
                "--out", str(tmp_path / "seeds"), *ray, *tiny)
    assert done.returncode == 0, done.stderr
    for seed, where in ((0, ray), (1, [])):
        single = _cli("train", "configs/mb_cartpole_swingup.yaml", "--set", f"seed={seed}", "--name",
                      f"tiny_s{seed}", "--out", str(tmp_path / "single"), *where, *tiny)
        assert single.returncode == 0, single.stderr
        for name in ("tasks.jsonl", "metrics.csv", "oracle_returns.json"):
            mine = (tmp_path / "single" / f"tiny_s{seed}" / name).read_text()
            theirs = (tmp_path / "seeds" / f"tiny_s{seed}" / name).read_text()
            if name == "metrics.csv":  # wall-clock seconds differ; every learned figure must not
                mine, theirs = (_without_seconds(t) for t in (mine, theirs))
            assert mine == theirs, f"seed {seed}: {name} differs"
        assert "oracle_returns" in (tmp_path / "single" / f"tiny_s{seed}" / "tasks.jsonl").read_text()


def test_dataset_collection_and_identification_on_the_cluster_equal_this_process(cluster, tmp_path: Path) -> None:
    """``metarl dataset collect`` (one task per job, the workers writing the logs) and ``metarl dataset build
    --label identify`` (one log per job) on the two-node cluster: the same transitions, labels and fits as here."""
    from metarl_robot.replay.dataset import load_dataset

    address, _, _ = cluster
    ray = ["--backend", "ray", "--ray-address", address]
    identify = ["--label", "identify", "--identify-restarts", "1", "--identify-iterations", "3",
                "--identify-population", "16", "--noise-std", "0.05"]
    datasets = {}
    for name, where in (("local", []), ("ray", ray)):
        done = _cli("dataset", "collect", "--policy", "random", "--family", "cartpole_swingup", "--tasks", "3",
                    "--episodes", "2", "--steps", "20", "--seed", "4", "--no-minari", "--out",
                    str(tmp_path / name / "collected"), *where)
        assert done.returncode == 0, done.stderr
        done = _cli("dataset", "build", str(tmp_path / name / "collected" / "logs"), "--family", "cartpole_swingup",
                    *identify, "--no-minari", "--out", str(tmp_path / name / "identified"), *where)
        assert done.returncode == 0, done.stderr
        datasets[name] = [load_dataset(tmp_path / name / kind) for kind in ("collected", "identified")]
    assert sorted(p.name for p in (tmp_path / "ray" / "collected" / "logs").iterdir()) == \
        [f"task{i:03d}_ep{j:03d}.mcap" for i in range(3) for j in range(2)]
    for mine, theirs in zip(datasets["local"], datasets["ray"], strict=True):
        for array in ("observations", "actions", "rewards", "task_values", "episode_offsets"):
            np.testing.assert_array_equal(getattr(mine, array), getattr(theirs, array), err_msg=array)
        assert [(e.label_source, e.fit) for e in mine.episodes] == [(e.label_source, e.fit) for e in theirs.episodes]
    assert {e.label_source for e in datasets["ray"][1].episodes} == {"identify"}


def _without_seconds(csv_text: str) -> list[list[str]]:
    rows = [line.split(",") for line in csv_text.strip().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if "seconds" not in name]
    return [[row[i] for i in keep] for row in rows]


def test_a_missing_ray_is_named_with_the_extra_to_install(tmp_path: Path) -> None:
    """Without ray importable, --backend ray answers with the pip command (ray hidden by a shadowing module)."""
    (tmp_path / "ray.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = _cli("eval", "policies/cartpole_mb", "--tasks", "1", "--backend", "ray", "--out", str(tmp_path / "out"),
                env=env)
    assert done.returncode == 2
    assert 'pip install "metarl-robot[cluster]"' in done.stderr

