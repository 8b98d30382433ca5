"""Attach: a client joins a running VM's serial console.

The console is the VM's serial port 0, shared by every attached client
through the ``Consoles`` port (one connection to QEMU per VM, its output
fanned out to all clients; ``agent.adapters.console``). Each client sees the
output from the moment it joined, and what it types goes to the console as
if typed on the VM's serial line. The container log keeps being written
meanwhile: virtlogd copies the serial output to the raw console log
whatever the agent does, and the log follower reads that file.

One attach ends when the client leaves (its output fails, its session's
resize channel closes), when the console closes (the VM stopped), or when
the client fell too far behind the console (then with an error saying so).
The client closing its stdin does not end it (as with containerd, output
keeps flowing); a client with neither stdin nor stdout has nothing to do.
"""

from __future__ import annotations

import threading

import structlog

from agent.domain.errors import FailedPrecondition, InvalidArgument, PodvisorError, ResourceExhausted
from agent.domain.vm import ContainerState
from agent.services.ports import Consoles, ConsoleSession, ContainerLookup
from agent.streaming.backend import Input, Output, Resizes, Streams

log = structlog.get_logger(__name__)

# How often the output loop looks whether the client left while the console is quiet.
POLL_S = 0.5


class AttachService:
    def __init__(self, containers: ContainerLookup, consoles: Consoles, poll_s: float = POLL_S) -> None:
        self._containers = containers
        self._consoles = consoles
        self._poll_s = poll_s

    def attach(self, container_id: str, tty: bool, streams: Streams) -> None:
        """Join the container's serial console until the client leaves or the
        VM stops. NotFound for an unknown container, FailedPrecondition for
        one that is not running."""
        c = self._containers.get(container_id)
        if c.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {c.id} is {c.state.value}, not running: "
                                     "attach needs the VM's console, which exists only while it runs")
        # A serial line is one byte stream: with or without a tty it goes to
        # stdout (stderr when the client asked for that alone).
        out = streams.stdout or streams.stderr
        if out is None and streams.stdin is None:
            raise InvalidArgument("stdout", "attach needs at least one of stdin, stdout or stderr")
        session = self._consoles.join(c.id, c.serial_socket)
        leave = threading.Event()
        try:
            if streams.stdin is not None:
                threading.Thread(target=self._pump_in, args=(streams.stdin, session, leave, out is None),
                                 name=f"attach-in-{c.id[:12]}", daemon=True).start()
            if tty and streams.resize is not None:
                threading.Thread(target=self._watch_resizes, args=(streams.resize, leave),
                                 name=f"attach-resize-{c.id[:12]}", daemon=True).start()
            self._pump_out(session, out, leave)
        finally:
            leave.set()
            reason = session.ended_reason
            session.close()
        if reason == "slow":
            raise ResourceExhausted(f"attach to container {c.id}: the client read the console too slowly "
                                    "and was disconnected so that the other clients and the log keep up")

    def _pump_out(self, session: ConsoleSession, out: Output | None, leave: threading.Event) -> None:
        while not leave.is_set():
            data = session.read(self._poll_s)
            if data is None:
                continue
            if not data:
                return  # the console closed (the VM stopped) or the client was dropped
            if out is None:
                continue  # stdin only: the output is not wanted
            try:
                out.write(data)
            except OSError:
                return  # the client is gone

    @staticmethod
    def _pump_in(stdin: Input, session: ConsoleSession, leave: threading.Event, only_stream: bool) -> None:
        try:
            while not leave.is_set():
                data = stdin.read()
                if not data:
                    break
                session.write(data)
        except (OSError, PodvisorError) as exc:
            log.debug("attach input ended", error=str(exc))
            leave.set()
            return
        if only_stream:
            leave.set()  # stdin was all the client had

    @staticmethod
    def _watch_resizes(resizes: Resizes, leave: threading.Event) -> None:
        # A serial line has no window size to set (no TIOCSWINSZ across a
        # UART): sizes are read and dropped. None means the session is over.
        while not leave.is_set():
            if resizes.get() is None:
                leave.set()
                return
