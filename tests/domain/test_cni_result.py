"""CNI ADD results and error objects: parsing (pure)."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from agent.domain.network.cni_result import (
    DNS,
    CNIErrorInfo,
    Interface,
    IPConfig,
    Route,
    parse_error,
    parse_result,
)

# What the bridge plugin (containernetworking-plugins 1.1.1) printed for a
# bridge + host-local ADD on this project's CI machine.
BRIDGE_RESULT_1_0: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cnit0", "mac": "02:0d:89:0d:34:38"},
        {"name": "vethff2d23da", "mac": "8e:ee:5f:a9:97:e7"},
        {"name": "eth0", "mac": "0E:2A:D7:75:FF:58", "sandbox": "/run/netns/pvpod1"},
    ],
    "ips": [{"interface": 2, "address": "10.77.3.2/24", "gateway": "10.77.3.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}

RESULT_0_4: dict[str, Any] = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "mac": "0e:2a:d7:75:ff:58", "sandbox": "/run/netns/x"}],
    "ips": [
        {"version": "4", "interface": 0, "address": "10.1.2.3/16", "gateway": "10.1.0.1"},
        {"version": "6", "interface": 0, "address": "fd00::3/64", "gateway": "fd00::1"},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "192.168.0.0/16"}, {"dst": "::/0"}],
    "dns": {"nameservers": ["10.96.0.10"], "domain": "cluster.local",
            "search": ["ns.svc.cluster.local", "cluster.local"], "options": ["ndots:5"]},
}


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_parse_bridge_result_1_0_0() -> None:
    r = parse_result(_json(BRIDGE_RESULT_1_0))
    assert r.cni_version == "1.0.0"
    assert r.interfaces == (
        Interface("cnit0", "02:0d:89:0d:34:38"),
        Interface("vethff2d23da", "8e:ee:5f:a9:97:e7"),
        Interface("eth0", "0e:2a:d7:75:ff:58", "/run/netns/pvpod1"),  # MAC normalised to lower case
    )
    assert r.ips == (IPConfig(ipaddress.ip_interface("10.77.3.2/24"), ipaddress.ip_address("10.77.3.1"), 2),)
    assert r.routes == (Route(ipaddress.ip_network("0.0.0.0/0")),)
    assert r.dns == DNS()


def test_parse_result_0_4_0_with_versions_and_dns() -> None:
    r = parse_result(json.dumps(RESULT_0_4))  # str input works too
    assert [str(ip.address) for ip in r.ips] == ["10.1.2.3/16", "fd00::3/64"]
    assert r.routes[0].gw == ipaddress.ip_address("10.1.0.1")
    assert r.routes[1] == Route(ipaddress.ip_network("192.168.0.0/16"), None)
    assert r.dns == DNS(("10.96.0.10",), "cluster.local", ("ns.svc.cluster.local", "cluster.local"), ("ndots:5",))


def test_parse_result_from_mapping() -> None:
    assert parse_result(BRIDGE_RESULT_1_0).ips[0].interface == 2


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_supported_versions(version: str) -> None:
    assert parse_result({"cniVersion": version}).cni_version == version


def test_minimal_result_is_empty() -> None:
    r = parse_result({"cniVersion": "1.0.0"})
    assert (r.interfaces, r.ips, r.routes, r.dns) == ((), (), (), DNS())


def test_unknown_fields_are_ignored() -> None:
    doc = {**BRIDGE_RESULT_1_0, "somethingNew": 1}
    doc["interfaces"] = [{**i, "mtu": 1500} for i in BRIDGE_RESULT_1_0["interfaces"]]
    assert len(parse_result(doc).interfaces) == 3


def test_route_dst_with_host_bits_names_its_network() -> None:
    r = parse_result({"cniVersion": "1.0.0", "routes": [{"dst": "10.0.0.5/8"}]})
    assert r.routes[0].dst == ipaddress.ip_network("10.0.0.0/8")


def test_sandbox_interface_and_ips_for() -> None:
    r = parse_result(BRIDGE_RESULT_1_0)
    assert r.sandbox_interface("eth0") == (2, Interface("eth0", "0e:2a:d7:75:ff:58", "/run/netns/pvpod1"))
    # The host-side bridge has the same kind of entry but no sandbox.
    assert r.sandbox_interface("cnit0") is None
    assert [str(i.address.ip) for i in r.ips_for("eth0")] == ["10.77.3.2"]
    assert r.ips_for("eth1") == ()


def test_ips_without_interface_index_belong_to_the_sandbox_interface() -> None:
    r = parse_result({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]})
    assert len(r.ips_for("eth0")) == 1


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({}, "cniVersion must be a non-empty string"),
        ({"cniVersion": 1}, "cniVersion must be a non-empty string"),
        ({"cniVersion": "0.2.0"}, "cniVersion '0.2.0' is not supported"),
        ({"cniVersion": "1.0.0", "interfaces": {}}, "interfaces must be a list"),
        ({"cniVersion": "1.0.0", "interfaces": ["eth0"]}, "interfaces[0] must be an object"),
        ({"cniVersion": "1.0.0", "interfaces": [{"mac": "02:00:00:00:00:01"}]},
         "interfaces[0].name must be a non-empty string"),
        ({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "mac": "02:00:00:00:01"}]},
         "interfaces[0].mac: '02:00:00:00:01' is not a hardware address"),
        ({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": 5}]},
         "interfaces[0].sandbox must be a string"),
        ({"cniVersion": "1.0.0", "ips": [{}]}, "ips[0].address must be a non-empty string"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2"}]}, "ips[0].address: '10.0.0.2' is not in CIDR"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/24"}]}, "is not an address in CIDR notation"),
        ({"cniVersion": "0.4.0", "ips": [{"version": "6", "address": "10.0.0.2/24"}]},
         "ips[0].version: '6' does not match address 10.0.0.2/24"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "gateway": "nope"}]},
         "ips[0].gateway: 'nope' is not an IP address"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "gateway": "fd00::1"}]},
         "ips[0].gateway: fd00::1 is not in the family of 10.0.0.2/24"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "interface": 0}]},
         "ips[0].interface: 0 does not index interfaces (there are 0)"),
        ({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.0.0.2/24",
                                                                              "interface": True}]},
         "ips[0].interface: True does not index interfaces"),
        ({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.0.0.2/24",
                                                                              "interface": -1}]},
         "ips[0].interface: -1 does not index interfaces"),
        ({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01\n"}]},
         "interfaces[0].mac: '02:00:00:00:00:01\\n' is not a hardware address"),
        ({"cniVersion": "1.0.0", "routes": [{"gw": "10.0.0.1"}]}, "routes[0].dst must be a non-empty string"),
        ({"cniVersion": "1.0.0", "routes": [{"dst": "default"}]}, "routes[0].dst: 'default' is not a network"),
        ({"cniVersion": "1.0.0", "routes": [{"dst": "0.0.0.0/0", "gw": "fd00::1"}]},
         "routes[0].gw: fd00::1 is not in the family of 0.0.0.0/0"),
        ({"cniVersion": "1.0.0", "routes": "0.0.0.0/0"}, "routes must be a list"),
        ({"cniVersion": "1.0.0", "dns": []}, "dns must be an object"),
        ({"cniVersion": "1.0.0", "dns": {"nameservers": "10.0.0.10"}}, "dns.nameservers must be a list of strings"),
        ({"cniVersion": "1.0.0", "dns": {"search": [1]}}, "dns.search must be a list of strings"),
        ({"cniVersion": "1.0.0", "dns": {"domain": 5}}, "dns.domain must be a string"),
    ],
)
def test_invalid_results(doc: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_result(doc)
    assert problem in str(info.value)


@pytest.mark.parametrize(("raw", "problem"), [(b"", "CNI result is not JSON"), (b"{", "CNI result is not JSON"),
                                              (b"[]", "CNI result is not a JSON object")])
def test_result_not_json(raw: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_result(raw)


def test_parse_error_object() -> None:
    raw = _json({"cniVersion": "1.0.0", "code": 11, "msg": "no IP addresses available", "details": "range full"})
    assert parse_error(raw) == CNIErrorInfo(11, "no IP addresses available", "range full")
    assert parse_error(_json({"code": 999, "msg": "failed"})) == CNIErrorInfo(999, "failed", "")


@pytest.mark.parametrize("raw", [b"", b"panic: runtime error", b"[]", _json({"msg": "x"}),
                                 _json({"code": "7", "msg": "x"}), _json({"code": True, "msg": "x"}),
                                 _json({"code": 7})])
def test_parse_error_without_error_object(raw: bytes) -> None:
    assert parse_error(raw) is None
