"""Keep docs/episode_log.md honest: its tables are the code's, and its example runs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from metarl_robot.logs import format as el
from metarl_robot.logs.reader import read_episode
from metarl_robot.logs.writer import EpisodeLogWriter
from metarl_robot.paths import REPO_ROOT
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.spec.robot import load_robot

DOC = (REPO_ROOT / "docs" / "episode_log.md").read_text()


def table(name: str) -> list[list[str]]:
    """Rows (cells without backticks) of the table between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    body = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", DOC, re.DOTALL)
    assert body, f"docs/episode_log.md has no {name} table"
    rows = [line.strip().strip("|").split("|") for line in body[1].strip().splitlines()[2:]]
    return [[cell.strip().replace("`", "") for cell in row] for row in rows]


def test_topic_table_is_the_layout() -> None:
    assert {row[0]: row[1] for row in table("topics")} == el.TOPIC_TYPES


def test_step_field_table_is_the_layout_with_its_code_tables() -> None:
    rows = table("step-fields")
    assert [row[0] for row in rows] == list(el.STEP_FIELDS)
    meaning = {row[0]: row[1] for row in rows}
    sources = re.findall(r"(\d) (\w+)", meaning["command_source"])
    assert [name for _, name in sources] == list(el.COMMAND_SOURCES)
    assert [int(code) for code, _ in sources] == list(range(len(el.COMMAND_SOURCES)))
    states = re.findall(r"(\d) ([A-Z_]+)", meaning["safety_state"])
    assert [name for _, name in states] == list(el.SAFETY_STATES[1:])
    assert [int(code) for code, _ in states] == list(range(1, len(el.SAFETY_STATES)))


def test_the_documented_version_is_the_code_s_and_every_readable_version_is_listed() -> None:
    assert f"The layout described here is version\n**{el.EPISODE_LOG_SCHEMA_VERSION}** " in DOC
    assert f"version of this layout (`{el.EPISODE_LOG_SCHEMA_VERSION}`;" in DOC
    history = re.search(r"\| version \| what changed \|\n\|---\|---\|\n((?:\|.*\n)+)", DOC)
    assert history, "docs/episode_log.md has no version table"
    assert [int(row.split("|")[1]) for row in history[1].splitlines()] == list(el.READABLE_SCHEMA_VERSIONS)
    assert el.READABLE_SCHEMA_VERSIONS[-1] == el.EPISODE_LOG_SCHEMA_VERSION
    # Versions only append fields: an older version's /metarl/step labels are a prefix of the newer one's.
    assert sorted(el.STEP_FIELDS_BY_VERSION) == list(el.READABLE_SCHEMA_VERSIONS)
    for old, new in zip(el.READABLE_SCHEMA_VERSIONS, el.READABLE_SCHEMA_VERSIONS[1:], strict=False):
        older, newer = el.STEP_FIELDS_BY_VERSION[old], el.STEP_FIELDS_BY_VERSION[new]
        assert newer[:len(older)] == older
    assert el.STEP_FIELDS_BY_VERSION[el.EPISODE_LOG_SCHEMA_VERSION] == el.STEP_FIELDS


def test_metadata_table_lists_every_key_the_writer_writes(tmp_path: Path) -> None:
    bundle = load_bundle(REPO_ROOT / "policies" / "cartpole_mb")
    path = tmp_path / "ep.mcap"
    with EpisodeLogWriter(path, load_robot("cartpole"), bundle=bundle, task={"pole_length": 1.0},
                          extra_metadata={"anything": 1}):
        pass
    written = {(record, key) for record, values in read_episode(path).metadata.items() for key in values}
    documented = {(row[0], row[1]) for row in table("metadata")}
    assert ("metarl/extra", "*any*") in documented
    assert written - {("metarl/extra", "anything")} == documented - {("metarl/extra", "*any*")}


def test_the_writing_example_runs(tmp_path: Path) -> None:
    block = re.search(r"<!-- check: python -->\s*\n```python\n(.*?)\n```", DOC, re.DOTALL)
    assert block
    exec(compile(block[1], "docs/episode_log.md", "exec"), {"workdir": str(tmp_path)})
    assert (tmp_path / "logs" / "cartpole_ep0000.mcap").is_file()


def test_the_documented_plot_index_is_the_prediction_error(tmp_path: Path) -> None:
    """The doc tells Foxglove users /metarl/adaptation.data[14] is the cart-pole adapter's prediction error."""
    assert "/metarl/adaptation.data[14]` (the cart-pole model-based adapter's prediction error" in DOC
    bundle = load_bundle(REPO_ROOT / "policies" / "cartpole_mb")
    action, diagnostics = bundle.make_adapter().act(np.array([[0.0, 3.1, 0.0, 0.0]]), {"target_x": 0.0})
    path = tmp_path / "ep.mcap"
    with EpisodeLogWriter(path, bundle.robot) as log:
        log.write_step(obs=np.zeros(4), state_seq=1, robot_stamp_ns=0, receive_time_ns=0, command=action,
                       command_seq=1, adapter_action=action, adaptation=diagnostics)
    episode = read_episode(path)
    blocks = [("action", 1)] + [(name, values.shape[1]) for name, values in episode.adaptation.items()]
    offsets = dict(zip([name for name, _ in blocks], np.cumsum([0] + [size for _, size in blocks]), strict=False))
    assert offsets["prediction_error"] == 14
