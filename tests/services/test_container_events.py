"""EventHub (agent/services/container_events.py): fan-out without blocking."""

from __future__ import annotations

import threading
import time

from agent.services.container_events import ContainerEvent, EventHub


def _ev(i: int) -> ContainerEvent:
    return ContainerEvent(f"{i:064x}", "a" * 64, "created", i)


def test_a_client_that_stops_reading_loses_events_but_never_blocks_publishing() -> None:
    hub = EventHub(queue_size=2)
    stream = hub.stream(threading.Event())
    first: list[ContainerEvent] = []
    # The stream subscribes on its first next(), which waits for an event.
    t = threading.Thread(target=lambda: first.append(next(stream)), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not hub.subscriber_count() and time.monotonic() < deadline:
        time.sleep(0.01)
    hub.publish(_ev(0))
    t.join(5)
    assert first == [_ev(0)]
    # Nobody reads now: two events fit, three are dropped.
    for i in range(1, 6):
        hub.publish(_ev(i))
    assert [next(stream), next(stream)] == [_ev(1), _ev(2)]
    hub.close()
    assert list(stream) == []
    assert hub.subscriber_count() == 0
