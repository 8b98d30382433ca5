"""The ExecSync handler: checks the request, calls the exec service once, converts the answer."""

from __future__ import annotations

from typing import Any, cast

import pytest

from agent.api.exec_sync import ExecSyncVerbs
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.errors import InvalidArgument, Unimplemented
from agent.services.exec import ExecResult, ExecService


class FakeExecs:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], float]] = []

    def exec_sync(self, container_id: str, cmd: list[str], timeout_s: float) -> ExecResult:
        self.calls.append((container_id, cmd, timeout_s))
        return ExecResult(stdout=b"out", stderr=b"err", exit_code=3)


class Verbs(ExecSyncVerbs):
    def __init__(self, execs: FakeExecs | None) -> None:
        self._execs = cast(ExecService, execs) if execs is not None else None


def test_the_answer_carries_output_and_exit_code() -> None:
    execs = FakeExecs()
    resp = Verbs(execs).ExecSync(pb.ExecSyncRequest(container_id="c1", cmd=["sh", "-c", "x"], timeout=7), None)
    assert (resp.stdout, resp.stderr, resp.exit_code) == (b"out", b"err", 3)
    assert execs.calls == [("c1", ["sh", "-c", "x"], 7.0)]


@pytest.mark.parametrize(("request_kw", "field"), [
    ({"container_id": "", "cmd": ["true"]}, "container_id"),
    ({"container_id": "c1", "cmd": []}, "cmd"),
    ({"container_id": "c1", "cmd": [""]}, "cmd"),
    ({"container_id": "c1", "cmd": ["true"], "timeout": -1}, "timeout"),
])
def test_bad_requests_name_the_field_and_reach_no_service(request_kw: dict[str, Any], field: str) -> None:
    execs = FakeExecs()
    with pytest.raises(InvalidArgument) as exc:
        Verbs(execs).ExecSync(pb.ExecSyncRequest(**request_kw), None)
    assert exc.value.field == field
    assert execs.calls == []


def test_without_an_exec_service_it_is_unimplemented() -> None:
    with pytest.raises(Unimplemented):
        Verbs(None).ExecSync(pb.ExecSyncRequest(container_id="c1", cmd=["true"]), None)
