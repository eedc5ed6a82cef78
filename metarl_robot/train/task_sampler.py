"""Which training tasks the learner sees next: uniform, Gaussian or adversarial (AdMRL).

Every sampler answers two questions per iteration, so the runner can treat them alike:

- :meth:`candidates`: which tasks the current learner runs one episode on;
- :meth:`select`: given each candidate's sub-optimality gap (when :attr:`needs_gap`), which of those
  episodes go into the training data.

Uniform and Gaussian samplers train on every candidate. The adversarial sampler runs the learner on a
population of candidate tasks, measures each one's gap (oracle return − the learner's return on that
very episode, both from the same initial state), trains on the worst ones and moves its search
distribution towards them (CEM over the family's train box). The episodes it grades are the episodes
it trains on, so an iteration collects the same number of *training* transitions under every sampler;
the extra episodes it grades and discards are counted separately (``adversary_env_steps``).
docs/admrl.md explains the method and its budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from metarl_robot.spec.family import ParamBox, Task, TaskFamily
from metarl_robot.spec.schema import SpecError
from metarl_robot.train.reward_adversary import RewardAdversaryConfig

SAMPLERS = ("uniform", "gaussian", "adversarial")
"""Names accepted by ``loop.task_sampler``."""


@dataclass
class GaussianSamplerConfig:
    """Tasks from a Gaussian around the centre of the train box (a baseline concentrated away from the edges)."""

    std: float = 0.2
    """Standard deviation in unit-box coordinates (each train range mapped to [0, 1], log-uniform
    parameters in log space); draws outside the box are redrawn, so edges are rare, not impossible."""


ADVERSARY_SEARCHES = ("replay", "cem")
"""Names accepted by ``loop.adversary.search``."""


@dataclass
class AdversaryConfig:
    """The gradient-free adversary over the train box, on the measured gap (docs/admrl.md)."""

    search: str = "replay"
    """``replay``: keep an archive of graded tasks and re-grade the worst (rank-prioritised, as in Prioritised
    Level Replay) next to fresh uniform draws, so several worst regions are tracked at once; ``cem``: one
    Gaussian refit to the worst candidates (finds a single worst region; collapses between two, see
    docs/BENCHMARKS.md)."""
    population: int = 8
    """Candidate tasks per iteration: each costs one learner episode and one oracle episode (>= the
    iteration's ``tasks_per_iteration``, the worst of which are trained on)."""
    elite_frac: float = 0.5
    """Fraction of the Gaussian's own candidates (by gap) its mean and std are refit to."""
    init_std: float = 0.3
    """Initial standard deviation in unit-box coordinates (the mean starts at the box centre)."""
    min_std: float = 0.1
    """Floor of the standard deviation: the search keeps looking around, since the worst task moves
    as the learner improves."""
    smoothing: float = 0.5
    """Weight of the new elite statistics in each refit (the rest stays with the previous Gaussian)."""
    uniform_fraction: float = 0.25
    """Share of the candidates drawn uniformly from the box instead of from the Gaussian (``cem``) or the
    archive (``replay``): finds worst tasks far from the current search and keeps the training data spread."""
    mutation_fraction: float = 0.5
    """``replay``: share of the archive picks perturbed (a new task near a bad one, graded from the iteration's
    start) instead of re-graded as they are: a local search towards worse tasks in every tracked region."""
    mutation_std: float = 0.15
    """``replay``: standard deviation of a perturbation in unit-box coordinates (clipped to the box)."""
    archive_size: int = 32
    """``replay``: graded tasks kept (the lowest gaps are dropped first)."""
    rank_temperature: float = 0.3
    """``replay``: a task of gap rank r is replayed with weight (1/r)^(1/temperature): small = greedier."""
    staleness_weight: float = 0.3
    """``replay``: share of the replay probability given by iterations since a task was last graded (its
    gap is out of date as the learner changes) instead of by its gap rank."""
    params: list[str] | None = None
    """Parameters the adversary chooses (default: all); the others are drawn uniformly."""
    oracle_threads: int = 1
    """Threads of the oracle's ``mujoco.rollout``."""
    reward_gradient: bool = False
    """Also ascend the gap's implicit gradient (AdMRL) over the reward parameters: after each iteration the
    worst candidate's reward parameters take ``gradient.steps`` projected steps and the result is one of the
    next iteration's candidates (graded like the others). Needs a family with reward parameters."""
    gradient: RewardAdversaryConfig = field(default_factory=RewardAdversaryConfig)
    """The reward-gradient steps and their estimator (docs/admrl.md)."""

    def validate(self, family: TaskFamily | None, tasks_per_iteration: int) -> None:
        """Raise ``ValueError`` naming the field and its allowed values."""
        if self.population < tasks_per_iteration:
            raise ValueError(f"loop.adversary.population ({self.population}) must be >= loop.tasks_per_iteration "
                             f"({tasks_per_iteration}): the adversary trains on the worst of its candidates")
        for name, lo, hi in (("elite_frac", 0.0, 1.0), ("smoothing", 0.0, 1.0), ("uniform_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if not (lo < value <= hi if name != "uniform_fraction" else lo <= value < hi):
                raise ValueError(f"loop.adversary.{name} = {value} is outside its allowed range "
                                 f"{'(0, 1]' if name != 'uniform_fraction' else '[0, 1)'}")
        if self.search not in ADVERSARY_SEARCHES:
            raise ValueError(f"loop.adversary.search = {self.search!r}; allowed: {', '.join(ADVERSARY_SEARCHES)}")
        if self.search == "replay":
            if self.uniform_fraction <= 0:
                raise ValueError("loop.adversary.uniform_fraction must be > 0 with search: replay (new tasks only "
                                 "enter the archive as uniform draws); allowed: (0, 1)")
            if self.archive_size < self.population:
                raise ValueError(f"loop.adversary.archive_size ({self.archive_size}) must be >= population "
                                 f"({self.population})")
            if self.rank_temperature <= 0:
                raise ValueError(f"loop.adversary.rank_temperature must be > 0, got {self.rank_temperature}")
            for name in ("staleness_weight", "mutation_fraction"):
                if not 0 <= getattr(self, name) <= 1:
                    raise ValueError(f"loop.adversary.{name} = {getattr(self, name)} is outside [0, 1]")
            if self.mutation_std <= 0:
                raise ValueError(f"loop.adversary.mutation_std must be > 0, got {self.mutation_std}")
        if not 0 < self.min_std <= self.init_std:
            raise ValueError(f"loop.adversary needs 0 < min_std <= init_std, got {self.min_std} and {self.init_std}")
        if self.oracle_threads < 1:
            raise ValueError(f"loop.adversary.oracle_threads must be >= 1, got {self.oracle_threads}")
        if family is not None and self.reward_gradient and not family.reward_names:
            raise ValueError(f"loop.adversary.reward_gradient needs reward parameters; {family.name} has none "
                             f"(its parameters: {family.names}); use the CEM adversary alone")
        if family is not None and self.params is not None:
            unknown = [p for p in self.params if p not in family.names]
            if unknown or not self.params:
                raise ValueError(f"loop.adversary.params: {unknown or 'empty list'} not in {family.name}'s "
                                 f"parameters {family.names}")


class UniformSampler:
    """Tasks drawn independently from the train split with each parameter's sampling rule."""

    needs_gap = False

    def __init__(self, family: TaskFamily, seed: int) -> None:
        self.family = family
        self.rng = np.random.default_rng(seed)

    def candidates(self, n: int) -> list[Task]:
        return self.family.sample(self.rng, "train", n)

    def select(self, tasks: list[Task], gaps: np.ndarray | None, n: int) -> list[int]:
        return list(range(len(tasks)))

    def starts(self, tasks: list[Task], seed: int) -> list[int]:
        """The reset seed each candidate's episode starts from (the oracle's too): the iteration's ``seed``."""
        return [seed] * len(tasks)

    def describe(self) -> dict:
        """What the sampler believes now (logged with the iteration's tasks)."""
        return {}

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class GaussianSampler(UniformSampler):
    """Tasks from a Gaussian around the centre of the train box (redrawn until inside the box)."""

    def __init__(self, family: TaskFamily, seed: int, cfg: GaussianSamplerConfig) -> None:
        super().__init__(family, seed)
        self.cfg = cfg
        self.box = ParamBox(family, family.names, "train")

    def candidates(self, n: int) -> list[Task]:
        u = _truncated_normal(self.rng, np.full(self.family.dim, 0.5), np.full(self.family.dim, self.cfg.std), n)
        return [self.family.from_vector(v) for v in self.box.to_values(u)]


class GapSampler(UniformSampler):
    """What both adversaries share: candidates graded by their gap, the worst trained on, outside proposals."""

    needs_gap = True

    def __init__(self, family: TaskFamily, seed: int, cfg: AdversaryConfig) -> None:
        super().__init__(family, seed)
        self.cfg = cfg
        self.searched = list(cfg.params) if cfg.params else family.names
        """Parameters the adversary chooses, in family order of its config."""
        self.box = ParamBox(family, self.searched, "train")
        self.last_gaps: list[float] = []
        self.proposals: list[Task] = []
        """Tasks proposed from outside the search (the reward gradient's steps): next candidates first."""

    def _with_searched(self, u: np.ndarray) -> list[Task]:
        """Tasks at unit points ``u`` of the searched parameters, the other parameters drawn uniformly."""
        tasks = self.family.sample(self.rng, "train", len(u))  # the parameters the adversary leaves alone
        return [self.family.validate({**t, **dict(zip(self.searched, map(float, v), strict=True))})
                for t, v in zip(tasks, self.box.to_values(u), strict=True)]

    def _take_proposals(self, limit: int) -> list[Task]:
        taken = [self.family.validate(task) for task in self.proposals[:limit]]
        self.proposals = []
        return taken

    def propose(self, task: Task) -> None:
        """Make ``task`` one of the next iteration's candidates."""
        self.proposals.append(self.family.validate(task))

    def _rank(self, tasks: list[Task], gaps: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Candidates worst first, and their gaps with a diverged episode (NaN) as the worst possible."""
        if gaps is None or len(gaps) != len(tasks):
            raise ValueError("the adversarial sampler needs one gap per candidate task")
        score = np.where(np.isfinite(gaps), gaps, np.inf)
        self.last_gaps = [float(g) for g in gaps]
        return np.argsort(-score, kind="stable"), score

    def state(self) -> dict:
        return {**super().state(), "searched": self.searched, "proposals": self.proposals}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        if "searched" not in state:  # a run of another sampler resumed adversarial: the search starts afresh
            return
        if state["searched"] != self.searched:
            raise ValueError(f"the checkpoint's adversary searched {state['searched']}, loop.adversary.params now "
                             f"names {self.searched}; resume with the same parameters")
        self.proposals = list(state.get("proposals", []))


class CEMAdversary(GapSampler):
    """CEM on the sub-optimality gap over the train box: train on the tasks the learner is worst at."""

    def __init__(self, family: TaskFamily, seed: int, cfg: AdversaryConfig) -> None:
        super().__init__(family, seed, cfg)
        self.mean = np.full(len(self.searched), 0.5)
        """Search mean in unit-box coordinates."""
        self.std = np.full(len(self.searched), cfg.init_std)
        """Search standard deviation in unit-box coordinates."""
        self.from_gaussian = np.zeros(0, dtype=bool)

    def candidates(self, n: int) -> list[Task]:
        p = self.cfg.population
        n_uniform = round(self.cfg.uniform_fraction * p)
        u = np.concatenate([_truncated_normal(self.rng, self.mean, self.std, p - n_uniform),
                            self.rng.uniform(0.0, 1.0, (n_uniform, len(self.searched)))])
        self.from_gaussian = np.arange(p) < p - n_uniform
        out = self._with_searched(u)
        # A proposal takes the place of a Gaussian draw, and is not part of the Gaussian's refit.
        for i, task in enumerate(self._take_proposals(p - n_uniform)):
            out[i] = task
            self.from_gaussian[i] = False
        return out

    def select(self, tasks: list[Task], gaps: np.ndarray | None, n: int) -> list[int]:
        order, _ = self._rank(tasks, gaps)
        u = self.box.to_unit(np.array([[t[name] for name in self.searched] for t in tasks]))
        own = order[self.from_gaussian[order]]
        elites = own[:max(1, round(self.cfg.elite_frac * len(own)))] if len(own) else order[:1]
        a = self.cfg.smoothing
        self.mean = (1 - a) * self.mean + a * u[elites].mean(axis=0)
        self.std = np.maximum((1 - a) * self.std + a * u[elites].std(axis=0), self.cfg.min_std)
        return [int(i) for i in order[:n]]

    def describe(self) -> dict:
        return {"searched": self.searched, "mean": self.box.to_values(self.mean).tolist(),
                "std_unit": self.std.tolist(), "candidate_gaps": self.last_gaps}

    def state(self) -> dict:
        return {**super().state(), "mean": self.mean.tolist(), "std": self.std.tolist()}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        if "mean" in state:
            self.mean, self.std = np.array(state["mean"]), np.array(state["std"])


class ReplayAdversary(GapSampler):
    """An archive of graded tasks; each iteration re-grades the worst of them (rank-prioritised, with a
    staleness share, as Prioritised Level Replay does) next to fresh uniform draws.

    Unlike one CEM Gaussian it tracks every region where the learner is bad at once (e.g. both ends of
    a pole-length range). A replayed task keeps the reset seed it was first graded from, so the oracle's
    return for it is a cache hit: a replayed candidate costs one learner episode, a new one also an
    oracle episode.
    """

    def __init__(self, family: TaskFamily, seed: int, cfg: AdversaryConfig) -> None:
        super().__init__(family, seed, cfg)
        self.archive: list[dict] = []
        """Graded tasks: ``{"task", "start" (reset seed), "gap", "graded" (iteration count)}``."""
        self.rounds = 0
        """Iterations graded so far (staleness is measured in them)."""
        self.pending: list[int | None] = []
        """Per current candidate: its archive index, or None for a new task."""
        self.pending_starts: list[int | None] = []

    def _replay_weights(self) -> np.ndarray:
        gaps = np.array([e["gap"] for e in self.archive])
        ranks = np.empty(len(gaps))
        ranks[np.argsort(-gaps, kind="stable")] = np.arange(1, len(gaps) + 1)
        by_rank = (1.0 / ranks) ** (1.0 / self.cfg.rank_temperature)
        stale = np.array([self.rounds - e["graded"] for e in self.archive], dtype=float)
        by_age = stale / stale.sum() if stale.sum() > 0 else np.full(len(gaps), 1.0 / len(gaps))
        w = self.cfg.staleness_weight
        return (1 - w) * by_rank / by_rank.sum() + w * by_age

    def candidates(self, n: int) -> list[Task]:
        p = self.cfg.population
        n_new = max(1, round(self.cfg.uniform_fraction * p), p - len(self.archive))
        proposals = self._take_proposals(p - n_new)
        n_replay = p - n_new - len(proposals)
        picks = (self.rng.choice(len(self.archive), n_replay, replace=False, p=self._replay_weights())
                 if n_replay else np.zeros(0, dtype=int))
        n_mutate = round(self.cfg.mutation_fraction * n_replay)
        mutated, picks = picks[:n_mutate], picks[n_mutate:]
        u = self.rng.uniform(0.0, 1.0, (n_new, len(self.searched)))
        if n_mutate:
            parents = self.box.to_unit(np.array([[self.archive[i]["task"][k] for k in self.searched] for i in mutated]))
            steps = self.rng.normal(0.0, self.cfg.mutation_std, parents.shape)
            u = np.concatenate([u, np.clip(parents + steps, 0.0, 1.0)])  # clipped: the box's faces are tasks too
        fresh = self._with_searched(u)
        n_fresh = len(proposals) + len(fresh)
        self.pending = [None] * n_fresh + [int(i) for i in picks]
        self.pending_starts = [None] * n_fresh + [self.archive[i]["start"] for i in picks]
        return [*proposals, *fresh, *(dict(self.archive[i]["task"]) for i in picks)]

    def starts(self, tasks: list[Task], seed: int) -> list[int]:
        """A replayed task starts where it was first graded (its oracle return is cached); a new one at ``seed``."""
        if len(tasks) != len(self.pending_starts):
            raise ValueError(f"starts() for {len(tasks)} tasks, the last candidates were {len(self.pending_starts)}")
        self.pending_starts = [seed if s is None else s for s in self.pending_starts]
        return list(self.pending_starts)

    def select(self, tasks: list[Task], gaps: np.ndarray | None, n: int) -> list[int]:
        order, score = self._rank(tasks, gaps)
        self.rounds += 1
        pending = self.pending if len(self.pending) == len(tasks) else [None] * len(tasks)
        starts = self.pending_starts if len(self.pending_starts) == len(tasks) else [None] * len(tasks)
        for task, index, start, gap in zip(tasks, pending, starts, score, strict=True):
            entry = {"task": dict(task), "start": start, "gap": float(gap), "graded": self.rounds}
            if index is None:
                self.archive.append(entry)
            else:
                self.archive[index] = entry
        if len(self.archive) > self.cfg.archive_size:  # drop the smallest gaps; the newest wins a tie
            ranked = sorted(range(len(self.archive)), key=lambda i: (-self.archive[i]["gap"], -i))
            self.archive = [self.archive[i] for i in sorted(ranked[:self.cfg.archive_size])]
        self.pending, self.pending_starts = [], []
        return [int(i) for i in order[:n]]

    def describe(self) -> dict:
        gaps = sorted((e["gap"] for e in self.archive), reverse=True)
        return {"searched": self.searched, "archive_size": len(self.archive), "archive_top_gaps": gaps[:8],
                "candidate_gaps": self.last_gaps}

    def state(self) -> dict:
        return {**super().state(), "archive": self.archive, "rounds": self.rounds}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.archive = [dict(e) for e in state.get("archive", [])]
        self.rounds = int(state.get("rounds", 0))


def _truncated_normal(rng: np.random.Generator, mean: np.ndarray, std: np.ndarray, n: int,
                      tries: int = 100) -> np.ndarray:
    """``n`` draws of N(mean, std²) inside the unit cube, redrawing rows that fall outside."""
    out = rng.normal(mean, std, (n, len(mean)))
    for _ in range(tries):
        bad = ((out < 0) | (out > 1)).any(axis=1)
        if not bad.any():
            return out
        out[bad] = rng.normal(mean, std, (int(bad.sum()), len(mean)))
    return np.clip(out, 0.0, 1.0)  # only for a mean far outside the box, which the samplers never set


def make_sampler(name: str, family: TaskFamily, seed: int, gaussian: GaussianSamplerConfig | None = None,
                 adversary: AdversaryConfig | None = None) -> UniformSampler:
    """The sampler ``name`` (one of :data:`SAMPLERS`) over ``family``'s train box."""
    if name == "uniform":
        return UniformSampler(family, seed)
    if name == "gaussian":
        return GaussianSampler(family, seed, gaussian or GaussianSamplerConfig())
    if name == "adversarial":
        cfg = adversary or AdversaryConfig()
        return (ReplayAdversary if cfg.search == "replay" else CEMAdversary)(family, seed, cfg)
    raise SpecError(family.name, "loop.task_sampler", f"unknown task sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
