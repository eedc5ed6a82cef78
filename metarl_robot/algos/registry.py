"""The algorithms ``metarl train`` knows: the one place their names appear.

A config's ``algo``, a checkpoint's ``algo_kind`` and the exporter's choice of bundle kind are looked
up here; nothing else compares algorithm names. Adding an algorithm is its module plus one line in
:data:`ALGORITHMS` (docs/algorithms.md).
"""

from __future__ import annotations

from metarl_robot.algos.base import Algorithm
from metarl_robot.algos.context_mbrl import ContextMBRL
from metarl_robot.algos.macaw import MACAW
from metarl_robot.algos.mbmpo import MBMPO
from metarl_robot.algos.online_mbrl import OnlineMBRL
from metarl_robot.algos.pearl import PEARL

ALGORITHMS: dict[str, type[Algorithm]] = {"context_mbrl": ContextMBRL, "pearl": PEARL, "online_mbrl": OnlineMBRL,
                                          "mbmpo": MBMPO, "macaw": MACAW}
"""``algo`` → the algorithm class (its ``name`` is the key)."""

SCHEMA_1_ALGORITHM = "context_mbrl"
"""Checkpoints of schema 1 predate ``algo_kind``; only this algorithm wrote them."""


class UnknownAlgorithmError(KeyError):
    """An algorithm name the registry does not hold."""

    def __str__(self) -> str:  # KeyError's str() is the repr of its argument
        return str(self.args[0])


def get_algorithm(name: object) -> type[Algorithm]:
    """The algorithm class registered as ``name``; :class:`UnknownAlgorithmError` names the registered ones."""
    if isinstance(name, str) and name in ALGORITHMS:
        return ALGORITHMS[name]
    raise UnknownAlgorithmError(f"unknown algorithm {name!r}; registered: " + ", ".join(map(repr, ALGORITHMS)))


def section_readers() -> dict[str, tuple[str, ...]]:
    """Run-config section → the algorithms that read it (the sections each algorithm declares); a config for any
    other algorithm is refused if it has the section."""
    readers: dict[str, tuple[str, ...]] = {}
    for name, algorithm in ALGORITHMS.items():
        for section in algorithm.sections:
            readers[section] = (*readers.get(section, ()), name)
    return readers


def with_capability(capability: str) -> list[str]:
    """Names of the registered algorithms whose class attribute ``capability`` is true."""
    return [name for name, algorithm in ALGORITHMS.items() if getattr(algorithm, capability)]
