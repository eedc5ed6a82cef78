"""Which training tasks the learner sees next. The adversarial sampler (AdMRL) plugs in here."""

from __future__ import annotations

import numpy as np

from metarl_robot.spec.family import Task, TaskFamily


class UniformSampler:
    """Tasks drawn independently from the train split with each parameter's sampling rule."""

    def __init__(self, family: TaskFamily, seed: int) -> None:
        self.family = family
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> list[Task]:
        return self.family.sample(self.rng, "train", n)

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def make_sampler(name: str, family: TaskFamily, seed: int) -> UniformSampler:
    if name == "uniform":
        return UniformSampler(family, seed)
    raise ValueError(f"unknown task sampler {name!r}; available: uniform")
