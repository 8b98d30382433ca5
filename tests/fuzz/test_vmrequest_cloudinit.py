"""CreateContainer → VMRequest → NoCloud seed: refused with a named field, or rendered without error.

Everything build_vm_request accepts must render: an exception in the
renderer comes after the overlay was written, so it would be an INTERNAL
that leaves files behind.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from agent.domain import annotations as ann
from agent.domain.vmrequest import CRIResources, VMDefaults, build_vm_request, parse_cloud_config
from agent.render.cloudinit import seed_files
from agent.render.nocloud import build_seed_iso
from tests.fuzz.properties import Refused, domain_errors_only
from tests.fuzz.strategies import dumps, json_values, mutate_document, nested_texts, wire_text

CLOUD_CONFIG: dict[str, Any] = {
    "hostname": "h", "ssh_authorized_keys": ["ssh-ed25519 AAAA a@b"], "runcmd": [["echo", "hi"], "ls"],
    "write_files": [{"path": "/etc/x", "content": "y"}], "users": [{"name": "u"}], "packages": ["curl"],
}
NETWORK_CONFIG: dict[str, Any] = {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}}
USER_DATA = st.one_of(
    mutate_document(CLOUD_CONFIG).map(lambda d: "#cloud-config\n" + yaml.safe_dump(d, allow_unicode=True)),
    mutate_document(CLOUD_CONFIG).map(lambda d: "#cloud-config\n" + dumps(d)),
    json_values.map(lambda v: "#cloud-config\n" + dumps(v)),
    wire_text, wire_text.map(lambda t: "#!/bin/sh\n" + t),
    st.sampled_from(["Content-Type: multipart/mixed; boundary=x\nMIME-Version: 1.0\n\n--x--\n",
                     "#cloud-config\n!!binary AAAA", "#cloud-config\na: !!set {x}", "#cloud-config\nd: 2001-01-01",
                     "#cloud-config\n\"\\ud800\": 1", "#cloud-config\nruncmd: \"\\ud800\"",
                     "#cloud-config\nhostname: \"\\ud800\"", "#include http://x"]),
    nested_texts.map(lambda t: "#cloud-config\n" + t),
)
NETWORK = st.one_of(mutate_document(NETWORK_CONFIG).map(dumps), json_values.map(dumps), wire_text, nested_texts)
ANNOTATIONS = st.fixed_dictionaries({}, optional={
    ann.USER_DATA: USER_DATA,
    ann.USER_DATA_BASE64: USER_DATA.map(lambda t: base64.b64encode(t.encode("utf-8", "surrogatepass")).decode()),
    ann.NETWORK_CONFIG: NETWORK,
    ann.SSH_AUTHORIZED_KEYS: st.one_of(wire_text, st.just("ssh-rsa AAAA x\nssh-ed25519 BBBB y")),
    ann.VCPUS: st.one_of(wire_text, st.integers(-1, 600).map(str)),
    ann.MEMORY: st.one_of(wire_text, st.sampled_from(["16Mi", "1Gi", "15Mi", "999999Ti", "1e3"])),
    ann.FIRMWARE: st.sampled_from(["bios", "uefi", "", "efi"]),
})
INT64 = st.integers(-(2**63), 2**63 - 1)


@given(ANNOTATIONS, ANNOTATIONS, st.lists(st.tuples(wire_text, wire_text), max_size=3),
       st.lists(wire_text, max_size=3), st.lists(wire_text, max_size=2), INT64, INT64, INT64, INT64, wire_text)
def test_accepted_requests_render_a_seed(pod: dict[str, str], container: dict[str, str],
                                         env: list[tuple[str, str]], command: list[str], args: list[str],
                                         memory: int, quota: int, period: int, shares: int, hostname: str) -> None:
    request = domain_errors_only(
        build_vm_request, cri_resources=CRIResources(memory, quota, period, shares), pod_annotations=pod,
        container_annotations=container, env=env, command=command, args=args, defaults=VMDefaults())
    if isinstance(request, Refused):
        return
    assert 1 <= request.vcpus <= request.max_vcpus and request.memory_bytes <= request.max_memory_bytes
    files = seed_files(instance_id="c" * 64, hostname=hostname or "vm", cloud_init=request.cloud_init)
    build_seed_iso(files["meta-data"], files["user-data"], files.get("network-config"))
    if request.cloud_init.user_data and files["user-data"].startswith(b"#cloud-config\n") and (
            request.cloud_init.user_data.startswith(b"#cloud-config\n")):
        # Merging keeps every key the user wrote.
        merged = parse_cloud_config(files["user-data"])
        assert set(parse_cloud_config(request.cloud_init.user_data)) <= set(merged)


# Found by the socket fuzz: libvirt refuses <shares> outside 2..262144, which
# gave INTERNAL after the overlay and seed were written.
@pytest.mark.parametrize("shares", [1, 262145, 2**62])
def test_cpu_shares_outside_libvirts_range_are_invalid_argument(shares: int) -> None:
    refused = domain_errors_only(build_vm_request, cri_resources=CRIResources(cpu_shares=shares),
                                 pod_annotations={}, container_annotations={})
    assert isinstance(refused, Refused)
    assert refused.error.field == "config.linux.resources.cpu_shares"  # type: ignore[attr-defined]


@pytest.mark.parametrize("shares", [0, 2, 1024, 262144])
def test_cpu_shares_in_range_are_kept(shares: int) -> None:
    request = build_vm_request(cri_resources=CRIResources(cpu_shares=shares), pod_annotations={},
                               container_annotations={})
    assert request.cpu_shares == (shares or None)
