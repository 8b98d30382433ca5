"""Sandbox specs: validate_sandbox_spec refuses with a named field, never another exception."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from agent.domain.sandbox import DNSConfig, Metadata, NetworkMode, PortMapping, SandboxSpec
from agent.domain.validation import validate_host_path, validate_id, validate_sandbox_spec
from tests.fuzz.messages import annotation_values, map_keys, strings
from tests.fuzz.properties import Refused, domain_errors_only
from tests.fuzz.strategies import wire_text

INT32 = st.integers(-(2**31), 2**31 - 1)
SPECS = st.builds(
    SandboxSpec,
    metadata=st.builds(Metadata, strings, strings, strings, INT32),
    hostname=strings, log_directory=strings,
    dns=st.builds(DNSConfig, st.lists(strings, max_size=3).map(tuple), st.lists(strings, max_size=3).map(tuple),
                  st.lists(strings, max_size=3).map(tuple)),
    port_mappings=st.lists(st.builds(PortMapping, st.sampled_from(["tcp", "udp", "sctp"]), INT32, INT32, strings),
                           max_size=3).map(tuple),
    labels=st.dictionaries(map_keys, strings, max_size=3),
    annotations=st.dictionaries(map_keys, annotation_values, max_size=3),
    runtime_handler=strings, network_mode=st.sampled_from(list(NetworkMode)), cgroup_parent=strings,
)


@given(SPECS)
def test_sandbox_specs_refused_with_a_field(spec: SandboxSpec) -> None:
    result = domain_errors_only(validate_sandbox_spec, spec)
    if isinstance(result, Refused):
        assert result.error.field  # type: ignore[attr-defined]


@given(strings)
@example("/var/log/\udcff")
def test_host_paths(value: str) -> None:
    domain_errors_only(validate_host_path, value, "config.log_directory")


@given(st.one_of(wire_text, st.text()))
def test_ids(value: str) -> None:
    domain_errors_only(validate_id, value, "pod_sandbox_id")
