"""Importing foreign logs (CSV, NPZ, rosbag2 MCAP with JointState) into episode logs, read back with read_episode.

Every good input is round-tripped and its values checked against what was written; every malformed one must
raise an error naming the field, or warn and list exactly what was dropped in the import report.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from mcap_ros2.writer import Writer as Ros2McapWriter

from metarl_robot.logs.format import concatenated_definition
from metarl_robot.logs.reader import read_episode
from metarl_robot.paths import REPO_ROOT
from metarl_robot.replay.importers import REPORT_SUFFIX, LogImportError, LogImportWarning, import_log, import_source
from metarl_robot.spec.robot import load_robot

ROBOT = load_robot("cartpole")
DT = ROBOT.ctrl_dt
N = 20
T0_UNIX_NS = 1_750_000_000_123_456_789


def _trajectory(n: int = N) -> dict[str, np.ndarray]:
    """A cart-pole-like trajectory in the *source's* units: pole angle in degrees, motor force in newtons."""
    k = np.arange(n)
    return {"t": k * DT, "x": 0.05 * k, "theta_deg": 180.0 - 3.0 * k, "xd": np.full(n, 1.25), "thd": -0.5 * k,
            "force_n": 4.0 * np.sin(k / 3.0)}


MAPPING = {
    "time": {"column": "t", "units": "s"},
    "observation": {"cart_pos": "x", "pole_angle": {"column": "theta_deg", "units": "deg", "scale": math.pi / 180},
                    "cart_vel": "xd", "pole_angvel": ["thd"]},
    "action": {"motor": {"column": "force_n", "scale": 0.1}},  # 1 unit = 10 N (robot.yaml)
    "task": {"pole_length": 1.1},
}


def _expected_obs(tr: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([tr["x"], tr["theta_deg"] * math.pi / 180, tr["xd"], tr["thd"]], axis=1)


def _write_csv(path: Path, tr: dict[str, np.ndarray], blanks: dict[int, str] | None = None) -> Path:
    names = list(tr)
    lines = [",".join(names)]
    for r in range(len(tr["t"])):
        cells = [repr(float(tr[c][r])) for c in names]
        if blanks and r in blanks:
            cells[names.index(blanks[r])] = ""  # an empty cell: a missing value
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def _import(tmp_path: Path, source: Path, mapping, **kw):
    out = tmp_path / "out.mcap"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = import_log(source, ROBOT, out, mapping=mapping, **kw)
    ours = [str(w.message) for w in caught if issubclass(w.category, LogImportWarning)]
    return report, read_episode(out), ours, json.loads(out.with_suffix(REPORT_SUFFIX).read_text())


# ---- good inputs ----------------------------------------------------------------------------------------
def test_csv_round_trip_values_units_and_metadata(tmp_path):
    tr = _trajectory()
    source = _write_csv(tmp_path / "run.csv", tr)
    mapping_file = tmp_path / "mapping.yaml"
    mapping_file.write_text(yaml.safe_dump(MAPPING))
    report, ep, warned, on_disk = _import(tmp_path, source, mapping_file)

    assert warned == [] and report.dropped == [] and ep.complete
    assert ep.num_steps == N and report.steps_written == N == report.samples_read
    np.testing.assert_allclose(ep.obs, _expected_obs(tr), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ep.command[:, 0], tr["force_n"] * 0.1, rtol=0, atol=1e-12)
    assert list(ep.command_source) == ["adapter"] * N and not ep.adapted.any() and ep.bundle is None
    assert np.array_equal(ep.time_ns, np.arange(N) * round(DT * 1e9))
    assert np.array_equal(ep.state_seq, np.arange(1, N + 1))  # source row + 1
    assert ep.task == {"pole_length": 1.1}
    assert ep.extra["import_source"]["format"] == "csv" and len(ep.extra["import_source"]["sha256"]) == 64
    assert ep.extra["import_mapping"] == MAPPING
    assert on_disk["steps_written"] == N and on_disk["period"]["median"] == pytest.approx(DT)
    assert import_source(ep)["sha256"] == on_disk["source_sha256"]


def test_npz_round_trip_with_2d_array_and_ms_time(tmp_path):
    tr = _trajectory()
    q = np.stack([tr["x"], tr["theta_deg"] * math.pi / 180], axis=1)  # (N, 2): [slider, hinge]
    qd = np.stack([tr["xd"], tr["thd"]], axis=1)
    np.savez(tmp_path / "run.npz", time_ms=tr["t"] * 1000, q=q, qd=qd, u=tr["force_n"] / 10)
    mapping = {"time": {"column": "time_ms", "units": "ms"},
               "observation": {"cart_pos": {"column": "q", "index": 0}, "pole_angle": {"column": "q", "index": 1},
                               "cart_vel": {"column": "qd", "index": 0}, "pole_angvel": {"column": "qd", "index": 1}},
               "action": {"motor": "u"}, "command_source": "fallback_controller"}
    _, ep, warned, _ = _import(tmp_path, tmp_path / "run.npz", mapping)
    assert warned == [] and ep.num_steps == N
    np.testing.assert_allclose(ep.obs, _expected_obs(tr), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ep.command[:, 0], tr["force_n"] / 10, rtol=0, atol=1e-12)
    assert set(ep.command_source) == {"fallback_controller"}
    assert np.array_equal(ep.time_ns, np.arange(N) * round(DT * 1e9))


def test_without_action_mapping_steps_have_no_command(tmp_path):
    tr = _trajectory()
    mapping = {k: v for k, v in MAPPING.items() if k != "action"}
    report, ep, _, _ = _import(tmp_path, _write_csv(tmp_path / "run.csv", tr), mapping)
    assert set(ep.command_source) == {"none"} and np.isnan(ep.command).all()
    assert any("no command" in n for n in report.notes)


# ---- rosbag2 --------------------------------------------------------------------------------------------
def _write_bag(path: Path, stamps_ns: list[int], *, names=("rail", "extra_joint", "pole"), drop_velocity=False,
               command_every: int = 2, effort: bool = False) -> dict[str, np.ndarray]:
    """A bag as another ROS 2 system would record it: joint names renamed and reordered, an extra joint,
    commands on a Float64MultiArray topic at half the rate. Returns the true values per JointState message."""
    n = len(stamps_ns)
    pos = np.stack([0.01 * np.arange(n), np.full(n, 7.0), 3.0 - 0.02 * np.arange(n)], axis=1)
    vel = np.stack([np.full(n, 0.3), np.zeros(n), -0.4 * np.arange(n)], axis=1)
    cmd = 0.1 * np.sin(np.arange(n))
    with open(path, "wb") as fh:
        writer = Ros2McapWriter(fh)
        js = writer.register_msgdef("sensor_msgs/msg/JointState", concatenated_definition("sensor_msgs/msg/JointState"))
        fa = writer.register_msgdef("std_msgs/msg/Float64MultiArray",
                                    concatenated_definition("std_msgs/msg/Float64MultiArray"))
        for i, stamp in enumerate(stamps_ns):
            log_time = stamp + 1_500_000  # received 1.5 ms after the stamp
            if i % command_every == 0:  # the command that was in force from this sample on
                writer.write_message("/cart/effort_cmd", fa, {"layout": {"dim": [], "data_offset": 0},
                                                              "data": [99.0, cmd[i]]}, log_time=stamp, sequence=i)
            msg = {"header": {"stamp": {"sec": stamp // 10**9, "nanosec": stamp % 10**9}, "frame_id": ""},
                   "name": list(names), "position": pos[i].tolist(),
                   "velocity": [] if drop_velocity else vel[i].tolist(),
                   "effort": [cmd[i], 0.0, -1.0] if effort else []}
            writer.write_message("/robot/joint_states", js, msg, log_time=log_time, sequence=i)
        writer.finish()
    held = np.array([cmd[i - i % command_every] for i in range(n)])
    # robot.yaml observation order: cart_pos (slider=rail), pole_angle (hinge=pole), cart_vel, pole_angvel
    return {"obs": np.stack([pos[:, 0], pos[:, 2], vel[:, 0], vel[:, 2]], axis=1), "command": held, "effort": cmd}


BAG_MAPPING = {"joint_states": {"joints": {"slider": "rail", "hinge": "pole"}},
               "command": {"topic": "/cart/effort_cmd", "field": "data", "index": [1]}}


def test_rosbag2_jointstate_round_trip_on_the_control_grid(tmp_path):
    period = round(DT * 1e9)
    jitter = [0, 3_000_000, -2_000_000, 1_000_000, 0, 4_000_000, -3_000_000, 0, 2_000_000, 0]
    stamps = [T0_UNIX_NS + k * period + jitter[k] for k in range(10)]
    truth = _write_bag(tmp_path / "bag.mcap", stamps)
    report, ep, warned, on_disk = _import(tmp_path, tmp_path / "bag.mcap", BAG_MAPPING)
    assert warned == [] and report.dropped == [] and ep.num_steps == 10
    np.testing.assert_array_equal(ep.obs, truth["obs"])
    np.testing.assert_array_equal(ep.command[:, 0], truth["command"])  # zero-order hold of the command topic
    assert np.array_equal(ep.time_ns, np.arange(10) * period)  # on the grid, relative to the first stamp
    assert np.array_equal(ep.robot_stamp_ns, stamps)  # the real stamps are kept
    assert ep.log_time_ns[0] == T0_UNIX_NS  # absolute source time: log times are the bag's UNIX times
    assert on_disk["source_format"] == "rosbag2" and ep.extra["import_source"]["format"] == "rosbag2"


def test_rosbag2_command_as_jointstate_effort_on_the_same_topic(tmp_path):
    stamps = [T0_UNIX_NS + k * round(DT * 1e9) for k in range(6)]
    truth = _write_bag(tmp_path / "bag.mcap", stamps, effort=True)
    mapping = {"joint_states": {"topic": "/robot/joint_states", "joints": {"slider": "rail", "hinge": "pole"}},
               "command": {"topic": "/robot/joint_states", "field": "effort", "index": ["rail"], "scale": 2.0},
               "command_source": "fallback_controller"}
    _, ep, warned, _ = _import(tmp_path, tmp_path / "bag.mcap", mapping)
    assert warned == [] and ep.num_steps == 6
    np.testing.assert_array_equal(ep.obs, truth["obs"])
    np.testing.assert_array_equal(ep.command[:, 0], 2.0 * truth["effort"])
    assert set(ep.command_source) == {"fallback_controller"}


def test_rosbag2_bag_folder_written_by_rosbags_with_robot_yaml_joint_names(tmp_path):
    """An independent writer (rosbags, Humble types, a bag folder with metadata.yaml); no mapping needed when the
    bag uses robot.yaml's joint names; no command topic -> no commands."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    joint_state, header, stamp_type = (store.types[t] for t in ("sensor_msgs/msg/JointState", "std_msgs/msg/Header",
                                                                  "builtin_interfaces/msg/Time"))
    bag = tmp_path / "bag"
    period = round(DT * 1e9)
    with Writer(bag, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=store)
        for k in range(5):
            t = T0_UNIX_NS + k * period
            msg = joint_state(header=header(stamp=stamp_type(sec=t // 10**9, nanosec=t % 10**9), frame_id=""),
                              name=["hinge", "slider"], position=np.array([3.0 - 0.1 * k, 0.01 * k]),
                              velocity=np.array([-1.0, 0.2]), effort=np.array([], dtype=np.float64))
            writer.write(conn, t, store.serialize_cdr(msg, "sensor_msgs/msg/JointState"))
    _, ep, warned, on_disk = _import(tmp_path, bag, None)
    assert warned == [] and ep.num_steps == 5 and on_disk["source_format"] == "rosbag2"
    k = np.arange(5)
    np.testing.assert_array_equal(ep.obs, np.stack([0.01 * k, 3.0 - 0.1 * k, np.full(5, 0.2), np.full(5, -1.0)], 1))
    assert set(ep.command_source) == {"none"} and np.isnan(ep.command).all()


def test_rosbag2_extra_and_missing_messages_are_dropped_and_reported(tmp_path):
    period = round(DT * 1e9)
    # Periods 0..7; 3 is missing (gap); a second message in period 5 (farther from the grid); one way off the grid.
    stamps = sorted([T0_UNIX_NS + k * period for k in (0, 1, 2, 4, 5, 6, 7)]
                    + [T0_UNIX_NS + 5 * period + 6_000_000, T0_UNIX_NS + 6 * period + 20_000_000])
    truth = _write_bag(tmp_path / "bag.mcap", stamps)
    _, ep, warned, on_disk = _import(tmp_path, tmp_path / "bag.mcap", BAG_MAPPING)
    assert ep.num_steps == 7
    assert np.array_equal(ep.time_ns, np.array([0, 1, 2, 4, 5, 6, 7]) * period)
    assert np.array_equal(ep.state_seq, np.array([0, 1, 2, 4, 5, 6, 7]) + 1)  # the gap is a jump of one frame
    # Message indices in stamp order: 0 1 2 | 4 5 5+6ms 6 6+20ms 7 -> the 6th (5+6ms) and 8th (6+20ms) go.
    np.testing.assert_array_equal(ep.obs, truth["obs"][[0, 1, 2, 3, 4, 6, 8]])
    unused, gap = on_disk["dropped"]
    assert unused["rows"] == [5, 7] and "nearest a control-grid time" in unused["reason"]
    assert gap["periods"] == [3] and gap["reason"].startswith("control periods without")
    assert len(warned) == 2 and all("bag.mcap" in w for w in warned)


def test_rosbag2_faster_than_the_control_rate_is_downsampled_with_consecutive_frames(tmp_path):
    # 100 Hz joint states, 25 Hz control: every 4th message is a step; state_seq has no jumps.
    stamps = [T0_UNIX_NS + k * 10_000_000 for k in range(38)]  # the last step is message 36 at 360 ms
    truth = _write_bag(tmp_path / "bag.mcap", stamps, command_every=1)
    _, ep, warned, on_disk = _import(tmp_path, tmp_path / "bag.mcap", BAG_MAPPING)
    assert ep.num_steps == 10 and np.array_equal(ep.state_seq, np.arange(1, 11))
    np.testing.assert_array_equal(ep.obs, truth["obs"][::4])
    np.testing.assert_array_equal(ep.command[:, 0], truth["command"][::4])
    assert on_disk["dropped"][0]["count"] == 28 and len(warned) == 1


def test_rosbag2_unknown_joint_in_mapping(tmp_path):
    _write_bag(tmp_path / "bag.mcap", [T0_UNIX_NS + k * round(DT * 1e9) for k in range(4)])
    with pytest.raises(LogImportError, match=r"joint_states\.joints\.wheel: unknown joint; robot 'cartpole' has "
                       r"\['slider', 'hinge'\]"):
        import_log(tmp_path / "bag.mcap", ROBOT, tmp_path / "o.mcap",
                   mapping={"joint_states": {"joints": {"wheel": "x"}}})
    # Without a joint map the robot.yaml names are looked for in the bag, which has other names.
    with pytest.raises(LogImportError, match=r"joint_states\.joints\.slider: joint 'slider' is not in the JointState"):
        import_log(tmp_path / "bag.mcap", ROBOT, tmp_path / "o.mcap")
    assert not (tmp_path / "o.mcap").exists()


def test_rosbag2_missing_velocity_and_wrong_command_index(tmp_path):
    stamps = [T0_UNIX_NS + k * round(DT * 1e9) for k in range(4)]
    _write_bag(tmp_path / "novel.mcap", stamps, drop_velocity=True)
    with pytest.raises(LogImportError, match=r"velocity: message 0 has 0 velocity values for 3 names"):
        import_log(tmp_path / "novel.mcap", ROBOT, tmp_path / "o.mcap", mapping=BAG_MAPPING)
    _write_bag(tmp_path / "bag.mcap", stamps)
    bad = {**BAG_MAPPING, "command": {"topic": "/cart/effort_cmd", "index": [5]}}
    with pytest.raises(LogImportError, match=r"command\.index\[0\]: 5 out of range .* \(allowed 0\.\.1\)"):
        import_log(tmp_path / "bag.mcap", ROBOT, tmp_path / "o.mcap", mapping=bad)
    with pytest.raises(LogImportError, match=r"command\.topic: '/nope' must be a topic"):
        import_log(tmp_path / "bag.mcap", ROBOT, tmp_path / "o.mcap",
                   mapping={**BAG_MAPPING, "command": {"topic": "/nope"}})


# ---- malformed tables -----------------------------------------------------------------------------------
def test_missing_column_names_the_field_and_the_columns(tmp_path):
    source = _write_csv(tmp_path / "run.csv", {k: v for k, v in _trajectory().items() if k != "xd"})
    with pytest.raises(LogImportError, match=r"observation\[2\]: column 'xd' not in the file; columns: \['force_n', "):
        import_log(source, ROBOT, tmp_path / "o.mcap", mapping=MAPPING)
    assert not (tmp_path / "o.mcap").exists()


def test_non_monotonic_time_is_an_error(tmp_path):
    tr = _trajectory()
    tr["t"][7] = tr["t"][3]  # jumps back
    with pytest.raises(LogImportError, match=r"time: not monotonic: sample 7 has time 0\.12"):
        import_log(_write_csv(tmp_path / "run.csv", tr), ROBOT, tmp_path / "o.mcap", mapping=MAPPING)


def test_nan_rows_and_duplicate_timestamps_are_dropped_warned_and_reported(tmp_path):
    tr = _trajectory()
    tr["thd"][4] = np.nan
    tr["t"][10] = tr["t"][9]  # duplicate stamp: the first is kept
    source = _write_csv(tmp_path / "run.csv", tr, blanks={12: "force_n"})
    _, ep, warned, on_disk = _import(tmp_path, source, {**MAPPING, "max_drop_fraction": 0.2})
    kept = [r for r in range(N) if r not in (4, 10, 12)]
    assert ep.num_steps == N - 3 and np.array_equal(ep.state_seq, np.array(kept) + 1)
    np.testing.assert_allclose(ep.obs, _expected_obs(_trajectory())[kept], atol=1e-12)
    nan_entry, dup_entry = on_disk["dropped"]
    assert nan_entry["rows"] == [4, 12] and nan_entry["fields"] == ["action.motor (force_n)",
                                                                   "observation.pole_angvel (thd)"]
    assert dup_entry["rows"] == [10] and "duplicate timestamp" in dup_entry["reason"]
    assert len(warned) == 2 and "rows 4, 12" in warned[0]
    assert ep.extra["import_report"]["dropped"][0]["count"] == 2  # also in the log's own metadata


def test_too_many_nan_rows_is_an_error(tmp_path):
    tr = _trajectory()
    tr["x"][:5] = np.nan
    too_many = r"max_drop_fraction: 5 of 20 samples would be dropped \(25\.0% > 10\.0%\)"
    listed = r"dropped 5 sample\(s\): NaN/Inf or missing value \(rows 0, 1, 2, 3, 4\)"
    with pytest.raises(LogImportError, match=too_many), pytest.warns(LogImportWarning, match=listed):
        import_log(_write_csv(tmp_path / "run.csv", tr), ROBOT, tmp_path / "o.mcap", mapping=MAPPING)


@pytest.mark.parametrize(("mapping", "message"), [
    ({**MAPPING, "colums": {}}, r"colums: unknown key; allowed: \['action', 'command_source'"),
    ({**MAPPING, "observation": {**MAPPING["observation"], "pole_angel": "x"}},
     r"observation\.pole_angel: not an observation field of robot 'cartpole'; allowed: \['cart_pos', 'pole_angle'"),
    ({**MAPPING, "observation": {k: v for k, v in MAPPING["observation"].items() if k != "cart_vel"}},
     r"observation\.cart_vel: missing"),
    ({**MAPPING, "action": {"motr": "force_n"}}, r"action\.motr: not an action field of robot 'cartpole'; allowed: "
     r"\['motor'\]"),
    ({**MAPPING, "time": {"column": "t", "units": "min"}}, r"time\.units: must be one of \['s', 'ms', 'us', 'ns'\]"),
    ({**MAPPING, "observation": {**MAPPING["observation"], "pole_angle": {"column": "theta_deg", "units": "deg"}}},
     r"observation\.pole_angle\.units: the column is in 'deg' but robot\.yaml wants 'rad'"),
    ({**MAPPING, "observation": {**MAPPING["observation"], "cart_pos": ["x", "xd"]}},
     r"observation\.cart_pos: robot\.yaml says size 1, the mapping gives 2 column\(s\)"),
    ({**MAPPING, "command_source": "policy"}, r"command_source: must be one of \['adapter', 'fallback_controller'"),
    ({**MAPPING, "observation": {**MAPPING["observation"], "cart_pos": {"column": "x", "scael": 2}}},
     r"observation\.cart_pos\.scael: unknown key"),
])
def test_wrong_mapping_names_the_key_and_allowed_values(tmp_path, mapping, message):
    source = _write_csv(tmp_path / "run.csv", _trajectory())
    with pytest.raises(LogImportError, match=message):
        import_log(source, ROBOT, tmp_path / "o.mcap", mapping=mapping)
    assert not (tmp_path / "o.mcap").exists()


def test_wrong_sizes_and_text_values(tmp_path):
    tr = _trajectory()
    np.savez(tmp_path / "short.npz", t=tr["t"], x=tr["x"][:-1], theta_deg=tr["theta_deg"], xd=tr["xd"],
             thd=tr["thd"], force_n=tr["force_n"])
    with pytest.raises(LogImportError, match=r"observation\[0\]: column 'x' has 19 rows, the time column 20"):
        import_log(tmp_path / "short.npz", ROBOT, tmp_path / "o.mcap", mapping=MAPPING)
    (tmp_path / "text.csv").write_text("t,x,theta_deg,xd,thd,force_n\n0,0,180,0,0,0\n0.04,abc,180,0,0,0\n")
    with pytest.raises(LogImportError, match=r"x \(line 3\): not a number: 'abc'"):
        import_log(tmp_path / "text.csv", ROBOT, tmp_path / "o.mcap", mapping=MAPPING)
    with pytest.raises(LogImportError, match=r"mapping: a csv log needs a mapping"):
        import_log(tmp_path / "text.csv", ROBOT, tmp_path / "o.mcap")


def test_out_of_range_commands_are_kept_and_warned(tmp_path):
    tr = _trajectory()
    mapping = {**MAPPING, "action": {"motor": "force_n"}}  # forgot the N -> unit scale
    _, ep, warned, _ = _import(tmp_path, _write_csv(tmp_path / "run.csv", tr), mapping)
    np.testing.assert_allclose(ep.command[:, 0], tr["force_n"])
    assert any("outside robot.yaml's [-1.0, 1.0]" in w and "scale/offset" in w for w in warned)


# ---- CLI ------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_cli_import_log_smoke(tmp_path):
    tr = _trajectory()
    tr["x"][2] = np.nan
    source = _write_csv(tmp_path / "run.csv", tr)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(MAPPING))
    out = tmp_path / "ep.mcap"
    cmd = [sys.executable, "-m", "metarl_robot.cli", "import-log", str(source), "--robot", "cartpole",
           "--mapping", str(tmp_path / "m.yaml"), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "19 steps from 20 samples" in result.stdout and "dropped 1: NaN/Inf" in result.stdout
    assert read_episode(out).num_steps == 19 and out.with_suffix(REPORT_SUFFIX).exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr


# ---- docs/log_import.md stays true ----------------------------------------------------------------------
def _doc_yaml(name: str) -> dict:
    doc = (REPO_ROOT / "docs" / "log_import.md").read_text()
    block = re.search(rf"<!-- check: {name} -->\n```yaml\n(.*?)```", doc, re.DOTALL)
    assert block, f"docs/log_import.md has no {name} example"
    return yaml.safe_load(block[1])


def test_doc_mapping_example_imports(tmp_path):
    mapping = _doc_yaml("mapping")
    _, ep, warned, _ = _import(tmp_path, _write_csv(tmp_path / "run.csv", _trajectory()), mapping)
    assert warned == [] and ep.num_steps == N and ep.task == {"pole_length": 1.2}
    np.testing.assert_allclose(ep.obs, _expected_obs(_trajectory()), atol=1e-12)


def test_doc_rosbag_mapping_example_imports(tmp_path):
    mapping = _doc_yaml("rosbag-mapping")
    truth = _write_bag(tmp_path / "bag.mcap", [T0_UNIX_NS + k * round(DT * 1e9) for k in range(6)])
    _, ep, warned, _ = _import(tmp_path, tmp_path / "bag.mcap", mapping)
    assert warned == [] and ep.num_steps == 6
    np.testing.assert_array_equal(ep.obs, truth["obs"])
    np.testing.assert_allclose(ep.command[:, 0], 0.1 * truth["command"])


# ---- what the import is for -----------------------------------------------------------------------------
@pytest.mark.slow
def test_identification_recovers_hidden_parameters_from_an_imported_csv(tmp_path):
    """A MuJoCo cart-pole with known hidden dynamics, logged by 'another lab' (ms, degrees, newtons) -> import ->
    metarl identify: every transition is usable (the step conventions fit identify's), and the identified
    physics explain the log far better than the nominal ones (a unit or sign left unconverted would not)."""
    from metarl_robot.envs.meta_env import MetaMujocoEnv
    from metarl_robot.real2sim.identify import IdentifyConfig, identify

    truth = {"pole_mass_scale": 1.6, "pole_length": 0.8, "cart_friction": 0.3, "motor_gain_scale": 0.8,
             "target_x": 0.0}
    env = MetaMujocoEnv("cartpole_swingup")
    obs, _ = env.reset(seed=1, options={"task": truth})
    lines = ["time_ms,x_m,theta_deg,xd,thd_deg_s,force_n"]
    for k in range(150):
        u = 0.8 * math.sin(0.3 * k) + 0.15 * math.sin(1.1 * k)  # within the motor's range and rate limit
        lines.append(f"{k * 40},{float(obs[0])!r},{math.degrees(obs[1])!r},{float(obs[2])!r},"
                     f"{math.degrees(obs[3])!r},{10 * u!r}")
        obs, _, diverged, _, info = env.step(np.array([u]))
        assert not diverged and np.allclose(info["applied_action"], u)
    (tmp_path / "run.csv").write_text("\n".join(lines) + "\n")
    deg = math.pi / 180
    mapping = {"time": {"column": "time_ms", "units": "ms"},
               "observation": {"cart_pos": "x_m", "pole_angle": {"column": "theta_deg", "scale": deg},
                               "cart_vel": "xd", "pole_angvel": {"column": "thd_deg_s", "scale": deg}},
               "action": {"motor": {"column": "force_n", "scale": 0.1}}}
    import_log(tmp_path / "run.csv", ROBOT, tmp_path / "ep.mcap", mapping=mapping)
    result = identify(tmp_path / "ep.mcap", "cartpole_swingup",
                      IdentifyConfig(population=32, iterations=8, restarts=2, seed=0))
    assert result.transitions == 149
    assert result.cost < result.nominal_cost / 10
    length = next(p for p in result.params if p.name == "pole_length")
    assert abs(length.value - truth["pole_length"]) <= 0.03  # test_identify.py's tolerance


def test_a_node_log_is_not_an_import(tmp_path):
    from metarl_robot.logs.writer import EpisodeLogWriter

    with EpisodeLogWriter(tmp_path / "node.mcap", ROBOT, extra_metadata={"import_source": {"path": "x"}}) as log:
        log.write_step(obs=np.zeros(4), state_seq=1, robot_stamp_ns=1, receive_time_ns=1, command=np.zeros(1),
                       command_seq=1, time_ns=1)
    assert import_source(read_episode(tmp_path / "node.mcap")) is None
