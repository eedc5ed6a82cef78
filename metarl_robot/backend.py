"""Where independent jobs run: in this process (``local``, the default) or as tasks on a Ray cluster (``ray``).

The sim-side tools fan work out through one interface, :meth:`Backend.run`: a function and a list of
:class:`Job` s in, each job's result out. A job carries everything that decides its result (tasks, reset seeds,
planner seed), so results are the same on either backend and with any number of workers; tests/test_backend.py
runs a real two-node Ray cluster on loopback against this process. What fans out (docs/scale_out.md): the oracle's
episodes (one task per job: ``metarl eval`` and the adversary's grading), ``metarl eval``'s controller episodes
(``--tasks-per-job``), training seeds (``metarl train --seeds``), ``metarl dataset collect``'s tasks and ``metarl
dataset build``'s identification of logs.

Failures are never silent. An exception raised by a job (bad input, a bug) is raised again here with a note naming
the job; a worker that dies (killed, out of memory, its machine gone) is retried ``max_retries`` times by Ray and
then reported as :class:`JobFailed` naming the job. Results completed before a failure have been yielded, so a
caller that stores as it goes (the oracle cache) keeps them. A worker running other code than the driver (another
checkout or version on one of the machines) is refused with both fingerprints in the message.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from metarl_robot.paths import sim_dir

BACKENDS = ("local", "ray")
"""Names accepted by ``--backend``."""

RAY_ADDRESS_ENV = "RAY_ADDRESS"
"""Where ``--backend ray`` finds the cluster when ``--ray-address`` is not given (Ray's own variable)."""


@dataclass(frozen=True)
class Job:
    """One independent piece of work: the function's arguments and what to call it in errors and progress."""

    label: str
    """What the job is, e.g. ``oracle episode of task {...} from reset seed 3``."""
    args: tuple[Any, ...]
    """Positional arguments of the function (picklable for ``ray``)."""
    cpus: float = 1.0
    """CPU cores the job uses (Ray schedules by them; e.g. the oracle's ``mujoco.rollout`` threads)."""


class JobFailed(RuntimeError):
    """A job whose worker died on every attempt; names the job."""

    def __init__(self, job: Job, attempts: int, cause: BaseException) -> None:
        super().__init__(f"{job.label}: its worker died on all {attempts} attempt(s) ({type(cause).__name__}: "
                         f"{cause}); no result for this job, the other jobs' results were kept")
        self.job, self.attempts = job, attempts


class WorkerMismatch(RuntimeError):
    """A worker runs other metarl-robot code or sim data than the driver: its results would not be the driver's."""


class Backend(Protocol):
    """Runs jobs; :meth:`run` yields ``(index, result)`` as each finishes (in any order)."""

    name: str
    """``local`` or ``ray``."""
    in_process: bool
    """Jobs run in this process: their arguments may hold live objects (a loaded bundle) instead of paths."""

    def run(self, fn: Callable[..., Any], jobs: Sequence[Job], desc: str = "jobs", progress: bool = False
            ) -> Iterator[tuple[int, Any]]: ...

    def describe(self) -> dict[str, Any]: ...


def run_all(backend: Backend, fn: Callable[..., Any], jobs: Sequence[Job], desc: str = "jobs",
            progress: bool = False) -> list[Any]:
    """Every job's result, in the order of ``jobs``."""
    out: list[Any] = [None] * len(jobs)
    for i, result in backend.run(fn, jobs, desc, progress):
        out[i] = result
    return out


def _with_job_note(exc: BaseException, job: Job, where: str) -> BaseException:
    exc.add_note(f"in job {job.label!r} ({where})")
    return exc


class LocalBackend:
    """Jobs one after another in this process: the default, and the reference the Ray backend is tested against."""

    name = "local"
    in_process = True

    def run(self, fn: Callable[..., Any], jobs: Sequence[Job], desc: str = "jobs", progress: bool = False
            ) -> Iterator[tuple[int, Any]]:
        for i, job in enumerate(jobs):
            try:
                result = fn(*job.args)
            except Exception as exc:
                raise _with_job_note(exc, job, "local backend") from None
            yield i, result

    def describe(self) -> dict[str, Any]:
        return {"backend": "local"}


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over this package's Python sources and the robot/task data it simulates (``sim/``): the same on every
    machine of a cluster that runs the same code on the same data."""
    digest = hashlib.sha256()
    roots = [(Path(__file__).resolve().parent, "*.py"), (sim_dir(), "*")]
    for root, pattern in roots:
        for path in sorted(p for p in root.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _job_in_worker(fn: Callable[..., Any], args: tuple[Any, ...], driver_fingerprint: str, driver_cwd: str) -> Any:
    """What a Ray worker runs: refuse other code than the driver's, then the job from the driver's working folder
    where the worker has it (this machine, or a shared filesystem mounted alike), so relative paths mean the same."""
    mine = code_fingerprint()
    if mine != driver_fingerprint:
        import socket

        raise WorkerMismatch(f"worker on {socket.gethostname()} runs other metarl-robot code or sim data "
                           f"(fingerprint {mine[:12]}) than the driver ({driver_fingerprint[:12]}); install the same "
                           "checkout on every machine of the cluster (docs/scale_out.md)")
    if os.path.isdir(driver_cwd):
        os.chdir(driver_cwd)
    return fn(*args)


class RayBackend:
    """Jobs as Ray tasks on a cluster: ``address`` (or ``$RAY_ADDRESS``) of a running one, else a Ray started in
    this process on this machine with ``workers`` CPU cores."""

    name = "ray"
    in_process = False

    def __init__(self, address: str | None = None, workers: int | None = None, max_retries: int = 2) -> None:
        import ray  # the cluster extra; the CLI turns its absence into the pip command
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.address = address or os.environ.get(RAY_ADDRESS_ENV) or None
        """The cluster's address (``host:port``), or None for a Ray of this process."""
        if self.address and workers is not None:
            raise ValueError("--workers sizes a Ray started on this machine; a running cluster (--ray-address or "
                             f"${RAY_ADDRESS_ENV}) has the workers its nodes were started with")
        if workers is not None and workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.max_retries = max_retries
        """Times Ray re-runs a job whose worker died (a job's own exception is never retried: it would recur)."""
        self._ray = ray
        started = time.perf_counter()
        if not ray.is_initialized():  # a Ray of this process passes its workers our sim data folder
            # "local": a new Ray of this process; without it ray.init joins the last cluster `ray start` began here
            ray.init(address=self.address or "local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, runtime_env=None if self.address else
                     {"env_vars": {"METARL_SIM_DIR": str(sim_dir())}})
        self.connect_seconds = time.perf_counter() - started
        """Seconds ``ray.init`` took (starting or joining the cluster)."""

    @property
    def cluster_cpus(self) -> float:
        """CPU cores the cluster offers now (its workers)."""
        return float(self._ray.cluster_resources().get("CPU", 0.0))

    def run(self, fn: Callable[..., Any], jobs: Sequence[Job], desc: str = "jobs", progress: bool = False
            ) -> Iterator[tuple[int, Any]]:
        ray = self._ray
        from tqdm.auto import tqdm

        remote = ray.remote(_job_in_worker)
        fingerprint, cwd = code_fingerprint(), os.getcwd()
        # A job asking for more cores than any machine has would wait forever (Ray only logs it as infeasible): it
        # asks for the largest machine's cores instead and runs its threads on them.
        largest = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]), default=1.0)
        pending = {remote.options(num_cpus=min(job.cpus, largest), name=job.label[:100], max_retries=self.max_retries,
                                  retry_exceptions=False).remote(fn, job.args, fingerprint, cwd): i
                   for i, job in enumerate(jobs)}
        bar = tqdm(total=len(jobs), desc=f"{desc} (ray)", unit="job", disable=None if progress else True)
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:  # the job raised: its own exception, named
                    raise _with_job_note(exc.as_instanceof_cause(), jobs[i], "ray backend") from None
                except ray.exceptions.RayError as exc:  # its worker died on every attempt
                    raise JobFailed(jobs[i], self.max_retries + 1, exc) from None
                bar.update(1)
                yield i, result
        finally:
            bar.close()
            for ref in pending:  # a failure, or a caller that stopped early: nothing keeps running unseen
                ray.cancel(ref, force=True)

    def describe(self) -> dict[str, Any]:
        return {"backend": "ray", "address": self.address or "local (started by this process)",
                "cluster_cpus": self.cluster_cpus, "max_retries": self.max_retries}


def make_backend(name: str = "local", address: str | None = None, workers: int | None = None) -> Backend:
    """The backend ``name`` (one of :data:`BACKENDS`); ``address``/``workers`` are Ray's (see :class:`RayBackend`)."""
    if name == "local":
        if address or workers is not None:
            raise ValueError("--ray-address and --workers are for --backend ray")
        return LocalBackend()
    if name == "ray":
        return RayBackend(address, workers)
    raise ValueError(f"--backend {name!r}: allowed: {', '.join(BACKENDS)}")
