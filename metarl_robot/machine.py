"""The machine a measurement runs on: its CPU model, and pinning a process to one core.

Standard library only. The latency benchmarks (bench/) pin themselves to one core so their figures
describe one core of the robot's computer, and record which CPU produced them.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), or ``unknown``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pin_one_core() -> int | None:
    """Pin this process to the lowest CPU it may run on and return it; None where the OS has no affinity call."""
    try:
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return core
    except (AttributeError, OSError):
        return None
