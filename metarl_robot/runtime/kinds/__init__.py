"""The bundle-kind registry: manifest ``kind`` → the :class:`~metarl_robot.runtime.manifest.LoadedBundle`
subclass that loads and runs it. The one place a kind's name is written outside its own module.

A new kind is a module here (its manifest schema, loader and smoke run, adapter, and what it declares:
dynamics model, planning, belief diagnostics, evaluation protocol) plus one line below. Kinds are imported when
first asked for, so loading one kind never imports another's code. docs/bundle_format.md describes each.
"""

from __future__ import annotations

import importlib

from metarl_robot.runtime.manifest import LoadedBundle

BUNDLE_KINDS: dict[str, str] = {
    "model_based": "metarl_robot.runtime.kinds.model_based:ModelBasedBundle",
    "context_policy": "metarl_robot.runtime.kinds.context_policy:ContextPolicyBundle",
    "unadapted": "metarl_robot.runtime.kinds.unadapted:UnadaptedBundle",
    "online_model": "metarl_robot.runtime.kinds.online_model:OnlineModelBundle",
    "meta_policy": "metarl_robot.runtime.kinds.meta_policy:MetaPolicyBundle",
    "awr_policy": "metarl_robot.runtime.kinds.awr_policy:AWRPolicyBundle",
}
"""Bundle kind → ``module:class`` of its loaded-bundle class."""


class UnknownKindError(KeyError):
    """A kind name no registry entry has."""

    def __str__(self) -> str:
        return str(self.args[0])


def bundle_kind(name: str) -> type[LoadedBundle]:
    """The loaded-bundle class of kind ``name``; :class:`UnknownKindError` names the registered kinds."""
    if not isinstance(name, str) or name not in BUNDLE_KINDS:
        raise UnknownKindError(f"unknown bundle kind {name!r}; this runtime runs: {', '.join(BUNDLE_KINDS)}")
    module, _, cls_name = BUNDLE_KINDS[name].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    if cls.kind != name:  # a registry line pointing at another kind's class
        raise RuntimeError(f"registry entry {name!r} points at {BUNDLE_KINDS[name]}, whose kind is {cls.kind!r}")
    return cls


def kind_names() -> tuple[str, ...]:
    """Every registered kind, in registry order."""
    return tuple(BUNDLE_KINDS)


__all__ = ["BUNDLE_KINDS", "UnknownKindError", "bundle_kind", "kind_names"]
