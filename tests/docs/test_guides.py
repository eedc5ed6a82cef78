"""Keep the user guides honest: their worked example runs, and they name everything the code offers.

- The code blocks marked ``<!-- example: <path> -->`` in docs/robot_spec.md and docs/task_families.md
  (the worked robot and family) are written to ``<path>`` under a scratch sim dir, loaded, built
  into an env, checked with gymnasium's env checker and stepped.
- The blocks marked ``<!-- check: python -->`` (the "check it" snippets) run against them.
- Every effect and every reward the code knows is named in docs/task_families.md.
- The table of shipped families in docs/task_families.md equals the one generated from sim/tasks;
  run ``python tests/docs/test_guides.py`` to rewrite it after changing a family.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import metarl_robot.envs  # registers the shipped families (before any test redirects the sim dir)
from metarl_robot.envs.dynamics import EFFECTS
from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.envs.robot_model import load_model
from metarl_robot.paths import REPO_ROOT
from metarl_robot.spec.family import PowerRange, TaskFamily, load_family
from metarl_robot.spec.rewards import REWARDS
from metarl_robot.spec.robot import load_robot

DOCS = REPO_ROOT / "docs"
GUIDES = (DOCS / "robot_spec.md", DOCS / "task_families.md")

_EXAMPLE = re.compile(r"<!-- example: (?P<path>[^\s>]+) -->\s*\n```[a-z]*\n(?P<body>.*?)\n```", re.DOTALL)
_CHECK = re.compile(r"<!-- check: python -->\s*\n```python\n(?P<body>.*?)\n```", re.DOTALL)
_TABLE = re.compile(r"<!-- shipped-families:begin -->\n(?P<body>.*?)<!-- shipped-families:end -->", re.DOTALL)

# What gymnasium's checker says about any MetaMujocoEnv by design: observations are unbounded
# physical values, actions are in robot units, and an env built directly has no registry spec.
_EXPECTED_CHECKER_WARNINGS = (
    "we recommend using a symmetric and normalized space",
    "Box observation space minimum value is -infinity",
    "Box observation space maximum value is infinity",
    "Not able to test alternative render modes",
)


def _examples() -> dict[str, str]:
    out: dict[str, str] = {}
    for guide in GUIDES:
        for m in _EXAMPLE.finditer(guide.read_text()):
            assert m["path"] not in out, f"example {m['path']} is marked twice"
            out[m["path"]] = m["body"] + "\n"
    return out


@pytest.fixture
def example_sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sim dir holding only the guides' worked example; the loaders read it through METARL_SIM_DIR."""
    sim = tmp_path / "sim"
    for rel, text in _examples().items():
        dst = sim / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(text)
    monkeypatch.setenv("METARL_SIM_DIR", str(sim))
    return sim


def _example_family_name(sim: Path) -> str:
    (family_yaml,) = (sim / "tasks").glob("*.yaml")
    return family_yaml.stem


def test_the_guides_mark_a_complete_example():
    paths = set(_examples())
    assert any(p.startswith("robots/") and p.endswith("/robot.yaml") for p in paths), paths
    assert any(p.startswith("robots/") and p.endswith(".xml") for p in paths), paths
    assert sum(p.startswith("tasks/") for p in paths) == 1, paths


def _documented_info_keys() -> set[str]:
    """The keys of the `info` table in docs/task_families.md (the table the user reads)."""
    text = (DOCS / "task_families.md").read_text()
    table = text[text.index("| `info` key | value |"):].split("\n\n")[0]
    return set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))


def test_worked_example_loads_builds_and_steps(example_sim: Path):
    (robot_yaml,) = (example_sim / "robots").glob("*/robot.yaml")
    robot = load_robot(robot_yaml.parent.name)
    model = load_model(robot)
    assert robot.mjcf_path.is_file()
    assert model.nu == robot.action_dim

    name = _example_family_name(example_sim)
    family = load_family(name)
    assert family.spec.robot == robot.name

    env = MetaMujocoEnv(family=name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    unexpected = [str(w.message) for w in caught if not any(s in str(w.message) for s in _EXPECTED_CHECKER_WARNINGS)]
    assert not unexpected, unexpected

    obs, info = env.reset(seed=0, options={"task": "test"})
    assert obs.shape == (robot.obs_dim,)
    assert info["privileged"].shape == (robot.privileged_dim,)
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs, reward, terminated, truncated, info = env.step(rng.uniform(robot.action_low, robot.action_high))
        assert np.all(np.isfinite(obs)) and np.isfinite(reward)
        assert not terminated and not truncated
        assert set(info) == _documented_info_keys()

    # Every grid task and every split is accepted by the env (the guide's ranges are consistent).
    for task in family.grid(2, "train") + family.grid(2, "test"):
        env.set_task(task)
        env.step(robot.safe_action)
    env.close()


def test_worked_example_through_gymnasium_make(example_sim: Path):
    family_yaml = next((example_sim / "tasks").glob("*.yaml"))
    env = metarl_robot.envs.make_env(str(family_yaml))
    obs, _ = env.reset(seed=1, options={"task": "train"})
    obs, *_ = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs)
    env.close()


@pytest.mark.parametrize("guide", [g.name for g in GUIDES])
def test_check_snippets_run(guide: str, example_sim: Path, capsys: pytest.CaptureFixture[str]):
    snippets = [m["body"] for m in _CHECK.finditer((DOCS / guide).read_text())]
    assert snippets, f"docs/{guide} has no <!-- check: python --> block"
    for i, snippet in enumerate(snippets):
        exec(compile(snippet, f"docs/{guide} check block {i}", "exec"), {"__name__": "__snippet__"})
        assert capsys.readouterr().out.strip()


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_every_effect_and_reward_is_documented():
    """Each effect has a row in the Effects table, each reward a row in the Rewards table."""
    text = (DOCS / "task_families.md").read_text()
    effects, rewards = _section(text, "Effects"), _section(text, "Rewards")
    missing = [f"effect {n}" for n in EFFECTS if f"\n| `{n}` |" not in effects]
    missing += [f"reward {n}" for n in REWARDS if f"\n| `{n}` |" not in rewards]
    assert not missing, f"docs/task_families.md does not document: {missing}"


# ---- the generated table of shipped families -------------------------------------------------------
def _flow(value) -> str:
    """YAML flow style, as a user would write it in the family file."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _num(x: float) -> str:
    return f"{x:.4g}"


def _range(written, resolved: tuple[float, float]) -> str:
    lo, hi = resolved
    if isinstance(written, PowerRange):
        e_lo, e_hi = written.exponent
        return f"{_num(written.base)}^[{_num(e_lo)}, {_num(e_hi)}] = [{_num(lo)}, {_num(hi)}]"
    return f"[{_num(lo)}, {_num(hi)}]"


def shipped_families_markdown() -> str:
    """The guide's table of the families in the repository's sim/tasks, generated from the YAMLs."""
    blocks = []
    for path in sorted((REPO_ROOT / "sim" / "tasks").glob("*.yaml")):
        family: TaskFamily = load_family(path)
        spec = family.spec
        robot = load_robot(REPO_ROOT / "sim" / "robots" / spec.robot / "robot.yaml")
        seconds = spec.episode_steps * robot.control.period
        lines = [
            f"#### `{family.name}`",
            "",
            f"{spec.description}",
            "",
            f"Robot `{spec.robot}`, env id `{spec.env_id}`, reward `{spec.reward}`, "
            f"{spec.episode_steps} steps per episode ({seconds:g} s).",
            "",
            "| parameter | kind | effect | sampling | units | nominal | train | test |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in family.params:
            written = spec.params[p.name]
            effect = f"`{_flow(p.effect)}`" if p.effect else "—"
            lines.append(
                f"| `{p.name}` | {p.kind} | {effect} | {p.sampling} | {p.units} | {_num(p.nominal)} "
                f"| {_range(written.train, p.train)} | {_range(written.test, p.test)} |"
            )
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def test_shipped_families_table_matches_sim_tasks():
    match = _TABLE.search((DOCS / "task_families.md").read_text())
    assert match, "docs/task_families.md lacks the <!-- shipped-families:begin/end --> table"
    expected = shipped_families_markdown()
    assert match["body"].strip() == expected.strip(), (
        "the shipped-families table is stale; regenerate it with: python tests/docs/test_guides.py"
    )


def write_shipped_families_table() -> None:
    """Replace the table between the guide's markers with the one generated from sim/tasks."""
    guide = DOCS / "task_families.md"
    text = guide.read_text()
    match = _TABLE.search(text)
    if match is None:
        raise SystemExit(f"{guide} lacks the <!-- shipped-families:begin/end --> markers")
    table = shipped_families_markdown().strip() + "\n\n"
    guide.write_text(text[: match.start("body")] + table + text[match.end("body") :])
    print(f"rewrote the shipped-families table in {guide}")


if __name__ == "__main__":
    write_shipped_families_table()
