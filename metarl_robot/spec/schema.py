"""Typed dataclass loading from YAML with strict checking.

Every persisted contract (robot.yaml, task families, run configs, later bundles) is a dataclass
tree built by :func:`build`. Unknown keys are rejected, types are checked, and every error names
the file and the dotted path of the offending field, so a user can fix their YAML without
reading code.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class SpecError(ValueError):
    """A spec or config is invalid. The message names the source, the field path and what is allowed."""

    def __init__(self, where: str, field: str, problem: str) -> None:
        self.where = where
        """The file (or other source) the value came from."""
        self.field = field
        """Dotted path of the offending field, e.g. ``params.pole_length.train``."""
        self.problem = problem
        """What is wrong and what is allowed."""
        location = f"{where}: {field}" if field else where
        super().__init__(f"{location}: {problem}")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key written twice in one mapping is an error: plain YAML keeps the last
    value silently, so a doubled ``mass:`` line in a config would change the robot without a word."""


def _construct_unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:  # the mapping's own keys, before merge keys (<<) bring others in
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            seen = key in first_line
        except TypeError:  # an unhashable key: the constructor below says so
            continue
        if seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first_line[key] + 1}); write each key once",
                key_node.start_mark)
        first_line[key] = key_node.start_mark.line
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML ``text`` (from ``where``, for the message) with duplicate keys refused; a
    :class:`SpecError` naming the line for anything that does not parse."""
    loader = _StrictLoader(text)
    loader.name = where  # the marks in the message name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise SpecError(where, "", f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> tuple[dict[str, Any], str]:
    """Read a YAML mapping; returns ``(data, where)`` with ``where`` the path for error messages."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise SpecError(where, "", "file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(where, "", f"cannot read: {exc}") from None
    data = parse_yaml(text, where)
    if not isinstance(data, dict):
        raise SpecError(where, "", f"expected a mapping at top level, got {type(data).__name__}")
    return data, where


def check_schema_version(data: Mapping[str, Any], where: str, supported: int, kind: str) -> None:
    """Refuse a document whose ``schema_version`` is missing or not the one this code reads."""
    version = data.get("schema_version")
    if version is None:
        raise SpecError(where, "schema_version", f"missing; this {kind} reader expects schema_version: {supported}")
    if version != supported:
        raise SpecError(
            where,
            "schema_version",
            f"{kind} schema version {version!r} is not supported; this version of metarl-robot reads {supported}",
        )


def build(cls: type[T], data: Any, where: str, field: str = "") -> T:
    """Build dataclass ``cls`` from plain YAML data, checking keys and types recursively."""
    return _convert(cls, data, where, field)


def _join(field: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{field}[{key}]"
    return f"{field}.{key}" if field else key


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_describe(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str, field: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(option, value, where, field)
            except SpecError:
                continue
        # One error per option is noise: describe the union once.
        raise SpecError(where, field, f"expected {_describe(tp)}, got {value!r}")
    if tp is type(None):
        if value is not None:
            raise SpecError(where, field, f"expected null, got {value!r}")
        return None
    if origin is Literal:
        if value not in get_args(tp):
            raise SpecError(where, field, f"got {value!r}; allowed: {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(where, field, f"expected {_describe(tp)}, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_convert(item_tp, v, where, _join(field, i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(where, field, f"expected {_describe(tp)}, got {value!r}")
        key_tp, val_tp = get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) and key_tp is str:
                raise SpecError(where, _join(field, str(k)), f"keys must be strings, got {k!r}")
            out[k] = _convert(val_tp, v, where, _join(field, str(k)))
        return out
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, where, field)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(where, field, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(where, field, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(where, field, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise SpecError(where, field, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(where, field, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"schema type {tp!r} at {field} is not supported by metarl_robot.spec.schema")


def _build_dataclass(cls: Any, value: Any, where: str, field: str) -> Any:
    if not isinstance(value, dict):
        raise SpecError(where, field, f"expected {_describe(cls)}, got {value!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise SpecError(
            where,
            _join(field, unknown[0]),
            f"unknown key {unknown[0]!r}; allowed keys here: {', '.join(fields)}",
        )
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], where, _join(field, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(where, _join(field, name), f"missing required key (expected {_describe(hints[name])})")
    return cls(**kwargs)


def to_plain(obj: Any) -> Any:
    """Dataclass tree → plain dicts/lists (for saving a resolved config or hashing a spec)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj


__all__ = ["SpecError", "build", "check_schema_version", "load_yaml", "to_plain"]
