"""The pod's resolver and sysctls as the guest gets them (agent.domain.guest_settings)."""

from __future__ import annotations

import pytest

from agent.domain.guest_settings import has_dns, resolv_conf_lines, sysctl_proc_path
from agent.domain.sandbox import DNSConfig
from agent.domain.vm import parse_workload_exit


def test_resolv_conf_lines() -> None:
    dns = DNSConfig(("10.96.0.10", "10.96.0.11"), ("ns.svc.cluster.local", "cluster.local"), ("ndots:5", "edns0"))
    assert resolv_conf_lines(dns) == ["nameserver 10.96.0.10", "nameserver 10.96.0.11",
                                      "search ns.svc.cluster.local cluster.local", "options ndots:5 edns0"]
    assert resolv_conf_lines(DNSConfig()) == []


@pytest.mark.parametrize(("dns", "expected"), [
    (DNSConfig(), False), (DNSConfig(servers=("1.1.1.1",)), True), (DNSConfig(searches=("a.b",)), True),
    (DNSConfig(options=("ndots:1",)), True),
])
def test_has_dns(dns: DNSConfig, expected: bool) -> None:
    assert has_dns(dns) is expected


@pytest.mark.parametrize(("name", "path"), [
    ("kernel.pid_max", "/proc/sys/kernel/pid_max"),
    ("net.ipv4.conf.eth0/100.rp_filter", "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"),
    ("net/ipv4/conf/eth0.100/rp_filter", "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"),
    ("fs.mqueue.msg_max", "/proc/sys/fs/mqueue/msg_max"),
    ("single", "/proc/sys/single"),
])
def test_sysctl_proc_path(name: str, path: str) -> None:
    assert sysctl_proc_path(name) == path


@pytest.mark.parametrize(("data", "code"), [
    (b"", None),
    (b"0\n", 0),
    (b"3\n", 3),
    (b"255\n", 255),
    (b"256\n", None),
    (b"-1\n", None),
    (b"garbage\n17\n", 17),
    (b"17\ngarbage\n", 17),  # the last number counts, noise after it does not
    (b"1\n2\n", 2),
    (b"\xff\xfe\n5", 5),
    (b"0007\n", None),
])
def test_parse_workload_exit(data: bytes, code: int | None) -> None:
    assert parse_workload_exit(data) == code
