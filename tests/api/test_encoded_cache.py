"""The cached ListPodSandbox encoding must be byte-for-byte a valid response."""

from __future__ import annotations

import dataclasses

from agent.api.convert.sandboxes import sandbox_to_pb
from agent.api.convert.wire import EncodedCache
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.sandbox import Metadata, Sandbox, SandboxSpec, SandboxState


def make(i: int, state: SandboxState = SandboxState.READY) -> Sandbox:
    return Sandbox(
        id=f"{i:064x}",
        spec=SandboxSpec(metadata=Metadata(f"vm-{i}", "ns", f"uid-{i}", i % 3),
                         labels={"app": "x" * (i * 40)}, annotations={"a": "b"},
                         runtime_handler="podvisor" if i % 2 else ""),
        state=state,
        created_at_ns=1_700_000_000_000_000_000 + i,
    )


def test_encoding_equals_protobuf_response() -> None:
    values = [make(i) for i in range(12)]  # label sizes cross the 1-byte varint length
    cache = EncodedCache(sandbox_to_pb, field_number=1)
    raw = cache.encode(values)
    expected = pb.ListPodSandboxResponse(items=[sandbox_to_pb(v) for v in values])
    assert pb.ListPodSandboxResponse.FromString(raw) == expected
    assert cache.encode(values) == raw  # served from the cache


def test_replaced_values_are_re_encoded_and_removed_ones_forgotten() -> None:
    values = [make(i) for i in range(3)]
    cache = EncodedCache(sandbox_to_pb, field_number=1)
    cache.encode(values)
    stopped = dataclasses.replace(values[1], state=SandboxState.NOTREADY)
    raw = cache.encode([values[0], stopped])
    items = pb.ListPodSandboxResponse.FromString(raw).items
    assert [i.state for i in items] == [pb.SANDBOX_READY, pb.SANDBOX_NOTREADY]
    assert len(cache._cache) == 2
    # A filtered (incomplete) list never evicts live entries.
    cache.encode([values[0]], complete=False)
    assert len(cache._cache) == 2


def test_empty_list_is_an_empty_response() -> None:
    cache = EncodedCache(sandbox_to_pb, field_number=1)
    assert cache.encode([]) == b""
