"""Bridge binding, the plan: how one sandbox's pod interface goes to its VM (pure).

After CNI ADD configured ``eth0`` in the pod's network namespace, the VM (not
the namespace) must own the pod IP and the interface's MAC. The wiring, as
KubeVirt's bridge binding does it::

    host netns                                  pod netns
    ----------                                  ---------
    CNI bridge ── veth ──────────────────────── eth0 (no IP, new random MAC)
                                                  │
                                                pvbr-eth0 (bridge, 169.254.75.10/32,
                                                  │        dnsmasq: one static lease)
    pvb<id> (bridge, no IP, ARP off) ── pvh<id> ═ pvp<id>
      │
    VM tap (libvirt <interface type='bridge'>, the pod's original MAC)

The VM's frames cross the two bridges and leave through ``eth0`` into the
CNI network exactly as the pod's own traffic would, so the CNI bridge, ARP
and portmap's DNAT all see the pod IP and the pod MAC. A DHCP server in the
pod namespace (Debian's dnsmasq, no DNS service) tells the VM its address,
gateway, routes, MTU and DNS: :func:`plan` decides what, from the CNI result
and the sandbox's DNS config.

Only IPv4 is served: an IPv6 pod address is removed from ``eth0`` like the
IPv4 one but the VM is not told about it (no router advertisement/DHCPv6).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.domain.network.cni_result import CNIResult

# KubeVirt's choice: a link-local address no pod network uses, as the DHCP
# server's identity on the in-namespace bridge.
DHCP_SERVER_IP = "169.254.75.10"
# What new veths and bridges get; the hand-over changes it where eth0 has another.
DEFAULT_MTU = 1500
_HEX = re.compile(r"^[0-9a-fA-F]{12}")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_DOMAIN = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}"
                     r"[A-Za-z0-9_])?)*\.?$")


@dataclass(frozen=True)
class LinkNames:
    """Interface names of one sandbox's wiring (all ≤ 15 characters)."""

    host_bridge: str
    host_veth: str
    pod_veth: str
    inner_bridge: str

    @classmethod
    def for_sandbox(cls, sandbox_id: str, ifname: str = "eth0") -> LinkNames:
        """The names, derived from the sandbox id alone (teardown needs nothing else)."""
        # The id's own prefix where it is hex (agent ids are), so `ip link`
        # names the sandbox an operator sees in crictl; a digest otherwise.
        m = _HEX.match(sandbox_id)
        tag = m.group(0).lower() if m else hashlib.sha256(sandbox_id.encode()).hexdigest()[:12]
        return cls(host_bridge=f"pvb{tag}", host_veth=f"pvh{tag}", pod_veth=f"pvp{tag}",
                   inner_bridge=f"pvbr-{ifname}"[:15])


@dataclass(frozen=True)
class DHCPRoute:
    """A route the VM is given: ``dst`` in CIDR notation via ``gw``."""

    dst: str
    gw: str


@dataclass(frozen=True)
class PodWiring:
    """What the VM needs to know: the bridge its NIC joins, its MAC, and the
    addressing its DHCP server hands out (also what cloud-init's default
    network-config should say)."""

    host_bridge: str
    vm_mac: str
    ip: str
    prefix: int
    gateway: str
    routes: tuple[DHCPRoute, ...]
    dns_servers: tuple[str, ...]
    dns_searches: tuple[str, ...]
    mtu: int = 1500
    hostname: str = ""

    def to_json(self) -> dict[str, Any]:
        """The wiring as a JSON document."""
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PodWiring:
        """Read back :meth:`to_json`'s document (KeyError, TypeError or ValueError if malformed)."""
        return cls(host_bridge=str(doc["host_bridge"]), vm_mac=str(doc["vm_mac"]), ip=str(doc["ip"]),
                   prefix=int(doc["prefix"]), gateway=str(doc["gateway"]),
                   routes=tuple(DHCPRoute(str(r["dst"]), str(r["gw"])) for r in doc["routes"]),
                   dns_servers=tuple(str(s) for s in doc["dns_servers"]),
                   dns_searches=tuple(str(s) for s in doc["dns_searches"]),
                   mtu=int(doc.get("mtu", 1500)), hostname=str(doc.get("hostname", "")))


@dataclass(frozen=True)
class WiringState:
    """podnet.json: the wiring, and how CNI left the pod interface (to put it
    back before CNI DEL: the bridge plugin finds the addresses whose
    masquerade rules it must delete on the interface itself)."""

    wiring: PodWiring
    pod_mac: str
    pod_addresses: tuple[str, ...]
    # Whether the DHCP server was started (for the VM): one that died is
    # restarted at recovery only then.
    dhcp: bool = False

    def to_json(self) -> dict[str, Any]:
        """The state file's document."""
        return {"wiring": self.wiring.to_json(),
                "podInterface": {"mac": self.pod_mac, "addresses": list(self.pod_addresses)}, "dhcp": self.dhcp}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> WiringState:
        """Read back :meth:`to_json`'s document (KeyError, TypeError or ValueError if malformed)."""
        return cls(wiring=PodWiring.from_json(doc["wiring"]), pod_mac=str(doc["podInterface"]["mac"]),
                   pod_addresses=tuple(str(a) for a in doc["podInterface"]["addresses"]),
                   dhcp=doc.get("dhcp") is True)


@dataclass(frozen=True)
class PodNetworkStatus:
    """The pod network as the sandbox (and its VM) will use it."""

    netns_name: str
    netns_path: Path
    network_name: str
    # The configuration file used, "builtin", or "cache" when read back by status().
    config_source: str
    # The VM's address (PodSandboxStatus.network.ip) and any others CNI gave.
    ip: str
    additional_ips: tuple[str, ...]
    wiring: PodWiring
    result: CNIResult

    @classmethod
    def of(cls, *, netns_name: str, netns_path: Path, network_name: str, config_source: str, wiring: PodWiring,
           result: CNIResult, ifname: str) -> PodNetworkStatus:
        """The status of a wired sandbox: the VM's address first, the other
        addresses CNI gave ``ifname`` after it."""
        others = tuple(str(ipc.address.ip) for ipc in result.ips_for(ifname) if str(ipc.address.ip) != wiring.ip)
        return cls(netns_name=netns_name, netns_path=netns_path, network_name=network_name,
                   config_source=config_source, ip=wiring.ip, additional_ips=others, wiring=wiring, result=result)


def dhcp_hostname(hostname: str) -> str:
    """The host name option for the VM: the first label, if it is a valid one."""
    label = hostname.split(".", 1)[0]
    return label if _LABEL.match(label) else ""


def plan(result: CNIResult, *, ifname: str, host_bridge: str, vm_mac: str, mtu: int, hostname: str,
         dns_servers: Sequence[str], dns_searches: Sequence[str]) -> PodWiring:
    """What the VM gets, from the CNI result and the sandbox's DNS config (pure).

    The sandbox's DNS config wins over the CNI result's (kubelet resolves
    cluster DNS into it). Raises ValueError when there is nothing to serve.
    """
    v4 = [ipc for ipc in result.ips_for(ifname) if ipc.address.version == 4]
    if not v4:
        raise ValueError(f"the CNI result has no IPv4 address for {ifname}; bridge binding serves IPv4 by DHCP")
    ipc = v4[0]
    gateway = str(ipc.gateway) if ipc.gateway is not None else ""
    routes: list[DHCPRoute] = []
    for r in result.routes:
        if r.dst.version != 4:
            continue
        gw = str(r.gw) if r.gw is not None else gateway
        if not gw:
            # An on-link route has no DHCP encoding dnsmasq would keep: it
            # reads the gateway 0.0.0.0 as "dnsmasq's own address".
            continue
        routes.append(DHCPRoute(str(r.dst), gw))
    servers_src = list(dns_servers) or list(result.dns.nameservers)
    servers = []
    for s in servers_src:
        try:
            addr = ipaddress.ip_address(s)
        except ValueError:
            raise ValueError(f"DNS server {s!r} is not an IP address") from None
        if addr.version == 4:  # DHCPv4 can only carry IPv4 servers
            servers.append(str(addr))
    searches = list(dns_searches) or list(result.dns.search) or ([result.dns.domain] if result.dns.domain else [])
    for d in searches:
        if not _DOMAIN.match(d) or len(d) > 253:
            raise ValueError(f"DNS search domain {d!r} is not a domain name")
    return PodWiring(host_bridge=host_bridge, vm_mac=vm_mac.lower(), ip=str(ipc.address.ip),
                     prefix=ipc.address.network.prefixlen, gateway=gateway, routes=tuple(routes),
                     dns_servers=tuple(servers), dns_searches=tuple(d.rstrip(".") for d in searches),
                     mtu=mtu, hostname=dhcp_hostname(hostname))


def plan_hand_over(sandbox_id: str, result: CNIResult, *, ifname: str, eth0_mtu: int, eth0_mac: str,
                   previous: WiringState | None, hostname: str, dns_servers: Sequence[str],
                   dns_searches: Sequence[str]) -> WiringState:
    """The hand-over of ``ifname`` to the VM, planned once after CNI ADD from
    what ADD returned and what ``ifname`` is now (its MTU and MAC): the
    wiring and the state to record before anything changes. Raises
    ValueError with the message for the client.

    The VM takes the pod interface's MAC: the CNI result's, else the one the
    interface has; on a retry (``previous`` recorded) the interface already
    carries a random MAC, and the recorded one is the VM's.
    """
    if previous is not None:
        vm_mac = previous.wiring.vm_mac
    else:
        found = result.sandbox_interface(ifname)
        vm_mac = (found[1].mac if found and found[1].mac else eth0_mac).lower()
    if not vm_mac:
        raise ValueError(f"no MAC address known for {ifname} of sandbox {sandbox_id}")
    try:
        wiring = plan(result, ifname=ifname, host_bridge=LinkNames.for_sandbox(sandbox_id, ifname).host_bridge,
                      vm_mac=vm_mac, mtu=eth0_mtu, hostname=hostname, dns_servers=dns_servers,
                      dns_searches=dns_searches)
    except ValueError as exc:
        raise ValueError(f"sandbox {sandbox_id}: {exc}") from None
    return WiringState(wiring=wiring, pod_mac=vm_mac,
                       pod_addresses=tuple(str(ipc.address) for ipc in result.ips_for(ifname)),
                       dhcp=previous is not None and previous.dhcp)


def restore_target(state: WiringState | None, cached: CNIResult | None, ifname: str) -> tuple[str, tuple[str, ...]]:
    """The MAC and addresses ``ifname`` gets back before CNI DEL: as recorded
    in the state file, or, with that lost, as the cached ADD result says."""
    if state is not None:
        return state.pod_mac, state.pod_addresses
    if cached is None:
        return "", ()
    found = cached.sandbox_interface(ifname)
    return (found[1].mac if found else "",
            tuple(str(ipc.address) for ipc in cached.ips_for(ifname)))
