"""The CRI list-filter rule that sandboxes and containers share (pure).

Every CRI List call filters the same way: an id matches by prefix (crictl
sends short ids), a state must equal the wanted one when one is given, and a
label selector matches when every one of its pairs is among the labels.
Empty fields match everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

S = TypeVar("S")


def selected(item_id: str, labels: Mapping[str, str], state: S, *, id_prefix: str = "",
             wanted_state: S | None = None, label_selector: Mapping[str, str] | None = None) -> bool:
    """Whether one listed item passes a CRI filter (see the module docstring)."""
    if not item_id.startswith(id_prefix):
        return False
    if wanted_state is not None and state != wanted_state:
        return False
    return all(labels.get(k) == v for k, v in (label_selector or {}).items())
