"""The crash-point module: the registry matches the code, parsing, and the
kill itself (in a child process)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent import faults

ROOT = Path(__file__).resolve().parents[1]
PLACED = re.compile(r'faults\.point\("([^"]+)"\)')


def placed_points() -> list[str]:
    found = []
    for path in (ROOT / "agent").rglob("*.py"):
        if path.name != "faults.py":
            found += PLACED.findall(path.read_text())
    return found


def test_every_placed_point_is_registered_once_and_every_registered_one_is_placed() -> None:
    placed = placed_points()
    assert len(placed) == len(set(placed)), "a point name is placed twice"
    registered = [p for points in faults.POINTS.values() for p in points]
    assert sorted(set(placed)) == sorted(set(registered))
    assert set(faults.POINTS) == {"RunPodSandbox", "CreateContainer", "StartContainer", "RemovePodSandbox",
                                  "PullImage"}


def test_every_point_is_listed_in_the_debugging_docs() -> None:
    doc = (ROOT / "docs/debugging.md").read_text()
    assert [p for p in faults.ALL_POINTS if f"`{p}`" not in doc] == []


@pytest.mark.parametrize("setting, expected", [
    ("pull.blob", ("pull.blob", 1)), ("pull.blob:3", ("pull.blob", 3)), (" sandbox.run.dir ", ("sandbox.run.dir", 1)),
])
def test_parse(setting: str, expected: tuple[str, int]) -> None:
    assert faults.parse(setting) == expected


@pytest.mark.parametrize("setting", ["nope", "pull.blob:0", "pull.blob:x", "pull.blob:-1", ""])
def test_parse_refuses(setting: str) -> None:
    with pytest.raises(ValueError, match=faults.ENV):
        faults.parse(setting)


def test_disarmed_points_do_nothing() -> None:
    faults.arm(None)
    for name in faults.ALL_POINTS:
        faults.point(name)


def _child(setting: str, reached: list[str]) -> subprocess.CompletedProcess[str]:
    code = ("import sys\nfrom agent import faults\nfaults.arm_from_environment()\n"
            f"for name in {reached!r}:\n    faults.point(name)\n    print('passed', name, flush=True)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PYTHONPATH": str(ROOT), faults.ENV: setting})


def test_the_armed_point_kills_the_process_with_sigkill() -> None:
    r = _child("container.create.overlay", ["container.create.dir", "container.create.overlay",
                                            "container.create.seed"])
    assert r.returncode == -signal.SIGKILL
    assert r.stdout.split("\n")[:-1] == ["passed container.create.dir"]
    assert "crashing at container.create.overlay" in r.stderr


def test_the_nth_hit_kills() -> None:
    r = _child("pull.blob:2", ["pull.blob", "pull.manifest", "pull.blob", "pull.recorded"])
    assert r.returncode == -signal.SIGKILL
    assert r.stdout.split() == ["passed", "pull.blob", "passed", "pull.manifest"]


def test_a_point_never_reached_does_not_kill() -> None:
    r = _child("pull.recorded", ["pull.blob"])
    assert r.returncode == 0 and "passed pull.blob" in r.stdout
