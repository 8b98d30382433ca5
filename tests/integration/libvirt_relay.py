"""A unix socket the test owns in front of libvirtd's: the agent connects to
libvirtd through it (``qemu+unix:///system?socket=<path>``), and the test makes
libvirtd unreachable for that agent alone by closing it, and reachable again by
re-opening it; the machine's libvirtd is never stopped."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

LIBVIRTD_SOCKET = Path("/run/libvirt/libvirt-sock")


class LibvirtRelay:
    def __init__(self, path: Path, upstream: Path = LIBVIRTD_SOCKET) -> None:
        self.path = path
        self.upstream = upstream
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.path}"

    def open(self) -> None:
        """Accept connections and relay each one to libvirtd."""
        assert self.upstream.exists(), f"libvirtd's socket {self.upstream} is missing: is libvirtd running?"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener.bind(str(self.path))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        """libvirtd goes away, as the agent sees it: the socket and every relayed connection close."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.connect(str(self.upstream))
            except OSError:
                client.close()
                server.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
