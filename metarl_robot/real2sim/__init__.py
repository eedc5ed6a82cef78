"""Real-to-sim (MuJoCo side): tie logged hardware episodes to the simulator and the simulator to the robot link.

- :mod:`~metarl_robot.real2sim.identify`: the task parameters that best explain a logged episode (``metarl identify``).
- :mod:`~metarl_robot.real2sim.sim_record`: an episode log recorded from a MuJoCo rollout (demo, tests).
- :mod:`~metarl_robot.real2sim.sim_dataset`: sim rollouts collected as logs for offline datasets, labels by
  identification (``metarl dataset``).
- :mod:`~metarl_robot.real2sim.twin`: the digital twin, a MuJoCo robot behind the telemetry protocol
  (``metarl sim-robot``).

These import MuJoCo (through :mod:`metarl_robot.envs`) and never run on a robot computer; nothing on the
robot side (spec, runtime, telemetry, logs) or in the offline replay tools imports them. Nothing is imported
here, so ``import metarl_robot.real2sim.twin`` loads only what the twin needs.
"""
