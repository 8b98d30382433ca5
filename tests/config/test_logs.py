"""agent.logs: tracebacks never carry frame locals (a pull's frames hold its credentials)."""

from __future__ import annotations

import json
import sys
from typing import Any

import structlog

from agent import logs
from agent.adapters.registry.credentials import RegistryCredentials
from agent.domain.registry import RegistryAuth

SECRET = "hunter2-very-secret"


def _fail_with_secret_in_locals() -> None:
    password = SECRET  # noqa: F841 - a local a traceback could show
    auth = RegistryAuth(username="bob", password=SECRET)  # noqa: F841
    raise ConnectionError("registry dropped the connection")


def _exc_info() -> Any:
    try:
        _fail_with_secret_in_locals()
    except ConnectionError:
        return sys.exc_info()
    raise AssertionError("unreachable")


def _event() -> dict[str, Any]:
    return {"event": "rpc raised an unexpected exception", "exc_info": _exc_info()}


def test_json_traceback_has_no_locals() -> None:
    event = logs.exception_processor()(None, "error", _event())  # type: ignore[arg-type]
    line = structlog.processors.JSONRenderer()(None, "error", event)  # type: ignore[arg-type]
    assert isinstance(line, str)
    frames = json.loads(line)["exception"][0]["frames"]
    assert any(f["name"] == "_fail_with_secret_in_locals" for f in frames)  # the traceback is there
    assert all("locals" not in f for f in frames)
    assert SECRET not in line


def test_console_traceback_has_no_locals() -> None:
    out = logs.console_renderer()(None, "error", _event())  # type: ignore[arg-type]
    assert isinstance(out, str)
    assert "_fail_with_secret_in_locals" in out and "ConnectionError" in out
    assert SECRET not in out


def test_credential_objects_hide_their_secrets() -> None:
    creds = RegistryCredentials(username="bob", password=SECRET, auth=SECRET, identity_token=SECRET,
                                registry_token=SECRET)
    assert SECRET not in repr(creds) and "bob" in repr(creds)
    assert SECRET not in repr(RegistryAuth(username="bob", password=SECRET, identity_token=SECRET))


def test_cached_token_hides_its_value() -> None:
    from agent.adapters.registry.auth import _Token

    assert SECRET not in repr(_Token(SECRET, 1.0))
