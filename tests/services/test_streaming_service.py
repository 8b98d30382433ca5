"""Exec, Attach and PortForward checks on fakes: a URL only for a valid
request on a running container or a ready sandbox, and the request kept is
the checked one (full ids, the command, the streams)."""

from __future__ import annotations

import pytest

from agent.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from agent.domain.streaming import AttachRequest, ExecRequest, PortForwardRequest, StreamRequest
from agent.services.containers import ContainerService
from agent.services.streaming import StreamingService
from tests.services.container_fakes import OTHER_SANDBOX_ID, SANDBOX_ID, ContainerFakes, cspec


class RecordingURLs:
    def __init__(self) -> None:
        self.issued: list[StreamRequest] = []

    def url_for(self, request: StreamRequest) -> str:
        self.issued.append(request)
        return f"http://127.0.0.1:1/x/{len(self.issued)}"


@pytest.fixture
def env() -> tuple[StreamingService, RecordingURLs, str, str]:
    fakes = ContainerFakes()
    containers = ContainerService(fakes.ports)
    running = containers.create(cspec())
    containers.start(running.id)
    created = containers.create(cspec(sandbox_id=OTHER_SANDBOX_ID))
    urls = RecordingURLs()
    return StreamingService(containers, fakes.sandboxes, urls), urls, running.id, created.id  # type: ignore[arg-type]


def test_exec_and_attach_on_a_running_container(env):
    svc, urls, running, _ = env
    assert svc.exec(running[:12], ["sh", "-c", "id"], False, False, True, True) == "http://127.0.0.1:1/x/1"
    assert svc.attach(running, True, True, True, False) == "http://127.0.0.1:1/x/2"
    assert urls.issued == [
        ExecRequest(running, ("sh", "-c", "id"), tty=False, stdin=False, stdout=True, stderr=True),
        AttachRequest(running, tty=True, stdin=True, stdout=True, stderr=False),
    ]


@pytest.mark.parametrize(("call", "error", "text"), [
    (lambda s, r, c: s.exec(c, ["id"], False, False, True, False), FailedPrecondition, "is not running"),
    (lambda s, r, c: s.attach(c, False, False, True, False), FailedPrecondition, "is not running"),
    (lambda s, r, c: s.exec("0" * 64, ["id"], False, False, True, False), NotFound, "not found"),
    (lambda s, r, c: s.exec(r, [], False, False, True, False), InvalidArgument, "cmd: must not be empty"),
    (lambda s, r, c: s.exec(r, ["id"], True, False, True, True), InvalidArgument, "stderr: tty and stderr"),
    (lambda s, r, c: s.exec(r, ["id"], False, False, False, False), InvalidArgument, "stdin: one of"),
    (lambda s, r, c: s.attach("", False, False, True, False), InvalidArgument, "container_id"),
    (lambda s, r, c: s.port_forward("0" * 64, [80]), NotFound, "not found"),
    (lambda s, r, c: s.port_forward("f" * 64, [80]), FailedPrecondition, "is not ready"),
    (lambda s, r, c: s.port_forward(SANDBOX_ID, [80, 65536]), InvalidArgument, "port[1]: 65536"),
    (lambda s, r, c: s.port_forward(SANDBOX_ID, [0]), InvalidArgument, "port[0]: 0"),
])
def test_bad_requests_get_no_url(env, call, error, text):
    svc, urls, running, created = env
    with pytest.raises(error, match=text.replace("[", r"\[").replace("]", r"\]")):
        call(svc, running, created)
    assert urls.issued == []


def test_port_forward_on_a_ready_sandbox(env):
    svc, urls, _, _ = env
    svc.port_forward(SANDBOX_ID, [8080, 80, 8080])
    svc.port_forward(SANDBOX_ID, [])
    assert urls.issued == [PortForwardRequest(SANDBOX_ID, (8080, 80)), PortForwardRequest(SANDBOX_ID, ())]
