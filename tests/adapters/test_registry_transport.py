"""Registry transport: which redirects are followed, and deadlines on every connection."""

from __future__ import annotations

import time

import httpx
import pytest

from agent.adapters.registry import deadline
from agent.adapters.registry.transport import RegistryHostConfig, RetryPolicy, Transport
from agent.domain.errors import FailedPrecondition
from agent.domain.imageref import RemoteRepository


def transport(insecure: bool = False) -> Transport:
    return Transport(hosts={"registry.example": RegistryHostConfig(insecure=insecure)},
                     timeout=httpx.Timeout(5.0), retry=RetryPolicy(), sleep=time.sleep)


def repo(host: str) -> RemoteRepository:
    return RemoteRepository(registry=host, host=host, name="x/y")


@pytest.mark.parametrize(("source", "target"), [
    ("https://registry.example/v2/x/y/blobs/d", "https://cdn.example/blob?sig=1"),
    ("http://127.0.0.1:5000/v2/x/y/blobs/d", "http://127.0.0.1:5001/blob"),
    ("http://127.0.0.1:5000/v2/x/y/blobs/d", "https://cdn.example/blob"),
])
def test_allowed_redirects(source: str, target: str) -> None:
    host = httpx.URL(source).netloc.decode()
    transport().check_redirect(repo(host), httpx.URL(source), httpx.URL(target))


@pytest.mark.parametrize(("source", "target", "why"), [
    ("https://registry.example/v2/x/y/blobs/d", "http://cdn.example/blob", "plain HTTP"),
    ("http://127.0.0.1:5000/v2/x/y/blobs/d", "http://example.invalid/blob", "plain HTTP"),
    ("https://registry.example/v2/x/y/blobs/d", "https://169.254.169.254/latest", "into this node"),
    ("https://registry.example/v2/x/y/blobs/d", "https://127.0.0.1:8080/", "into this node"),
    ("https://registry.example/v2/x/y/blobs/d", "https://[::ffff:127.0.0.1]/", "into this node"),
    ("https://registry.example/v2/x/y/blobs/d", "https://localhost/", "into this node"),
    ("https://registry.example/v2/x/y/blobs/d", "ftp://cdn.example/blob", "only http"),
])
def test_refused_redirects(source: str, target: str, why: str) -> None:
    host = httpx.URL(source).netloc.decode()
    with pytest.raises(FailedPrecondition, match=why):
        transport().check_redirect(repo(host), httpx.URL(source), httpx.URL(target))


def test_insecure_registry_may_redirect_to_plain_http() -> None:
    source = httpx.URL("http://registry.example/v2/x/y/blobs/d")
    transport(insecure=True).check_redirect(repo("registry.example"), source, httpx.URL("http://cdn.example/b"))


def test_every_pooled_client_gets_deadlines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    client = transport().client("registry.example")
    pools = [client._transport, *(t for t in client._mounts.values() if t is not None)]
    assert len(pools) >= 2  # the direct connection and the proxy
    for t in pools:
        assert isinstance(t._pool._network_backend, deadline.DeadlineBackend)  # type: ignore[attr-defined]
