"""Read a ROS 2 Python launch file without the ``launch``/``launch_ros`` packages (they are not on PyPI).

The launch files of this repository are declarative: ``generate_launch_description()`` returns a
``LaunchDescription([...])`` of ``DeclareLaunchArgument``, ``Node`` and ``ExecuteProcess`` actions
whose fields (``remappings`` included) are literals, module constants and the substitutions ``LaunchConfiguration``,
``PathJoinSubstitution``, ``FindPackageShare`` and ``ParameterValue``. This module parses the file
with :mod:`ast` and evaluates exactly those constructs the way ``launch``/``launch_ros`` do
(``ParameterValue(..., value_type=T)`` coerces to T; a bare substitution in a parameter dict is
read as YAML), so a test can check every package, executable, file and parameter a launch file
names. Anything else is refused with :class:`UnsupportedLaunchConstruct`, so the launch files stay
checkable.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class UnsupportedLaunchConstruct(ValueError):
    """The launch file uses something this reader does not evaluate (keep launch files declarative)."""


@dataclass(frozen=True)
class Argument:
    name: str
    default: ast.expr | None
    description: str


@dataclass
class ResolvedNode:
    package: str
    executable: str
    name: str | None
    parameter_files: list[Path] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    remappings: list[tuple[str, str]] = field(default_factory=list)
    """(from, to) topic remappings, as ``ros2 launch`` passes them: ``--ros-args -r from:=to``."""

    def remap_args(self) -> list[str]:
        return [arg for source, target in self.remappings for arg in ("-r", f"{source}:={target}")]


@dataclass
class ResolvedProcess:
    cmd: list[str]
    name: str | None


@dataclass
class ResolvedLaunch:
    arguments: dict[str, str]
    """Every declared argument → the value used (given, else its default)."""
    nodes: list[ResolvedNode]
    processes: list[ResolvedProcess]


class LaunchFile:
    """A parsed launch file; :meth:`resolve` evaluates it for given arguments and package share folders."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tree = ast.parse(self.path.read_text(), str(self.path))
        self.constants: dict[str, Any] = {}
        func = None
        for node in self.tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.constants[node.targets[0].id] = ast.literal_eval(node.value)
            elif isinstance(node, ast.FunctionDef) and node.name == "generate_launch_description":
                func = node
        if func is None:
            raise UnsupportedLaunchConstruct(f"{self.path}: no generate_launch_description()")
        returns = [n for n in ast.walk(func) if isinstance(n, ast.Return)]
        if len(returns) != 1 or not self._is_call(returns[0].value, "LaunchDescription"):
            raise UnsupportedLaunchConstruct(f"{self.path}: generate_launch_description must return LaunchDescription")
        actions = returns[0].value.args[0]
        if not isinstance(actions, ast.List):
            raise UnsupportedLaunchConstruct(f"{self.path}: LaunchDescription takes a literal list here")
        self.actions: list[ast.Call] = list(actions.elts)
        self.arguments: dict[str, Argument] = {}
        for action in self.actions:
            if self._is_call(action, "DeclareLaunchArgument"):
                kw = {k.arg: k.value for k in action.keywords}
                name = ast.literal_eval(action.args[0])
                description = ast.literal_eval(kw["description"]) if "description" in kw else ""
                self.arguments[name] = Argument(name, kw.get("default_value"), description)

    @staticmethod
    def _is_call(node: ast.AST, name: str) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name

    def resolve(self, shares: dict[str, Path], given: dict[str, str] | None = None) -> ResolvedLaunch:
        """Evaluate with launch arguments ``given`` (strings, as on the ``ros2 launch`` command line) and
        ``shares`` (package → its installed share folder, what FindPackageShare finds)."""
        given = dict(given or {})
        unknown = set(given) - set(self.arguments)
        if unknown:
            raise ValueError(f"{self.path.name}: arguments {sorted(unknown)} are not declared")
        values: dict[str, str] = {}
        for name, arg in self.arguments.items():
            if name in given:
                values[name] = given[name]
            elif arg.default is not None:
                values[name] = str(self._eval(arg.default, values, shares))
            else:
                raise ValueError(f"{self.path.name}: argument {name!r} has no default and was not given")
        nodes, processes = [], []
        for action in self.actions:
            if self._is_call(action, "DeclareLaunchArgument"):
                continue
            kw = {k.arg: k.value for k in action.keywords}
            if self._is_call(action, "Node"):
                node = ResolvedNode(package=self._eval(kw["package"], values, shares),
                                    executable=self._eval(kw["executable"], values, shares),
                                    name=self._eval(kw["name"], values, shares) if "name" in kw else None)
                for entry in (kw["parameters"].elts if "parameters" in kw else []):
                    if isinstance(entry, ast.Dict):
                        for key, value in zip(entry.keys, entry.values, strict=True):
                            node.parameters[ast.literal_eval(key)] = self._parameter(value, values, shares)
                    else:
                        node.parameter_files.append(Path(self._eval(entry, values, shares)))
                if "remappings" in kw:
                    node.remappings = [(str(a), str(b)) for a, b in self._eval(kw["remappings"], values, shares)]
                nodes.append(node)
            elif self._is_call(action, "ExecuteProcess"):
                cmd = [str(self._eval(part, values, shares)) for part in kw["cmd"].elts]
                processes.append(ResolvedProcess(cmd, self._eval(kw["name"], values, shares) if "name" in kw else None))
            else:
                raise UnsupportedLaunchConstruct(f"{self.path.name}:{action.lineno}: {ast.unparse(action)[:60]}")
        return ResolvedLaunch(values, nodes, processes)

    def _parameter(self, node: ast.expr, values: dict[str, str], shares: dict[str, Path]) -> Any:
        """A parameter value as launch_ros gives it to the node."""
        if self._is_call(node, "ParameterValue"):
            kw = {k.arg: k.value for k in node.keywords}
            raw = str(self._eval(node.args[0], values, shares))
            kind = kw["value_type"].id if "value_type" in kw else None
            if kind == "str":
                return raw
            if kind == "int":
                return int(raw)
            if kind == "float":
                return float(raw)
            if kind == "bool":
                if raw.lower() not in ("true", "false"):
                    raise ValueError(f"{self.path.name}: {raw!r} is not a bool (true/false)")
                return raw.lower() == "true"
            return yaml.safe_load(raw)
        if isinstance(node, ast.Call):  # a bare substitution: launch_ros reads its text as YAML
            return yaml.safe_load(str(self._eval(node, values, shares)))
        return self._eval(node, values, shares)

    def _eval(self, node: ast.expr, values: dict[str, str], shares: dict[str, Path]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and node.id in self.constants:
            return self.constants[node.id]
        if isinstance(node, ast.List):
            return [self._eval(e, values, shares) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(self._eval(e, values, shares) for e in node.elts)
        if self._is_call(node, "LaunchConfiguration"):
            name = self._eval(node.args[0], values, shares)
            if name not in values:
                raise ValueError(f"{self.path.name}:{node.lineno}: LaunchConfiguration({name!r}) is not declared "
                                 "before use")
            return values[name]
        if self._is_call(node, "FindPackageShare"):
            package = self._eval(node.args[0], values, shares)
            if package not in shares:
                raise FileNotFoundError(f"{self.path.name}: package {package!r} is not installed")
            return str(shares[package])
        if self._is_call(node, "PathJoinSubstitution"):
            return os.path.join(*(str(p) for p in self._eval(node.args[0], values, shares)))
        raise UnsupportedLaunchConstruct(f"{self.path.name}:{node.lineno}: cannot evaluate {ast.unparse(node)[:60]}")
