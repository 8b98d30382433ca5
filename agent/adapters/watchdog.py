"""systemd's watchdog: WATCHDOG=1 only while the agent's own loops turn.

systemd passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) when the unit sets
``WatchdogSec=``; it restarts the agent when no ``WATCHDOG=1`` arrives within
that time. A ping proves nothing unless it depends on the work: so the
watchdog's thread pings (every half interval) only when every watched loop
went round within the last half interval. A loop that hangs (a deadlock, a
call that never returns) stops the pings, and systemd restarts the agent,
which never stops a VM (QEMU lives outside the unit; KillMode=process).

The loops watched (agent.daemon wires them): gRPC serving, through a health
``Check`` this module sends over the agent's own socket (``GrpcProbe``);
libvirt's event loop (a timer on it); and the console follower's thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = structlog.get_logger(__name__)

# Answers that prove the server took the call and ran it (or refused it at once).
_ANSWERED = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
})


def interval_from_environment(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog interval in seconds systemd asks for, or None when there is none for us.

    None when ``WATCHDOG_USEC`` is unset, not a positive integer, or when
    ``WATCHDOG_PID`` names another process (sd_watchdog_enabled(3)).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != (os.getpid() if pid is None else pid)):
        return None
    return int(usec) / 1_000_000


class GrpcProbe:
    """Calls grpc.health.v1 Check on the agent's own socket, over and over:
    gRPC serving turns while ``progress`` moves."""

    def __init__(self, target: str, period: float) -> None:
        self._target = target
        self._period = period
        self._progress = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def progress(self) -> float:
        return self._progress

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watchdog-probe", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._period * 4 + 5)

    def _run(self) -> None:
        channel = grpc.insecure_channel(self._target, options=[("grpc.use_local_subchannel_pool", 1)])
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            while not self._stop.is_set():
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=max(self._period * 2, 1.0))
                    self._progress = time.monotonic()
                except grpc.RpcError as exc:
                    if exc.code() in _ANSWERED:
                        self._progress = time.monotonic()
                self._stop.wait(self._period)
        finally:
            channel.close()


class Watchdog:
    """Sends WATCHDOG=1 every ``interval / 2`` seconds while every loop in
    ``loops`` (name → when it last made progress, monotonic) is fresh."""

    def __init__(self, interval: float, loops: Mapping[str, Callable[[], float]],
                 notify: Callable[[str], bool], clock: Callable[[], float] = time.monotonic) -> None:
        self.period = interval / 2
        self._loops = dict(loops)
        self._notify = notify
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stalled: frozenset[str] = frozenset()

    def stalled(self) -> list[str]:
        """The loops that made no progress within the last half interval."""
        now = self._clock()
        return sorted(name for name, progress in self._loops.items() if now - progress() > self.period)

    def tick(self) -> bool:
        """One round: ping if every loop is fresh; True when a ping was sent."""
        stalled = self.stalled()
        if stalled:
            if frozenset(stalled) != self._stalled:
                log.error("watchdog: loops made no progress; WATCHDOG=1 withheld, systemd will restart the agent",
                          loops=stalled, limit_s=self.period)
            self._stalled = frozenset(stalled)
            return False
        if self._stalled:
            log.warning("watchdog: every loop turns again; pinging", loops=sorted(self._loops))
            self._stalled = frozenset()
        try:
            return self._notify("WATCHDOG=1")
        except OSError as exc:
            log.warning("watchdog: cannot notify systemd", error=str(exc))
            return False

    def start(self) -> None:
        log.info("watchdog on", interval_s=self.period * 2, loops=sorted(self._loops))
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.tick()
