"""Running commands in a VM's guest: ExecSync (and the non-interactive
fallback of Exec) through the QEMU guest agent; Exec (``StreamBackend.exec``)
through SSH over the pod network.

The agent's ``guest-exec`` starts the program with its output captured, and
``guest-exec-status`` is polled (a back-off from a few milliseconds) until it
has exited; the agent hands the output over, base64, once the program ended.
A timeout kills the program and its descendants in the guest and fails the
call with ``DeadlineExceeded``, which kubelet reads as a timed-out probe.
While the guest is still booting, its agent is not connected yet: the call
waits for it, bounded by its own timeout or else by ``[exec]
guest_ready_timeout_seconds``.

Exec connects to the pod IP, port 22, with the VM's own client key, and
accepts only the host key given to the VM through cloud-init; it waits the
same way for sshd while the guest boots. Where SSH cannot reach the guest (a
hostNetwork pod, a pod without an IP) a command without tty or stdin runs
through the guest agent instead, its output delivered when it ends.
docs/exec.md has the whole story.
"""

from __future__ import annotations

import base64
import binascii
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from agent.domain.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    GuestAgentNotReady,
    GuestAgentRefused,
    GuestNotReady,
    Internal,
    InvalidArgument,
    PodvisorError,
    Unavailable,
)
from agent.domain.sandbox import NetworkMode
from agent.domain.vm import Container, ContainerState, ExecCredentials
from agent.services.ports import (
    ContainerLookup,
    ExecKeyStore,
    GuestAgent,
    GuestShell,
    SandboxLookup,
    ShellSession,
    SystemTimer,
    Timer,
)
from agent.streaming.backend import ExitStatus, Streams

log = structlog.get_logger(__name__)

# kubelet's CRI client accepts answers up to 16 MiB (its maxMsgSize), and so
# does our gRPC server; stdout and stderr together stay below, with room for
# the rest of the message.
MAX_OUTPUT_BYTES = 16 * 2**20 - 64 * 2**10
# Back-off of guest-exec-status polling: first wait, factor, longest wait.
POLL_FIRST_S = 0.002
POLL_FACTOR = 1.5
POLL_MAX_S = 0.1
# Back-off while waiting for a booting guest's agent.
READY_FIRST_S = 0.05
READY_MAX_S = 1.0
# Longest single agent command (libvirt's own wait for its answer).
COMMAND_MAX_S = 10
DEFAULT_GUEST_READY_TIMEOUT_S = 120.0
# After a timeout: how long the killer may take, then the killed program to be gone.
KILL_WAIT_S = 30.0
REAP_WAIT_S = 5.0

# Stops the program and its descendants (depth first), then kills them: run
# by the guest's own sh, pgrep (procps) finds the children.
_KILL_TREE = ('t() { kill -STOP "$1" 2>/dev/null; for c in $(pgrep -P "$1"); do t "$c"; done; '
              'kill -KILL "$1" 2>/dev/null; }; t "$1"')


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int


def _guest_needs(domain: str) -> str:
    return (f"the guest agent of {domain} never answered: the guest needs the QEMU guest agent "
            "(Debian/Ubuntu: package qemu-guest-agent) installed and running, on the virtio-serial "
            "channel org.qemu.guest_agent.0, which podvisor.io/guest-agent: \"false\" turns off")


class ExecService:
    """Commands in a container's guest, through its QEMU guest agent."""

    def __init__(self, containers: ContainerLookup, agent: GuestAgent, *,
                 sandboxes: SandboxLookup | None = None, keys: ExecKeyStore | None = None,
                 shell: GuestShell | None = None,
                 guest_ready_timeout_s: float = DEFAULT_GUEST_READY_TIMEOUT_S,
                 pacing: Timer | None = None) -> None:
        self._containers = containers
        self._agent = agent
        self._sandboxes = sandboxes
        self._keys = keys
        self._shell = shell
        self._ready_timeout = guest_ready_timeout_s
        self._t = pacing or SystemTimer()

    # Lookups -----------------------------------------------------------------------------

    def running(self, container_id: str) -> Container:
        """The container (NotFound), which must be running (FailedPrecondition)."""
        c = self._containers.get(container_id)
        if c.state is not ContainerState.RUNNING:
            raise FailedPrecondition(
                f"container {container_id} is not running (it is {c.state.value}): exec needs a running VM")
        return c

    # ExecSync ----------------------------------------------------------------------------

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout_s: float) -> ExecResult:
        """Run ``cmd`` in the guest and return its output and exit code.

        ``timeout_s`` > 0 bounds the whole call, waiting for a booting guest's
        agent included: past it the program is killed in the guest and
        DeadlineExceeded raised. 0 means no timeout (the wait for the agent is
        then bounded by the configured limit).
        """
        if not cmd or not cmd[0]:
            raise InvalidArgument("cmd", "must name a program to run")
        if timeout_s < 0:
            raise InvalidArgument("timeout", "must not be negative")
        c = self.running(container_id)
        start = self._t.monotonic()
        deadline = start + timeout_s if timeout_s > 0 else None
        try:
            pid = self._start(c, list(cmd), timeout_s, deadline)
        except _NotStarted as exc:
            return not_started_result(exc.message)
        return self._wait(c, list(cmd), pid, timeout_s, deadline)

    def _remaining(self, deadline: float | None) -> float | None:
        return None if deadline is None else deadline - self._t.monotonic()

    def _command_timeout(self, deadline: float | None) -> int:
        left = self._remaining(deadline)
        if left is None:
            return COMMAND_MAX_S
        return max(1, min(COMMAND_MAX_S, int(left + 0.999)))

    def _timed_out(self, cmd: list[str], timeout_s: float, what: str) -> DeadlineExceeded:
        return DeadlineExceeded(f"command {shlex.join(cmd)!r} timed out after {timeout_s:g}s: {what}")

    def _start(self, c: Container, cmd: list[str], timeout_s: float, deadline: float | None) -> int:
        """guest-exec, waiting for the agent while the guest boots; → the guest pid."""
        request = {"execute": "guest-exec",
                   "arguments": {"path": cmd[0], "arg": cmd[1:], "capture-output": True}}
        ready_by = deadline if deadline is not None else self._t.monotonic() + self._ready_timeout
        pause = READY_FIRST_S
        while True:
            try:
                # The full wait, not what is left of the call's timeout: were
                # libvirt to give up on a slow answer, the program might run
                # with its pid unknown, beyond the reach of the kill below.
                answer = self._agent.guest_agent_command(c.domain_name, request, COMMAND_MAX_S)
                break
            except GuestAgentRefused as exc:
                # The agent could not start the program: a shell's answer to that.
                raise _NotStarted(exc.message) from None
            except Unavailable as exc:
                # The agent not connected yet (booting), or libvirtd itself
                # away for a moment (the adapter reconnects): both are waited on.
                now = self._t.monotonic()
                if now + pause > ready_by:
                    if not isinstance(exc, GuestAgentNotReady):
                        raise
                    if deadline is not None:
                        raise self._timed_out(cmd, timeout_s, "the guest agent did not answer in time "
                                                              "(the guest may still be booting)") from None
                    raise FailedPrecondition(_guest_needs(c.domain_name)) from None
                self._t.sleep(pause)
                pause = min(READY_MAX_S, pause * 2)
        if not isinstance(answer, dict) or not isinstance(answer.get("pid"), int):
            raise Internal(f"guest-exec in {c.domain_name} answered without a pid")
        return int(answer["pid"])

    def _wait(self, c: Container, cmd: list[str], pid: int, timeout_s: float,
              deadline: float | None) -> ExecResult:
        """Poll guest-exec-status until the program exits or the deadline passes."""
        request = {"execute": "guest-exec-status", "arguments": {"pid": pid}}
        pause = POLL_FIRST_S
        failing_since: float | None = None
        while True:
            try:
                status = self._agent.guest_agent_command(c.domain_name, request, self._command_timeout(deadline))
                failing_since = None
            except Unavailable:
                # A slow answer, libvirtd away for a moment: the deadline decides,
                # or without one the configured limit on how long it may last.
                status = None
                now = self._t.monotonic()
                failing_since = now if failing_since is None else failing_since
                if deadline is None and now - failing_since > self._ready_timeout:
                    raise
            if isinstance(status, dict) and status.get("exited"):
                return _result(status)
            left = self._remaining(deadline)
            if left is not None and left <= 0:
                self._kill(c, pid)
                raise self._timed_out(cmd, timeout_s, "it was killed in the guest")
            wait = pause if left is None else min(pause, left)
            self._t.sleep(wait)
            pause = min(POLL_MAX_S, pause * POLL_FACTOR)

    def _kill(self, c: Container, pid: int) -> None:
        """Kill the program and its descendants in the guest (best effort), then
        read both its status and the killer's, which frees the agent's records."""
        kill = {"execute": "guest-exec",
                "arguments": {"path": "sh", "arg": ["-c", _KILL_TREE, "kill-tree", str(pid)]}}
        plain = {"execute": "guest-exec", "arguments": {"path": "kill", "arg": ["-KILL", str(pid)]}}
        for request in (kill, plain):
            try:
                answer = self._agent.guest_agent_command(c.domain_name, request, COMMAND_MAX_S)
            except PodvisorError as exc:
                log.warning("cannot kill a timed-out exec in the guest", container_id=c.id, pid=pid,
                            error=str(exc))
                continue
            if isinstance(answer, dict) and isinstance(answer.get("pid"), int):
                # The call returns once the killing is done: on a busy TCG guest
                # the killer's forks take seconds, and a caller that looks right
                # after must not find the program still there.
                self._reap(c, int(answer["pid"]), KILL_WAIT_S)
            break
        self._reap(c, pid, REAP_WAIT_S)

    def _reap(self, c: Container, pid: int, limit_s: float) -> None:
        """Wait up to ``limit_s`` for ``pid`` to have exited, reading its status (best effort)."""
        status = {"execute": "guest-exec-status", "arguments": {"pid": pid}}
        until = self._t.monotonic() + limit_s
        while self._t.monotonic() < until:
            try:
                answer = self._agent.guest_agent_command(c.domain_name, status, 2)
            except PodvisorError:
                return
            if isinstance(answer, dict) and answer.get("exited"):
                return
            self._t.sleep(0.1)
        log.warning("a killed exec's process has not ended yet", container_id=c.id, pid=pid)

    # Exec (streaming) ---------------------------------------------------------------------

    def exec(self, container_id: str, cmd: list[str], tty: bool, streams: Streams) -> ExitStatus:
        """``StreamBackend.exec``: run ``cmd`` in the guest with these streams until it ends."""
        if not cmd or not cmd[0]:
            raise InvalidArgument("cmd", "must name a program to run")
        c = self.running(container_id)
        host = self._ssh_host(c)
        if host is None:
            return self._exec_through_agent(c, cmd, tty, streams)
        if self._keys is None or self._shell is None:
            raise FailedPrecondition("interactive exec over SSH is not configured in this agent")
        credentials = self._keys.load(c.directory)
        session = self._connect(c, host, credentials)
        try:
            return session.run(shlex.join(cmd), tty, streams)
        finally:
            session.close()

    def _ssh_host(self, c: Container) -> str | None:
        """The pod IP SSH reaches the guest on, or None where SSH cannot (hostNetwork, no IP)."""
        if self._sandboxes is None or self._shell is None:
            return None
        sandbox = self._sandboxes.get(c.sandbox_id)
        if sandbox.spec.network_mode is not NetworkMode.POD or not sandbox.ip:
            return None
        return sandbox.ip

    def _connect(self, c: Container, host: str, credentials: ExecCredentials) -> ShellSession:
        """Connect, waiting (bounded by the configured limit) while the guest boots."""
        assert self._shell is not None
        ready_by = self._t.monotonic() + self._ready_timeout
        pause = READY_FIRST_S
        while True:
            left = ready_by - self._t.monotonic()
            try:
                return self._shell.connect(host, credentials, max(0.5, min(5.0, left)))
            except GuestNotReady as exc:
                if self._t.monotonic() + pause > ready_by:
                    raise FailedPrecondition(
                        f"the guest of container {c.id} did not answer SSH on {host}:22 within "
                        f"{self._ready_timeout:g}s ({exc.message}): interactive exec needs the guest to run "
                        "sshd (Debian: openssh-server) and cloud-init, which installs Podvisor's keys") from None
                self._t.sleep(pause)
                pause = min(READY_MAX_S, pause * 2)

    def _exec_through_agent(self, c: Container, cmd: list[str], tty: bool, streams: Streams) -> ExitStatus:
        """The fallback where SSH cannot reach the guest: no tty, no stdin; output when it ends."""
        if tty or streams.stdin is not None:
            raise FailedPrecondition(
                f"container {c.id}: exec with a tty or stdin needs SSH to the pod IP, and this pod has none "
                "(hostNetwork or no pod IP); only non-interactive exec (no -i, no -t) runs here, through the "
                "QEMU guest agent")
        r = self.exec_sync(c.id, cmd, 0)
        try:
            if r.stdout and streams.stdout is not None:
                streams.stdout.write(r.stdout)
            if r.stderr and streams.stderr is not None:
                streams.stderr.write(r.stderr)
        except OSError:
            return ExitStatus(code=r.exit_code, message="the client closed the stream")
        return ExitStatus(code=r.exit_code)


class _NotStarted(Exception):
    """guest-exec could not start the program (converted into exit 126/127)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _decode(status: dict[str, Any], key: str) -> bytes:
    value = status.get(key)
    if not value:
        return b""
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise Internal(f"guest-exec-status answered {key} that is not base64") from None


def _result(status: dict[str, Any]) -> ExecResult:
    stdout = _decode(status, "out-data")[:MAX_OUTPUT_BYTES]
    stderr = _decode(status, "err-data")[:MAX_OUTPUT_BYTES - len(stdout)]
    if "exitcode" in status:
        code = int(status["exitcode"])
    elif "signal" in status:
        code = 128 + int(status["signal"])  # as a shell reports a killed program
    else:
        code = -1
    return ExecResult(stdout=stdout, stderr=stderr, exit_code=code)


def not_started_result(message: str) -> ExecResult:
    """What a program the guest could not start ends as: 127 (not found) or 126, as in a shell."""
    # libvirt's "unable to execute QEMU agent command 'guest-exec': <the agent's words>"
    _, sep, agents = message.partition("': ")
    message = agents if sep else message
    code = 127 if "No such file" in message or "not found" in message else 126
    return ExecResult(stdout=b"", stderr=(message.rstrip() + "\n").encode(), exit_code=code)
