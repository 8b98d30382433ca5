"""The watchdog adapter: when systemd asks for pings, and that a ping needs
every loop to have turned within the last half interval."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from agent import faults
from agent.adapters.watchdog import Watchdog, interval_from_environment

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_interval_from_environment(env: dict[str, str], expected: float | None) -> None:
    assert interval_from_environment(env, pid=42) == expected


class Loops:
    def __init__(self) -> None:
        self.now = 100.0
        self.last = {"grpc": 100.0, "libvirt-events": 100.0, "console-logs": 100.0}
        self.sent: list[str] = []

    def watchdog(self) -> Watchdog:
        return Watchdog(10.0, {name: (lambda n=name: self.last[n]) for name in self.last},
                        self.notify, clock=lambda: self.now)

    def notify(self, state: str) -> bool:
        self.sent.append(state)
        return True


def test_pings_only_while_every_loop_turns() -> None:
    loops = Loops()
    dog = loops.watchdog()
    assert dog.period == 5.0
    assert dog.tick() and loops.sent == ["WATCHDOG=1"]
    # Five seconds on, every loop turned meanwhile: a ping.
    loops.now = 105.0
    loops.last = dict.fromkeys(loops.last, 104.0)
    assert dog.tick()
    # The console follower stopped at 104: still within the half interval at 109, not at 109.5.
    loops.now, loops.last["grpc"], loops.last["libvirt-events"] = 109.0, 108.9, 108.9
    assert dog.tick()
    loops.now, loops.last["grpc"], loops.last["libvirt-events"] = 109.5, 109.4, 109.4
    assert dog.stalled() == ["console-logs"]
    assert not dog.tick()
    assert not dog.tick()
    assert loops.sent == ["WATCHDOG=1"] * 3
    # It turns again: pings again.
    loops.last["console-logs"] = 109.5
    assert dog.tick() and len(loops.sent) == 4


def test_a_notify_error_is_no_ping_and_no_crash() -> None:
    def broken(_state: str) -> bool:
        raise ConnectionRefusedError("no systemd there")

    dog = Watchdog(2.0, {"grpc": lambda: 0.0}, broken, clock=lambda: 0.5)
    assert dog.tick() is False


def test_every_watched_loop_has_exactly_one_wedge_point() -> None:
    placed = [name for path in (ROOT / "agent").rglob("*.py") if path.name != "faults.py"
              for name in re.findall(r'faults\.wedge\("([^"]+)"\)', path.read_text())]
    assert sorted(placed) == sorted(faults.LOOPS)


@pytest.mark.parametrize(("setting", "problem"), [
    ("nosuchloop@/tmp/x", "unknown loop"),
    ("grpc", "expected <loop>@"),
    ("grpc@relative", "expected <loop>@"),
])
def test_bad_wedge_settings_are_refused(setting: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        faults.parse_wedge(setting)


def test_a_wedge_blocks_only_its_loop_and_only_once_triggered(tmp_path: Path) -> None:
    trigger = tmp_path / "now"
    faults.arm_wedge(f"console-logs@{trigger}")
    try:
        faults.wedge("console-logs")  # not triggered: passes
        trigger.touch()
        faults.wedge("grpc")  # another loop: passes
        stuck = threading.Thread(target=faults.wedge, args=("console-logs",), daemon=True)
        stuck.start()
        stuck.join(1.0)
        assert stuck.is_alive()
    finally:
        faults.arm_wedge(None)
    faults.wedge("console-logs")  # disarmed: passes
