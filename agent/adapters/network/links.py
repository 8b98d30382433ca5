"""The VM's links of one sandbox: bridges, the veth pair, eth0's hand-over.

:func:`build` makes everything but ``eth0``'s part while CNI ADD runs (it
needs only the namespace): the host bridge for the VM's tap, the veth pair to
the pod namespace and, in there, the bridge ``eth0`` will join, with the DHCP
server's address. :func:`hand_over` moves ``eth0`` over afterwards with a few
ioctls; :func:`restore` puts it back before CNI DEL; :func:`delete_host_links`
removes the host side. Names come from ``LinkNames`` (domain), so all of it
works from the sandbox id alone.

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
- In the pod namespace the bridge is pure L2, so its br_netfilter calls are
  switched off (the host side is firewall.py's NOTRACK rule).

Processes are few: one ``ip -batch`` per side and step; what can be done
with an ioctl or a /proc/sys write is.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import secrets
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from agent.adapters.network import netns
from agent.adapters.network.tools import run
from agent.domain.errors import FailedPrecondition, Internal
from agent.domain.network.wiring import DEFAULT_MTU, DHCP_SERVER_IP, LinkNames

log = structlog.get_logger(__name__)

IP = "ip"
SYS_CLASS_NET = Path("/sys/class/net")
# Interface ioctls (linux/sockios.h, linux/if.h).
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFADDR = 0x8915
SIOCSIFADDR = 0x8916
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
SIOCGIFHWADDR = 0x8927
SIOCSIFNETMASK = 0x891C
SIOCBRADDIF = 0x89A2
SIOCBRDELIF = 0x89A3
IFF_UP = 0x1
ARPHRD_ETHER = 1


def random_mac() -> str:
    """A random unicast, locally administered MAC (02-style first octet)."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def exists(name: str) -> bool:
    """Whether an interface of that name exists in the agent's (the calling
    thread's) namespace, without a subprocess."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _link(name: str) -> dict[str, Any] | None:
    """`ip -j link show` of one interface, None if it does not exist."""
    proc = run([IP, "-j", "link", "show", "dev", name], what=f"look up {name}", check=False)
    if proc.returncode != 0:
        return None
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        return None
    return doc[0] if isinstance(doc, list) and doc and isinstance(doc[0], dict) else None


def _alias(sandbox_id: str) -> str:
    """The VM bridge's alias: whose it is (`ip link` shows it to an operator)."""
    return f"podvisor sandbox {sandbox_id}"


def foreign_owner(names: LinkNames, sandbox_id: str) -> str | None:
    """The alias of an existing VM bridge of that name when it names another
    sandbox (link names carry 48 bits of the id), else None. No alias at all
    is our own, from a crash right after it was added."""
    if not exists(names.host_bridge):
        return None
    alias = _read_alias(names.host_bridge)
    return str(alias) if alias not in (None, _alias(sandbox_id)) else None


def _read_alias(name: str) -> str | None:
    """A host interface's alias (None without one): from sysfs, which shows
    the agent's own namespace, without a process; `ip` if sysfs cannot say."""
    try:
        text = (SYS_CLASS_NET / name / "ifalias").read_text()
    except OSError:
        found = (_link(name) or {}).get("ifalias")
        return None if found is None else str(found)
    return text.rstrip("\n") or None


def host_links_exist(names: LinkNames) -> bool:
    """Whether the sandbox's VM bridge or veth exists in the calling thread's namespace."""
    return exists(names.host_bridge) or exists(names.host_veth)


def _batch_error(stderr: bytes) -> str:
    """The useful part of a failed `ip -batch`'s stderr: its "Error: ..."
    line(s), not the trailing "Command failed -:N"."""
    lines = [ln for ln in stderr.decode(errors="replace").strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if not ln.startswith("Command failed")]
    return "; ".join(errors[-2:] or lines[-1:]) or "failed"


def ip_batch(commands: Sequence[str], *, what: str, force: bool = False) -> None:
    """Several `ip` commands in one process (`ip -batch -`), stopping at the
    first that fails, as separate calls would; with ``force`` all are run
    (and a failure still raises, after them)."""
    args = [IP, *(["-force"] if force else []), "-batch", "-"]
    proc = run(args, what=what, check=False, stdin="".join(f"{c}\n" for c in commands).encode())
    if proc.returncode != 0:
        raise Internal(f"{what}: {' '.join(args[:4])} failed: {_batch_error(proc.stderr)}")


def _batch_safe(text: str) -> bool:
    """Whether ``text`` survives as one double-quoted `ip -batch` argument
    (`ip` reads "#" as a comment even inside quotes)."""
    return all(c.isprintable() and c not in "\"\\'#" for c in text)


def sysctl(settings: dict[str, str], *, where: str) -> None:
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


def iface(name: str) -> tuple[int, str] | None:
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


def build(names: LinkNames, sandbox_id: str, netns_name: str, *, what: str) -> bool:
    """The links that do not depend on the CNI result, with the default MTU
    (:func:`hand_over` adjusts it to ``eth0``'s). Safe to retry; refuses a
    VM bridge of that name that belongs to another sandbox. True when the
    VM bridge was made now (no earlier attempt can have left anything on it).
    """
    # Host side first (the veth's pod end must exist before the pod side
    # enslaves it). Each `ip -batch` stops at its first failing command.
    alias = _alias(sandbox_id)
    existing = exists(names.host_bridge)
    foreign = foreign_owner(names, sandbox_id) if existing else None
    if foreign is not None:
        raise FailedPrecondition(f"interface {names.host_bridge} exists and belongs to {foreign!r}, "
                                 f"not to sandbox {sandbox_id}")
    host: list[str] = []
    if not existing:
        host.append(f"link add name {names.host_bridge} type bridge ageing_time 0")
    if _batch_safe(alias):
        host.append(f'link set dev {names.host_bridge} alias "{alias}"')
    host.append(f"link set dev {names.host_bridge} arp off")
    if not exists(names.host_veth):
        host.append(f"link add name {names.host_veth} type veth peer name {names.pod_veth} netns {netns_name}")
    if not netns.run_in(netns_name, lambda: exists(names.inner_bridge)):
        # Made from here, straight into the pod namespace. A fixed address:
        # a bridge otherwise takes its ports' lowest MAC and the DHCP
        # server's source address would change under the VM.
        host.append(f"link add name {names.inner_bridge} address {random_mac()} netns {netns_name} "
                    "type bridge ageing_time 0")
    host.append(f"link set dev {names.host_veth} master {names.host_bridge}")
    ip_batch(host, what=what)
    if not _batch_safe(alias):  # an id `ip -batch` cannot quote: on its own command line
        run([IP, "link", "set", "dev", names.host_bridge, "alias", alias], what=what)
    # IPv6 off before the links go up (no link-local address, no router
    # solicitation from the host into the pod network).
    sysctl({f"/proc/sys/net/ipv6/conf/{names.host_bridge}/disable_ipv6": "1",
            f"/proc/sys/net/ipv6/conf/{names.host_veth}/disable_ipv6": "1"}, where="host")

    def pod_side() -> None:
        sysctl({f"/proc/sys/net/ipv6/conf/{names.inner_bridge}/disable_ipv6": "1",
                f"/proc/sys/net/ipv6/conf/{names.pod_veth}/disable_ipv6": "1",
                # Pure L2 in here: no reason for bridged frames to see netfilter.
                "/proc/sys/net/bridge/bridge-nf-call-iptables": "0",
                "/proc/sys/net/bridge/bridge-nf-call-ip6tables": "0",
                "/proc/sys/net/bridge/bridge-nf-call-arptables": "0"}, where=netns_name)
        ip_batch([f"addr replace {DHCP_SERVER_IP}/32 dev {names.inner_bridge}",
                  f"link set dev {names.pod_veth} master {names.inner_bridge}",
                  f"link set dev {names.pod_veth} up",
                  f"link set dev {names.inner_bridge} up"], what=what)

    netns.run_in(netns_name, pod_side)
    ip_batch([f"link set dev {names.host_veth} up",
              f"link set dev {names.host_bridge} up"], what=what)
    return not existing


def _ifreq_flags(s: socket.socket, name: str) -> int:
    return int(struct.unpack_from("H", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("16s24x", name.encode())),
                                  16)[0])


def _set_ifreq_flags(s: socket.socket, name: str, flags: int) -> None:
    fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags))


def _ioctl_hand_over(ifname: str, names: LinkNames, mtu: int) -> None:
    """``ifname`` gives up its IPv4 addresses and its MAC and joins the
    pod-side bridge; with another MTU than the default, the links towards
    the VM take it. Classic interface ioctls (what ifconfig and brctl use),
    so no process is started: ``ip`` would cost more than all of them together."""
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


def hand_over(ifname: str, names: LinkNames, mtu: int, *, netns_name: str, what: str) -> None:
    """In the pod's namespace (call it from :func:`netns.run_in`): IPv6 off
    on ``ifname`` (its addresses go with it: only IPv4 is served), then
    ``ifname`` to the VM's side (new random MAC, no IPv4 address, a port of
    the pod-side bridge, ``mtu`` on the pod-side links)."""
    sysctl({f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6": "1"}, where=netns_name)
    try:
        _ioctl_hand_over(ifname, names, mtu)
    except OSError as exc:
        raise Internal(f"{what}: cannot hand {ifname} in {netns_name} over to the VM: {exc}") from None


def set_host_mtu(names: LinkNames, mtu: int, *, what: str) -> None:
    """The host side of the VM's links takes the pod interface's MTU."""
    ip_batch([f"link set dev {names.host_veth} mtu {mtu}",
              f"link set dev {names.host_bridge} mtu {mtu}"], what=what)


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


def _ioctl_restorable(addresses: Sequence[str]) -> bool:
    """Whether the classic ioctls can put ``addresses`` back: at most one,
    IPv4 (what a bridge + host-local pod has); IPv6 or several go through `ip`."""
    if len(addresses) > 1:
        return False
    try:
        return all(ipaddress.ip_interface(a).version == 4 for a in addresses)
    except ValueError:
        return False


def _ioctl_restore(ifname: str, names: LinkNames, mac: str, addresses: Sequence[str]) -> None:
    """:func:`_restore_commands` with the interface ioctls (the inverse of
    :func:`_ioctl_hand_over`, no process): ``ifname`` out of the pod-side
    bridge, down, its MAC and its one IPv4 address with its prefix back, up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        index = socket.if_nametoindex(ifname)
        if exists(names.inner_bridge):
            try:
                fcntl.ioctl(s.fileno(), SIOCBRDELIF, struct.pack("16si20x", names.inner_bridge.encode(), index))
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: not a port of it (any more)
                    raise
        flags = _ifreq_flags(s, ifname)
        _set_ifreq_flags(s, ifname, flags & ~IFF_UP)
        if mac:
            fcntl.ioctl(s.fileno(), SIOCSIFHWADDR,
                        struct.pack("16sH6s16x", ifname.encode(), ARPHRD_ETHER, bytes.fromhex(mac.replace(":", ""))))
        for address in addresses:
            iface4 = ipaddress.IPv4Interface(address)
            for request, value in ((SIOCSIFADDR, iface4.ip), (SIOCSIFNETMASK, iface4.netmask)):
                fcntl.ioctl(s.fileno(), request, struct.pack("16sH2s4s8x", ifname.encode(), socket.AF_INET, b"",
                                                             value.packed))
        _set_ifreq_flags(s, ifname, flags | IFF_UP)


def restore(ifname: str, names: LinkNames, mac: str, addresses: Sequence[str], *, netns_name: str) -> bool:
    """In the pod's namespace: ``ifname`` out of the pod-side bridge, with
    its MAC and addresses back. True when it got addresses back; False when
    there is no such interface. The pod-side bridge and veth end go with the
    namespace."""

    def pod_side() -> bool:
        if not exists(ifname):
            return False
        if _ioctl_restorable(addresses):
            try:
                _ioctl_restore(ifname, names, mac, addresses)
            except OSError as exc:
                raise Internal(f"restore {ifname} in {netns_name}: {exc}") from None
            return bool(addresses)
        if any(":" in a for a in addresses):
            # IPv6 back on before its addresses return.
            sysctl({f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6": "0"}, where=netns_name)
        commands = [f"link set dev {ifname} nomaster"] if exists(names.inner_bridge) else []
        ip_batch(commands + _restore_commands(ifname, mac, addresses), what=f"restore {ifname} in {netns_name}")
        return bool(addresses)

    return netns.run_in(netns_name, pod_side)


def delete_host_links(names: LinkNames) -> None:
    """Delete the veth pair (its pod end goes with it) and the VM's bridge,
    those that exist. The VM must be stopped first: its tap leaves the
    bridge being deleted."""
    present = [n for n in (names.host_veth, names.host_bridge) if exists(n)]
    if not present:
        return
    problem = ""
    try:
        ip_batch([f"link del dev {n}" for n in present], what="delete the VM's links", force=True)
    except Internal as exc:
        problem = exc.message
    left = [n for n in present if exists(n)]  # one deleted with its peer, or by someone else: fine
    if left:
        raise Internal(f"cannot delete interface {', '.join(left)}: {problem}")
