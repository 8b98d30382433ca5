"""PodSandbox lifecycle against the real agent: persistence across kill -9,
filters, idempotency, and bad input that must not hurt what is stored."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.integration.agentproc import AgentProcess


def sandbox_config(name: str, uid: str | None = None, *, attempt: int = 0,
                   labels: dict[str, str] | None = None,
                   annotations: dict[str, str] | None = None,
                   log_directory: str = "") -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="podvisor-test",
                                       uid=uid or f"uid-{name}", attempt=attempt),
        hostname=name,
        log_directory=log_directory,
        labels=labels or {},
        annotations=annotations or {},
        dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["svc.cluster.local"]),
        port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=18080)],
    )


def run(agent: AgentProcess, config: pb.PodSandboxConfig) -> str:
    resp = agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=10)
    return str(resp.pod_sandbox_id)


def listed(agent: AgentProcess, flt: pb.PodSandboxFilter | None = None) -> list[Any]:
    req = pb.ListPodSandboxRequest(filter=flt) if flt is not None else pb.ListPodSandboxRequest()
    return list(agent.runtime.ListPodSandbox(req, timeout=10).items)


def rpc_error(fn: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, timeout=10)
    return err.value


def test_full_lifecycle(running_agent: AgentProcess, tmp_path: Path) -> None:
    logs = tmp_path / "pods" / "podvisor-test_web_uid-web"
    before = time.time_ns()
    sid = run(running_agent, sandbox_config("web", labels={"app": "web"},
                                             annotations={"team": "vm"},
                                             log_directory=str(logs)))
    assert len(sid) == 64 and int(sid, 16) >= 0
    assert logs.is_dir(), "the log directory is created for the VM's console log"
    assert (running_agent.state_dir / "sandboxes" / sid).is_dir()

    status = running_agent.runtime.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True), timeout=10)
    st = status.status
    assert st.id == sid and st.state == pb.SANDBOX_READY
    assert (st.metadata.name, st.metadata.namespace, st.metadata.uid) == \
        ("web", "podvisor-test", "uid-web")
    assert before <= st.created_at <= time.time_ns()
    assert dict(st.labels) == {"app": "web"} and dict(st.annotations) == {"team": "vm"}
    info = json.loads(status.info["info"])
    assert info["hostname"] == "web" and info["logDirectory"] == str(logs)
    assert info["portMappings"][0]["hostPort"] == 18080
    assert info["dnsConfig"]["servers"] == ["10.96.0.10"]

    # A prefix works like a full id, as crictl users expect.
    short = running_agent.runtime.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=sid[:13]), timeout=10)
    assert short.status.id == sid

    running_agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=10)
    running_agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=10)
    st = running_agent.runtime.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10).status
    assert st.state == pb.SANDBOX_NOTREADY

    running_agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                           timeout=10)
    running_agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                           timeout=10)
    err = rpc_error(running_agent.runtime.PodSandboxStatus,
                    pb.PodSandboxStatusRequest(pod_sandbox_id=sid))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert listed(running_agent) == []
    assert not (running_agent.state_dir / "sandboxes" / sid).exists()


def test_remove_without_stop_and_name_reuse(running_agent: AgentProcess) -> None:
    cfg = sandbox_config("db")
    sid = run(running_agent, cfg)
    err = rpc_error(running_agent.runtime.RunPodSandbox, pb.RunPodSandboxRequest(config=cfg))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert sid in (err.details() or "")
    # The next attempt number is a new sandbox, as kubelet does after a failure.
    cfg2 = sandbox_config("db", attempt=1)
    sid2 = run(running_agent, cfg2)
    assert sid2 != sid
    running_agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                           timeout=10)
    sid3 = run(running_agent, cfg)
    assert sid3 not in (sid, sid2)


def test_list_filters(running_agent: AgentProcess) -> None:
    a = run(running_agent, sandbox_config("a", labels={"tier": "front", "app": "shop"}))
    b = run(running_agent, sandbox_config("b", labels={"tier": "back", "app": "shop"}))
    c = run(running_agent, sandbox_config("c", labels={"tier": "back"}))
    running_agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=c), timeout=10)

    def ids(flt: pb.PodSandboxFilter) -> set[str]:
        return {s.id for s in listed(running_agent, flt)}

    assert {s.id for s in listed(running_agent)} == {a, b, c}
    assert ids(pb.PodSandboxFilter(id=b)) == {b}
    assert ids(pb.PodSandboxFilter(id=b[:10])) == {b}
    assert ids(pb.PodSandboxFilter(id="f" * 64)) == set()
    ready = pb.PodSandboxStateValue(state=pb.SANDBOX_READY)
    notready = pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY)
    assert ids(pb.PodSandboxFilter(state=ready)) == {a, b}
    assert ids(pb.PodSandboxFilter(state=notready)) == {c}
    assert ids(pb.PodSandboxFilter(label_selector={"app": "shop"})) == {a, b}
    assert ids(pb.PodSandboxFilter(label_selector={"app": "shop", "tier": "back"})) == {b}
    assert ids(pb.PodSandboxFilter(state=ready, label_selector={"tier": "back"})) == {b}
    assert ids(pb.PodSandboxFilter(label_selector={"app": "none"})) == set()
    # Listed in creation order with their runtime fields.
    items = listed(running_agent)
    assert [s.id for s in items] == [a, b, c]
    assert [s.state for s in items] == [pb.SANDBOX_READY, pb.SANDBOX_READY, pb.SANDBOX_NOTREADY]


def test_kill9_then_restart_lists_the_same_sandboxes(agent_factory: Any) -> None:
    agent = agent_factory().start()
    made = [run(agent, sandbox_config(f"vm-{i}", labels={"i": str(i)},
                                      annotations={"note": "x" * i}))
            for i in range(6)]
    for sid in made[:2]:
        agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=10)
    agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=made[5]), timeout=10)
    before = listed(agent)
    agent.kill9()

    again = agent_factory(state_dir=agent.state_dir).start()
    after = listed(again)
    assert [s.SerializeToString(deterministic=True) for s in after] == \
        [s.SerializeToString(deterministic=True) for s in before]
    assert {s.id for s in after} == set(made[:5])
    states = {s.id: s.state for s in after}
    assert states[made[0]] == states[made[1]] == pb.SANDBOX_NOTREADY
    assert states[made[2]] == pb.SANDBOX_READY
    # And the restarted agent keeps working on them.
    again.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=made[0]), timeout=10)
    assert len(listed(again)) == 4


def test_recovery_rolls_back_an_interrupted_creation(agent_factory: Any) -> None:
    """A sandbox row left in CREATING (crash mid-RunPodSandbox) is rolled back."""
    import sqlite3

    agent = agent_factory().start()
    sid = run(agent, sandbox_config("half"))
    agent.kill9()
    db = sqlite3.connect(agent.state_dir / "podvisor.db")
    db.execute("UPDATE sandboxes SET state = 'creating' WHERE id = ?", (sid,))
    db.commit()
    db.close()
    orphan = agent.state_dir / "sandboxes" / ("ab" * 32)
    orphan.mkdir()
    again = agent_factory(state_dir=agent.state_dir).start()
    assert listed(again) == []
    assert not (agent.state_dir / "sandboxes" / sid).exists()
    assert not orphan.exists()
    # The name is free again.
    run(again, sandbox_config("half"))


BAD_REQUESTS = [
    (pb.RunPodSandboxRequest(), "config"),
    (pb.RunPodSandboxRequest(config=pb.PodSandboxConfig()), "config.metadata"),
    (pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(namespace="n", uid="u"))), "config.metadata.name"),
    (pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="n", uid="u"))), "config.metadata.namespace"),
    (pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="n", namespace="n"))), "config.metadata.uid"),
    (pb.RunPodSandboxRequest(config=sandbox_config(
        "big", annotations={"blob": "x" * (300 * 1024)})), "config.annotations"),
    (pb.RunPodSandboxRequest(config=sandbox_config(
        "ann", annotations={"podvisor.io/flavour": "big"})), "podvisor.io/flavour"),
    (pb.RunPodSandboxRequest(config=sandbox_config(
        "mem", annotations={"podvisor.io/memory": "lots"})), "podvisor.io/memory"),
    (pb.RunPodSandboxRequest(config=sandbox_config("log", log_directory="relative/dir")),
     "config.log_directory"),
    (pb.RunPodSandboxRequest(config=sandbox_config("esc", log_directory="/var/log/../../etc")),
     "config.log_directory"),
    (pb.RunPodSandboxRequest(config=sandbox_config("rh"), runtime_handler="runc"),
     "runtime_handler"),
]


def test_bad_requests_name_the_field_and_store_nothing(running_agent: AgentProcess) -> None:
    keep = run(running_agent, sandbox_config("keep", labels={"k": "v"}))
    before = listed(running_agent)
    for request, field in BAD_REQUESTS:
        err = rpc_error(running_agent.runtime.RunPodSandbox, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.details())
        assert field in (err.details() or ""), (field, err.details())
        assert "Traceback" not in (err.details() or "")
    for method, req_type in (("PodSandboxStatus", pb.PodSandboxStatusRequest),
                             ("StopPodSandbox", pb.StopPodSandboxRequest),
                             ("RemovePodSandbox", pb.RemovePodSandboxRequest)):
        err = rpc_error(getattr(running_agent.runtime, method), req_type(pod_sandbox_id=""))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "pod_sandbox_id" in (err.details() or "")
    after = listed(running_agent)
    assert [s.SerializeToString(deterministic=True) for s in after] == \
        [s.SerializeToString(deterministic=True) for s in before]
    assert [s.id for s in after] == [keep]


def test_unknown_ids(running_agent: AgentProcess) -> None:
    unknown = "0123456789abcdef" * 4
    err = rpc_error(running_agent.runtime.PodSandboxStatus,
                    pb.PodSandboxStatusRequest(pod_sandbox_id=unknown))
    assert err.code() == grpc.StatusCode.NOT_FOUND and unknown in (err.details() or "")
    # CRI: stopping or removing what is already gone is not an error.
    running_agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=unknown),
                                         timeout=10)
    running_agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=unknown),
                                           timeout=10)
    running_agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id="nonexistent"),
                                         timeout=10)


def test_garbage_on_the_socket_does_not_hurt(running_agent: AgentProcess) -> None:
    sid = run(running_agent, sandbox_config("survivor"))
    payloads = [os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(512), b"\x00" * 100000]
    for payload in payloads:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(running_agent.socket))
            try:
                s.sendall(payload)
                s.recv(1024)
            except OSError:
                pass
    # A syntactically broken protobuf body for a real method.
    raw = running_agent.channel.unary_unary(
        "/runtime.v1.RuntimeService/RunPodSandbox",
        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\x0a\xff\xff\xff\xff\x0f garbage", timeout=10)
    assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    # An oversized message is refused by the transport.
    with pytest.raises(grpc.RpcError) as err:
        running_agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sandbox_config(
            "huge", annotations={"a": "x" * (17 * 1024 * 1024)})), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Still serving, and nothing stored was touched.
    assert [s.id for s in listed(running_agent)] == [sid]
    assert running_agent.proc is not None and running_agent.proc.poll() is None
    assert "rpc raised an unexpected exception" not in running_agent.log()


def test_concurrent_runs_get_distinct_sandboxes(running_agent: AgentProcess) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda i: run(running_agent, sandbox_config(f"c-{i}")), range(40)))
    assert len(set(ids)) == 40
    assert {s.id for s in listed(running_agent)} == set(ids)
