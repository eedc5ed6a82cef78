"""Which software wrote a file: the installed metarl-robot version and the source checkout's commit.

Standard library only: bundles (export), run folders (training) and episode logs (the robot) record
the same two facts.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from functools import lru_cache
from pathlib import Path


def software_version() -> str:
    """The installed metarl-robot version, or ``unknown``."""
    try:
        return importlib.metadata.version("metarl-robot")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=2)
def git_commit(include_untracked: bool = True) -> str | None:
    """The source checkout's commit, ``-dirty`` if modified, or None where there is no git (an installed copy,
    a robot). ``include_untracked``: whether files git does not track yet make it dirty."""
    here = Path(__file__).parent
    status = ["git", "status", "--porcelain"] + ([] if include_untracked else ["--untracked-files=no"])
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(status, capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")
