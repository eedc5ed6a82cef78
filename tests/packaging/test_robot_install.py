"""The robot-side install: ``pip install metarl-robot`` (the wheel, core dependencies only) into a fresh venv runs a
shipped bundle against the digital twin with no torch or MuJoCo present, on this Python and on Python 3.10 (ROS 2
Humble's) where one is found.

The wheel is built from a copy of the sources (the checkout stays clean while other tests run), the venv is new and
empty, and pip resolves the wheel's own dependencies: what a robot computer would get. The twin needs MuJoCo, so it
runs from this (development) venv in a process of its own; the robot side runs ``robot_episode.py`` in the fresh
venv: the node's control loop, safety layer and episode log, 250 control steps at the robot's rate.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from metarl_robot import cli
from metarl_robot.paths import REPO_ROOT

BUNDLE = REPO_ROOT / "policies" / "cartpole_mb"
NODE_SRC = REPO_ROOT / "ros2_ws" / "src" / "metarl_robot_ros"
EPISODE_SCRIPT = Path(__file__).with_name("robot_episode.py")
STEPS = 250
"""10 s of cart-pole control at 25 Hz."""
WHEEL_SOURCES = ("pyproject.toml", "README.md", "metarl_robot")
"""What the wheel is built from (pyproject's readme and package list)."""


def python310() -> str | None:
    """A working Python 3.10 with venv: ``$METARL_PYTHON310``, ``python3.10`` on PATH, pyenv's, Debian's path.

    Neither Debian bookworm nor PyPI ships a CPython 3.10 a fresh machine could install (bookworm has 3.11 only;
    PyPI's Python installers download from elsewhere), so this looks for one that is already there (the dev image's
    pyenv has 3.10) and the test says so when there is none.
    """
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [os.environ.get("METARL_PYTHON310"), shutil.which("python3.10"),
                  *sorted(str(p) for p in pyenv_root.glob("versions/3.10*/bin/python3.10")),
                  "/usr/bin/python3.10", "/usr/local/bin/python3.10"]
    for candidate in filter(None, candidates):
        try:  # a pyenv shim on PATH exists but fails unless 3.10 is selected
            ok = subprocess.run([candidate, "-c", "import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != "
                                 "(3, 10))"], capture_output=True, timeout=60).returncode == 0
        except OSError:
            ok = False
        if ok:
            return candidate
    return None


def clean_env() -> dict[str, str]:
    """This environment without what would put the checkout or this venv on the fresh venv's path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run(cmd: list[str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                            timeout=timeout_s)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The metarl-robot wheel, built by pip (setuptools, as pyproject's build-system says) from a copy."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    src.mkdir()
    for name in WHEEL_SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO_ROOT / name, src / name)
    # An absolute path: a bare folder name is a requirement name to pip (PyPI has a package called "src").
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", out, src.resolve()], tmp, 300)
    (built,) = out.glob("metarl_robot-*.whl")
    return built


class Twin:
    """``metarl sim-robot`` from the development venv, until stopped; ``endpoints`` from its ready line."""

    def __init__(self, tmp: Path) -> None:
        self.summary_path = tmp / "twin_summary.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metarl_robot.cli", "sim-robot", "--robot", "cartpole", "--task",
             "cartpole_swingup:test", "--port-base", "0", "--summary", str(self.summary_path)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        if not line or not line[0]:
            self.proc.kill()
            raise AssertionError(f"no ready line from sim-robot: {self.proc.stderr.read()}")
        self.endpoints: dict[str, str] = json.loads(line[0])["endpoints"]

    def stop(self) -> dict:
        """SIGINT (as Ctrl-C), wait, and its summary."""
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return json.loads(self.summary_path.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


HERE = f"python{sys.version_info.major}.{sys.version_info.minor}"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("version", [HERE, "python3.10"])
def test_robot_install_runs_a_bundle_against_the_twin_without_torch_or_mujoco(version, wheel, tmp_path):
    python = sys.executable if version == HERE else python310()
    if python is None:
        pytest.skip("no Python 3.10 on this machine ($METARL_PYTHON310, python3.10 on PATH, ~/.pyenv/versions/3.10*, "
                    "/usr/bin): Debian bookworm and PyPI ship none to install")
    venv = tmp_path / "venv"
    run([python, "-m", "venv", venv], tmp_path, 120)
    vpython = venv / "bin" / "python"
    run([vpython, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel], tmp_path, 480)
    listed = run([vpython, "-m", "pip", "list", "--format", "json"], tmp_path, 120).stdout
    distributions = {d["name"].lower() for d in json.loads(listed)}
    assert "metarl-robot" in distributions
    assert not distributions & {"torch", "mujoco", "gymnasium", "matplotlib", "tqdm", "tensorboard", "onnxscript"}

    twin = Twin(tmp_path)
    try:
        out = run([vpython, "-I", EPISODE_SCRIPT, "--bundle", BUNDLE, "--endpoints", json.dumps(twin.endpoints),
                   "--steps", STEPS, "--log", tmp_path / "episode.mcap", "--node-src", NODE_SRC,
                   "--compile", NODE_SRC, "--compile", REPO_ROOT / "launch"], tmp_path, 300).stdout
        summary = twin.stop()
    finally:
        twin.kill()
    report = json.loads(out.strip().splitlines()[-1])

    assert Path(report["package_file"]).is_relative_to(venv), report["package_file"]  # the wheel, not the checkout
    assert f"python{report['python'][0]}.{report['python'][1]}" == version
    assert report["installed_not_on_a_robot"] == [] and report["imported_not_on_a_robot"] == []
    assert report["robot_side_modules"] > 30 and report["compiled"] > 4
    assert report["error"] == "" and report["outcome"] == f"episode_steps reached ({STEPS})", report
    assert report["bundle_kind"] == "model_based" and report["steps"] == STEPS
    # Every step was logged and read back: the adapter's 250 and the node's safe commands at the end.
    assert report["log_complete"] and report["log_error"] == "" and report["log_adapted"] == STEPS
    assert report["log_steps"] == report["commands_sent"] >= STEPS
    assert summary["handshakes"]["accepted"] == 1
    # The twin took the commands: a loaded machine may let a few expire, never most.
    assert summary["commands"]["accepted"] >= 0.9 * STEPS, summary["commands"]

    # The command line of a robot install: the robot-side commands run, a sim or train one says what to install.
    metarl = venv / "bin" / "metarl"
    assert "replay" in run([metarl, "--help"], tmp_path, 120).stdout
    for command, extra in (("train", "train"), ("sim-robot", "sim")):
        args = [metarl, command, *(["configs/mb_cartpole_swingup.yaml"] if command == "train" else [])]
        result = subprocess.run([str(a) for a in args], cwd=tmp_path, env=clean_env(), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"metarl {command}: error: needs ") and line.endswith(
            f'which is not installed: pip install "metarl-robot[{extra}]"'), line


def test_a_missing_optional_module_is_one_line_naming_the_extra(monkeypatch, capsys):
    def needs_torch(args):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(cli, "_cmd_eval", needs_torch)
    assert cli.main(["eval", "runs/x"]) == 2
    assert capsys.readouterr().err == 'metarl eval: error: needs torch, which is not installed: pip install ' \
                                      '"metarl-robot[train]"\n'
    # A command of no extra names the module's; the demo needs the development setup's extras.
    assert cli._missing_extra("families", ModuleNotFoundError(name="matplotlib")).endswith('"metarl-robot[replay]"')
    assert cli._missing_extra("demo", ModuleNotFoundError(name="mujoco.rollout")).endswith(
        '"metarl-robot[train,ros,dev]"')


def test_a_missing_module_of_no_extra_is_a_bug_and_raises(monkeypatch):
    def broken(args):
        raise ModuleNotFoundError("No module named 'metarl_robot.nope'", name="metarl_robot.nope")

    monkeypatch.setattr(cli, "_cmd_families", broken)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["families"])
