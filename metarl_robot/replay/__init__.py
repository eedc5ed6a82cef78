"""Offline tools on logged hardware episodes: shadow replay, reports, log importers, threshold calibration.

- :mod:`~metarl_robot.replay.shadow`: feed logged episodes through a bundle (``metarl replay``).
- :mod:`~metarl_robot.replay.report`: the replay's plots and tables.
- :mod:`~metarl_robot.replay.importers`: turn other recordings into episode logs (``metarl import-log``).
- :mod:`~metarl_robot.replay.calibration`: the safety layer's prediction-error threshold from nominal errors.

They read and write the episode logs of :mod:`metarl_robot.logs` and run with onnxruntime, never torch or
MuJoCo (a robot computer runs them too); real-to-sim identification, which needs MuJoCo, is
:mod:`metarl_robot.real2sim`.
"""
