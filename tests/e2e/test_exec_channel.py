"""The guest agent channel through the gRPC API, on the tiny guest (it runs no
agent): every VM gets the channel unless ``podvisor.io/guest-agent: "false"``;
ExecSync says clearly what is missing either way. The guest answering is
proven on the Debian guest (test_exec.py)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import grpc
import pytest

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import VMAgent

pytestmark = pytest.mark.e2e

CHANNEL = "org.qemu.guest_agent.0"


def _channels(vma: VMAgent, vm: object) -> list[tuple[str, str]]:
    xml = json.loads(vma.status(vm, verbose=True).info["info"])["domainXML"]  # type: ignore[arg-type]
    return [(ch.find("target").get("name", ""), ch.find("source").get("path", ""))  # type: ignore[union-attr]
            for ch in ET.fromstring(xml).iterfind("./devices/channel")]


def test_the_channel_is_there_unless_turned_off_and_exec_sync_says_what_is_missing(vm_agent: VMAgent) -> None:
    with_channel = vm_agent.create("qga-on")
    without = vm_agent.create("qga-off", annotations={"podvisor.io/guest-agent": "false"}, pull=False)
    [(name, path)] = _channels(vm_agent, with_channel)
    assert name == CHANNEL and path.endswith(".qga")
    assert _channels(vm_agent, without) == []
    vm_agent.start(with_channel)
    vm_agent.start(without)

    # No channel: refused at once, naming the annotation.
    with pytest.raises(grpc.RpcError) as exc:
        vm_agent.agent.runtime.ExecSync(pb.ExecSyncRequest(
            container_id=without.container_id, cmd=["true"], timeout=30), timeout=60)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no guest agent channel" in exc.value.details() and "guest-agent" in exc.value.details()

    # A channel nobody answers on (the tiny guest runs no agent): the call's
    # timeout bounds the wait, and the answer is a timed-out command.
    with pytest.raises(grpc.RpcError) as exc:
        vm_agent.agent.runtime.ExecSync(pb.ExecSyncRequest(
            container_id=with_channel.container_id, cmd=["true"], timeout=3), timeout=60)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "guest agent did not answer" in exc.value.details()


def test_a_malformed_guest_agent_annotation_is_refused(vm_agent: VMAgent) -> None:
    cfg = vm_agent.sandbox_config("qga-bad", pod_annotations={"podvisor.io/guest-agent": "no"})
    with pytest.raises(grpc.RpcError) as exc:
        vm_agent.agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "podvisor.io/guest-agent" in exc.value.details()
