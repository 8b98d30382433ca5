"""The property every fuzz test checks: only documented errors come out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from agent.domain.errors import InvalidArgument, PodvisorError

T = TypeVar("T")


class Refused:
    """Marker result: the input was refused with a documented error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def domain_errors_only(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | Refused:
    """Call ``fn``; a PodvisorError with a message is a refusal, anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except PodvisorError as exc:
        assert exc.message, f"{type(exc).__name__} without a message"
        if isinstance(exc, InvalidArgument):
            assert exc.field, "InvalidArgument without a field"
        assert type(exc).__name__ != "Internal", f"Internal from a parser: {exc.message}"
        return Refused(exc)


def value_errors_only(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | Refused:
    """For parsers whose documented refusal is a plain ValueError (the caller names the field).

    A library's subclass (UnicodeDecodeError, JSONDecodeError) is not the
    documented error: its message is the library's, not the parser's. The
    agent's own subclasses (a DocumentTooComplex, say) are.
    """
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        assert type(exc) is ValueError or type(exc).__module__.startswith("agent."), (
            f"{type(exc).__name__} escaped: {exc}")
        assert str(exc), "ValueError without a message"
        return Refused(exc)
