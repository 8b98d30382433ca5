"""Container lifecycle events (GetContainerEvents): one queue per subscriber.

A client that stops reading must not stall VMs: publishing never blocks, and
an event that does not fit a full queue is dropped with a warning.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ContainerEvent:
    container_id: str
    sandbox_id: str
    kind: str  # created, started, stopped, deleted
    at_ns: int


class EventHub:
    """Fans container events out to every open stream."""

    def __init__(self, queue_size: int = 10_000) -> None:
        self._queue_size = queue_size
        self._subscribers: list[queue.Queue[ContainerEvent | None]] = []
        self._lock = threading.Lock()

    def subscriber_count(self) -> int:
        """How many streams are open."""
        with self._lock:
            return len(self._subscribers)

    def publish(self, ev: ContainerEvent) -> None:
        """Hand ``ev`` to every subscriber, without waiting for any."""
        with self._lock:
            for q in self._subscribers:
                try:
                    q.put_nowait(ev)
                except queue.Full:
                    log.warning("container event dropped for a slow client", container_id=ev.container_id,
                                kind=ev.kind)

    def stream(self, stop: threading.Event) -> Iterator[ContainerEvent]:
        """Events from now on, until ``stop`` is set or the hub is closed."""
        q: queue.Queue[ContainerEvent | None] = queue.Queue(maxsize=self._queue_size)
        with self._lock:
            self._subscribers.append(q)
        try:
            while not stop.is_set():
                try:
                    ev = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if ev is None:
                    return
                yield ev
        finally:
            with self._lock:
                self._subscribers.remove(q)

    def close(self) -> None:
        """End every open stream (the agent is stopping)."""
        with self._lock:
            for q in self._subscribers:
                q.put(None)
