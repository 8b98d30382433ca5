"""Hostile images pulled by the real agent from a real registry: tar header
memory bombs, disk-fill bombs, the per-pull cap and the free-space reserve
(issue #10, items 1-2). Each refusal leaves nothing in the image store."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc

from agent.adapters.registry import RegistryClient
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain import oci
from tests.hostile_layers import header_bomb
from tests.integration.agentproc import AgentProcess
from tests.integration.registry_fixture import RunningRegistry
from tests.integration.test_images import client, listed, push, raw_disk, rpc_error  # noqa: F401

MiB = 1 << 20


def peak_rss_kib(agent: AgentProcess) -> int:
    assert agent.proc is not None
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def store_is_empty(agent: AgentProcess) -> None:
    assert listed(agent) == []
    root = agent.state_dir / "images"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == []
    assert list((root / "tmp").iterdir()) == []
    assert list((root / "disks").iterdir()) == []


def pull_error(agent: AgentProcess, image: str) -> grpc.RpcError:
    return rpc_error(agent.images.PullImage, pb.PullImageRequest(image=pb.ImageSpec(image=image)))


def test_long_name_header_bomb_is_refused_without_growing_the_agent(
        running_agent: AgentProcess, registry: RunningRegistry, client: RegistryClient) -> None:  # noqa: F811
    bomb = header_bomb(b"L", claimed=2 << 30, present=64 * MiB)
    assert len(bomb) < 200_000
    name, _ = push(client, registry, {}, layers=[bomb])
    before = peak_rss_kib(running_agent)
    err = pull_error(running_agent, f"{name}:v1")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == (
        f"image {name}:v1: layer {oci.sha256_digest(bomb)} is refused: a GNU long name header claims "
        f"{2 << 30} bytes (at most 65536 are allowed)"
    )
    assert peak_rss_kib(running_agent) - before < 32 * 1024  # the 64 MiB behind the header stayed out
    store_is_empty(running_agent)
    running_agent.runtime.Version(pb.VersionRequest(), timeout=10)


def test_pax_header_bomb_is_refused(running_agent: AgentProcess, registry: RunningRegistry,
                                    client: RegistryClient) -> None:  # noqa: F811
    name, _ = push(client, registry, {}, layers=[header_bomb(b"x", claimed=1 << 40, present=MiB)])
    err = pull_error(running_agent, f"{name}:v1")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "a pax header claims 1099511627776 bytes" in (err.details() or "")
    store_is_empty(running_agent)


def test_a_pull_beyond_its_byte_cap_is_resource_exhausted(agent_factory: Any, registry: RunningRegistry,
                                                          client: RegistryClient) -> None:  # noqa: F811
    agent = agent_factory(extra_config=f"[images]\nmax_pull_bytes = {MiB}\n").start()
    name, _ = push(client, registry, {"disk/a.raw": raw_disk(2 * MiB)})
    err = pull_error(agent, f"{name}:v1")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"more than the {MiB} allowed ([images] max_pull_bytes)" in (err.details() or "")
    store_is_empty(agent)
    # Within the cap the same agent pulls.
    small, _ = push(client, registry, {"disk/a.raw": raw_disk(MiB // 2)})
    agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=f"{small}:v1")), timeout=120)


def test_a_pull_that_would_cross_the_free_space_reserve_is_resource_exhausted(
        agent_factory: Any, registry: RunningRegistry, client: RegistryClient) -> None:  # noqa: F811
    agent = agent_factory(extra_config=f"[images]\nmin_free_bytes = {1 << 62}\n").start()
    name, _ = push(client, registry, {"disk/a.raw": raw_disk()})
    err = pull_error(agent, f"{name}:v1")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "not enough space to download" in (err.details() or "")
    assert f"of which {1 << 62} are kept in reserve ([images] min_free_bytes)" in (err.details() or "")
    store_is_empty(agent)
    assert agent.proc is not None and agent.proc.poll() is None
