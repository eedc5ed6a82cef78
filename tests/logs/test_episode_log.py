"""Episode logs: a real cart-pole episode written to MCAP, read back exactly by our reader and by rosbags.

Also: a writer SIGKILLed mid-episode loses at most its open chunk; truncated and corrupt files and
unknown layout versions get warnings or errors that say what is wrong; a shadow replay of a real
adapter from the log reproduces its commands.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mcap_ros2.writer import Writer as Ros2McapWriter
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from metarl_robot import provenance
from metarl_robot.envs.registry import make_env
from metarl_robot.logs import format as el
from metarl_robot.logs import writer as log_writer
from metarl_robot.logs.format import (
    COMMAND_SOURCES,
    NOT_TIMED,
    SAFETY_STATES,
    STEP_FIELDS,
    DiagnosticEntry,
    EpisodeLogError,
    EpisodeLogWarning,
)
from metarl_robot.logs.reader import read_episode
from metarl_robot.logs.writer import EpisodeLogWriter
from metarl_robot.paths import REPO_ROOT
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.safety import CommandSource, SafetyConfig, SafetyLayer, SafetyState
from metarl_robot.spec.robot import load_robot
from tests.boundary import assert_robot_side

ENV_ID = "metarl/CartpoleSwingup-v0"
STEPS = 100
PERIOD_NS = 40_000_000
"""The cart-pole's 25 Hz control period."""
ROBOT_EPOCH_NS = 2**60
"""Robot stamps far beyond 2**53: only an integer encoding keeps them exact."""
SAFE_STEPS = range(40, 43)
"""Steps on which the (simulated) safety layer sent the safe command without running the adapter."""


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Exact float64 equality, NaN payloads included."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.array_equal(a.view(np.int64), b.view(np.int64)))


@dataclass
class Recorded:
    """What the test wrote, to compare the read-back with."""

    path: Path
    robot_dict: dict
    task: dict
    bundle_sha256: str
    t0: int
    obs: np.ndarray
    command: np.ndarray
    adapter_action: np.ndarray
    context: np.ndarray
    prediction_error: np.ndarray
    target_x: np.ndarray
    ints: np.ndarray
    source: list[str]


def record_cartpole_episode(path: Path) -> Recorded:
    """Drive the cart-pole env with random actions and log every step as the node would."""
    env = make_env(ENV_ID)
    rng = np.random.default_rng(7)
    robot = env.unwrapped.robot
    obs, info = env.reset(seed=3, options={"task": "test"})
    bundle = load_bundle(REPO_ROOT / "policies" / "cartpole_mb")
    t0 = time.monotonic_ns()
    rows: dict[str, list] = {k: [] for k in ("obs", "command", "adapter_action", "context", "prediction_error",
                                             "target_x", "ints", "source")}
    with EpisodeLogWriter(path, robot, bundle=bundle, task=info["task"],
                          extra_metadata={"adaptation_mode": "model_based", "endpoints": ["tcp://127.0.0.1:5555"]},
                          clock_anchor=(1_700_000_000_000_000_000, t0)) as log:
        for k in range(STEPS):
            time_ns = t0 + (k + 1) * PERIOD_NS
            raw = rng.uniform(-1.5, 1.5, size=(1, robot.action_dim))  # beyond the limits: the env clips it
            adapted = k not in SAFE_STEPS
            if k == SAFE_STEPS[0]:
                log.write_safety_event("stale_telemetry", "no fresh frame for 2 periods", action="safe_command",
                                       state_seq=1000 + k, values={"age_s": 0.08, "deadline_s": 0.05},
                                       time_ns=time_ns - 1)
            if k == SAFE_STEPS[-1] + 1:
                log.write_safety_event("stale_telemetry", "fresh frames again", level="OK", time_ns=time_ns - 1)
            context = rng.normal(size=(1, 8))
            error = np.array([np.nan if k == 0 else rng.uniform()])
            action = raw if adapted else robot.safe_action[None]
            next_obs, _, terminated, truncated, step_info = env.step(action[0])
            command = step_info["sent_action"]
            source, state = ("adapter", "OK") if adapted else ("safe_command", "SAFE_STOP")
            # Compute times as the node measures them: the adapter's only where it ran, the node's every step
            # (one left untimed, as the end-of-episode commands are).
            adapter_ns = 2_000_000 + 1000 * k if adapted else NOT_TIMED
            node_ns = NOT_TIMED if k == STEPS - 1 else max(adapter_ns, 0) + 150_000 + k
            ints = [k, time_ns, 1000 + k, ROBOT_EPOCH_NS + k * PERIOD_NS + 17, time_ns - 3_000_000,
                    0 if k == 0 or k - 1 in SAFE_STEPS else 5000 + k - 1, 5000 + k, 1000 + k,
                    ROBOT_EPOCH_NS + (k + 3) * PERIOD_NS, COMMAND_SOURCES.index(source), SAFETY_STATES.index(state),
                    adapter_ns, node_ns]
            log.write_step(
                obs=obs[None], state_seq=ints[2], robot_stamp_ns=ints[3], receive_time_ns=ints[4],
                applied_command_seq=ints[5], command=command, command_seq=ints[6], command_expires_ns=ints[8],
                command_source=source, safety_state=state,
                task_params=env.unwrapped.reward_params,
                adapter_action=raw if adapted else None,
                adaptation={"context": context, "context_size": np.array([min(k, 16)]), "prediction_error": error,
                            "predicted_next_obs": next_obs[None] + 0.01, "plan_return": np.array([k * 0.5])}
                if adapted else None,
                time_ns=time_ns, adapter_compute_ns=adapter_ns, node_compute_ns=node_ns)
            if k % 25 == 0:
                log.write_diagnostics([DiagnosticEntry("metarl/loop", "OK", "25.0 Hz", robot.name,
                                                       {"rate_hz": 25.0, "late_steps": 0})], time_ns=time_ns + 1)
            rows["obs"].append(obs.copy())
            rows["command"].append(command.copy())
            rows["adapter_action"].append(raw[0] if adapted else np.full(robot.action_dim, np.nan))
            rows["context"].append(context[0] if adapted else np.full(8, np.nan))
            rows["prediction_error"].append(error[0] if adapted else np.nan)
            rows["target_x"].append(env.unwrapped.reward_params["target_x"])
            rows["ints"].append(ints)
            rows["source"].append(source)
            obs = next_obs
            assert not (terminated or truncated)
    env.close()
    return Recorded(path, robot.to_dict(), info["task"], bundle.sha256, t0,
                    **{k: np.array(v) if k != "source" else v for k, v in rows.items()})


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    return record_cartpole_episode(tmp_path_factory.mktemp("logs") / "cartpole_ep0.mcap")


# ---- our reader ---------------------------------------------------------------------------------------
def test_our_reader_returns_exactly_what_was_written(recorded: Recorded) -> None:
    ep = read_episode(recorded.path)
    assert ep.warnings == [] and ep.complete and ep.end_reason == "closed"
    assert ep.num_steps == STEPS
    assert same_bits(ep.obs, recorded.obs) and same_bits(ep.command, recorded.command)
    assert same_bits(ep.adapter_action, recorded.adapter_action)
    assert same_bits(ep.adaptation["context"], recorded.context)
    assert same_bits(ep.adaptation["prediction_error"][:, 0], recorded.prediction_error)
    assert math.isnan(ep.adaptation["prediction_error"][0, 0])
    assert list(ep.adaptation) == ["context", "context_size", "prediction_error", "predicted_next_obs", "plan_return"]
    assert same_bits(ep.task_params["target_x"], recorded.target_x)
    ints = recorded.ints
    for i, name in enumerate(STEP_FIELDS):
        if name not in ("command_source", "safety_state"):  # codes, read back as names below
            assert getattr(ep, name).dtype == np.int64 and np.array_equal(getattr(ep, name), ints[:, i]), name
    assert ep.schema_version == 2 and STEP_FIELDS[-2:] == ("adapter_compute_ns", "node_compute_ns")
    assert (ep.adapter_compute_ns[list(SAFE_STEPS)] == NOT_TIMED).all() and ep.node_compute_ns[-1] == NOT_TIMED
    overhead = ep.node_overhead_ns
    assert overhead.dtype == np.int64 and overhead[-1] == NOT_TIMED and (overhead[list(SAFE_STEPS)] == NOT_TIMED).all()
    timed = (ep.adapter_compute_ns >= 0) & (ep.node_compute_ns >= 0)
    assert timed.sum() == STEPS - len(SAFE_STEPS) - 1
    assert np.array_equal(overhead[timed], 150_000 + np.flatnonzero(timed))
    assert int(ep.robot_stamp_ns[-1]) == ROBOT_EPOCH_NS + (STEPS - 1) * PERIOD_NS + 17  # > 2**53, exact
    assert ep.command_source.tolist() == recorded.source
    assert ep.safety_state.tolist() == ["SAFE_STOP" if k in SAFE_STEPS else "OK" for k in range(STEPS)]
    assert ep.adapted.tolist() == [k not in SAFE_STEPS for k in range(STEPS)]
    assert np.array_equal(ep.log_time_ns, 1_700_000_000_000_000_000 + ep.time_ns - recorded.t0)

    first, recovered = ep.safety_events
    assert (first.kind, first.level, first.action, first.state_seq, first.step) == (
        "stale_telemetry", "ERROR", "safe_command", 1000 + SAFE_STEPS[0], SAFE_STEPS[0])
    assert float(first.values["age_s"]) == 0.08 and first.time_ns == ints[SAFE_STEPS[0], 1] - 1
    assert (recovered.level, recovered.step, recovered.state_seq) == ("OK", SAFE_STEPS[-1] + 1, None)
    assert [d.time_ns for d in ep.diagnostics] == [int(ints[k, 1]) + 1 for k in range(0, STEPS, 25)]
    assert ep.diagnostics[0].statuses[0] == DiagnosticEntry("metarl/loop", "OK", "25.0 Hz", "cartpole",
                                                            {"rate_hz": "25.0", "late_steps": "0"})


def test_metadata_names_robot_bundle_task_and_software(recorded: Recorded) -> None:
    ep = read_episode(recorded.path)
    assert ep.robot.to_dict() == recorded.robot_dict
    assert ep.robot_interface_sha256 == load_robot("cartpole").interface_hash
    assert ep.bundle == {"name": "cartpole_mb", "sha256": recorded.bundle_sha256,
                         "path": str(REPO_ROOT / "policies" / "cartpole_mb")}
    assert ep.task == recorded.task and set(ep.task) >= {"pole_mass_scale", "target_x"}
    assert ep.extra == {"adaptation_mode": "model_based", "endpoints": ["tcp://127.0.0.1:5555"]}
    assert ep.schema_version == el.EPISODE_LOG_SCHEMA_VERSION
    assert ep.software["software_version"] == provenance.software_version() != ""
    assert ep.software["git_commit"] == provenance.git_commit()
    assert ep.metadata[el.META_EPISODE]["wall_anchor_ns"] == "1700000000000000000"
    assert ep.metadata[el.META_END] == {"steps": str(STEPS), "safety_events": "2", "end_reason": "closed"}


# ---- an independent reader: rosbags -------------------------------------------------------------------
def test_rosbags_reads_topics_types_counts_and_values(recorded: Recorded) -> None:
    humble = get_typestore(Stores.ROS2_HUMBLE)  # the standard definitions, not the ones embedded in the log
    expected_counts = {el.TOPIC_STEP: STEPS, el.TOPIC_OBSERVATION: STEPS, el.TOPIC_JOINT_STATES: STEPS,
                       el.TOPIC_TASK: STEPS, el.TOPIC_ADAPTATION: STEPS - len(SAFE_STEPS), el.TOPIC_COMMAND: STEPS,
                       el.TOPIC_SAFETY: 2, el.TOPIC_DIAGNOSTICS: STEPS // 25}
    with AnyReader([recorded.path]) as reader:
        assert {c.topic: (c.msgtype, c.msgcount) for c in reader.connections} == {
            topic: (el.TOPIC_TYPES[topic], n) for topic, n in expected_counts.items()}
        by_topic: dict[str, list] = {t: [] for t in expected_counts}
        for conn, timestamp, raw in reader.messages():
            embedded = reader.deserialize(raw, conn.msgtype)
            standard = humble.deserialize_cdr(raw, conn.msgtype)
            by_topic[conn.topic].append((timestamp, embedded, standard))

    step_times = [t for t, _, _ in by_topic[el.TOPIC_STEP]]
    assert step_times == sorted(step_times) and len(set(step_times)) == STEPS
    for topic in (el.TOPIC_OBSERVATION, el.TOPIC_JOINT_STATES, el.TOPIC_TASK, el.TOPIC_COMMAND):
        assert [t for t, _, _ in by_topic[topic]] == step_times, topic  # a step's messages share its log time
    ints = np.array([s.data for _, _, s in by_topic[el.TOPIC_STEP]])
    assert ints.dtype == np.int64 and np.array_equal(ints, recorded.ints)
    _, first_step, _ = by_topic[el.TOPIC_STEP][0]
    assert [d.label for d in first_step.layout.dim] == list(STEP_FIELDS)

    obs = np.array([s.data for _, _, s in by_topic[el.TOPIC_OBSERVATION]])
    assert same_bits(obs, recorded.obs)
    assert same_bits(np.array([e.data for _, e, _ in by_topic[el.TOPIC_OBSERVATION]]), recorded.obs)
    _, _, obs_msg = by_topic[el.TOPIC_OBSERVATION][0]
    assert [(d.label, d.size, d.stride) for d in obs_msg.layout.dim] == [
        ("cart_pos", 1, 0), ("pole_angle", 1, 1), ("cart_vel", 1, 2), ("pole_angvel", 1, 3)]
    assert same_bits(np.array([s.data for _, _, s in by_topic[el.TOPIC_COMMAND]]), recorded.command)
    assert same_bits(np.array([s.data[0] for _, _, s in by_topic[el.TOPIC_TASK]]), recorded.target_x)

    adapted = [k for k in range(STEPS) if k not in SAFE_STEPS]
    adaptation = np.array([s.data for _, _, s in by_topic[el.TOPIC_ADAPTATION]])
    assert same_bits(adaptation[:, 0:1], recorded.adapter_action[adapted])
    assert same_bits(adaptation[:, 1:9], recorded.context[adapted])

    for (t, _, joints), obs_row in zip(by_topic[el.TOPIC_JOINT_STATES], recorded.obs, strict=True):
        assert list(joints.name) == ["slider", "hinge"]
        assert same_bits(joints.position, obs_row[[0, 1]]) and same_bits(joints.velocity, obs_row[[2, 3]])
        assert joints.header.stamp.sec * 10**9 + joints.header.stamp.nanosec == t

    _, _, safety = by_topic[el.TOPIC_SAFETY][0]
    status = safety.status[0]
    assert (status.level, status.name, status.hardware_id) == (2, "metarl/safety/stale_telemetry", "cartpole")
    assert {kv.key: kv.value for kv in status.values}["action"] == "safe_command"


def test_embedded_definitions_are_the_installed_ros2_messages() -> None:
    share = Path(sys.prefix) / "share"
    if not (share / "sensor_msgs" / "msg" / "JointState.msg").is_file():
        pytest.skip(f"no ros-*-msgs wheels installed under {share} (pip install '.[ros]')")
    for name, text in el.MESSAGE_DEFINITIONS.items():
        pkg, _, msg = name.split("/")
        installed = (share / pkg / "msg" / f"{msg}.msg").read_text()
        lines = [" ".join(line.split("#")[0].split()) for line in installed.splitlines()]
        assert [ln for ln in lines if ln] == text.splitlines(), name
    # A dependency appears once, after its user, as rosbag2 writes it.
    diag = el.concatenated_definition("diagnostic_msgs/msg/DiagnosticArray")
    assert [ln for ln in diag.splitlines() if ln.startswith("MSG: ")] == [
        "MSG: std_msgs/Header", "MSG: builtin_interfaces/Time", "MSG: diagnostic_msgs/DiagnosticStatus",
        "MSG: diagnostic_msgs/KeyValue"]


def test_rclpy_diagnostic_statuses_can_be_logged_as_published(tmp_path: Path) -> None:
    msgs = pytest.importorskip("diagnostic_msgs.msg")
    status = msgs.DiagnosticStatus(level=msgs.DiagnosticStatus.WARN, name="metarl/link", message="3 stale frames",
                                   hardware_id="cartpole", values=[msgs.KeyValue(key="stale", value="3")])
    path = tmp_path / "ep.mcap"
    with EpisodeLogWriter(path, load_robot("cartpole")) as log:
        log.write_diagnostics([status], time_ns=time.monotonic_ns())
    ep = read_episode(path)
    assert ep.diagnostics[0].statuses == (DiagnosticEntry("metarl/link", "WARN", "3 stale frames", "cartpole",
                                                          {"stale": "3"}),)
    assert ep.num_steps == 0


# ---- crashes, truncation, corruption, versions ----------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from metarl_robot.logs.writer import EpisodeLogWriter
    from metarl_robot.spec.robot import load_robot

    t0 = time.monotonic_ns()
    log = EpisodeLogWriter(sys.argv[1], load_robot("cartpole"), chunk_size=int(sys.argv[2]),
                           max_chunk_age_s=float(sys.argv[3]))
    for k in range(100_000):
        log.write_step(obs=[k, k * 0.5, np.sin(k), 1 / (k + 1)], state_seq=k, robot_stamp_ns=k, receive_time_ns=t0,
                       command=[np.cos(k)], command_seq=k, time_ns=t0 + (k + 1) * 40_000_000)
        print(k, flush=True)
        time.sleep(0.002)
""")
MIN_STEP_BYTES = 700
"""Uncompressed bytes of one of the child's steps is ~760 (4 messages): a chunk of N bytes holds <= N / 700 steps."""


@pytest.mark.integration
@pytest.mark.parametrize(("chunk_size", "max_age_s", "max_lost"), [
    (1 << 20, 1.0, 25 + 1),  # closed by age: every 1 s of log time = 25 steps
    (2048, 1e6, 2048 // MIN_STEP_BYTES + 2),  # closed by size
], ids=["by-age", "by-size"])
def test_sigkilled_writer_loses_at_most_the_open_chunk(tmp_path: Path, chunk_size: int, max_age_s: float,
                                                       max_lost: int) -> None:
    path = tmp_path / "killed.mcap"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(chunk_size), str(max_age_s)],
                             stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    last = -1
    deadline = time.monotonic() + 60
    try:
        while last < 130 and time.monotonic() < deadline:  # well past 5 chunks
            line = child.stdout.readline()
            assert line, f"writer died early: rc={child.poll()}"
            last = int(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    last = max([last, *(int(x) for x in rest.split())])
    assert last >= 130

    with pytest.warns(EpisodeLogWarning):
        ep = read_episode(path)
    assert not ep.complete and any(re.search("without a footer|ends inside", w) for w in ep.warnings)
    n = ep.num_steps
    # The open chunk (and the step being written when the signal came) is all a crash may lose.
    assert last + 1 - max_lost <= n <= last + 1, (n, last)
    k = np.arange(n)
    assert same_bits(ep.obs, np.stack([k, k * 0.5, np.sin(k), 1 / (k + 1)], axis=1))
    assert same_bits(ep.command[:, 0], np.cos(k)) and np.array_equal(ep.state_seq, k)


def test_every_finished_chunk_is_on_disk_while_writing(tmp_path: Path) -> None:
    """Read the file from outside after each step, as after a crash there: only the open chunk may be missing."""
    path = tmp_path / "live.mcap"
    chunk_size = 2048
    max_open = chunk_size // MIN_STEP_BYTES + 2
    t0 = time.monotonic_ns()
    with EpisodeLogWriter(path, load_robot("cartpole"), chunk_size=chunk_size, max_chunk_age_s=1e6) as log:
        for k in range(60):
            log.write_step(obs=[k, 0.0, 0.0, 0.0], state_seq=k, robot_stamp_ns=k, receive_time_ns=t0, command=[0.0],
                           command_seq=k, time_ns=t0 + k + 1)
            with pytest.warns(EpisodeLogWarning):
                live = read_episode(path)
            assert re.search("without a footer|ends inside", live.warnings[0])
            on_disk = live.num_steps
            assert k + 1 - max_open <= on_disk <= k + 1, (k, on_disk)
        log.write_safety_event("nonfinite_obs", "NaN in pole_angle", action="safe_command")
        with pytest.warns(EpisodeLogWarning):
            live = read_episode(path)
        assert live.num_steps == 60 and [e.kind for e in live.safety_events] == ["nonfinite_obs"]  # flushed at once


def record_offsets(path: Path) -> list[tuple[int, int, int]]:
    """``(offset, opcode, length)`` of every top-level MCAP record, by walking the file independently."""
    data = path.read_bytes()
    out, offset = [], 8
    while offset < len(data) - 8:
        opcode, length = struct.unpack_from("<BQ", data, offset)
        out.append((offset, opcode, length))
        offset += 9 + length
    return out


def test_a_file_cut_inside_a_chunk_reads_up_to_it_with_a_warning(recorded: Recorded, tmp_path: Path) -> None:
    chunks = [(o, n) for o, op, n in record_offsets(recorded.path) if op == 0x06]
    assert len(chunks) >= 3
    offset, length = chunks[2]
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(recorded.path.read_bytes()[:offset + length // 2])
    with pytest.warns(EpisodeLogWarning, match=f"ends inside a CHUNK record at byte {offset}"):
        ep = read_episode(cut)
    assert not ep.complete and ep.end_reason == ""
    assert 0 < ep.num_steps < STEPS
    n = ep.num_steps
    assert same_bits(ep.obs, recorded.obs[:n]) and same_bits(ep.command, recorded.command[:n])
    assert np.array_equal(ep.time_ns, recorded.ints[:n, 1])
    assert ep.bundle is not None and ep.robot.name == "cartpole"  # metadata precedes the data


def test_a_corrupt_chunk_is_an_error_naming_its_offset(recorded: Recorded, tmp_path: Path) -> None:
    offset, _, length = [r for r in record_offsets(recorded.path) if r[1] == 0x06][1]
    data = bytearray(recorded.path.read_bytes())
    data[offset + length - 10] ^= 0xFF  # inside the compressed messages
    bad = tmp_path / "corrupt.mcap"
    bad.write_bytes(bytes(data))
    with pytest.raises(EpisodeLogError, match=f"byte {offset}: corrupt CHUNK record"):
        read_episode(bad)


def one_step_log_labelled(path: Path, version: int, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A one-step log whose metadata says layout ``version`` (its steps are this writer's)."""
    monkeypatch.setattr(log_writer, "EPISODE_LOG_SCHEMA_VERSION", version)  # the writer writes it
    with EpisodeLogWriter(path, load_robot("cartpole")) as log:
        log.write_step(obs=np.zeros(4), state_seq=0, robot_stamp_ns=0, receive_time_ns=0, command=[0.0],
                       command_seq=0)
    monkeypatch.undo()
    return path


def test_unknown_layout_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = one_step_log_labelled(tmp_path / "future.mcap", 99, monkeypatch)
    with pytest.raises(EpisodeLogError, match=r"schema_version: is '99'; this reader reads versions 1, 2 \(written"):
        read_episode(path)


V1_LOG = Path(__file__).parent / "episode_log_v1.mcap"
"""A log written by the version-1 writer itself (commit 57a3c37, just before the compute times): 4 cart-pole steps
(adapter, adapter, safe command after a TELEMETRY_STALE event, nothing sent), task params, adaptation diagnostics,
one /diagnostics message, clock anchor (1.7e18, 5e9)."""


def test_a_version_1_log_still_reads_with_its_compute_times_not_timed() -> None:
    ep = read_episode(V1_LOG)
    assert ep.schema_version == 1 and ep.metadata[el.META_EPISODE]["schema_version"] == "1"
    assert ep.software["git_commit"].startswith("57a3c37") and ep.extra == {"fixture": "version-1 log"}
    assert ep.complete and ep.end_reason == "closed" and ep.warnings == [] and ep.num_steps == 4
    t0 = 5_000_000_000
    assert ep.time_ns.tolist() == [t0 + (k + 1) * 40_000_000 for k in range(4)]
    assert ep.receive_time_ns.tolist() == [t - 2_000_000 for t in ep.time_ns.tolist()]
    assert ep.state_seq.tolist() == [1, 2, 3, 4] and ep.robot_stamp_ns[3] == 2**60 + 3 * 40_000_000
    assert ep.command_source.tolist() == ["adapter", "adapter", "safe_command", "none"]
    assert ep.safety_state.tolist() == ["OK", "OK", "SAFE_STOP", "OK"]
    assert ep.command_seq.tolist() == [1, 2, 3, -1] and math.isnan(ep.command[3, 0]) and ep.command[2, 0] == 0.5
    assert ep.adapted.tolist() == [True, True, False, True] and ep.adapter_action[:, 0].tolist()[:2] == [0.5, 1.5]
    assert ep.adaptation["context"][3].tolist() == [3.0, 3.0] and ep.task_params["target_x"].tolist() == [0.0] * 4
    assert [e.kind for e in ep.safety_events] == ["TELEMETRY_STALE"] and len(ep.diagnostics) == 1
    # The fields version 1 lacks read as "not timed", with the types of a version-2 log.
    for column in (ep.adapter_compute_ns, ep.node_compute_ns, ep.node_overhead_ns):
        assert column.dtype == np.int64 and column.tolist() == [NOT_TIMED] * 4
    with AnyReader([V1_LOG]) as reader:  # and the file is what the version-1 writer wrote: 11 fields, no more
        conn = next(c for c in reader.connections if c.topic == el.TOPIC_STEP)
        first = reader.deserialize(next(reader.messages(connections=[conn]))[2], conn.msgtype)
    assert [d.label for d in first.layout.dim] == list(el.STEP_FIELDS_BY_VERSION[1]) == list(STEP_FIELDS[:11])


def test_each_version_is_read_with_its_own_step_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that says version 1 but holds version-2 steps (or the reverse) is refused, not misread."""
    path = one_step_log_labelled(tmp_path / "mislabelled.mcap", 1, monkeypatch)
    with pytest.raises(EpisodeLogError, match=r"/metarl/step: step 0: fields .*'node_compute_ns'.* differ"):
        read_episode(path)
    data = V1_LOG.read_bytes()
    relabelled = tmp_path / "v1_says_2.mcap"  # a version-1 file claiming version 2 (same length: the CRCs hold)
    assert data.count(b"schema_version\x01\x00\x00\x001") == 1
    relabelled.write_bytes(data.replace(b"schema_version\x01\x00\x00\x001", b"schema_version\x01\x00\x00\x002"))
    with pytest.raises(EpisodeLogError, match=r"/metarl/step: step 0: fields .* differ"):
        read_episode(relabelled)


def test_files_that_are_not_episode_logs_are_refused(tmp_path: Path) -> None:
    not_mcap = tmp_path / "notes.mcap"
    not_mcap.write_bytes(b"hello, not a log")
    with pytest.raises(EpisodeLogError, match="not an MCAP file"):
        read_episode(not_mcap)
    with pytest.raises(EpisodeLogError, match="file not found"):
        read_episode(tmp_path / "missing.mcap")
    with pytest.raises(EpisodeLogError, match=r"is a directory; give the episode's .mcap file \(found here: \['notes"):
        read_episode(tmp_path)

    foreign = tmp_path / "rosbag.mcap"  # a plain ROS 2 recording, e.g. from `ros2 bag record`
    with foreign.open("wb") as f:
        writer = Ros2McapWriter(f)
        schema = writer.register_msgdef(el.FLOAT64_MULTI_ARRAY, el.concatenated_definition(el.FLOAT64_MULTI_ARRAY))
        writer.write_message("/chatter", schema, {"layout": {"dim": [], "data_offset": 0}, "data": [1.0]}, log_time=1)
        writer.finish()
    with pytest.raises(EpisodeLogError, match=r"not a metarl episode log .*topics: \['/chatter'\]"):
        read_episode(foreign)


def test_altered_robot_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ep.mcap"
    with EpisodeLogWriter(path, load_robot("cartpole")):
        pass
    data = path.read_bytes()
    spec = json.dumps(load_robot("cartpole").to_dict(), sort_keys=True)
    altered = spec.replace('"period": 0.04', '"period": 0.05')
    assert altered != spec and len(altered) == len(spec)
    path.write_bytes(data.replace(spec.encode(), altered.encode()))
    with pytest.raises(EpisodeLogError, match="interface_sha256: the recorded spec hashes to"):
        read_episode(path)


def test_bad_writer_input_names_the_field_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ep.mcap"
    robot = load_robot("cartpole")
    good = {"obs": np.zeros(4), "state_seq": 0, "robot_stamp_ns": 0, "receive_time_ns": 0, "command": [0.0],
            "command_seq": 0, "task_params": {"target_x": 0.0}, "time_ns": 10**9}
    with EpisodeLogWriter(path, robot) as log:
        log.write_step(**good)
        bad_inputs = [
            ({"obs": np.zeros(5)}, r"obs: must have shape \(4,\) or \(1, 4\), got \(5,\)"),
            ({"command": np.zeros((2, 1))}, r"command: must have shape \(1,\)"),
            ({"time_ns": 10**9}, "time_ns: 1000000000 is not after the previous step's"),
            ({"command_source": "planner"}, r"command_source: must be one of \['adapter', 'safe_command', "),
            ({"command_source": "none"}, "command: must be None with command_source='none'"),
            ({"command": None}, "command and command_seq are required when a command was sent"),
            ({"safety_state": "PANIC"}, "safety_state: must be one of"),
            ({"task_params": {"target_y": 1.0}}, r"task_params: names \['target_y'\] differ"),
            ({"state_seq": 1.5}, "state_seq: must be an integer"),
            ({"state_seq": 2**64}, "state_seq: .* does not fit in int64"),
            ({"adapter_action": [0.1]}, "give adapter_action and adaptation together"),
            ({"adapter_action": [0.1], "adaptation": {"context": np.zeros((2, 8))}}, "one robot only"),
            ({"node_compute_ns": -2}, r"node_compute_ns: must be a duration >= 0 ns, or -1 \(not timed\), got -2"),
            ({"node_compute_ns": 1.5e6}, "node_compute_ns: must be an integer"),
            ({"adapter_compute_ns": 1000}, "adapter_compute_ns: is 1000 on a step without adapter_action"),
        ]
        for change, message in bad_inputs:
            with pytest.raises(EpisodeLogError, match=message):
                log.write_step(**{**good, "time_ns": 2 * 10**9, **change})
        with pytest.raises(EpisodeLogError, match="level: must be one of"):
            log.write_safety_event("stale_telemetry", "x", level="FATAL")
        with pytest.raises(EpisodeLogError, match=r"kind: must be an identifier \(letters, digits, _\)"):
            log.write_safety_event("stale telemetry!", "x")
        with pytest.raises(EpisodeLogError, match=r"values: keys \['step'\] are reserved"):
            log.write_safety_event("stale_telemetry", "x", values={"step": 3})
        log.write_step(**{**good, "time_ns": 2 * 10**9})
        assert log.step_count == 2
    with pytest.raises(EpisodeLogError, match="already exists; every episode needs a new file"):
        EpisodeLogWriter(path, robot)
    with pytest.raises(EpisodeLogError, match="the log is closed"):
        log.write_step(**good)
    ep = read_episode(path)
    assert ep.num_steps == 2 and ep.warnings == [] and ep.safety_events == []


@pytest.mark.parametrize("compression", ["zstd", "lz4", "none"])
def test_every_compression_reads_back(tmp_path: Path, compression: str) -> None:
    path = tmp_path / f"{compression}.mcap"
    with EpisodeLogWriter(path, load_robot("cartpole"), compression=compression, chunk_size=1024) as log:
        for k in range(30):
            log.write_step(obs=[k, -k, 0.5 * k, np.pi], state_seq=k, robot_stamp_ns=k, receive_time_ns=k,
                           command=[k / 30], command_seq=k, time_ns=k + 1)
    ep = read_episode(path)
    assert ep.metadata[el.META_EPISODE]["compression"] == compression
    assert same_bits(ep.command[:, 0], np.arange(30) / 30) and ep.obs[29, 1] == -29


def test_adaptation_diagnostics_must_keep_their_layout(tmp_path: Path) -> None:
    with EpisodeLogWriter(tmp_path / "ep.mcap", load_robot("cartpole")) as log:
        step = {"obs": np.zeros(4), "state_seq": 0, "robot_stamp_ns": 0, "receive_time_ns": 0, "command": [0.0],
                "command_seq": 0, "adapter_action": [0.0]}
        log.write_step(**step, adaptation={"context": np.zeros((1, 8))}, time_ns=1)
        with pytest.raises(EpisodeLogError, match=r"names/sizes .*'context', 4.* differ from the first adapted"):
            log.write_step(**step, adaptation={"context": np.zeros((1, 4))}, time_ns=2)


# ---- what the replay needs: the log reproduces a real adapter's decisions -----------------------------
def test_a_shadow_replay_of_the_log_reproduces_the_adapters_commands(tmp_path: Path) -> None:
    bundle = load_bundle(REPO_ROOT / "policies" / "cartpole_mb")
    env = make_env(ENV_ID)
    obs, info = env.reset(seed=5, options={"task": "test"})
    params = env.unwrapped.reward_params
    path = tmp_path / "adapted.mcap"
    adapter = bundle.make_adapter(seed=11)
    prev = None
    with EpisodeLogWriter(path, bundle.robot, bundle=bundle, task=info["task"]) as log:
        for k in range(12):
            if prev is not None:
                adapter.observe(prev[0][None], prev[1][None], obs[None])
            action, diagnostics = adapter.act(obs[None], params)
            next_obs, *_, step_info = env.step(action[0])
            sent = step_info["sent_action"]
            log.write_step(obs=obs, state_seq=k, robot_stamp_ns=k, receive_time_ns=k, command=sent, command_seq=k,
                           task_params=params, adapter_action=action, adaptation=diagnostics)
            prev, obs = (obs, sent), next_obs
    env.close()

    ep = read_episode(path)
    assert ep.bundle["sha256"] == load_bundle(ep.bundle["path"]).sha256
    replay = load_bundle(ep.bundle["path"]).make_adapter(seed=11)
    for k in range(ep.num_steps):
        if k:
            replay.observe(ep.obs[k - 1][None], ep.command[k - 1][None], ep.obs[k][None])
        params_k = {name: values[k] for name, values in ep.task_params.items()}
        action, diagnostics = replay.act(ep.obs[k][None], params_k)
        np.testing.assert_allclose(action[0], ep.adapter_action[k], rtol=0, atol=1e-6)
        np.testing.assert_allclose(diagnostics["context"][0], ep.adaptation["context"][k], rtol=0, atol=1e-6)
    assert set(ep.command_source) == {"adapter"}


def test_a_safety_layers_decisions_and_events_log_as_they_come(tmp_path: Path) -> None:
    """The node's natural inputs (SafetyDecision, SafetyEvent) map onto the log one to one."""
    assert {s.value for s in CommandSource} <= set(COMMAND_SOURCES)
    assert {s.value for s in SafetyState} <= set(SAFETY_STATES)
    robot = load_robot("cartpole")
    layer = SafetyLayer(robot, SafetyConfig(stale_after_periods=2.5, recovery_fresh_frames=2))
    dt = robot.ctrl_dt
    layer.on_handshake(True, now=0.0)
    path = tmp_path / "safety.mcap"
    decisions = []
    with EpisodeLogWriter(path, robot) as log:
        seq = 0
        for k in range(20):
            now = (k + 1) * dt
            frame_lost = 6 <= k < 10  # the link drops 4 frames: stale after 2.5 periods
            usable = False
            if not frame_lost:
                seq += 1
                usable = layer.on_frame(seq, seq * 40_000_000, now, np.array([0.1, 3.0, 0.0, 0.0]))
            decision = layer.filter(np.array([0.3]), 0.01, now) if usable else layer.tick(now)
            for event in decision.events:
                log.write_safety_event(event.code, event.message, level=event.level, action=decision.source,
                                       state_seq=seq, time_ns=round(event.at * 1e9))
            sent = decision.command is not None
            log.write_step(obs=np.array([0.1, 3.0, 0.0, 0.0]), state_seq=seq, robot_stamp_ns=seq * 40_000_000,
                           receive_time_ns=round(now * 1e9), command=decision.command,
                           command_seq=k if sent else None, command_source=decision.source,
                           safety_state=decision.state, time_ns=round(now * 1e9) + 1)
            decisions.append(decision)
    ep = read_episode(path)
    assert ep.command_source.tolist() == [d.source.value for d in decisions]
    assert ep.safety_state.tolist() == [d.state.value for d in decisions]
    assert "SAFE_STOP" in ep.safety_state and "safe_command" in ep.command_source
    events = [e for d in decisions for e in d.events]
    assert [(e.kind, e.level, e.message) for e in ep.safety_events] == [
        (e.code.value, e.level.name, e.message) for e in events]
    assert "TELEMETRY_STALE" in [e.kind for e in ep.safety_events]
    nothing_sent = [d.command is None for d in decisions]
    assert np.isnan(ep.command[nothing_sent]).all() and not np.isnan(ep.command[~np.array(nothing_sent)]).any()


def test_episode_log_is_robot_side_code() -> None:
    """The node imports the writer on the robot: no torch, MuJoCo or gymnasium."""
    assert_robot_side(["metarl_robot.logs.writer", "metarl_robot.logs.reader"])


def test_the_adapter_state_an_episode_started_from_round_trips_and_bad_arrays_are_refused(tmp_path):
    robot = load_robot("cartpole")
    state = {"last_layer_weights": np.arange(24.0).reshape(1, 2, 3, 4), "last_layer_updates": np.array([7])}
    path = tmp_path / "carried.mcap"
    with EpisodeLogWriter(path, robot, adapter_state=state):
        pass
    read = read_episode(path)
    assert sorted(read.adapter_state) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(read.adapter_state[key], value)
    with EpisodeLogWriter(tmp_path / "prior.mcap", robot, adapter_state={}):
        pass
    assert read_episode(tmp_path / "prior.mcap").adapter_state == {}  # nothing carried: no attachment
    with pytest.raises(EpisodeLogError) as err:
        EpisodeLogWriter(tmp_path / "nan.mcap", robot, adapter_state={"w": np.array([np.nan])})
    assert err.value.field == "adapter_state.w" and "finite" in str(err.value)
    assert not (tmp_path / "nan.mcap").exists()
