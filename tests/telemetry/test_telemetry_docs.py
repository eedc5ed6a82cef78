"""docs/telemetry.md stays true: its example frames are the encoder's bytes, its interface-hash recipe gives the
hashes, and it names every reason and fault."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from metarl_robot.paths import REPO_ROOT
from metarl_robot.real2sim.twin import FaultConfig
from metarl_robot.spec.robot import load_robot
from metarl_robot.telemetry.protocol import REJECT_REASONS, CommandFrame, Hello, StateFrame, Welcome, encode

DOC = (REPO_ROOT / "docs" / "telemetry.md").read_text()
CARTPOLE_HASH = "bf5857a81adeb57abdd9797d665c8a2bd2d7b8dea2652f9e4a3a5ea9c3653f25"
"""The doc's HELLO/WELCOME examples spell this hash out (the shipped cartpole robot.yaml's when they were written);
pinned here so that the examples do not change with robot.yaml."""
IDENTITY = {"robot_name": "cartpole", "interface_hash": CARTPOLE_HASH, "obs_dim": 4, "action_dim": 1, "ctrl_dt": 0.04}

EXAMPLES = {
    "state": StateFrame(seq=42, stamp_ns=1_000_000_000, obs=np.array([0.5, 3.0, -0.25, 1.5]),
                        applied_action=np.array([0.75]), applied_command_seq=41, session=0x12345678),
    "command": CommandFrame(seq=43, answers_seq=42, expires_ns=1_000_000_000 + 3 * 40_000_000, session=0x12345678,
                            action=np.array([0.75])),
    "hello": Hello(**IDENTITY),
    "welcome": Welcome(accepted=True, session=0x12345678, watchdog_ms=200, robot_stamp_ns=950_000_000, **IDENTITY),
    "refusal": Welcome(accepted=False, session=0, watchdog_ms=200, robot_stamp_ns=950_000_000,
                       message="robot.yaml interface mismatch", **IDENTITY),
}


def doc_frame(name: str) -> bytes:
    match = re.search(rf"<!-- example-frame: {name} -->\s*```text\n(.*?)```", DOC, re.S)
    assert match, f"docs/telemetry.md has no example-frame block for {name}"
    data = bytearray()
    for i, line in enumerate(match.group(1).strip().splitlines()):
        offset, _, hexbytes = line.partition(":")
        assert int(offset, 16) == len(data) == 16 * i, f"bad offset column in line {line!r}"
        data += bytes.fromhex(hexbytes)
    return bytes(data)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_doc_example_frames_are_what_the_encoder_produces(name):
    assert doc_frame(name) == encode(EXAMPLES[name])


def test_doc_shows_an_example_of_every_message_type():
    assert {type(m) for m in EXAMPLES.values()} == {StateFrame, CommandFrame, Hello, Welcome}


# ---- the interface hash, from the doc's recipe alone (plain yaml + json + hashlib, no RobotSpec) ----------------
def doc_hash_keys() -> dict[str, tuple[str, str]]:
    """The doc's table of canonical keys: dotted path → (type, default or 'required')."""
    body = DOC.split("<!-- interface-hash-keys:begin -->")[1].split("<!-- interface-hash-keys:end -->")[0]
    rows = [line for line in body.strip().splitlines()[2:] if line.startswith("|")]
    keys = {}
    for row in rows:
        path, kind, default = (cell.strip() for cell in row.strip("|").split("|"))
        keys[path.strip("`")] = (kind, default.strip("`"))
    return keys


def canonical(data: dict, keys: dict[str, tuple[str, str]], prefix: str = "") -> dict:
    """Step 2 of the recipe: the keys the table lists under ``prefix``, from ``data`` or their defaults, floats as
    floats, containers recursively; anything else in ``data`` (noise_std) left out."""
    out = {}
    for path, (kind, default) in keys.items():
        if not path.startswith(prefix) or "." in path[len(prefix):]:
            continue  # not a direct child of this object
        key = path[len(prefix):]
        if key not in data:
            assert default != "required", f"robot.yaml lacks the required key {path}"
            out[key] = json.loads(default)  # `null`, `false`, `""`
        elif kind == "object":
            out[key] = canonical(data[key], keys, f"{path}.")
        elif kind == "list of objects":
            out[key] = [canonical(item, keys, f"{path}[].") for item in data[key]]
        elif kind == "float":
            out[key] = float(data[key])
        elif kind.startswith("object of floats"):
            out[key] = {name: float(value) for name, value in data[key].items()}
        else:
            out[key] = data[key]
    return out


def hash_by_the_doc(robot_yaml: Path) -> str:
    data = yaml.safe_load(robot_yaml.read_text())  # step 1
    text = json.dumps(canonical(data, doc_hash_keys()), sort_keys=True, separators=(",", ":"))  # steps 2, 3
    return hashlib.sha256(text.encode("ascii")).hexdigest()  # step 4


ROBOT_YAMLS = sorted((REPO_ROOT / "sim" / "robots").glob("*/robot.yaml"))


@pytest.mark.parametrize("robot_yaml", ROBOT_YAMLS, ids=lambda p: p.parent.name)
def test_the_docs_interface_hash_recipe_gives_every_robots_hash(robot_yaml):
    assert hash_by_the_doc(robot_yaml) == load_robot(robot_yaml.parent.name).interface_hash


def test_the_recipe_ignores_what_the_doc_says_it_ignores_and_sees_the_prose(tmp_path):
    original = REPO_ROOT / "sim" / "robots" / "cartpole" / "robot.yaml"
    data = yaml.safe_load(original.read_text())
    reference = load_robot(original).interface_hash
    assert len(ROBOT_YAMLS) >= 3 and reference == CARTPOLE_HASH  # else update the doc's HELLO/WELCOME examples

    def variant(change) -> Path:
        edited = json.loads(json.dumps(data))
        change(edited)
        path = tmp_path / f"v{len(list(tmp_path.iterdir()))}" / "cartpole" / "robot.yaml"  # the folder is the name
        path.parent.mkdir(parents=True)
        path.write_text("# comments and key order do not count\n" + yaml.safe_dump(edited, sort_keys=True))
        return path

    def same(change) -> None:
        path = variant(change)
        assert hash_by_the_doc(path) == load_robot(path).interface_hash == reference

    def differs(change) -> None:
        path = variant(change)
        assert hash_by_the_doc(path) == load_robot(path).interface_hash != reference

    same(lambda d: None)
    same(lambda d: d["observation"][0].update(scale=1))  # 1 and 1.0 are one float
    same(lambda d: d["observation"][0].update(noise_std=0.01))  # a calibration, not the interface
    same(lambda d: d["observation"][1].update(privileged=False, doc=d["observation"][1]["doc"]))  # defaults spelt out
    differs(lambda d: d["observation"][0].update(doc="reworded"))  # prose is part of the hash today
    differs(lambda d: d.update(description="another robot"))
    differs(lambda d: d["control"].update(substeps=4))


def test_doc_names_every_reject_reason_and_fault_kind():
    for reason in REJECT_REASONS:
        assert f"`{reason}`" in DOC, reason
    for kind in FaultConfig.KINDS:
        assert f"`{kind}=" in DOC, kind
