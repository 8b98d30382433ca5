"""podnet.json in the sandbox directory: the wiring of one sandbox and how
CNI left its pod interface (``WiringState``), so that the DHCP server and
teardown work with nothing in memory.

Written with :func:`agent.adapters.atomic.write_atomic` (synced); a file that
is unreadable all the same (a disk fault, a hand edit) is, for teardown, a
lost record: :func:`load_for_teardown` returns None and teardown goes by what
it can find (the namespace and links named after the sandbox id, the CNI
cache), never failing forever on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from agent.adapters.atomic import write_atomic
from agent.domain.errors import Internal
from agent.domain.network.wiring import PodWiring, WiringState

log = structlog.get_logger(__name__)

STATE_FILE = "podnet.json"


def load_state(workdir: Path) -> WiringState | None:
    """The recorded state (None if there is none); Internal if unreadable."""
    path = workdir / STATE_FILE
    try:
        return WiringState.from_json(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Internal(f"{path} is unreadable: {exc}") from None


def exists(workdir: Path) -> bool:
    """Whether a state file is there, readable or not."""
    return (workdir / STATE_FILE).exists()


def load_for_teardown(workdir: Path) -> WiringState | None:
    """The recorded state, or None when there is none or it is unreadable
    (then logged: teardown proceeds as for a lost network)."""
    try:
        return load_state(workdir)
    except Internal as exc:
        log.error("pod network state unreadable; tearing down by what can be found", error=exc.message)
        return None


def load(workdir: Path) -> PodWiring | None:
    """The wiring recorded for a sandbox (None if there is none)."""
    state = load_state(workdir)
    return state.wiring if state else None


def save(state: WiringState, workdir: Path) -> None:
    """Record the state (atomically replaced and synced)."""
    write_atomic(workdir / STATE_FILE, json.dumps(state.to_json(), indent=1).encode())


def forget(workdir: Path) -> None:
    """Drop the state file, once teardown is complete."""
    (workdir / STATE_FILE).unlink(missing_ok=True)
