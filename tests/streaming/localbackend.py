"""A real StreamBackend on this machine, for the streaming server's tests:
exec runs LOCAL processes (a pty for tty, TIOCSWINSZ for resizes), attach
joins a local long-running "console" process, port forward connects to
127.0.0.1 (pod port → local port through `ports`)."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import socket
import struct
import subprocess
import termios
import threading
from collections.abc import Callable

from agent.domain.errors import NotFound
from agent.streaming.backend import ExitStatus, Input, Output, Streams


def _copy_in(src: Input, write: Callable[[bytes], object], done: Callable[[], None]) -> None:
    try:
        while chunk := src.read():
            write(chunk)
    except OSError:
        pass
    done()


def _copy_out(read: Callable[[], bytes], dst: Output | None) -> None:
    while True:
        try:
            chunk = read()
        except OSError:  # EIO: the pty's other side is gone
            return
        if not chunk:
            return
        if dst is not None:
            try:
                dst.write(chunk)
            except OSError:
                pass


class Console:
    """A long-running process whose output goes to whoever is attached."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._lock = threading.Lock()
        self.clients: list[Output] = []
        threading.Thread(target=self._fanout, daemon=True).start()

    def _fanout(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            with self._lock:
                clients = list(self.clients)
            for c in clients:
                try:
                    c.write(chunk)
                except OSError:
                    with self._lock:
                        if c in self.clients:
                            self.clients.remove(c)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class LocalBackend:
    def __init__(self, ports: dict[int, int] | None = None) -> None:
        self.ports = ports or {}
        self.consoles: dict[str, Console] = {}
        self.resizes_seen: list[tuple[int, int]] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def close(self) -> None:
        """Kill what is still running (the tests' clean-up)."""
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the whole group: sh and what it started
            except ProcessLookupError:
                pass
            p.wait(10)
        for c in self.consoles.values():
            c.stop()

    def exec(self, container_id: str, cmd: list[str], tty: bool, streams: Streams) -> ExitStatus:
        if tty:
            return self._exec_tty(cmd, streams)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if streams.stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stderr is not None
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        threads = [
            threading.Thread(target=_copy_out, args=(lambda: os.read(out_fd, 65536), streams.stdout)),
            threading.Thread(target=_copy_out, args=(lambda: os.read(err_fd, 65536), streams.stderr)),
        ]
        if streams.stdin is not None:
            assert proc.stdin is not None
            pin = proc.stdin
            threading.Thread(target=_copy_in, args=(streams.stdin, _writer(pin), pin.close), daemon=True).start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        proc.stdout.close()
        proc.stderr.close()
        return ExitStatus(proc.wait())

    def _exec_tty(self, cmd: list[str], streams: Streams) -> ExitStatus:
        master, slave = pty.openpty()
        first = streams.resize.get(timeout=5) if streams.resize is not None else None
        if first is not None:
            self._set_size(master, first.width, first.height)
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, close_fds=True)
        self.procs.append(proc)
        os.close(slave)
        out = threading.Thread(target=_copy_out, args=(lambda: os.read(master, 65536), streams.stdout))
        out.start()
        if streams.stdin is not None:
            threading.Thread(target=_copy_in, args=(streams.stdin, lambda b: os.write(master, b), lambda: None),
                             daemon=True).start()
        if streams.resize is not None:
            resize = streams.resize

            def follow() -> None:
                while proc.poll() is None:
                    size = resize.get(timeout=0.5)
                    if size is not None:
                        self._set_size(master, size.width, size.height)

            threading.Thread(target=follow, daemon=True).start()
        code = proc.wait()
        out.join()
        os.close(master)
        return ExitStatus(code)

    def _set_size(self, fd: int, width: int, height: int) -> None:
        self.resizes_seen.append((width, height))
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def attach(self, container_id: str, tty: bool, streams: Streams) -> None:
        console = self.consoles.get(container_id)
        if console is None:
            raise NotFound(f"container {container_id!r} not found")
        if streams.stdout is not None:
            with console._lock:
                console.clients.append(streams.stdout)
        try:
            if streams.stdin is not None:
                pin = console.proc.stdin
                assert pin is not None
                while chunk := streams.stdin.read():
                    pin.write(chunk)
                    pin.flush()
            else:
                console.proc.wait()
        finally:
            with console._lock:
                if streams.stdout in console.clients:
                    console.clients.remove(streams.stdout)

    def port_forward(self, sandbox_id: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.ports.get(port, port)), timeout=timeout)


def _writer(f: object) -> Callable[[bytes], object]:
    def write(b: bytes) -> None:
        f.write(b)  # type: ignore[attr-defined]
        f.flush()  # type: ignore[attr-defined]

    return write
