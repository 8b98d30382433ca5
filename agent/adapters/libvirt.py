"""The one place that imports libvirt.

It owns the connection: opens it, runs libvirt's event loop (keepalives and
close notifications need it), notices when libvirtd goes away and re-opens the
connection by itself, and translates ``libvirtError`` into domain errors so no
other module ever sees a libvirt type.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
import structlog

from agent.domain.errors import Internal, NotFound, Unavailable

log = structlog.get_logger(__name__)
T = TypeVar("T")

_event_loop_lock = threading.Lock()
_event_loop_started = False

# libvirt error codes that mean "the connection is gone", not "the call was wrong".
_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
}
_CONNECTION_DOMAINS = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}


def _ignore_errors(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we log them ourselves."""


def _start_event_loop() -> None:
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.registerErrorHandler(_ignore_errors, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


@dataclass(frozen=True)
class Versions:
    library: str
    daemon: str
    hypervisor: str


def _fmt_version(v: int) -> str:
    return f"{v // 1_000_000}.{(v // 1000) % 1000}.{v % 1000}" if v else ""


class Libvirt:
    """A self-healing connection to libvirtd."""

    def __init__(self, uri: str, reconnect_interval: float = 2.0) -> None:
        self.uri = uri
        self._interval = reconnect_interval
        self._lock = threading.Lock()
        self._conn: Any = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_error = "not connected yet"
        self._last_attempt = 0.0
        self._monitor: threading.Thread | None = None

    # Connection management -------------------------------------------------

    def start(self) -> None:
        """Start the event loop and the watcher that keeps the connection open."""
        _start_event_loop()
        self._monitor = threading.Thread(target=self._watch, name="libvirt-watch", daemon=True)
        self._monitor.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    @property
    def last_error(self) -> str:
        return self._last_error

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        reasons = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "client closed"}
        self._mark_lost(f"libvirt closed the connection ({reasons.get(reason, reason)})")

    def _mark_lost(self, why: str) -> None:
        with self._lock:
            was = self._conn
            self._conn = None
            self._last_error = why
        if was is not None:
            log.warning("libvirt connection lost", uri=self.uri, reason=why)
            try:
                was.close()
            except libvirt.libvirtError:
                pass
        self._wake.set()

    def _open(self) -> Any:
        """Open a connection now, or raise Unavailable."""
        self._last_attempt = time.monotonic()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            self._last_error = f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}"
            raise Unavailable(self._last_error) from None
        try:
            conn.registerCloseCallback(self._on_close, None)
            # Keepalive notices a dead daemon even when we make no calls.
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError as exc:
            log.warning("libvirt keepalive not enabled", error=exc.get_error_message())
        log.info("libvirt connected", uri=self.uri,
                 libvirtd=_fmt_version(conn.getLibVersion()))
        return conn

    def _connection(self) -> Any:
        with self._lock:
            if self._conn is not None:
                return self._conn
            # Bound reconnect attempts from RPCs while libvirtd is down.
            if time.monotonic() - self._last_attempt < 0.2:
                raise Unavailable(self._last_error)
            self._conn = self._open()
            return self._conn

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                if self.connected():
                    pass
            except Exception:  # never let the watcher die
                log.exception("libvirt watcher error")
            self._wake.wait(self._interval)
            self._wake.clear()

    def connected(self) -> bool:
        """True when a live call to libvirtd succeeds right now (reconnects if needed)."""
        try:
            self.call(lambda c: c.getLibVersion())
        except (Unavailable, Internal):
            return False
        return True

    # Calls ---------------------------------------------------------------

    def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(conn)``, translating libvirt errors; reconnects on demand."""
        conn = self._connection()
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            raise self._translate(exc) from None

    def _translate(self, exc: Any) -> Exception:
        code = exc.get_error_code()
        message = exc.get_error_message() or str(exc)
        if code in _CONNECTION_ERRORS or exc.get_error_domain() in _CONNECTION_DOMAINS:
            self._mark_lost(message)
            return Unavailable(f"libvirt unavailable: {message}")
        if code in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_NETWORK):
            return NotFound(f"libvirt: {message}")
        return Internal(f"libvirt error: {message}")

    # Queries -------------------------------------------------------------

    def versions(self) -> Versions:
        def get(conn: Any) -> Versions:
            return Versions(
                library=_fmt_version(libvirt.getVersion()),
                daemon=_fmt_version(conn.getLibVersion()),
                hypervisor=_fmt_version(conn.getVersion()),
            )

        return self.call(get)

    def capabilities_xml(self) -> str:
        return self.call(lambda c: str(c.getCapabilities()))

    @staticmethod
    def library_version() -> str:
        return _fmt_version(libvirt.getVersion())
