"""Torn state files (issue #10, item 10): a podnet.json or CNI cache entry
cut short by a power cut (or garbage on disk) must never wedge StopPodSandbox
and RemovePodSandbox. Teardown goes by what it can find (the namespace and
links named after the sandbox id, the CNI cache or the configuration in use)
and leaves nothing: no link, namespace, lease, iptables rule or file.

Real agent, real network namespaces and CNI plugins, each test with its own
CNI configuration (the ``network`` fixture of test_sandbox_network.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.integration.agentproc import AgentProcess
from tests.integration.test_sandbox_network import (  # noqa: F401
    NOTHING,
    agent_with,
    leftovers,
    marks_for,
    network,
    sandbox,
)


def _podnet(agent: AgentProcess, sid: str) -> Path:
    return agent.state_dir / "sandboxes" / sid / "podnet.json"


def _stop_and_remove(agent: AgentProcess, sid: str) -> None:
    agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)


def _run(agent: AgentProcess, name: str) -> tuple[str, str]:
    sid = agent.runtime.RunPodSandbox(sandbox(name), timeout=120).pod_sandbox_id
    ip = agent.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status.network.ip
    return sid, ip


def _nothing_left(agent: AgentProcess, net: dict[str, Any], made: list[tuple[str, str]]) -> None:
    assert leftovers(net["ipam"], marks_for(agent, made)) == NOTHING
    assert list((agent.state_dir / "sandboxes").iterdir()) == []
    assert list((agent.state_dir / "cni").iterdir()) == []
    assert agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items == []


def test_truncated_podnet_json_after_a_crash_does_not_wedge_stop_or_remove(
        agent_factory: Any, network: dict[str, Any]) -> None:  # noqa: F811
    agent = agent_with(agent_factory, network).start()
    sid, ip = _run(agent, "torn")
    state = _podnet(agent, sid)
    whole = state.read_bytes()
    assert len(whole) > 40 and ip
    agent.kill9()
    state.write_bytes(whole[: len(whole) // 2])  # what a power cut mid-write left before the fix
    agent.start()
    # Recovery cannot read the wiring: the sandbox is reported like a lost network.
    st = agent.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status
    assert st.state == pb.SANDBOX_NOTREADY
    assert leftovers(network["ipam"], marks_for(agent, [(sid, ip)]))["netns"], "the namespace is still there"
    _stop_and_remove(agent, sid)
    _nothing_left(agent, network, [(sid, ip)])
    assert "pod network state unreadable" in agent.log()


def test_garbage_podnet_json_and_torn_cni_cache_do_not_wedge_stop_or_remove(
        agent_factory: Any, network: dict[str, Any]) -> None:  # noqa: F811
    agent = agent_with(agent_factory, network).start()
    sid, ip = _run(agent, "garbage")
    _podnet(agent, sid).write_bytes(b"\x00\xff{garbage")
    cache = agent.state_dir / "cni" / f"{sid}.json"
    cache.write_bytes(cache.read_bytes()[:100])
    during = leftovers(network["ipam"], marks_for(agent, [(sid, ip)]))
    assert during["netns"] and during["leases"] and during["links"]
    _stop_and_remove(agent, sid)
    # The lease too: DEL ran with the configuration in use, as libcni does without a cache.
    _nothing_left(agent, network, [(sid, ip)])
    # And a second Stop/Remove of the gone sandbox is still fine.
    _stop_and_remove(agent, sid)


def test_state_files_are_written_whole(agent_factory: Any, network: dict[str, Any]) -> None:  # noqa: F811
    """What the agent writes is complete and private, with no temporary left."""
    agent = agent_with(agent_factory, network).start()
    sid, ip = _run(agent, "whole")
    for path in (_podnet(agent, sid), agent.state_dir / "cni" / f"{sid}.json"):
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.read_bytes().rstrip().endswith(b"}")
    temporaries = [p for p in agent.state_dir.rglob(".*.tmp")]
    assert temporaries == []
    _stop_and_remove(agent, sid)
    _nothing_left(agent, network, [(sid, ip)])
