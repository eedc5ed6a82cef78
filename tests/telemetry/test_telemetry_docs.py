"""docs/telemetry.md stays true: its example frames are the encoder's bytes, and it names every reason and fault."""

from __future__ import annotations

import re

import numpy as np
import pytest

from metarl_robot.paths import REPO_ROOT
from metarl_robot.real2sim.twin import FaultConfig
from metarl_robot.telemetry.protocol import REJECT_REASONS, CommandFrame, StateFrame, encode

DOC = (REPO_ROOT / "docs" / "telemetry.md").read_text()

EXAMPLES = {
    "state": StateFrame(seq=42, stamp_ns=1_000_000_000, obs=np.array([0.5, 3.0, -0.25, 1.5]),
                        applied_action=np.array([0.75]), applied_command_seq=41, session=0x12345678),
    "command": CommandFrame(seq=43, answers_seq=42, expires_ns=1_000_000_000 + 3 * 40_000_000, session=0x12345678,
                            action=np.array([0.75])),
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


def test_doc_names_every_reject_reason_and_fault_kind():
    for reason in REJECT_REASONS:
        assert f"`{reason}`" in DOC, reason
    for kind in FaultConfig.KINDS:
        assert f"`{kind}=" in DOC, kind
