"""ExecService.exec_sync against a scripted guest agent and a stepping clock."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from agent.domain.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    GuestAgentNotReady,
    GuestAgentRefused,
    InvalidArgument,
    NotFound,
)
from agent.domain.vm import Container, ContainerState
from agent.services.exec import MAX_OUTPUT_BYTES, ExecService
from tests.services.container_fakes import record

CID = "c" * 64


class SteppingClock:
    """Monotonic time that moves only when someone sleeps (or a command takes time)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class Containers:
    def __init__(self, *containers: Container) -> None:
        self.by_id = {c.id: c for c in containers}

    def get(self, container_id: str) -> Container:
        if container_id not in self.by_id:
            raise NotFound(f"container {container_id!r} not found")
        return self.by_id[container_id]


Handler = Callable[[dict[str, Any], int], Any]


class ScriptedAgent:
    """Answers each command with the handler registered for its name; records every call."""

    def __init__(self, clock: SteppingClock, **handlers: Handler) -> None:
        self.clock = clock
        self.handlers = handlers
        self.calls: list[tuple[str, str, dict[str, Any], int]] = []

    def guest_agent_command(self, name: str, command: dict[str, Any], timeout_s: int) -> Any:
        self.calls.append((name, command["execute"], command.get("arguments", {}), timeout_s))
        handler = self.handlers[command["execute"].replace("-", "_")]
        return handler(command.get("arguments", {}), timeout_s)

    def of(self, execute: str) -> list[dict[str, Any]]:
        return [args for _, ex, args, _ in self.calls if ex == execute]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def running() -> Container:
    return record(CID, ContainerState.RUNNING)


def service(agent: ScriptedAgent, clock: SteppingClock, *containers: Container,
            ready_timeout: float = 120.0) -> ExecService:
    return ExecService(Containers(*(containers or (running(),))), agent, guest_ready_timeout_s=ready_timeout,
                       pacing=clock)


def exits_after(polls: int, **status: Any) -> Handler:
    """guest-exec-status: running for ``polls`` answers, then exited with ``status``."""
    seen = {"n": 0}

    def answer(args: dict[str, Any], timeout: int) -> Any:
        seen["n"] += 1
        if seen["n"] <= polls:
            return {"exited": False}
        return {"exited": True, **status}
    return answer


def started(pid: int = 42) -> Handler:
    return lambda args, timeout: {"pid": pid}


def test_output_and_exit_code_come_back_decoded() -> None:
    clock = SteppingClock()
    agent = ScriptedAgent(clock, guest_exec=started(), guest_exec_status=exits_after(
        3, exitcode=3, **{"out-data": b64(b"out\n"), "err-data": b64(b"err\n")}))
    r = service(agent, clock).exec_sync(CID, ["sh", "-c", "echo out; echo err >&2; exit 3"], 5)
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
    assert agent.of("guest-exec") == [
        {"path": "sh", "arg": ["-c", "echo out; echo err >&2; exit 3"], "capture-output": True}]
    assert agent.calls[0][0] == f"podvisor-{CID}"
    assert {a["pid"] for a in agent.of("guest-exec-status")} == {42}


def test_polling_backs_off_from_a_few_milliseconds() -> None:
    clock = SteppingClock()
    agent = ScriptedAgent(clock, guest_exec=started(), guest_exec_status=exits_after(30, exitcode=0))
    service(agent, clock).exec_sync(CID, ["true"], 0)
    assert clock.sleeps[0] < 0.01
    assert clock.sleeps == sorted(clock.sleeps)
    assert max(clock.sleeps) <= 0.1


def test_a_signal_reads_as_128_plus_its_number() -> None:
    clock = SteppingClock()
    agent = ScriptedAgent(clock, guest_exec=started(), guest_exec_status=exits_after(0, signal=9))
    assert service(agent, clock).exec_sync(CID, ["x"], 0).exit_code == 137


def test_output_is_capped_below_kubelets_message_limit() -> None:
    clock = SteppingClock()
    big = b"a" * (MAX_OUTPUT_BYTES - 10)
    agent = ScriptedAgent(clock, guest_exec=started(), guest_exec_status=exits_after(
        0, exitcode=0, **{"out-data": b64(big), "err-data": b64(b"e" * 100)}))
    r = service(agent, clock).exec_sync(CID, ["cat"], 0)
    assert len(r.stdout) + len(r.stderr) == MAX_OUTPUT_BYTES < 16 * 2**20
    assert r.stdout == big and r.stderr == b"e" * 10


def test_timeout_kills_the_program_in_the_guest_and_fails_as_deadline_exceeded() -> None:
    clock = SteppingClock()
    killed = {"yes": False}

    def exec_(args: dict[str, Any], timeout: int) -> Any:
        if args["path"] == "sh" and "kill-tree" in args["arg"]:
            killed["yes"] = True
            return {"pid": 43}
        return {"pid": 42}

    def status(args: dict[str, Any], timeout: int) -> Any:
        return {"exited": True, "signal": 9} if killed["yes"] else {"exited": False}

    agent = ScriptedAgent(clock, guest_exec=exec_, guest_exec_status=status)
    start = clock.now
    with pytest.raises(DeadlineExceeded, match=r"command 'sleep 10' timed out after 2s"):
        service(agent, clock).exec_sync(CID, ["sleep", "10"], 2)
    assert killed["yes"]
    kill = agent.of("guest-exec")[1]
    assert kill["arg"][-1] == "42"
    # Stopped within its timeout (plus one poll), not after the program ended.
    assert clock.now - start < 2.2
    # The killed program's status was read, freeing the agent's record of it.
    assert agent.of("guest-exec-status")[-1] == {"pid": 42}


def test_the_plain_kill_is_tried_when_the_shell_cannot_run() -> None:
    clock = SteppingClock()

    def exec_(args: dict[str, Any], timeout: int) -> Any:
        if args["path"] == "sh":
            raise GuestAgentRefused("Failed to execute child process “sh” (No such file or directory)")
        return {"pid": 42}

    agent = ScriptedAgent(clock, guest_exec=exec_, guest_exec_status=lambda a, t: {"exited": False})
    with pytest.raises(DeadlineExceeded):
        service(agent, clock).exec_sync(CID, ["sleep", "10"], 1)
    assert [a["path"] for a in agent.of("guest-exec")] == ["sleep", "sh", "kill"]


def test_a_booting_guest_is_waited_for() -> None:
    clock = SteppingClock()
    tries = {"n": 0}

    def exec_(args: dict[str, Any], timeout: int) -> Any:
        tries["n"] += 1
        if clock.now < 1030:  # the agent connects 30 s in
            raise GuestAgentNotReady("QEMU guest agent is not connected")
        return {"pid": 7}

    agent = ScriptedAgent(clock, guest_exec=exec_, guest_exec_status=exits_after(0, exitcode=0))
    assert service(agent, clock).exec_sync(CID, ["hostname"], 0).exit_code == 0
    assert tries["n"] > 2
    assert max(clock.sleeps) <= 1.0


def test_the_wait_for_the_agent_is_bounded_by_the_calls_timeout() -> None:
    clock = SteppingClock()

    def never(args: dict[str, Any], timeout: int) -> Any:
        raise GuestAgentNotReady("QEMU guest agent is not connected")

    agent = ScriptedAgent(clock, guest_exec=never)
    with pytest.raises(DeadlineExceeded, match="guest agent did not answer"):
        service(agent, clock).exec_sync(CID, ["true"], 5)
    assert clock.now - 1000 <= 5


def test_an_agent_that_never_answers_is_a_failed_precondition_naming_what_the_guest_needs() -> None:
    clock = SteppingClock()

    def never(args: dict[str, Any], timeout: int) -> Any:
        raise GuestAgentNotReady("QEMU guest agent is not connected")

    agent = ScriptedAgent(clock, guest_exec=never)
    with pytest.raises(FailedPrecondition, match="qemu-guest-agent.*org.qemu.guest_agent.0"):
        service(agent, clock, ready_timeout=120).exec_sync(CID, ["true"], 0)
    assert 100 <= clock.now - 1000 <= 120


@pytest.mark.parametrize(("message", "code"), [
    ("internal error: unable to execute QEMU agent command 'guest-exec': "
     "Failed to execute child process “nope” (No such file or directory)", 127),
    ("internal error: unable to execute QEMU agent command 'guest-exec': "
     "Failed to execute child process “/etc/hosts” (Permission denied)", 126),
])
def test_a_program_the_guest_cannot_start_exits_like_in_a_shell(message: str, code: int) -> None:
    clock = SteppingClock()

    def refuse(args: dict[str, Any], timeout: int) -> Any:
        raise GuestAgentRefused(message)

    r = service(ScriptedAgent(clock, guest_exec=refuse), clock).exec_sync(CID, ["nope"], 0)
    assert r.exit_code == code
    assert r.stderr.startswith(b"Failed to execute child process")


def test_an_unknown_container_is_not_found() -> None:
    clock = SteppingClock()
    with pytest.raises(NotFound):
        service(ScriptedAgent(clock), clock).exec_sync("d" * 64, ["true"], 0)


@pytest.mark.parametrize("state", [ContainerState.CREATED, ContainerState.EXITED])
def test_a_container_that_is_not_running_is_a_failed_precondition(state: ContainerState) -> None:
    clock = SteppingClock()
    agent = ScriptedAgent(clock)
    c = dataclasses.replace(running(), state=state)
    with pytest.raises(FailedPrecondition, match=f"not running \\(it is {state.value}\\)"):
        service(agent, clock, c).exec_sync(CID, ["true"], 0)
    assert agent.calls == []


@pytest.mark.parametrize(("cmd", "timeout", "field"), [([], 0, "cmd"), ([""], 0, "cmd"), (["true"], -1, "timeout")])
def test_bad_requests_name_the_field(cmd: list[str], timeout: int, field: str) -> None:
    clock = SteppingClock()
    agent = ScriptedAgent(clock)
    with pytest.raises(InvalidArgument) as exc:
        service(agent, clock).exec_sync(CID, cmd, timeout)
    assert exc.value.field == field
    assert agent.calls == []


def test_a_channel_turned_off_fails_at_once() -> None:
    clock = SteppingClock()

    def off(args: dict[str, Any], timeout: int) -> Any:
        raise FailedPrecondition("domain has no guest agent channel (org.qemu.guest_agent.0)")

    agent = ScriptedAgent(clock, guest_exec=off)
    with pytest.raises(FailedPrecondition, match="no guest agent channel"):
        service(agent, clock).exec_sync(CID, ["true"], 0)
    assert len(agent.calls) == 1 and clock.sleeps == []
