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
    GuestNotReady,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from agent.domain.sandbox import NetworkMode, Sandbox
from agent.domain.vm import Container, ContainerState, ExecCredentials, GuestAccess
from agent.services.exec import COMMAND_MAX_S, MAX_OUTPUT_BYTES, ExecService
from agent.streaming.backend import ExitStatus, Streams
from tests.services.container_fakes import record, sandbox

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
    # guest-exec gets libvirt's full wait even with 2 s left: a start libvirt
    # gave up on could leave the program running with its pid unknown.
    assert agent.calls[0][1:] == ("guest-exec", agent.of("guest-exec")[0], COMMAND_MAX_S)
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


# -- streaming exec ------------------------------------------------------------------------


class Sandboxes:
    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb

    def get(self, sandbox_id: str) -> Sandbox:
        return self.sb

    def hold(self, sandbox_id: str) -> Any:
        raise AssertionError("exec never holds a sandbox")


class Keys:
    def create(self, directory: str) -> GuestAccess:
        raise AssertionError("exec never makes keys")

    def load(self, directory: str) -> ExecCredentials:
        return ExecCredentials(client_private_key=b"k", host_public_key=f"ssh-ed25519 AAAA {directory}")


class Session:
    def __init__(self, shell: Shell) -> None:
        self.shell = shell

    def run(self, command: str, tty: bool, streams: Streams) -> ExitStatus:
        self.shell.ran.append((command, tty))
        if streams.stdout is not None:
            streams.stdout.write(b"from ssh")
        return ExitStatus(code=4)

    def close(self) -> None:
        self.shell.closed += 1


class Shell:
    """Refuses ``not_ready`` connections (the guest boots), then opens sessions."""

    def __init__(self, clock: SteppingClock, not_ready: int = 0) -> None:
        self.clock = clock
        self.not_ready = not_ready
        self.connects: list[tuple[str, ExecCredentials, float]] = []
        self.ran: list[tuple[str, bool]] = []
        self.closed = 0

    def connect(self, host: str, credentials: ExecCredentials, timeout_s: float) -> Session:
        self.connects.append((host, credentials, timeout_s))
        if len(self.connects) <= self.not_ready:
            self.clock.now += timeout_s
            raise GuestNotReady(f"SSH on {host}:22 does not answer")
        return Session(self)


class Out:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class In:
    def read(self, n: int = 65536) -> bytes:
        return b""


def pod(ip: str = "10.88.0.7", mode: NetworkMode = NetworkMode.POD) -> Sandbox:
    sb = sandbox()
    return dataclasses.replace(sb, ip=ip, spec=dataclasses.replace(sb.spec, network_mode=mode))


def streaming(agent: ScriptedAgent, clock: SteppingClock, shell: Shell, sb: Sandbox,
              ready_timeout: float = 120.0) -> ExecService:
    return ExecService(Containers(running()), agent, sandboxes=Sandboxes(sb), keys=Keys(), shell=shell,
                       guest_ready_timeout_s=ready_timeout, pacing=clock)


def test_exec_runs_the_argv_over_ssh_to_the_pod_ip_with_the_vms_keys() -> None:
    clock = SteppingClock()
    agent, shell, out = ScriptedAgent(clock), Shell(clock), Out()
    status = streaming(agent, clock, shell, pod()).exec(
        CID, ["sh", "-c", "echo 'a b'; exit 4"], True, Streams(stdin=In(), stdout=out, stderr=None, resize=None))
    assert status == ExitStatus(code=4)
    assert out.data == b"from ssh"
    [(host, creds, _)] = shell.connects
    assert host == "10.88.0.7"
    assert creds.host_public_key.endswith(running().directory)
    assert shell.ran == [("sh -c 'echo '\"'\"'a b'\"'\"'; exit 4'", True)]
    assert shell.closed == 1
    assert agent.calls == []


def test_exec_waits_for_sshd_while_the_guest_boots() -> None:
    clock = SteppingClock()
    shell = Shell(clock, not_ready=5)
    status = streaming(ScriptedAgent(clock), clock, shell, pod()).exec(
        CID, ["true"], False, Streams(stdin=None, stdout=Out(), stderr=Out(), resize=None))
    assert status.code == 4
    assert len(shell.connects) == 6


def test_exec_gives_up_after_the_configured_wait_saying_what_the_guest_needs() -> None:
    clock = SteppingClock()
    shell = Shell(clock, not_ready=10**6)
    with pytest.raises(FailedPrecondition, match="did not answer SSH on 10.88.0.7:22 within 60s.*openssh-server"):
        streaming(ScriptedAgent(clock), clock, shell, pod(), ready_timeout=60).exec(
            CID, ["true"], False, Streams(stdin=None, stdout=Out(), stderr=Out(), resize=None))
    assert clock.now - 1000 <= 62


@pytest.mark.parametrize("sb", [pod(mode=NetworkMode.NODE), pod(ip="")], ids=["host-network", "no-pod-ip"])
def test_without_ssh_a_plain_exec_runs_through_the_guest_agent(sb: Sandbox) -> None:
    clock = SteppingClock()
    agent = ScriptedAgent(clock, guest_exec=started(), guest_exec_status=exits_after(
        1, exitcode=2, **{"out-data": b64(b"o"), "err-data": b64(b"e")}))
    shell, out, err = Shell(clock), Out(), Out()
    status = streaming(agent, clock, shell, sb).exec(CID, ["ls"], False,
                                                     Streams(stdin=None, stdout=out, stderr=err, resize=None))
    assert (status.code, out.data, err.data) == (2, b"o", b"e")
    assert shell.connects == []


@pytest.mark.parametrize(("tty", "stdin"), [(True, False), (False, True)])
def test_without_ssh_a_tty_or_stdin_is_refused_clearly(tty: bool, stdin: bool) -> None:
    clock = SteppingClock()
    agent = ScriptedAgent(clock)
    with pytest.raises(FailedPrecondition, match="tty or stdin needs SSH to the pod IP.*hostNetwork"):
        streaming(agent, clock, Shell(clock), pod(mode=NetworkMode.NODE)).exec(
            CID, ["sh"], tty, Streams(stdin=In() if stdin else None, stdout=Out(), stderr=None, resize=None))
    assert agent.calls == []


def test_libvirtd_away_for_a_moment_is_waited_on() -> None:
    clock = SteppingClock()
    tries = {"n": 0}

    def exec_(args: dict[str, Any], timeout: int) -> Any:
        tries["n"] += 1
        if tries["n"] <= 3:
            raise Unavailable("libvirt unavailable: end of file")
        return {"pid": 7}

    agent = ScriptedAgent(clock, guest_exec=exec_, guest_exec_status=exits_after(0, exitcode=0))
    assert service(agent, clock).exec_sync(CID, ["true"], 30).exit_code == 0


def test_libvirtd_away_for_good_is_unavailable_not_a_guest_problem() -> None:
    clock = SteppingClock()

    def down(args: dict[str, Any], timeout: int) -> Any:
        raise Unavailable("cannot connect to libvirt at qemu:///system")

    with pytest.raises(Unavailable, match="cannot connect to libvirt"):
        service(ScriptedAgent(clock, guest_exec=down), clock, ready_timeout=30).exec_sync(CID, ["true"], 0)


def test_a_status_poll_that_never_answers_again_ends_without_a_timeout() -> None:
    clock = SteppingClock()

    def gone(args: dict[str, Any], timeout: int) -> Any:
        clock.now += timeout
        raise GuestAgentNotReady("Guest agent not available for now")

    agent = ScriptedAgent(clock, guest_exec=started(), guest_exec_status=gone)
    with pytest.raises(GuestAgentNotReady):
        service(agent, clock, ready_timeout=60).exec_sync(CID, ["true"], 0)


def test_a_timed_out_call_returns_once_a_slow_killer_is_done() -> None:
    clock = SteppingClock()
    polls = {"killer": 0}

    def exec_(args: dict[str, Any], timeout: int) -> Any:
        return {"pid": 43} if args["path"] == "sh" and "kill-tree" in args["arg"] else {"pid": 42}

    def status(args: dict[str, Any], timeout: int) -> Any:
        if args["pid"] == 43:
            polls["killer"] += 1
            return {"exited": polls["killer"] >= 60, "exitcode": 0}  # ~6 s of a busy guest
        return {"exited": polls["killer"] >= 60, "signal": 9}

    agent = ScriptedAgent(clock, guest_exec=exec_, guest_exec_status=status)
    with pytest.raises(DeadlineExceeded):
        service(agent, clock).exec_sync(CID, ["sleep", "10"], 1)
    assert polls["killer"] == 60
    assert agent.of("guest-exec-status")[-1] == {"pid": 42}
