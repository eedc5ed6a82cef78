"""Episode logs (robot side): one MCAP file per episode, written by the ROS 2 node, read back for replay.

- :mod:`~metarl_robot.logs.format`: the layout (version, topics, message definitions) and the records read back.
- :mod:`~metarl_robot.logs.writer`: :class:`EpisodeLogWriter` (and :func:`joint_state_map`).
- :mod:`~metarl_robot.logs.reader`: :func:`read_episode`, also for a file cut short by a crash.

Everything here runs on a robot computer: numpy, mcap and mcap-ros2-support, no torch, no MuJoCo.
"""

from __future__ import annotations

from metarl_robot.logs.format import (
    EPISODE_LOG_SCHEMA_VERSION,
    NOT_TIMED,
    DiagnosticEntry,
    Episode,
    EpisodeLogError,
    EpisodeLogWarning,
    SafetyEventRecord,
)
from metarl_robot.logs.reader import read_episode
from metarl_robot.logs.writer import EpisodeLogWriter

__all__ = ["EPISODE_LOG_SCHEMA_VERSION", "NOT_TIMED", "DiagnosticEntry", "Episode", "EpisodeLogError",
           "EpisodeLogWarning", "EpisodeLogWriter", "SafetyEventRecord", "read_episode"]
