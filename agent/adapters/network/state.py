"""podnet.json in the sandbox directory: the wiring of one sandbox and how
CNI left its pod interface (``WiringState``), so that the DHCP server and
teardown work with nothing in memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from agent.domain.errors import Internal
from agent.domain.network.wiring import PodWiring, WiringState

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


def load(workdir: Path) -> PodWiring | None:
    """The wiring recorded for a sandbox (None if there is none)."""
    state = load_state(workdir)
    return state.wiring if state else None


def save(state: WiringState, workdir: Path) -> None:
    """Record the state (atomically replaced, not synced: the links it
    describes do not survive a power cut either)."""
    tmp = workdir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state.to_json(), indent=1))
    os.replace(tmp, workdir / STATE_FILE)


def forget(workdir: Path) -> None:
    """Drop the state file, once teardown is complete."""
    (workdir / STATE_FILE).unlink(missing_ok=True)
