"""Smoke run of bench/node_latency.py at the --quick budget: the installed node, the bare controller and the
echo all answer, the JSON has every row, and the table prints (no timing asserts: the numbers of a 1.6 s run
mean nothing)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_node_latency_quick_run_prints_every_row(tmp_path):
    result = subprocess.run([sys.executable, "bench/node_latency.py", "--quick", "--rates", "100"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert set(doc["runs"]) == {"shipped_25hz", "cheap_100hz"}
    for name, run in doc["runs"].items():
        node, bare = run["node"], run["bare_controller"]
        # The replay did the node's exact work: same seed and inputs give the same actions, bit for bit.
        assert node["adapter_replay"]["max_abs_action_diff"] == 0.0, name
        assert node["adapter_replay"]["steps_compared"] >= node["steps"] > 0
        assert {"HANDSHAKE_OK", "ARMED"} <= set(node["safety_events"])
        for block in (node, bare):
            deadline = block["deadline"]
            assert 0 < block["steps"] <= deadline["states"] and deadline["states_without_command"] < 0.1 * deadline[
                "states"], (name, deadline)
            for key in ("e2e", "internal", "link", "overhead_over_adapter"):
                assert block[key]["n"] == block["steps"] and math.isfinite(block[key]["p99_ms"]), (name, key)
            # The command answering a state can only arrive after the state was sent, and only after the
            # controller received it.
            assert block["e2e"]["p50_ms"] > block["internal"]["p50_ms"] > 0
        assert run["adapter_alone"]["n"] == node["steps"] and bare["compute_in_process"]["n"] == bare["steps"]
        # The node's log times every adapter step itself: node time and adapter time paired without a replay.
        for key in ("compute_in_node", "node_compute_logged", "internal_over_adapter_in_node",
                    "overhead_over_adapter_in_node"):
            assert node[key]["n"] == node["steps"] and math.isfinite(node[key]["p99_ms"]), (name, key)
        assert node["compute_in_node"]["p50_ms"] > 0 and node["internal_over_adapter_in_node"]["p50_ms"] >= 0
        assert node["node_compute_logged"]["p50_ms"] >= node["compute_in_node"]["p50_ms"]
        assert node["e2e"]["p50_ms"] > node["overhead_over_adapter_in_node"]["p50_ms"] > 0
    assert doc["runs"]["cheap_100hz"]["rate_hz"] == 100 and doc["echo"]["rtt"]["n"] > 0
    assert isinstance(doc["summary"]["met"], bool)
    assert set(doc["summary"]["node_overhead_over_adapter_in_node_p99_ms"]) == set(doc["runs"])

    saved = tmp_path / "node_latency.json"
    saved.write_text(result.stdout)
    table = subprocess.run([sys.executable, "bench/node_latency.py", "--table", str(saved)], capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == 4 and "raw pyzmq" in table.stdout
