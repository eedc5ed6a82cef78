"""The robot boundary check, for every test that needs it: what importing (or running) some code pulls in.

Code runs in a fresh interpreter (this one's ``sys.modules`` already holds torch and MuJoCo), with this
checkout first on the path, and reports which of the ``forbidden`` modules it left loaded. A forbidden
name may be a package of this repository too (``metarl_robot.real2sim``): importing any of its modules
imports the package itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from metarl_robot.paths import REPO_ROOT

FORBIDDEN = ("torch", "mujoco", "gymnasium")
"""What the robot side may never load: training (torch) and simulation (MuJoCo, gymnasium)."""

_REPORT = """
import importlib, json, sys
forbidden, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
pulled = {}
for name in modules:
    before = {m for m in forbidden if m in sys.modules}
    importlib.import_module(name)
    pulled[name] = sorted(m for m in forbidden if m in sys.modules and m not in before)
print(json.dumps(pulled))
"""
"""Imports each module in turn and names what each one loaded first (so the report blames the importer)."""


def forbidden_imports(modules: Sequence[str], *, forbidden: Sequence[str] = FORBIDDEN,
                      sys_path: Sequence[str | Path] = (), timeout_s: float = 120.0) -> dict[str, list[str]]:
    """Import ``modules`` one after another in a fresh interpreter: module → the forbidden modules its import
    loaded first (empty lists when the boundary holds). ``sys_path``: folders to put first on the path."""
    return json.loads(_run(_REPORT, [json.dumps(list(forbidden)), json.dumps(list(modules))], sys_path, timeout_s))


def forbidden_after(code: str, *, forbidden: Sequence[str] = FORBIDDEN, sys_path: Sequence[str | Path] = (),
                    timeout_s: float = 120.0) -> list[str]:
    """The forbidden modules loaded after running ``code`` (statements, e.g. loading a bundle and acting) in a
    fresh interpreter."""
    report = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {list(forbidden)!r} if m in sys.modules)))"
    return json.loads(_run(report, [], sys_path, timeout_s))


def assert_robot_side(modules: Sequence[str], *, forbidden: Sequence[str] = FORBIDDEN,
                      sys_path: Sequence[str | Path] = ()) -> None:
    """Fail naming each module that pulled in something forbidden, and what."""
    pulled = {m: found for m, found in forbidden_imports(modules, forbidden=forbidden, sys_path=sys_path).items()
              if found}
    assert not pulled, "robot-side code pulled in forbidden modules: " + "; ".join(
        f"{m} -> {', '.join(found)}" for m, found in pulled.items())


def _run(code: str, args: list[str], sys_path: Sequence[str | Path], timeout_s: float) -> str:
    """Run ``code`` with this checkout (and ``sys_path``) first on the path; its last line of output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in sys_path), str(REPO_ROOT),
                                         *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                            timeout=timeout_s, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, f"the check itself failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout.strip().splitlines()[-1]
