"""The VM's serial console, shared by every client attached to it (Attach).

QEMU serves serial port 0 on a unix socket (``<serial type='unix'>``, bind
mode, no wait) and talks to one connection at a time: a second client's
connect lands in the listen backlog and sees nothing until the first one
leaves. So the agent holds **one** connection per VM while at least one
client is attached, and multiplexes it:

- one reader thread per connection drains the socket as fast as QEMU writes
  and hands each chunk to every attached client's buffer. It never waits for
  a client: QEMU blocks the guest's serial output (and with it the virtlogd
  copy that becomes the container log) while its peer does not read, so a
  client that falls more than ``client_buffer`` bytes behind is dropped
  (its session ends with a reason) instead of slowing the others down;
- every client's input is written to the same connection, under one lock,
  so two clients' writes never interleave inside one ``write`` call;
- when the last client leaves, the connection is closed and QEMU listens
  again; when QEMU closes it (the VM stopped), every session ends.

The container log does not depend on this connection: virtlogd copies every
byte the guest writes to the serial port into the raw console log
(``<log file=…>``), whether or not anyone is connected, and
``agent.adapters.console_log`` follows that file, not the socket.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque

import structlog

from agent.concurrency import KeyedLock
from agent.domain.errors import FailedPrecondition, Unavailable

log = structlog.get_logger(__name__)

# What one client may fall behind the console before it is dropped.
CLIENT_BUFFER = 1 << 20
CONNECT_TIMEOUT = 5.0
_CHUNK = 65536


class ConsoleSession:
    """One attached client: the console's output since it joined, and a way
    to write to the console. Ends when the client closes it, the console
    closes (the VM stopped) or the client fell too far behind."""

    def __init__(self, console: _Console, limit: int) -> None:
        self._console = console
        self._limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._cond = threading.Condition()
        self._ended = False
        self._reason = ""

    @property
    def ended_reason(self) -> str:
        """Why the session ended: "" while it runs or when the client closed
        it, else "eof" (the console closed) or "slow" (dropped)."""
        with self._cond:
            return self._reason

    def read(self, timeout: float | None = None) -> bytes | None:
        """The console output buffered for this client (all of it, joined);
        b"" once the session ended and everything was read; None when
        ``timeout`` passed with nothing new."""
        with self._cond:
            if not self._chunks and not self._ended:
                self._cond.wait(timeout)
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._size = 0
                return data
            return b"" if self._ended else None

    def write(self, data: bytes) -> None:
        """Send ``data`` to the console (the guest reads it as typed input);
        Unavailable once the session ended."""
        if self._ended:
            raise Unavailable("the console session has ended")
        self._console.send(data)

    def close(self) -> None:
        """Leave; the last client to leave closes the connection to QEMU."""
        self._end("")
        self._console.leave(self)

    # Called by the console's reader thread.

    def _offer(self, data: bytes) -> bool:
        """Buffer ``data``; False (and the session ends) when the client is too far behind."""
        with self._cond:
            if self._ended:
                return True
            if self._size + len(data) > self._limit:
                self._ended = True
                self._reason = "slow"
                self._chunks.clear()
                self._size = 0
                self._cond.notify_all()
                return False
            self._chunks.append(data)
            self._size += len(data)
            self._cond.notify_all()
            return True

    def _end(self, reason: str) -> None:
        with self._cond:
            if not self._ended:
                self._ended = True
                self._reason = reason
            self._cond.notify_all()


class _Console:
    """One connection to one VM's serial socket, and its reader thread."""

    def __init__(self, hub: ConsoleHub, key: str, sock: socket.socket) -> None:
        self._hub = hub
        self.key = key
        self._sock = sock
        self._sessions: list[ConsoleSession] = []
        self._lock = threading.Lock()  # sessions, closed
        self._send_lock = threading.Lock()
        self.closed = False
        self._thread = threading.Thread(target=self._run, name=f"console-{key[:12]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, session: ConsoleSession) -> bool:
        with self._lock:
            if self.closed:
                return False
            self._sessions.append(session)
            return True

    def send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise Unavailable(f"cannot write to the console: {exc.strerror or exc}") from None

    def leave(self, session: ConsoleSession) -> None:
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)
            last = not self._sessions and not self.closed
        if last:
            self._hub._release(self, only_if_unused=True)

    def shut(self) -> list[ConsoleSession]:
        """Mark closed and wake the reader (which closes the socket); the sessions left."""
        with self._lock:
            self.closed = True
            sessions, self._sessions = self._sessions, []
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return sessions

    def unused(self) -> bool:
        with self._lock:
            return not self._sessions

    def _run(self) -> None:
        try:
            while True:
                try:
                    data = self._sock.recv(_CHUNK)
                except OSError:
                    data = b""
                if not data:
                    break
                with self._lock:
                    sessions = list(self._sessions)
                dropped = [s for s in sessions if not s._offer(data)]
                for s in dropped:
                    log.warning("console client too slow; dropped", console=self.key, behind=s._limit)
                    self.leave(s)
        finally:
            was_closed = self.closed
            self._hub._release(self, only_if_unused=False)
            for s in self.shut():
                s._end("eof")
            self._sock.close()
            if not was_closed:
                log.info("console closed by the VM", console=self.key)


class ConsoleHub:
    """Serial consoles of running VMs, one shared connection each (the
    ``Consoles`` port)."""

    def __init__(self, client_buffer: int = CLIENT_BUFFER, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self._client_buffer = client_buffer
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._consoles: dict[str, _Console] = {}
        self._connecting = KeyedLock()

    def join(self, key: str, socket_path: str) -> ConsoleSession:
        """Attach one more client to the console of ``key`` (a container id),
        connecting to ``socket_path`` if no client is attached yet.
        FailedPrecondition when nothing listens there (the VM is not
        running), Unavailable for other connection failures."""
        session = self._join_open(key)
        if session is not None:
            return session
        # One connect per VM at a time (QEMU's listen backlog is 1: a second
        # concurrent connect would be refused with EAGAIN), and outside the
        # hub's lock, so a slow connect to one VM does not hold up the others.
        with self._connecting.hold(key):
            session = self._join_open(key)
            if session is not None:
                return session
            sock = self._connect(socket_path)
            with self._lock:
                console = _Console(self, key, sock)
                self._consoles[key] = console
                console.start()
                session = ConsoleSession(console, self._client_buffer)
                if not console.add(session):  # QEMU closed it at once
                    session._end("eof")
                return session

    def _join_open(self, key: str) -> ConsoleSession | None:
        with self._lock:
            console = self._consoles.get(key)
            if console is None or console.closed:
                return None
            session = ConsoleSession(console, self._client_buffer)
            if not console.add(session):
                return None
            return session

    def _connect(self, path: str) -> socket.socket:
        deadline = time.monotonic() + self._connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(self._connect_timeout)
            try:
                sock.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                raise FailedPrecondition(f"the VM's serial console ({path}) is not listening: "
                                         "is the VM running?") from None
            except BlockingIOError:
                # QEMU's backlog is full: someone else's connection (a socat,
                # say) is waiting for the console. Retried until the timeout.
                sock.close()
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise Unavailable(f"the VM's serial console ({path}) is busy: another client outside "
                                  "the agent holds it") from None
            except OSError as exc:
                sock.close()
                raise Unavailable(f"cannot connect to the VM's serial console ({path}): "
                                  f"{exc.strerror or exc}") from None
            sock.settimeout(None)
            return sock

    def _release(self, console: _Console, *, only_if_unused: bool) -> None:
        with self._lock:
            if only_if_unused and not console.unused():
                return
            if self._consoles.get(console.key) is console:
                del self._consoles[console.key]
        if only_if_unused:
            console.shut()

    def connected(self) -> list[str]:
        """Keys of the consoles with an open connection (for tests and debugging)."""
        with self._lock:
            return [k for k, c in self._consoles.items() if not c.closed]

    def close(self) -> None:
        """End every session and close every connection (the agent stops)."""
        with self._lock:
            consoles = list(self._consoles.values())
            self._consoles.clear()
        for c in consoles:
            for s in c.shut():
                s._end("eof")
