"""The one place that imports libvirt.

It owns the connection: opens it, runs libvirt's event loop (keepalives and
close notifications need it), notices when libvirtd goes away and re-opens the
connection by itself, and translates ``libvirtError`` into domain errors so no
other module ever sees a libvirt type.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import libvirt_qemu
import structlog

from agent import faults
from agent.domain.errors import (
    FailedPrecondition,
    GuestAgentNotReady,
    GuestAgentRefused,
    Internal,
    NotFound,
    Unavailable,
)
from agent.domain.hypervisor import DomainState, DomainStats, HypervisorVersions, LifecycleEvent

log = structlog.get_logger(__name__)
T = TypeVar("T")

_event_loop_lock = threading.Lock()
_event_loop_started = False
# A timer on libvirt's event loop marks that the loop turns (the watchdog reads it).
EVENT_LOOP_TICK_MS = 500
_event_loop_tick = time.monotonic()

# libvirt error codes that mean "the connection is gone", not "the call was wrong".
# VIR_ERR_SYSTEM_ERROR is not among them: libvirtd reports every failed system
# call with it (a storage file it cannot open, say); only when it comes from the
# RPC layer, or the connection is dead, is it the connection's.
_CONNECTION_ERRORS = frozenset({
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
})
_CONNECTION_DOMAINS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})
_ACCESS_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


def classify_error(code: int, domain: int, sys_errno: int, alive: bool) -> str:
    """What a libvirt error means for the caller, from its code, domain and errno.

    ``lost``: the connection dropped (reconnect; UNAVAILABLE). ``busy``: libvirtd
    timed out on a lock or a job, the connection is fine (UNAVAILABLE, no
    reconnect). ``access``: a system call failed with EACCES/EPERM on a file
    (FAILED_PRECONDITION). ``not_found``: no such domain or network. ``other``.
    """
    if not alive or code in _CONNECTION_ERRORS or domain in _CONNECTION_DOMAINS:
        return "lost"
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return "busy"
    if code == libvirt.VIR_ERR_SYSTEM_ERROR and sys_errno in _ACCESS_ERRNOS:
        return "access"
    if code in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_NETWORK):
        return "not_found"
    return "other"


def classify_agent_error(code: int, message: str) -> str:
    """What a failed guest-agent command means: ``not_ready`` (the agent is not
    connected or did not answer: the guest may be booting; retry), ``off``
    (the domain has no agent channel), ``not_running``, ``refused`` (the agent
    answered with an error of its own), or ``other`` (left to ``classify_error``)."""
    if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED):
        return "not_ready"
    if code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED and "agent" in message:
        return "off"
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return "not_running"
    if code == libvirt.VIR_ERR_INTERNAL_ERROR and "agent command" in message:
        return "refused"
    return "other"


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False

# Where libvirtd (qemu:///system) keeps a running domain's pid file.
QEMU_RUN_DIR = Path("/run/libvirt/qemu")


def _ignore_errors(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we log them ourselves."""


def _start_event_loop() -> None:
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.registerErrorHandler(_ignore_errors, None)
        libvirt.virEventRegisterDefaultImpl()
        if libvirt.virEventAddTimeout(EVENT_LOOP_TICK_MS, _tick, None) < 0:
            log.error("libvirt event loop: no timer; the watchdog cannot see it turn")

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def _tick(_timer: int, _opaque: object) -> None:
    global _event_loop_tick
    faults.wedge("libvirt-events")  # tests only: a callback that never returns
    _event_loop_tick = time.monotonic()


def event_loop_progress() -> float:
    """When (monotonic) libvirt's event loop last ran its timer: it turns while this moves."""
    return _event_loop_tick


def _fmt_version(v: int) -> str:
    return f"{v // 1_000_000}.{(v // 1000) % 1000}.{v % 1000}" if v else ""


_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",  # shutting down: still running
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff", libvirt.VIR_DOMAIN_CRASHED: "crashed",
}
_SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed", libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed",
    libvirt.VIR_DOMAIN_SHUTOFF_DAEMON: "daemon",
}
_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined", libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started", libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed", libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
_STOPPED_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed", libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
}


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
        self._lifecycle: list[Callable[[LifecycleEvent], None]] = []
        self._reconnected: list[Callable[[], None]] = []
        # Connection state (None: not tried yet) and who wants to hear of changes.
        self._state_lock = threading.Lock()
        self._up: bool | None = None
        self._state_listeners: list[Callable[[bool], None]] = []

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
                # Under the connection lock: a reconnection cannot slip in before it.
                self._set_up(False)
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
            self._set_up(False)
            raise Unavailable(self._last_error) from None
        try:
            conn.registerCloseCallback(self._on_close, None)
            # Keepalive notices a dead daemon even when we make no calls.
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError as exc:
            log.warning("libvirt keepalive not enabled", error=exc.get_error_message())
        try:
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        except libvirt.libvirtError as exc:
            log.warning("libvirt domain events unavailable", error=exc.get_error_message())
        log.info("libvirt connected", uri=self.uri,
                 libvirtd=_fmt_version(conn.getLibVersion()))
        self._set_up(True)
        for fn in self._reconnected:
            # Outside the connection lock: callbacks may call back into us.
            threading.Thread(target=fn, name="libvirt-reconnected", daemon=True).start()
        return conn

    def _set_up(self, up: bool) -> None:
        with self._state_lock:
            if self._up is up:
                return
            self._up = up
            for fn in self._state_listeners:
                fn(up)

    def on_connection(self, fn: Callable[[bool], None]) -> None:
        """Call ``fn(True)`` when the connection opens and ``fn(False)`` when it
        is lost or cannot be opened, once per change, and now with the current
        state if it is known. ``fn`` must be quick and must not call back into
        this adapter (it runs under the state lock, which keeps calls in order)."""
        with self._state_lock:
            self._state_listeners.append(fn)
            if self._up is not None:
                fn(self._up)

    def on_lifecycle(self, fn: Callable[[LifecycleEvent], None]) -> None:
        """Call ``fn`` (on libvirt's event thread) for every domain lifecycle event."""
        self._lifecycle.append(fn)

    def on_reconnect(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` after every (re)connection: states may have changed unseen."""
        self._reconnected.append(fn)

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        kind = _EVENTS.get(event, "other")
        what = _STOPPED_DETAILS.get(detail, "other") if kind == "stopped" else ""
        ev = LifecycleEvent(domain=dom.name(), kind=kind, detail=what)
        for fn in self._lifecycle:
            try:
                fn(ev)
            except Exception:  # an event handler must never kill libvirt's loop
                log.exception("lifecycle handler failed", domain=ev.domain)

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
            raise self._translate(exc, conn) from None

    def _translate(self, exc: Any, conn: Any) -> Exception:
        message = exc.get_error_message() or str(exc)
        kind = classify_error(exc.get_error_code(), exc.get_error_domain(), exc.get_int1() or 0, _alive(conn))
        if kind == "lost":
            self._mark_lost(message)
            return Unavailable(f"libvirt unavailable: {message}")
        if kind == "busy":
            return Unavailable(f"libvirt busy: {message}")
        if kind == "access":
            # e.g. "Cannot access storage file '<path>' (as uid:64055, gid:64055): Permission denied"
            return FailedPrecondition(
                f"libvirt: {message}; QEMU's user needs search (x) permission on every directory above that path")
        if kind == "not_found":
            return NotFound(f"libvirt: {message}")
        return Internal(f"libvirt error: {message}")

    # Queries -------------------------------------------------------------

    def versions(self) -> HypervisorVersions:
        def get(conn: Any) -> HypervisorVersions:
            return HypervisorVersions(
                library=_fmt_version(libvirt.getVersion()),
                daemon=_fmt_version(conn.getLibVersion()),
                hypervisor=_fmt_version(conn.getVersion()),
            )

        return self.call(get)

    # Domains ---------------------------------------------------------------

    def define_domain(self, xml: str) -> None:
        self.call(lambda c: c.defineXML(xml))

    def _domain(self, conn: Any, name: str) -> Any:
        return conn.lookupByName(name)

    def start_domain(self, name: str) -> None:
        self.call(lambda c: self._domain(c, name).create())

    def shutdown_domain(self, name: str) -> None:
        """Press the ACPI power button."""
        def press(c: Any) -> None:
            dom = self._domain(c, name)
            try:
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # not running
                    raise
        self.call(press)

    def destroy_domain(self, name: str) -> bool:
        """Hard stop; False when it was not running (or does not exist)."""
        def pull_the_plug(c: Any) -> bool:
            try:
                self._domain(c, name).destroy()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
                    return False
                raise
            return True
        return self.call(pull_the_plug)

    def undefine_domain(self, name: str) -> bool:
        """Remove the definition (and NVRAM); False when there was none."""
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)

        def forget(c: Any) -> bool:
            try:
                self._domain(c, name).undefineFlags(flags)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise
            return True
        return self.call(forget)

    def domain_state(self, name: str) -> DomainState:
        def read(c: Any) -> DomainState:
            try:
                state, reason = self._domain(c, name).state()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return DomainState("missing")
                raise
            word = _STATES.get(state, "other")
            return DomainState(word, _SHUTOFF_REASONS.get(reason, "unknown") if word == "shutoff" else "")
        return self.call(read)

    def domain_xml(self, name: str) -> str:
        return self.call(lambda c: str(self._domain(c, name).XMLDesc(0)))

    def domain_stats(self, name: str) -> DomainStats:
        def read(c: Any) -> DomainStats:
            dom = self._domain(c, name)
            info = dom.info()  # [state, maxMem KiB, mem KiB, vcpus, cpuTime ns]
            try:
                mem = dom.memoryStats() if dom.isActive() else {}
            except libvirt.libvirtError:
                mem = {}
            return DomainStats(
                cpu_time_ns=int(info[4]),
                rss_bytes=int(mem.get("rss", 0)) * 1024,
                balloon_bytes=int(mem.get("actual", info[2])) * 1024,
                guest_available_bytes=int(mem.get("available", 0)) * 1024,
                guest_unused_bytes=int(mem.get("unused", 0)) * 1024,
            )
        return self.call(read)

    def set_domain_memory(self, name: str, size_bytes: int, *, live: bool) -> None:
        """Balloon target in the persistent definition, and live when running."""
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
        self.call(lambda c: self._domain(c, name).setMemoryFlags(size_bytes // 1024, flags))

    def set_domain_vcpus(self, name: str, count: int, *, live: bool) -> None:
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
        self.call(lambda c: self._domain(c, name).setVcpusFlags(count, flags))

    @staticmethod
    def domain_pid(name: str) -> int:
        """The process id of a running domain's QEMU (qemu:///system's pid file, checked against /proc)."""
        pidfile = QEMU_RUN_DIR / f"{name}.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            raise FailedPrecondition(f"cannot find the QEMU process of domain {name} ({pidfile})") from None
        if f"guest={name},".encode() not in cmdline and f"guest={name}\0".encode() not in cmdline:
            raise FailedPrecondition(f"process {pid} in {pidfile} is not the QEMU of domain {name}")
        return pid

    def guest_agent_command(self, name: str, command: dict[str, Any], timeout_s: int) -> Any:
        """Send one QMP-style command to the domain's QEMU guest agent and return
        its ``return`` value, waiting at most ``timeout_s`` seconds (≥ 1) for
        the answer.

        Raises GuestAgentNotReady (not connected, no answer in time),
        FailedPrecondition (no agent channel, domain not running),
        GuestAgentRefused (the agent's own error), NotFound (no domain).
        """
        text = json.dumps(command)

        def send(c: Any) -> Any:
            dom = self._domain(c, name)
            try:
                return libvirt_qemu.qemuAgentCommand(dom, text, max(1, int(timeout_s)), 0)
            except libvirt.libvirtError as exc:
                message = exc.get_error_message() or str(exc)
                kind = classify_agent_error(exc.get_error_code(), message)
                if kind == "not_ready":
                    raise GuestAgentNotReady(f"the guest agent of {name} did not answer: {message}") from None
                if kind == "off":
                    raise FailedPrecondition(
                        f"domain {name} has no guest agent channel (org.qemu.guest_agent.0): "
                        "it was created with podvisor.io/guest-agent: \"false\"") from None
                if kind == "not_running":
                    raise FailedPrecondition(f"domain {name} is not running: {message}") from None
                if kind == "refused":
                    raise GuestAgentRefused(message) from None
                raise

        answer = self.call(send)
        try:
            reply = json.loads(answer)
        except (TypeError, ValueError):
            raise Internal(f"the guest agent of {name} answered something that is not JSON") from None
        if not isinstance(reply, dict) or "return" not in reply:
            raise Internal(f"the guest agent of {name} answered without a return value")
        return reply["return"]

    def list_domains(self) -> dict[str, str]:
        """Every domain's name → its XML (callers keep only their own)."""
        def read(c: Any) -> dict[str, str]:
            out = {}
            for dom in c.listAllDomains(0):
                try:
                    out[dom.name()] = dom.XMLDesc(0)
                except libvirt.libvirtError:
                    continue  # vanished while listing
            return out
        return self.call(read)

    def guest_shutdown(self, name: str) -> None:
        """Ask the guest agent (QGA ``guest-shutdown``, powerdown) to power the guest off.

        For a guest that ignores the ACPI button. libvirt returns once the
        agent took the request, or fails at once when the domain has no agent
        channel and after its agent timeout (seconds) when no agent answers.
        """
        def ask(c: Any) -> None:
            dom = self._domain(c, name)
            try:
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # not running
                    raise
        self.call(ask)
