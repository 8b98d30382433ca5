"""Bridge binding: hand the pod's CNI interface over to the VM of one sandbox.

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

:func:`prepare` builds everything but ``eth0``'s part while CNI ADD runs;
:func:`setup` hands ``eth0`` over afterwards with a few ioctls; the DHCP
server starts when the VM is created (:func:`ensure_dhcp`).

The VM's frames cross the two bridges and leave through ``eth0`` into the
CNI network exactly as the pod's own traffic would, so the CNI bridge, ARP
and portmap's DNAT all see the pod IP and the pod MAC. A DHCP server in the
pod namespace (Debian's dnsmasq, no DNS service) tells the VM its address,
gateway, routes, MTU and DNS; its server identity is the link-local /32,
``--shared-network`` lets it serve the pod subnet it has no address in.

Host-side details learned the hard way (see the integration tests):

- ``pvb`` has ARP switched off: otherwise the host answers the VM's ARP for
  the gateway address through ``pvb`` (Linux answers for any local address
  on any interface), the VM's traffic to the gateway then bypasses the pod
  namespace and CNI bridge, and replies that portmap's NAT must rewrite come
  back on a path it never saw.
- Neither bridge learns MAC addresses (``ageing_time 0``: the kernel's
  "always flood"). A CNI bridge port in hairpin mode (the bridge plugin's
  ``hairpinMode``, common in Kubernetes) reflects the VM's broadcasts back
  into the pod; learning from those echoes would move the VM's MAC to the
  uplink port, and frames for the VM (the DHCP offer first) would go back
  the way they came. Each bridge has just two ports, so flooding sends a
  frame nowhere but where it had to go anyway.
- With br_netfilter loaded (every Kubernetes node), frames bridged through
  ``pvb`` traverse the host's conntrack, and then again as they arrive on
  the CNI bridge: the same connection tracked twice, with source ports
  rewritten to resolve the clash. A raw-table NOTRACK rule for ``pvb`` keeps
  the host's conntrack (and so NAT and portmap) to the CNI bridge, where it
  belongs. In the pod namespace the bridge is pure L2, so its br_netfilter
  calls are switched off.

Teardown puts ``eth0`` back as CNI ADD left it (its MAC and addresses)
before CNI DEL runs: DEL succeeds with ``eth0`` stripped and enslaved, but
the bridge plugin deletes the masquerade rules of the addresses it finds on
the interface, and would leave its ipMasq chain behind otherwise.

Only IPv4 is served: an IPv6 pod address is removed from ``eth0`` like the
IPv4 one but the VM is not told about it (no router advertisement/DHCPv6).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.adapters import netns
from agent.domain.cni_result import CNIResult
from agent.domain.errors import FailedPrecondition, Internal

log = structlog.get_logger(__name__)

IP = "ip"
DNSMASQ = "dnsmasq"
IPTABLES = "iptables"
TIMEOUT = 30.0
# KubeVirt's choice: a link-local address no pod network uses, as the DHCP
# server's identity on the in-namespace bridge.
DHCP_SERVER_IP = "169.254.75.10"
# The lease never expires: the VM keeps the pod IP for the sandbox's life and
# need not renew (a renewal is unicast to the link-local server identity,
# which the VM may route to its gateway instead of the pod namespace).
LEASE_TIME = "infinite"
STATE_FILE = "podnet.json"
PID_FILE = "dnsmasq.pid"
LEASE_FILE = "dnsmasq.leases"
LOG_FILE = "dnsmasq.log"
STOP_TIMEOUT = 5.0
# What new veths and bridges get; setup() changes it where eth0 has another.
DEFAULT_MTU = 1500
# Interface ioctls (linux/sockios.h, linux/if.h).
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFADDR = 0x8915
SIOCSIFADDR = 0x8916
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
SIOCGIFHWADDR = 0x8927
SIOCBRADDIF = 0x89A2
IFF_UP = 0x1
ARPHRD_ETHER = 1
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
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PodWiring:
        return cls(host_bridge=str(doc["host_bridge"]), vm_mac=str(doc["vm_mac"]), ip=str(doc["ip"]),
                   prefix=int(doc["prefix"]), gateway=str(doc["gateway"]),
                   routes=tuple(DHCPRoute(str(r["dst"]), str(r["gw"])) for r in doc["routes"]),
                   dns_servers=tuple(str(s) for s in doc["dns_servers"]),
                   dns_searches=tuple(str(s) for s in doc["dns_searches"]),
                   mtu=int(doc.get("mtu", 1500)), hostname=str(doc.get("hostname", "")))


# Pure planning ----------------------------------------------------------------------


def random_mac() -> str:
    """A random unicast, locally administered MAC (02-style first octet)."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


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


# Host tools ---------------------------------------------------------------------------


def _run(args: list[str], *, what: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(args, capture_output=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise Internal(f"{what}: {args[0]} took longer than {TIMEOUT:.0f}s") from None
    except FileNotFoundError:
        raise Internal(f"{what}: {args[0]} is not installed") from None
    if check and proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        raise Internal(f"{what}: {' '.join(args[:6])} failed: {message[-1] if message else proc.returncode}")
    return proc


def _ip(args: list[str], *, ns: str | None = None, what: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    prefix = [IP, "-n", ns] if ns else [IP]
    return _run([*prefix, *args], what=what, check=check)


def _link(name: str, *, ns: str | None = None) -> dict[str, Any] | None:
    """`ip -j link show` of one interface, None if it does not exist."""
    proc = _ip(["-j", "link", "show", "dev", name], ns=ns, what=f"look up {name}", check=False)
    if proc.returncode != 0:
        return None
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        return None
    return doc[0] if isinstance(doc, list) and doc and isinstance(doc[0], dict) else None


def _exists(name: str) -> bool:
    """Whether an interface of that name exists in the agent's (the calling
    thread's) namespace, without a subprocess."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _ifreq_flags(s: socket.socket, name: str) -> int:
    return int(struct.unpack_from("H", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("16s24x", name.encode())),
                                  16)[0])


def _set_ifreq_flags(s: socket.socket, name: str, flags: int) -> None:
    fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags))


def _hand_over(ifname: str, names: LinkNames, mtu: int) -> None:
    """In the pod's namespace: ``ifname`` gives up its IPv4 addresses and
    its MAC and joins the pod-side bridge; with another MTU than the
    default, the links towards the VM take it. Classic interface ioctls
    (what ifconfig and brctl use), so no process is started: ``ip`` would
    cost more than all of them together."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = _ifreq_flags(s, ifname)
        _set_ifreq_flags(s, ifname, flags & ~IFF_UP)  # down: its routes go too
        mac = bytes.fromhex(random_mac().replace(":", ""))
        fcntl.ioctl(s.fileno(), SIOCSIFHWADDR, struct.pack("16sH6s16x", ifname.encode(), ARPHRD_ETHER, mac))
        zero = struct.pack("16sH2s4s8x", ifname.encode(), socket.AF_INET, b"", socket.inet_aton("0.0.0.0"))
        for _ in range(64):
            # Setting 0.0.0.0 deletes the interface's (first) IPv4 address.
            try:
                fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("16s24x", ifname.encode()))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    break
                raise
            fcntl.ioctl(s.fileno(), SIOCSIFADDR, zero)
        else:
            raise OSError(errno.EBUSY, f"{ifname} keeps IPv4 addresses")
        if mtu != DEFAULT_MTU:
            for link in (names.pod_veth, names.inner_bridge):
                fcntl.ioctl(s.fileno(), SIOCSIFMTU, struct.pack("16si20x", link.encode(), mtu))
        fcntl.ioctl(s.fileno(), SIOCBRADDIF,
                    struct.pack("16si20x", names.inner_bridge.encode(), socket.if_nametoindex(ifname)))
        _set_ifreq_flags(s, ifname, flags | IFF_UP)


def _batch_error(stderr: bytes) -> str:
    """The useful part of a failed `ip -batch`'s stderr: its "Error: ..."
    line(s), not the trailing "Command failed -:N"."""
    lines = [ln for ln in stderr.decode(errors="replace").strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if not ln.startswith("Command failed")]
    return "; ".join(errors[-2:] or lines[-1:]) or "failed"


def _ip_batch(commands: Sequence[str], *, ns: str | None = None, what: str, force: bool = False) -> None:
    """Several `ip` commands in one process (`ip -batch -`), stopping at the
    first that fails, as separate calls would; with ``force`` all are run
    (and a failure still raises, after them)."""
    prefix = [IP, "-n", ns] if ns else [IP]
    args = [*prefix, *(["-force"] if force else []), "-batch", "-"]
    try:
        proc = subprocess.run(args, input="".join(f"{c}\n" for c in commands).encode(), capture_output=True,
                              timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise Internal(f"{what}: {IP} took longer than {TIMEOUT:.0f}s") from None
    except FileNotFoundError:
        raise Internal(f"{what}: {IP} is not installed") from None
    if proc.returncode != 0:
        raise Internal(f"{what}: {' '.join(args[:4])} failed: {_batch_error(proc.stderr)}")


def _batch_safe(text: str) -> bool:
    """Whether ``text`` survives as one double-quoted `ip -batch` argument
    (`ip` reads "#" as a comment even inside quotes)."""
    return all(c.isprintable() and c not in "\"\\'#" for c in text)


def _sysctl(settings: dict[str, str], *, where: str) -> None:
    """Best-effort writes under /proc/sys, in the calling thread's network
    namespace (net settings follow the writing thread, so from inside
    :func:`netns.run_in` they are the pod's): missing keys (no IPv6, no
    br_netfilter) are skipped, as `sysctl -e` would; a refused write is logged."""
    for path, value in settings.items():
        try:
            with open(path, "w") as f:
                f.write(value)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("sysctl failed", netns=where, setting=path, value=value, error=str(exc))


def _iface(name: str) -> tuple[int, str] | None:
    """MTU and MAC of an interface in the calling thread's namespace (two
    ioctls, no process); None if there is no such interface."""
    req = struct.pack("16s24x", name.encode())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            mtu = fcntl.ioctl(s.fileno(), SIOCGIFMTU, req)
            hw = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, req)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise Internal(f"cannot read interface {name}: {exc.strerror}") from None
    # struct ifreq: the name, then ifr_mtu (int) or ifr_hwaddr (sa_family + bytes).
    return struct.unpack_from("i", mtu, 16)[0], ":".join(f"{b:02x}" for b in hw[18:24])


def _notrack_rule(names: LinkNames, sandbox_id: str) -> list[str]:
    return ["-t", "raw", "PREROUTING", "-i", names.host_bridge, "-m", "comment", "--comment",
            f"podvisor: VM bridge of sandbox {sandbox_id[:12]}", "-j", "NOTRACK"]


def _iptables(op: str, rule: list[str]) -> int:
    # -w: the xtables lock is shared with CNI plugins running in parallel.
    args = [IPTABLES, "-w", "30", rule[0], rule[1], op, *rule[2:]]
    return _run(args, what="iptables", check=False).returncode


def _add_notrack(names: LinkNames, sandbox_id: str, *, fresh: bool) -> None:
    """The rule for the VM bridge; ``fresh``: the bridge was just created, so
    no earlier attempt can have added the rule (no check, one process less)."""
    rule = _notrack_rule(names, sandbox_id)
    if shutil.which(IPTABLES) is None or ((fresh or _iptables("-C", rule) != 0) and _iptables("-A", rule) != 0):
        # Not fatal: without it NAT'd flows still work, only tracked twice.
        log.warning("cannot exempt the VM bridge from conntrack", bridge=names.host_bridge)


def _remove_notrack(names: LinkNames, sandbox_id: str) -> None:
    if shutil.which(IPTABLES) is None:
        return  # then setup could not have added it either
    rule = _notrack_rule(names, sandbox_id)
    for _ in range(16):  # a retried setup may have added it more than once
        # Delete first and check after: one call less than check-then-delete
        # for the usual single rule; a failed -D is an error only if -C still
        # finds the rule.
        deleted = _iptables("-D", rule) == 0
        if _iptables("-C", rule) != 0:
            return
        if not deleted:
            raise Internal(f"cannot delete the conntrack exemption of {names.host_bridge}")


# dnsmasq ----------------------------------------------------------------------------


def _proc_state(pid: int) -> str:
    """The process's state letter ('' when gone); a zombie counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # comm may contain spaces and parentheses: the state follows the last ')'.
    return stat[stat.rfind(")") + 2:][:1]


def _is_our_dnsmasq(pid: int, pid_file: Path) -> bool:
    """Whether ``pid`` is a live dnsmasq started for this pid file (pids are reused)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return comm == "dnsmasq" and f"--pid-file={pid_file}".encode() in cmdline and _proc_state(pid) not in ("", "Z")


def _read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _find_dnsmasq(pid_file: Path) -> list[int]:
    """Live dnsmasq processes serving this sandbox: the pid file's, and any
    other started with the same pid file (a pid file lost in a crash)."""
    pids = []
    pid = _read_pid(pid_file)
    if pid is not None and _is_our_dnsmasq(pid, pid_file):
        pids.append(pid)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in pids and _is_our_dnsmasq(int(entry.name), pid_file):
            pids.append(int(entry.name))
    return pids


def dhcp_running(workdir: Path) -> bool:
    """Whether this sandbox's DHCP server runs."""
    pid = _read_pid(workdir / PID_FILE)
    return pid is not None and _is_our_dnsmasq(pid, workdir / PID_FILE)


def _start_dnsmasq(wiring: PodWiring, names: LinkNames, workdir: Path) -> None:
    """Start the DHCP server; call it inside the pod's namespace (netns.run_in)."""
    args = dnsmasq_args(wiring, interface=names.inner_bridge, workdir=workdir)
    # dnsmasq forks into the background once its sockets are bound, so a bad
    # flag or a missing interface shows up as this command's exit status.
    _run(args, what="start the DHCP server")
    if not dhcp_running(workdir):
        raise Internal(f"dnsmasq for sandbox {names.host_bridge[3:]} exited right after starting; "
                       f"see {workdir / LOG_FILE}")


def _stop_dnsmasq(workdir: Path, *, scan: bool = True) -> None:
    """Stop the sandbox's dnsmasq; ``scan``: also look through /proc for one
    whose pid file was lost (needless when the state says none was started)."""
    pid_file = workdir / PID_FILE
    if scan:
        pids = _find_dnsmasq(pid_file)
    else:
        pid = _read_pid(pid_file)
        pids = [pid] if pid is not None and _is_our_dnsmasq(pid, pid_file) else []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_TIMEOUT
    for pid in pids:
        while _is_our_dnsmasq(pid, pid_file):
            if time.monotonic() > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                time.sleep(0.05)
                if _is_our_dnsmasq(pid, pid_file):
                    raise Internal(f"dnsmasq (pid {pid}) does not exit")
                break
            time.sleep(0.005)  # dnsmasq exits within milliseconds of SIGTERM
    for name in (PID_FILE, LEASE_FILE, LOG_FILE):
        (workdir / name).unlink(missing_ok=True)


# Public API -------------------------------------------------------------------------


@dataclass(frozen=True)
class _State:
    """podnet.json: the wiring, and how CNI left the pod interface (to put it
    back before CNI DEL: the bridge plugin finds the addresses whose
    masquerade rules it must delete on the interface itself)."""

    wiring: PodWiring
    pod_mac: str
    pod_addresses: tuple[str, ...]
    # Whether the DHCP server was started (by ensure_dhcp, for the VM): one
    # that died is restarted at recovery only then.
    dhcp: bool = False


def _load_state(workdir: Path) -> _State | None:
    path = workdir / STATE_FILE
    try:
        doc = json.loads(path.read_bytes())
        return _State(wiring=PodWiring.from_json(doc["wiring"]), pod_mac=str(doc["podInterface"]["mac"]),
                      pod_addresses=tuple(str(a) for a in doc["podInterface"]["addresses"]),
                      dhcp=doc.get("dhcp") is True)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Internal(f"{path} is unreadable: {exc}") from None


def load(workdir: Path) -> PodWiring | None:
    """The wiring recorded for a sandbox (None if there is none)."""
    state = _load_state(workdir)
    return state.wiring if state else None


def _save(state: _State, workdir: Path) -> None:
    doc = {"wiring": state.wiring.to_json(),
           "podInterface": {"mac": state.pod_mac, "addresses": list(state.pod_addresses)}, "dhcp": state.dhcp}
    tmp = workdir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, workdir / STATE_FILE)


def _alias(sandbox_id: str) -> str:
    """The VM bridge's alias: whose it is (`ip link` shows it to an operator)."""
    return f"podvisor sandbox {sandbox_id}"


def _foreign_owner(names: LinkNames, sandbox_id: str) -> str | None:
    """The alias of an existing VM bridge of that name when it names another
    sandbox (link names carry 48 bits of the id), else None. No alias at all
    is our own, from a crash right after it was added."""
    alias = (_link(names.host_bridge) or {}).get("ifalias")
    return str(alias) if alias not in (None, _alias(sandbox_id)) else None


def prepare(sandbox_id: str, netns_name: str, workdir: Path, *, ifname: str = "eth0") -> None:
    """The part of the wiring that does not depend on the CNI result, meant
    to run while CNI ADD runs: the host bridge for the VM's tap, the veth
    pair to the pod namespace and, in there, the bridge ``eth0`` will join,
    with the DHCP server's address. Links get the default MTU; :func:`setup`
    adjusts it to ``eth0``'s.

    Safe to retry. On failure :func:`teardown_pod` and :func:`teardown_host`
    (PodNetworkManager.remove) undo whatever was done.
    """
    names = LinkNames.for_sandbox(sandbox_id, ifname)
    workdir.mkdir(parents=True, exist_ok=True)
    what = f"wire sandbox {sandbox_id[:12]}"
    # Host side first (the veth's pod end must exist before the pod side
    # enslaves it). Each `ip -batch` stops at its first failing command.
    alias = _alias(sandbox_id)
    existing = _exists(names.host_bridge)
    foreign = _foreign_owner(names, sandbox_id) if existing else None
    if foreign is not None:
        raise FailedPrecondition(f"interface {names.host_bridge} exists and belongs to {foreign!r}, "
                                 f"not to sandbox {sandbox_id}")
    host: list[str] = []
    if not existing:
        host.append(f"link add name {names.host_bridge} type bridge ageing_time 0")
    if _batch_safe(alias):
        host.append(f'link set dev {names.host_bridge} alias "{alias}"')
    host.append(f"link set dev {names.host_bridge} arp off")
    if not _exists(names.host_veth):
        host.append(f"link add name {names.host_veth} type veth peer name {names.pod_veth} netns {netns_name}")
    if not netns.run_in(netns_name, lambda: _exists(names.inner_bridge)):
        # Made from here, straight into the pod namespace. A fixed address:
        # a bridge otherwise takes its ports' lowest MAC and the DHCP
        # server's source address would change under the VM.
        host.append(f"link add name {names.inner_bridge} address {random_mac()} netns {netns_name} "
                    "type bridge ageing_time 0")
    host.append(f"link set dev {names.host_veth} master {names.host_bridge}")
    _ip_batch(host, what=what)
    if not _batch_safe(alias):  # an id `ip -batch` cannot quote: on its own command line
        _ip(["link", "set", "dev", names.host_bridge, "alias", alias], what=what)
    # IPv6 off before the links go up (no link-local address, no router
    # solicitation from the host into the pod network).
    _sysctl({f"/proc/sys/net/ipv6/conf/{names.host_bridge}/disable_ipv6": "1",
             f"/proc/sys/net/ipv6/conf/{names.host_veth}/disable_ipv6": "1"}, where="host")

    def pod_side() -> None:
        _sysctl({f"/proc/sys/net/ipv6/conf/{names.inner_bridge}/disable_ipv6": "1",
                 f"/proc/sys/net/ipv6/conf/{names.pod_veth}/disable_ipv6": "1",
                 # Pure L2 in here: no reason for bridged frames to see netfilter.
                 "/proc/sys/net/bridge/bridge-nf-call-iptables": "0",
                 "/proc/sys/net/bridge/bridge-nf-call-ip6tables": "0",
                 "/proc/sys/net/bridge/bridge-nf-call-arptables": "0"}, where=netns_name)
        _ip_batch([f"addr replace {DHCP_SERVER_IP}/32 dev {names.inner_bridge}",
                   f"link set dev {names.pod_veth} master {names.inner_bridge}",
                   f"link set dev {names.pod_veth} up",
                   f"link set dev {names.inner_bridge} up"], what=what)

    netns.run_in(netns_name, pod_side)
    _ip_batch([f"link set dev {names.host_veth} up",
               f"link set dev {names.host_bridge} up"], what=what)
    _add_notrack(names, sandbox_id, fresh=not existing)


def setup(sandbox_id: str, netns_name: str, cni_result: CNIResult, hostname: str,
          dns_servers: Sequence[str], dns_searches: Sequence[str], workdir: Path,
          *, ifname: str = "eth0") -> PodWiring:
    """After CNI ADD (and :func:`prepare`): hand the pod's ``ifname`` over
    to the VM: it gives up its address and MAC and joins the pod-side
    bridge. The DHCP server is started later, for the VM (:func:`ensure_dhcp`).

    Safe to retry. On failure :func:`teardown_pod` and :func:`teardown_host`
    (PodNetworkManager.remove) undo whatever was done.
    """
    names = LinkNames.for_sandbox(sandbox_id, ifname)
    what = f"wire sandbox {sandbox_id[:12]}"

    def pod_side() -> PodWiring:
        found_if = _iface(ifname)
        if found_if is None:
            raise FailedPrecondition(f"the pod network namespace {netns_name} has no {ifname} after CNI ADD")
        mtu, current_mac = found_if
        previous = _load_state(workdir)
        if previous is not None:
            # A retry: eth0 already carries the random MAC, the VM's is recorded.
            vm_mac = previous.wiring.vm_mac
        else:
            found = cni_result.sandbox_interface(ifname)
            vm_mac = (found[1].mac if found and found[1].mac else current_mac).lower()
        if not vm_mac:
            raise FailedPrecondition(f"no MAC address known for {ifname} of sandbox {sandbox_id}")
        try:
            wiring = plan(cni_result, ifname=ifname, host_bridge=names.host_bridge, vm_mac=vm_mac, mtu=mtu,
                          hostname=hostname, dns_servers=dns_servers, dns_searches=dns_searches)
        except ValueError as exc:
            raise FailedPrecondition(f"sandbox {sandbox_id}: {exc}") from None
        # Recorded before anything changes, so the VM's MAC survives a crash
        # after eth0 got its new one, and teardown knows what to put back.
        addresses = tuple(str(ipc.address) for ipc in cni_result.ips_for(ifname))
        _save(_State(wiring=wiring, pod_mac=vm_mac, pod_addresses=addresses,
                     dhcp=previous is not None and previous.dhcp), workdir)
        # IPv6 off first: its addresses go with it (only IPv4 is served).
        _sysctl({f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6": "1"}, where=netns_name)
        try:
            _hand_over(ifname, names, mtu)
        except OSError as exc:
            raise Internal(f"{what}: cannot hand {ifname} in {netns_name} over to the VM: {exc}") from None
        return wiring

    wiring = netns.run_in(netns_name, pod_side)
    if wiring.mtu != DEFAULT_MTU:
        _ip_batch([f"link set dev {names.host_veth} mtu {wiring.mtu}",
                   f"link set dev {names.host_bridge} mtu {wiring.mtu}"], what=what)
    log.info("pod wired for the VM", sandbox_id=sandbox_id, bridge=names.host_bridge, ip=wiring.ip,
             mac=wiring.vm_mac)
    return wiring


def ensure_dhcp(sandbox_id: str, netns_name: str, workdir: Path, *, ifname: str = "eth0",
                only_if_started: bool = False) -> bool:
    """Start the sandbox's DHCP server unless it runs; True if it had to be
    started. With ``only_if_started`` (recovery) only one that was started
    before and died since is restarted. No wiring: nothing to serve, False."""
    state = _load_state(workdir)
    if state is None or dhcp_running(workdir) or (only_if_started and not state.dhcp):
        return False
    if not state.dhcp:
        # Recorded first: a crash while it starts still has it restarted.
        _save(dataclasses.replace(state, dhcp=True), workdir)
    names = LinkNames.for_sandbox(sandbox_id, ifname)
    netns.run_in(netns_name, lambda: _start_dnsmasq(state.wiring, names, workdir))
    return True


def _restore_commands(ifname: str, mac: str, addresses: Sequence[str]) -> list[str]:
    """`ip` commands that put eth0 back as CNI ADD left it: its MAC and addresses.

    CNI DEL "works" with eth0 stripped, but the bridge plugin deletes the
    masquerade rules of the addresses it finds on the interface: with none
    there, its ipMasq chain would stay in the host's nat table forever.
    """
    commands = [f"link set dev {ifname} down"]
    if mac:
        commands.append(f"link set dev {ifname} address {mac}")
    commands += [f"addr replace {address} dev {ifname}" for address in addresses]
    commands.append(f"link set dev {ifname} up")
    return commands


def teardown_pod(sandbox_id: str, netns_name: str, workdir: Path, *, ifname: str = "eth0",
                 cni_result: CNIResult | None = None) -> bool:
    """What must happen before CNI DEL: stop the DHCP server (a live process
    would keep the namespace alive after its deletion) and give ``eth0``
    back its MAC and addresses, out of the pod-side bridge. Idempotent, and
    works with nothing in memory (dnsmasq is found by its pid file, eth0's
    MAC and addresses are in the state file; ``cni_result``, the cached ADD
    result, stands in for a lost state file). The pod-side bridge and veth
    end go with the namespace.

    True when ``eth0`` got its addresses back (then CNI DEL can clean up
    after them itself).
    """
    state = _load_state(workdir)
    # Without a state file (lost with the sandbox directory) a dnsmasq may
    # still run: only then is /proc searched for it.
    _stop_dnsmasq(workdir, scan=state is None or state.dhcp)
    mac, addresses = (state.pod_mac, state.pod_addresses) if state else ("", ())
    if state is None and cni_result is not None:
        found = cni_result.sandbox_interface(ifname)
        mac = found[1].mac if found else ""
        addresses = tuple(str(ipc.address) for ipc in cni_result.ips_for(ifname))
    if not (mac or addresses) or not netns.exists(netns_name):
        return False
    names = LinkNames.for_sandbox(sandbox_id, ifname)

    def pod_side() -> bool:
        if not _exists(ifname):
            return False
        if any(":" in a for a in addresses):
            # IPv6 back on before its addresses return.
            _sysctl({f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6": "0"}, where=netns_name)
        commands = [f"link set dev {ifname} nomaster"] if _exists(names.inner_bridge) else []
        _ip_batch(commands + _restore_commands(ifname, mac, addresses), what=f"restore {ifname} in {netns_name}")
        return bool(addresses)

    return netns.run_in(netns_name, pod_side)


def teardown_host(sandbox_id: str, *, ifname: str = "eth0") -> None:
    """The host side, independent of CNI DEL (it may run meanwhile): the
    conntrack exemption, the veth pair (its pod end goes with it) and the
    VM's bridge. Idempotent. The VM must be stopped first: its tap leaves
    the bridge being deleted."""
    names = LinkNames.for_sandbox(sandbox_id, ifname)
    foreign = _foreign_owner(names, sandbox_id) if _exists(names.host_bridge) else None
    if foreign is not None:
        # prepare() refused to take that bridge over: its links and rule are not ours.
        log.warning("VM bridge belongs to another sandbox, left alone", sandbox_id=sandbox_id,
                    bridge=names.host_bridge, alias=foreign)
        return
    _remove_notrack(names, sandbox_id)
    present = [n for n in (names.host_veth, names.host_bridge) if _exists(n)]
    if present:
        problem = ""
        try:
            _ip_batch([f"link del dev {n}" for n in present], what="delete the VM's links", force=True)
        except Internal as exc:
            problem = exc.message
        left = [n for n in present if _exists(n)]  # one deleted with its peer, or by someone else: fine
        if left:
            raise Internal(f"cannot delete interface {', '.join(left)}: {problem}")
    log.info("pod wiring removed", sandbox_id=sandbox_id, bridge=names.host_bridge)


def host_links_exist(sandbox_id: str, *, ifname: str = "eth0") -> bool:
    """Whether the sandbox's VM bridge or veth exists in the calling thread's namespace."""
    names = LinkNames.for_sandbox(sandbox_id, ifname)
    return _exists(names.host_bridge) or _exists(names.host_veth)


def forget(workdir: Path) -> None:
    """Drop the wiring's state file, once teardown is complete."""
    (workdir / STATE_FILE).unlink(missing_ok=True)
