"""The pod's DHCP server: dnsmasq's command line for one static lease (pure).

dnsmasq runs in the pod namespace, bound to the in-namespace bridge; its
server identity is the link-local /32 there, and ``--shared-network`` lets it
serve the pod subnet it has no address in. Its files live in the sandbox
directory (``workdir``), passed in.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from agent.domain.network.wiring import PodWiring

DNSMASQ = "dnsmasq"
PID_FILE = "dnsmasq.pid"
LEASE_FILE = "dnsmasq.leases"
LOG_FILE = "dnsmasq.log"
# The lease never expires: the VM keeps the pod IP for the sandbox's life and
# need not renew (a renewal is unicast to the link-local server identity,
# which the VM may route to its gateway instead of the pod namespace).
LEASE_TIME = "infinite"


def dnsmasq_args(wiring: PodWiring, *, interface: str, workdir: Path) -> list[str]:
    """dnsmasq's command line for one static lease on the in-namespace bridge (pure).

    No DNS service (``--port=0``), nothing read from the host (``--conf-file=/dev/null``,
    ``--no-resolv``, ``--no-hosts``), sockets bound to the one bridge.
    """
    netmask = str(ipaddress.IPv4Network(f"0.0.0.0/{wiring.prefix}").netmask)
    args = [
        DNSMASQ,
        "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0",
        f"--interface={interface}", "--bind-interfaces",
        f"--pid-file={workdir / PID_FILE}",
        f"--dhcp-leasefile={workdir / LEASE_FILE}",
        f"--log-facility={workdir / LOG_FILE}",
        "--dhcp-authoritative",
        f"--shared-network={interface},{wiring.ip}",
        f"--dhcp-range={wiring.ip},static,{netmask},{LEASE_TIME}",
        f"--dhcp-host={wiring.vm_mac},{wiring.ip}{',' + wiring.hostname if wiring.hostname else ''},{LEASE_TIME}",
        f"--dhcp-option=option:mtu,{wiring.mtu}",
    ]
    default = next((r for r in wiring.routes if r.dst == "0.0.0.0/0"), None)
    if default is not None:
        args.append(f"--dhcp-option=option:router,{default.gw}")
    else:
        # Without this dnsmasq would offer itself (the link-local address) as router.
        args.append("--dhcp-option=option:router")
    others = [r for r in wiring.routes if r.dst != "0.0.0.0/0"]
    if others:
        # A client that takes classless routes (option 121) ignores the router
        # option (RFC 3442), so the default route is repeated in it.
        routes = others + ([default] if default else [])
        args.append("--dhcp-option=option:classless-static-route," + ",".join(f"{r.dst},{r.gw}" for r in routes))
    if wiring.dns_servers:
        args.append("--dhcp-option=option:dns-server," + ",".join(wiring.dns_servers))
    else:
        args.append("--dhcp-option=option:dns-server")
    if wiring.dns_searches:
        args.append(f"--dhcp-option=option:domain-name,{wiring.dns_searches[0]}")
        args.append("--dhcp-option=option:domain-search," + ",".join(wiring.dns_searches))
    return args
