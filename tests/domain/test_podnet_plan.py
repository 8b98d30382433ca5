"""Bridge binding, the pure part: what the VM is told and dnsmasq's command line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.network.links import random_mac
from agent.domain.network.cni_result import parse_result
from agent.domain.network.dnsmasq import dnsmasq_args
from agent.domain.network.wiring import DHCPRoute, LinkNames, PodWiring, dhcp_hostname, plan

SANDBOX = "0123456789abcdef" * 4


def _result(**extra: Any) -> Any:
    doc = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "cni0", "mac": "02:aa:00:00:00:01"},
                       {"name": "eth0", "mac": "0e:2a:d7:75:ff:58", "sandbox": "/run/netns/x"}],
        "ips": [{"address": "10.77.3.2/24", "gateway": "10.77.3.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}],
        **extra,
    }
    return parse_result(doc)


def _plan(result: Any = None, **kw: Any) -> PodWiring:
    args: dict[str, Any] = {"ifname": "eth0", "host_bridge": "pvb0123456789ab", "vm_mac": "0E:2A:D7:75:FF:58",
                            "mtu": 1450, "hostname": "web-0", "dns_servers": (), "dns_searches": ()}
    args.update(kw)
    return plan(result or _result(), **args)


def test_link_names_from_a_hex_id() -> None:
    names = LinkNames.for_sandbox(SANDBOX)
    assert names == LinkNames("pvb0123456789ab", "pvh0123456789ab", "pvp0123456789ab", "pvbr-eth0")
    assert all(len(n) <= 15 for n in (names.host_bridge, names.host_veth, names.pod_veth, names.inner_bridge))


def test_link_names_from_other_ids_use_a_digest() -> None:
    a, b = LinkNames.for_sandbox("my-sandbox"), LinkNames.for_sandbox("my-sandbox2")
    assert re.fullmatch(r"pvb[0-9a-f]{12}", a.host_bridge) and a.host_bridge != b.host_bridge


def test_random_mac_is_unicast_and_locally_administered() -> None:
    for _ in range(50):
        mac = random_mac()
        first = int(mac[:2], 16)
        assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac)
        assert first & 0x01 == 0 and first & 0x02 == 2


@pytest.mark.parametrize(("given", "sent"), [("web-0", "web-0"), ("web-0.example.org", "web-0"),
                                             ("", ""), ("bad_name", ""), ("-x", "")])
def test_dhcp_hostname(given: str, sent: str) -> None:
    assert dhcp_hostname(given) == sent


def test_plan_from_a_bridge_result() -> None:
    w = _plan()
    assert w == PodWiring(host_bridge="pvb0123456789ab", vm_mac="0e:2a:d7:75:ff:58", ip="10.77.3.2", prefix=24,
                          gateway="10.77.3.1", routes=(DHCPRoute("0.0.0.0/0", "10.77.3.1"),), dns_servers=(),
                          dns_searches=(), mtu=1450, hostname="web-0")


def test_plan_prefers_the_sandbox_dns_config_over_cni() -> None:
    result = _result(dns={"nameservers": ["10.0.0.53"], "search": ["cni.example"]})
    assert _plan(result).dns_servers == ("10.0.0.53",)
    assert _plan(result).dns_searches == ("cni.example",)
    w = _plan(result, dns_servers=("10.96.0.10", "fd00::10"), dns_searches=("ns.svc.cluster.local.", "cluster.local"))
    # DHCPv4 carries IPv4 servers only; a trailing dot is dropped.
    assert w.dns_servers == ("10.96.0.10",)
    assert w.dns_searches == ("ns.svc.cluster.local", "cluster.local")
    assert _plan(_result(dns={"domain": "only.example"})).dns_searches == ("only.example",)


def test_plan_routes() -> None:
    result = _result(routes=[{"dst": "0.0.0.0/0", "gw": "10.77.3.254"}, {"dst": "192.168.0.0/16"},
                             {"dst": "::/0"}])
    assert _plan(result).routes == (DHCPRoute("0.0.0.0/0", "10.77.3.254"), DHCPRoute("192.168.0.0/16", "10.77.3.1"))
    # No gateway anywhere: nothing DHCP could say.
    no_gw = parse_result({"cniVersion": "1.0.0", "ips": [{"address": "10.5.0.2/24"}], "routes": [{"dst": "0.0.0.0/0"}]})
    assert _plan(no_gw).routes == () and _plan(no_gw).gateway == ""


def test_plan_picks_the_ipv4_address_of_the_interface() -> None:
    result = _result(ips=[{"address": "fd00::2/64", "gateway": "fd00::1", "interface": 1},
                          {"address": "10.77.3.2/24", "gateway": "10.77.3.1", "interface": 1},
                          {"address": "10.99.0.2/24", "interface": 0}])
    assert _plan(result).ip == "10.77.3.2"


@pytest.mark.parametrize(
    ("kw", "problem"),
    [
        ({"dns_servers": ("not-an-ip",)}, "DNS server 'not-an-ip' is not an IP address"),
        ({"dns_searches": ("a,b",)}, "DNS search domain 'a,b' is not a domain name"),
        ({"dns_searches": ("x y",)}, "is not a domain name"),
    ],
)
def test_plan_rejects(kw: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        _plan(**kw)


def test_plan_needs_ipv4() -> None:
    with pytest.raises(ValueError, match="no IPv4 address for eth0"):
        _plan(_result(ips=[{"address": "fd00::2/64", "interface": 1}]))


def test_dnsmasq_args_for_a_default_route() -> None:
    w = _plan(dns_servers=("10.96.0.10", "10.96.0.11"), dns_searches=("ns.svc.cluster.local", "cluster.local"))
    args = dnsmasq_args(w, interface="pvbr-eth0", workdir=Path("/var/lib/podvisor/sandboxes/x"))
    assert args == [
        "dnsmasq", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0",
        "--interface=pvbr-eth0", "--bind-interfaces",
        "--pid-file=/var/lib/podvisor/sandboxes/x/dnsmasq.pid",
        "--dhcp-leasefile=/var/lib/podvisor/sandboxes/x/dnsmasq.leases",
        "--log-facility=/var/lib/podvisor/sandboxes/x/dnsmasq.log",
        "--dhcp-authoritative",
        "--shared-network=pvbr-eth0,10.77.3.2",
        "--dhcp-range=10.77.3.2,static,255.255.255.0,infinite",
        "--dhcp-host=0e:2a:d7:75:ff:58,10.77.3.2,web-0,infinite",
        "--dhcp-option=option:mtu,1450",
        "--dhcp-option=option:router,10.77.3.1",
        "--dhcp-option=option:dns-server,10.96.0.10,10.96.0.11",
        "--dhcp-option=option:domain-name,ns.svc.cluster.local",
        "--dhcp-option=option:domain-search,ns.svc.cluster.local,cluster.local",
    ]


def test_dnsmasq_args_with_extra_routes_and_nothing_else() -> None:
    w = _plan(_result(routes=[{"dst": "0.0.0.0/0"}, {"dst": "172.16.0.0/12", "gw": "10.77.3.254"}]), hostname="")
    args = dnsmasq_args(w, interface="pvbr-eth0", workdir=Path("/w"))
    assert "--dhcp-host=0e:2a:d7:75:ff:58,10.77.3.2,infinite" in args
    # Classless routes repeat the default route: clients that take them ignore option 3.
    assert "--dhcp-option=option:classless-static-route,172.16.0.0/12,10.77.3.254,0.0.0.0/0,10.77.3.1" in args
    # Empty options keep dnsmasq from offering itself as DNS server.
    assert "--dhcp-option=option:dns-server" in args
    assert not any("domain" in a for a in args)


def test_dnsmasq_args_without_default_route_send_no_router() -> None:
    w = _plan(_result(routes=[]))
    assert "--dhcp-option=option:router" in dnsmasq_args(w, interface="b", workdir=Path("/w"))


def test_wiring_round_trips_through_json() -> None:
    w = _plan(_result(routes=[{"dst": "0.0.0.0/0"}, {"dst": "172.16.0.0/12"}]), dns_servers=("1.1.1.1",))
    assert PodWiring.from_json(w.to_json()) == w


def test_batch_error_keeps_the_error_not_the_line_number() -> None:
    from agent.adapters.network.links import _batch_error

    assert _batch_error(b'Error: argument "x" is wrong: "dev" not a valid ifname\nCommand failed -:3\n') == (
        'Error: argument "x" is wrong: "dev" not a valid ifname')
    assert _batch_error(b"Command failed -:1\n") == "Command failed -:1"
    assert _batch_error(b"") == "failed"


def test_batch_safe_only_for_quotable_text() -> None:
    from agent.adapters.network.links import _batch_safe

    assert _batch_safe("podvisor sandbox " + SANDBOX)
    assert _batch_safe("podvisor sandbox my sandbox; $1")
    assert not _batch_safe("podvisor sandbox #1") and not _batch_safe("podvisor sandbox a'b")
    assert not _batch_safe('podvisor sandbox a"b') and not _batch_safe("podvisor sandbox a\\b")
    assert not _batch_safe("podvisor sandbox a\nlink del dev eth0")
