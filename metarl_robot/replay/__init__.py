"""Logged hardware episodes: the MCAP episode log (written by the ROS 2 node, read by the replay).

Shadow replay (``replay.shadow``, ``replay.report``), real-to-sim identification and reports build on
:func:`read_episode`; ``replay.sim_record`` writes the same log from a MuJoCo rollout (demo, tests).
"""

from __future__ import annotations

from metarl_robot.replay.episode_log import (
    EPISODE_LOG_SCHEMA_VERSION,
    DiagnosticEntry,
    Episode,
    EpisodeLogError,
    EpisodeLogWarning,
    EpisodeLogWriter,
    SafetyEventRecord,
    read_episode,
)

__all__ = ["EPISODE_LOG_SCHEMA_VERSION", "DiagnosticEntry", "Episode", "EpisodeLogError", "EpisodeLogWarning",
           "EpisodeLogWriter", "SafetyEventRecord", "read_episode"]
