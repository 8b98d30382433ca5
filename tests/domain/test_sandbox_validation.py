"""Table tests for RunPodSandbox validation and `podvisor.io/` annotations."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import pytest

from agent.domain import annotations as ann
from agent.domain.errors import InvalidArgument
from agent.domain.sandbox import DNSConfig, Metadata, PortMapping, SandboxSpec
from agent.domain.validation import (
    MAX_ANNOTATIONS_TOTAL,
    MAX_LABEL_VALUE,
    MAX_LABELS_TOTAL,
    validate_id,
    validate_sandbox_spec,
)

SSH_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@host"
)


def make_spec(**changes: Any) -> SandboxSpec:
    """A valid spec; ``name``/``namespace``/``uid``/``attempt`` change the metadata."""
    md = {"name": "vm-1", "namespace": "default", "uid": "0c9e1d2a-uid", "attempt": 0}
    for key in list(md):
        if key in changes:
            md[key] = changes.pop(key)
    base = SandboxSpec(
        metadata=Metadata(**md),  # type: ignore[arg-type]
        hostname="vm-1",
        log_directory="/var/log/pods/default_vm-1_0c9e1d2a-uid",
        dns=DNSConfig(servers=("10.96.0.10",), searches=("default.svc.cluster.local",),
                      options=("ndots:5",)),
        port_mappings=(PortMapping("tcp", 80, 8080, "127.0.0.1"),),
        labels={"app": "web"},
        annotations={"example.com/note": "hello"},
    )
    return dataclasses.replace(base, **changes)


def assert_invalid(spec: SandboxSpec, field: str, problem: str = "") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as exc_info:
        validate_sandbox_spec(spec)
    err = exc_info.value
    assert err.field == field, err.message
    assert err.message.startswith(f"{field}: ")
    assert problem in err.message
    return err


def test_a_full_valid_spec_passes() -> None:
    validate_sandbox_spec(make_spec())


def test_minimal_spec_passes() -> None:
    validate_sandbox_spec(SandboxSpec(metadata=Metadata("n", "ns", "u")))


# Metadata, hostname, paths, runtime handler ------------------------------------

BAD_SPECS: list[tuple[str, dict[str, Any], str, str]] = [
    ("name missing", {"name": ""}, "config.metadata.name", "is required"),
    ("namespace missing", {"namespace": ""}, "config.metadata.namespace", "is required"),
    ("uid missing", {"uid": ""}, "config.metadata.uid", "is required"),
    ("name too long", {"name": "n" * 254}, "config.metadata.name", "longer than 253"),
    ("namespace too long", {"namespace": "n" * 254}, "config.metadata.namespace", "longer"),
    ("uid too long", {"uid": "u" * 129}, "config.metadata.uid", "longer than 128"),
    ("name with slash", {"name": "a/b"}, "config.metadata.name", "'/'"),
    ("namespace with slash", {"namespace": "a/b"}, "config.metadata.namespace", "'/'"),
    ("name with NUL", {"name": "a\x00b"}, "config.metadata.name", "NUL"),
    ("namespace with NUL", {"namespace": "a\x00"}, "config.metadata.namespace", "NUL"),
    ("uid with NUL", {"uid": "u\x00"}, "config.metadata.uid", "NUL"),
    ("name with newline", {"name": "a\nb"}, "config.metadata.name", "control"),
    ("uid with escape", {"uid": "u\x1b[0m"}, "config.metadata.uid", "control"),
    ("negative attempt", {"attempt": -1}, "config.metadata.attempt", "negative"),
    ("hostname underscore", {"hostname": "bad_host"}, "config.hostname", "not a valid hostname"),
    ("hostname leading dash", {"hostname": "-vm"}, "config.hostname", "not a valid hostname"),
    ("hostname trailing dash", {"hostname": "vm-"}, "config.hostname", "not a valid hostname"),
    ("hostname empty label", {"hostname": "a..b"}, "config.hostname", "not a valid hostname"),
    ("hostname label 64", {"hostname": "a" * 64}, "config.hostname", "not a valid hostname"),
    ("hostname too long", {"hostname": ".".join(["a" * 63] * 4)}, "config.hostname", "hostname"),
    ("hostname with space", {"hostname": "vm 1"}, "config.hostname", "not a valid hostname"),
    # `$` also matches before a final newline: the whole value must match.
    ("hostname trailing newline", {"hostname": "vm\n"}, "config.hostname", "not a valid hostname"),
    ("log dir relative", {"log_directory": "var/log/pods"}, "config.log_directory", "absolute"),
    ("log dir dotdot", {"log_directory": "/var/log/../../etc"}, "config.log_directory",
     "normalised"),
    ("log dir double slash", {"log_directory": "/var//log"}, "config.log_directory",
     "normalised"),
    ("log dir dot", {"log_directory": "/var/./log"}, "config.log_directory", "normalised"),
    # POSIX normpath keeps a leading "//", so this one needs its own check.
    ("log dir leading double slash", {"log_directory": "//var/log/pods"},
     "config.log_directory", "normalised"),
    ("log dir NUL", {"log_directory": "/var/log\x00"}, "config.log_directory", "not a valid path"),
    ("log dir control character", {"log_directory": "/var/log/pods/a\x01b"}, "config.log_directory",
     "control characters"),
    ("log dir newline", {"log_directory": "/var/log/pods/a\nb"}, "config.log_directory", "control characters"),
    ("log dir DEL", {"log_directory": "/var/log/pods/a\x7fb"}, "config.log_directory", "control characters"),
    ("log dir too long", {"log_directory": "/" + "a" * 4096}, "config.log_directory",
     "not a valid path"),
    ("cgroup parent relative", {"cgroup_parent": "kubepods"}, "config.linux.cgroup_parent",
     "absolute"),
    ("cgroup slice trailing newline", {"cgroup_parent": "kubepods.slice\n"}, "config.linux.cgroup_parent",
     "absolute"),
    ("runtime handler NUL", {"runtime_handler": "pod\x00visor"}, "runtime_handler", "NUL"),
    ("runtime handler too long", {"runtime_handler": "h" * 254}, "runtime_handler", "longer"),
]


@pytest.mark.parametrize(("changes", "field", "problem"),
                         [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_names_the_field(changes: dict[str, Any], field: str, problem: str) -> None:
    assert_invalid(make_spec(**changes), field, problem)


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "n" * 253},
        {"uid": "u" * 128},
        {"attempt": 7},
        {"hostname": ""},
        {"hostname": "a" * 63},
        {"hostname": "vm-1.pods.example.com"},
        {"hostname": "9lives"},
        {"log_directory": ""},
        {"log_directory": "/var/log/pods/"},
        {"log_directory": "/"},
        {"cgroup_parent": "/kubepods/burstable"},
        {"runtime_handler": "podvisor"},
    ],
    ids=repr,
)
def test_good_spec_values(changes: dict[str, Any]) -> None:
    validate_sandbox_spec(make_spec(**changes))


def test_uid_may_contain_slash() -> None:
    # Only name and namespace become path-like reservation keys.
    validate_sandbox_spec(make_spec(uid="a/b"))


# Labels and annotations ----------------------------------------------------------


def test_label_value_at_the_limit_passes() -> None:
    validate_sandbox_spec(make_spec(labels={"k": "v" * MAX_LABEL_VALUE}))


def test_label_value_too_long_names_the_key() -> None:
    assert_invalid(make_spec(labels={"k": "v" * (MAX_LABEL_VALUE + 1)}), "config.labels['k']",
                   f"longer than {MAX_LABEL_VALUE}")


def test_labels_total_too_large() -> None:
    labels = {f"label-{i:03d}": "v" * 1000 for i in range(MAX_LABELS_TOTAL // 1000 + 1)}
    assert_invalid(make_spec(labels=labels), "config.labels",
                   f"exceeds {MAX_LABELS_TOTAL} bytes")


def test_too_many_labels() -> None:
    assert_invalid(make_spec(labels={f"k{i}": "" for i in range(1025)}), "config.labels",
                   "more than 1024 entries")


def test_empty_label_key() -> None:
    assert_invalid(make_spec(labels={"": "v"}), "config.labels", "must not be empty")


def test_label_key_too_long() -> None:
    err = assert_invalid(make_spec(labels={"k" * 318: "v"}), "config.labels['" + "k" * 40 + "'...]",
                         "key longer than 317")
    assert "k" * 41 not in err.message


@pytest.mark.parametrize(
    ("labels", "field"),
    [
        ({"app": "a\x00b"}, "config.labels['app']"),
        ({"a\x00pp": "v"}, "config.labels['a\\x00pp']"),
    ],
)
def test_label_with_nul(labels: dict[str, str], field: str) -> None:
    assert_invalid(make_spec(labels=labels), field, "NUL")


def test_annotation_value_too_long_names_the_key() -> None:
    spec = make_spec(annotations={"example.com/big": "x" * (MAX_ANNOTATIONS_TOTAL + 1)})
    assert_invalid(spec, "config.annotations['example.com/big']", "value longer than")


def test_annotations_total_too_large() -> None:
    half = MAX_ANNOTATIONS_TOTAL // 2
    spec = make_spec(annotations={"example.com/a": "x" * half, "example.com/b": "y" * half})
    assert_invalid(spec, "config.annotations", f"exceeds {MAX_ANNOTATIONS_TOTAL} bytes")


def test_annotation_with_nul() -> None:
    assert_invalid(make_spec(annotations={"example.com/a": "\x00"}),
                   "config.annotations['example.com/a']", "NUL")


def test_label_size_counts_bytes() -> None:
    # 600 two-byte characters are 1200 bytes, over the 1024-byte value limit.
    assert_invalid(make_spec(labels={"k": "é" * 600}), "config.labels['k']", "longer")


# DNS ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dns", "field", "problem"),
    [
        (DNSConfig(servers=("10.0.0.10", "dns.example.com")), "config.dns_config.servers",
         "'dns.example.com' is not an IP address"),
        (DNSConfig(servers=("10.0.0.256",)), "config.dns_config.servers", "not an IP address"),
        (DNSConfig(servers=("",)), "config.dns_config.servers", "is required"),
        (DNSConfig(servers=tuple(f"10.0.0.{i}" for i in range(33))), "config.dns_config.servers",
         "more than 32"),
        (DNSConfig(searches=("ok.local", "")), "config.dns_config.searches", "is required"),
        (DNSConfig(searches=tuple(f"s{i}.local" for i in range(33))),
         "config.dns_config.searches", "more than 32"),
        (DNSConfig(options=("ndots:5\x00",)), "config.dns_config.options", "NUL"),
        (DNSConfig(options=("n" * 254,)), "config.dns_config.options", "longer"),
        (DNSConfig(searches=("bad domain",)), "config.dns_config.searches", "'bad domain' is not a domain name"),
        (DNSConfig(searches=("-x.example",)), "config.dns_config.searches", "not a domain name"),
        (DNSConfig(searches=("a..b",)), "config.dns_config.searches", "not a domain name"),
        (DNSConfig(searches=("x\nnameserver 1.2.3.4",)), "config.dns_config.searches", "control"),
        # kubelet's limits: 32 searches, 2048 characters on the search line.
        (DNSConfig(searches=tuple(f"{c * 63}.{c * 63}.{c * 63}" for c in "abcdefghijk")),
         "config.dns_config.searches", "2111 characters in all; at most 2048"),
        (DNSConfig(options=("ndots 5",)), "config.dns_config.options", "not a resolv.conf option"),
        (DNSConfig(options=("ndots:",)), "config.dns_config.options", "not a resolv.conf option"),
        (DNSConfig(options=("ndots:five",)), "config.dns_config.options", "ndots takes a number"),
        (DNSConfig(options=("timeout:-1",)), "config.dns_config.options", "timeout takes a number"),
        (DNSConfig(options=("rotate\nnameserver 1.2.3.4",)), "config.dns_config.options", "control"),
        (DNSConfig(options=tuple(f"opt{i}" for i in range(33))), "config.dns_config.options", "more than 32"),
    ],
)
def test_bad_dns(dns: DNSConfig, field: str, problem: str) -> None:
    assert_invalid(make_spec(dns=dns), field, problem)


def test_good_dns() -> None:
    validate_sandbox_spec(make_spec(dns=DNSConfig(
        servers=("10.96.0.10", "fd00::a", "8.8.8.8"),
        searches=("ns.svc.cluster.local", "svc.cluster.local", "example.com.", "Upper.Example"),
        options=("ndots:5", "timeout:1", "attempts:2", "rotate", "edns0", "single-request-reopen",
                 "use-vc", "trust-ad"),
    )))


def test_dns_at_kubelets_limits_is_accepted() -> None:
    searches = tuple(f"{c * 63}.{c * 63}.{c * 63}" for c in "abcdefghij")  # 10 × 191 + 9 spaces
    validate_sandbox_spec(make_spec(dns=DNSConfig(searches=searches)))
    validate_sandbox_spec(make_spec(dns=DNSConfig(searches=tuple(f"s{i}.local" for i in range(32)))))


# Sysctls ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sysctls", "field", "problem"),
    [
        ({"Net.IPv4.ip_forward": "1"}, "config.linux.sysctls['Net.IPv4.ip_forward']", "not a sysctl name"),
        ({"net..ipv4": "1"}, "config.linux.sysctls['net..ipv4']", "not a sysctl name"),
        ({"net.ipv4.": "1"}, "config.linux.sysctls['net.ipv4.']", "not a sysctl name"),
        ({"../../etc/passwd": "1"}, "config.linux.sysctls['../../etc/passwd']", "not a sysctl name"),
        ({"kernel pid_max": "1"}, "config.linux.sysctls['kernel pid_max']", "not a sysctl name"),
        ({"a" * 254: "1"}, f"config.linux.sysctls[{'a' * 64!r}]", "not a sysctl name"),
        ({"kernel.pid_max": ""}, "config.linux.sysctls['kernel.pid_max']", "must not be empty"),
        ({"kernel.pid_max": "1\nkernel.x = 2"}, "config.linux.sysctls['kernel.pid_max']", "one line"),
        ({"kernel.pid_max": "1\r"}, "config.linux.sysctls['kernel.pid_max']", "U+000D"),
        ({"kernel.pid_max": "1" * 4097}, "config.linux.sysctls['kernel.pid_max']", "longer than 4096"),
        ({f"k.s{i}": "1" for i in range(257)}, "config.linux.sysctls", "more than 256"),
    ],
)
def test_bad_sysctls(sysctls: dict[str, str], field: str, problem: str) -> None:
    assert_invalid(make_spec(sysctls=sysctls), field, problem)


def test_good_sysctls() -> None:
    validate_sandbox_spec(make_spec(sysctls={
        "net.ipv4.ip_forward": "1", "net.ipv4.ip_local_port_range": "1024 65535",
        "net/ipv4/conf/eth0.100/rp_filter": "2", "net.ipv4.conf.eth0/100.rp_filter": "2",
        "kernel.shm_rmid_forced": "1", "net.core.somaxconn": "4096",
    }))


# Port mappings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mappings", "field"),
    [
        ((PortMapping("tcp", 0, 8080),), "config.port_mappings[0].container_port"),
        ((PortMapping("tcp", 65536, 8080),), "config.port_mappings[0].container_port"),
        ((PortMapping("tcp", -1, 8080),), "config.port_mappings[0].container_port"),
        ((PortMapping("tcp", 80, -1),), "config.port_mappings[0].host_port"),
        ((PortMapping("udp", 53, 65536),), "config.port_mappings[0].host_port"),
        ((PortMapping("tcp", 80, 8080), PortMapping("tcp", 443, 70000)),
         "config.port_mappings[1].host_port"),
        ((PortMapping("tcp", 80, 8080, "localhost"),), "config.port_mappings[0].host_ip"),
        ((PortMapping("tcp", 80, 8080), PortMapping("sctp", 9, 9, "1.2.3")),
         "config.port_mappings[1].host_ip"),
        (tuple(PortMapping("tcp", 1 + i, 0) for i in range(257)), "config.port_mappings"),
    ],
)
def test_bad_port_mappings(mappings: tuple[PortMapping, ...], field: str) -> None:
    assert_invalid(make_spec(port_mappings=mappings), field)


def test_good_port_mappings() -> None:
    validate_sandbox_spec(make_spec(port_mappings=(
        PortMapping("tcp", 1, 0),
        PortMapping("udp", 65535, 65535, "0.0.0.0"),
        PortMapping("sctp", 9, 9, "::1"),
    )))


# podvisor.io/ annotations ----------------------------------------------------------


def _with_annotation(key: str, value: str) -> SandboxSpec:
    return make_spec(annotations={"example.com/other": "x", key: value})


def test_unknown_podvisor_annotation_is_named() -> None:
    err = assert_invalid(_with_annotation("podvisor.io/cpus", "2"),
                         "config.annotations['podvisor.io/cpus']", "unknown Podvisor annotation")
    for known in sorted(ann.KNOWN_KEYS):
        assert known in err.message


def test_other_prefixes_are_not_checked() -> None:
    validate_sandbox_spec(make_spec(annotations={
        "example.com/vcpus": "lots",
        "podvisor.iox/whatever": "x",
        "kubernetes.io/config.seen": "2024-01-01T00:00:00Z",
    }))


GOOD_ANNOTATIONS: list[tuple[str, str]] = [
    (ann.VCPUS, "1"),
    (ann.VCPUS, "4"),
    (ann.VCPUS, "512"),
    (ann.VCPUS, " 2 "),
    (ann.MEMORY, "16Mi"),
    (ann.MEMORY, "512Mi"),
    (ann.MEMORY, "2Gi"),
    (ann.MEMORY, "1G"),
    (ann.MEMORY, "16777216"),
    (ann.MEMORY, "65536k"),
    (ann.FIRMWARE, "bios"),
    (ann.FIRMWARE, "uefi"),
    (ann.USER_DATA, "#cloud-config\nruncmd:\n  - echo hi\n"),
    (ann.USER_DATA, ""),
    (ann.USER_DATA_BASE64, base64.b64encode(b"#cloud-config\npackages: [htop]\n").decode()),
    (ann.VM, '{"domain": {"resources": {"requests": {"memory": "128Mi"}}}}'),
    (ann.VM, "domain:\n  cpu:\n    cores: 2\nvolumes:\n  - name: disk0\n"),
    (ann.NETWORK_CONFIG, "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"),
    (ann.NETWORK_CONFIG, '{"version": 1, "config": []}'),
    (ann.SSH_AUTHORIZED_KEYS, SSH_KEY),
    (ann.SSH_AUTHORIZED_KEYS,
     SSH_KEY + "\n\necdsa-sha2-nistp256 AAAAE2VjZHNh key2\nsk-ssh-ed25519@openssh.com AAAA k3\n"),
]


@pytest.mark.parametrize(("key", "value"), GOOD_ANNOTATIONS, ids=[
    f"{k.removeprefix('podvisor.io/')}={v[:20]!r}" for k, v in GOOD_ANNOTATIONS])
def test_good_podvisor_annotations(key: str, value: str) -> None:
    validate_sandbox_spec(_with_annotation(key, value))


BAD_ANNOTATIONS: list[tuple[str, str, str]] = [
    (ann.VCPUS, "0", "between 1 and 512"),
    (ann.VCPUS, "513", "between 1 and 512"),
    (ann.VCPUS, "two", "positive integer"),
    (ann.VCPUS, "-1", "positive integer"),
    (ann.VCPUS, "1.5", "positive integer"),
    (ann.VCPUS, "", "positive integer"),
    (ann.MEMORY, "15Mi", "at least 16Mi"),
    (ann.MEMORY, "1024", "at least 16Mi"),
    (ann.MEMORY, "1.5Gi", "memory quantity"),
    (ann.MEMORY, "64MB", "memory quantity"),
    (ann.MEMORY, "64mi", "memory quantity"),
    (ann.MEMORY, "-64Mi", "memory quantity"),
    (ann.MEMORY, "lots", "memory quantity"),
    (ann.MEMORY, "", "memory quantity"),
    (ann.FIRMWARE, "BIOS", "bios or uefi"),
    (ann.FIRMWARE, "efi", "bios or uefi"),
    (ann.FIRMWARE, "", "bios or uefi"),
    (ann.USER_DATA_BASE64, "not base64!", "not valid base64"),
    (ann.USER_DATA_BASE64, "YWJ", "not valid base64"),
    (ann.VM, "[1, 2]", "mapping"),
    (ann.VM, "just words", "mapping"),
    (ann.VM, "", "mapping"),
    (ann.VM, "{unclosed: [", "neither JSON nor YAML"),
    (ann.NETWORK_CONFIG, "- eth0\n- eth1\n", "mapping"),
    (ann.NETWORK_CONFIG, "key: [unbalanced\n", "neither JSON nor YAML"),
    (ann.SSH_AUTHORIZED_KEYS, "not a key", "OpenSSH public key"),
    (ann.SSH_AUTHORIZED_KEYS, SSH_KEY + "\nrm -rf /", "OpenSSH public key"),
]


@pytest.mark.parametrize(("key", "value", "problem"), BAD_ANNOTATIONS, ids=[
    f"{k.removeprefix('podvisor.io/')}={v[:20]!r}" for k, v, _ in BAD_ANNOTATIONS])
def test_bad_podvisor_annotations_name_the_key(key: str, value: str, problem: str) -> None:
    assert_invalid(_with_annotation(key, value), f"config.annotations[{key!r}]", problem)


def test_annotation_validator_uses_the_given_field_name() -> None:
    with pytest.raises(InvalidArgument) as exc_info:
        ann.validate({ann.FIRMWARE: "coreboot"}, "config.annotations")
    assert exc_info.value.field == "config.annotations['podvisor.io/firmware']"
    with pytest.raises(InvalidArgument) as exc_info:
        ann.validate({ann.VCPUS: "x"}, "container.annotations")
    assert exc_info.value.field == "container.annotations['podvisor.io/vcpus']"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (ann.USER_DATA, "x" * (ann.MAX_USER_DATA_BYTES + 1)),
        (ann.USER_DATA_BASE64, base64.b64encode(b"x" * (ann.MAX_USER_DATA_BYTES + 1)).decode()),
        (ann.VM, '{"a": "' + "x" * ann.MAX_USER_DATA_BYTES + '"}'),
        (ann.SSH_AUTHORIZED_KEYS, (SSH_KEY + "\n") * (ann.MAX_USER_DATA_BYTES // 80)),
    ],
    ids=["user-data", "user-data-base64", "vm", "ssh-authorized-keys"],
)
def test_oversize_cloud_init_payloads(key: str, value: str) -> None:
    # Larger than the whole-annotations budget, so call the annotation check directly.
    with pytest.raises(InvalidArgument) as exc_info:
        ann.validate({key: value}, "config.annotations")
    assert exc_info.value.field == f"config.annotations[{key!r}]"
    assert str(ann.MAX_USER_DATA_BYTES) in exc_info.value.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("16Mi", 16 * 2**20),
        ("1Gi", 2**30),
        ("2G", 2 * 10**9),
        ("1Ti", 2**40),
        ("20000k", 20_000_000),
        ("33554432", 2**25),
    ],
)
def test_parse_memory_values(value: str, expected: int) -> None:
    assert ann.parse_memory(value) == expected


# Ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "a/b", "a\nb", "x" * 129, "id\x00"])
def test_bad_ids(value: str) -> None:
    with pytest.raises(InvalidArgument) as exc_info:
        validate_id(value, "pod_sandbox_id")
    assert exc_info.value.field == "pod_sandbox_id"


@pytest.mark.parametrize("value", ["a", "0123abc", "f" * 64, "x" * 128])
def test_good_ids(value: str) -> None:
    validate_id(value, "pod_sandbox_id")
