"""JSON from untrusted bytes (a registry, a CNI plugin, qemu-img) with one failure type.

``json.loads`` fails in more ways than ``JSONDecodeError``: deep nesting
(``"[" * 100000``) raises RecursionError, an integer of more than 4300 digits
a plain ValueError, bytes that are not UTF-8 a UnicodeDecodeError. A parser
that catches only some of them lets the rest escape as INTERNAL; ``loads``
turns every one into a plain ValueError whose message says what is wrong.
"""

from __future__ import annotations

import json
from typing import Any


def loads(data: bytes | str) -> Any:
    """Parse ``data``; ValueError (never a subclass, never RecursionError) when it is not JSON."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise ValueError(f"not JSON: {exc}") from None
