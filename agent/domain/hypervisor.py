"""What the hypervisor reports, as plain values (pure).

The libvirt adapter translates libvirt's numeric states, reasons and events
into these words; services and their fakes read them without knowing libvirt.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HypervisorVersions:
    """Versions of the client library, the daemon and the hypervisor ("" when unknown)."""

    library: str
    daemon: str
    hypervisor: str


@dataclass(frozen=True)
class DomainState:
    """A domain's state in plain words.

    ``state``: running, paused, shutoff, crashed, other, or missing (no such
    domain). ``reason`` for shutoff: shutdown (the guest powered off),
    destroyed, crashed, failed, daemon, or unknown.
    """

    state: str
    reason: str = ""


@dataclass(frozen=True)
class DomainStats:
    cpu_time_ns: int
    rss_bytes: int
    balloon_bytes: int  # what the guest currently has (balloon "actual")
    guest_available_bytes: int  # 0 when the balloon driver reports nothing
    guest_unused_bytes: int


@dataclass(frozen=True)
class LifecycleEvent:
    domain: str
    kind: str  # defined, undefined, started, stopped, suspended, resumed, shutdown, crashed, other
    detail: str  # for stopped: shutdown, destroyed, crashed, failed, other
