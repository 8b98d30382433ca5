"""CNI ADD results and CNI error objects: typed values from plugin output (pure).

A plugin's ADD result says which interfaces exist (host side and in the
sandbox), which addresses they carry, the routes and the DNS settings the
runtime should hand to the workload. Results of spec versions 0.3.x, 0.4.0 and
1.0.0 share one shape (1.0.0 only dropped the per-IP ``version`` field), and
1.1.0 adds optional fields we do not need, so one parser reads them all.
Anything malformed is a ValueError whose message names the offending field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.domain import jsontext

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The result versions that share the "interfaces/ips/routes/dns" shape; 0.1.0
# and 0.2.0 used "ip4"/"ip6" objects and no plugin we ship speaks only those.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

# Hardware addresses as plugins print them: colon-separated octets (6 for
# Ethernet, 8 for EUI-64, 20 for InfiniBand).
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$|^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){7}$"
                  r"|^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){19}$")


@dataclass(frozen=True)
class Interface:
    """An interface a plugin created or configured; ``sandbox`` is the netns
    path for interfaces inside the pod, empty for host-side ones."""

    name: str
    mac: str = ""
    sandbox: str = ""


@dataclass(frozen=True)
class IPConfig:
    """One address; ``interface`` indexes ``CNIResult.interfaces`` (None when
    the plugin did not say which interface carries it)."""

    address: IPInterface
    gateway: IPAddress | None = None
    interface: int | None = None


@dataclass(frozen=True)
class Route:
    """A route to install for the workload; no ``gw`` means "via the
    gateway of the address in the same family"."""

    dst: IPNetwork
    gw: IPAddress | None = None


@dataclass(frozen=True)
class DNS:
    """The DNS settings a result hands to the workload."""

    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class CNIResult:
    """A parsed ADD result: interfaces, addresses, routes, DNS."""

    cni_version: str
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = field(default_factory=DNS)

    def sandbox_interface(self, ifname: str) -> tuple[int, Interface] | None:
        """Index and entry of the in-sandbox interface called ``ifname``."""
        for index, iface in enumerate(self.interfaces):
            if iface.name == ifname and iface.sandbox:
                return index, iface
        return None

    def ips_for(self, ifname: str) -> tuple[IPConfig, ...]:
        """Addresses of the sandbox interface ``ifname``.

        An address without an interface index belongs to the sandbox
        interface by convention (plugins that configure a single interface
        often omit the index).
        """
        found = self.sandbox_interface(ifname)
        wanted = found[0] if found else None
        return tuple(ip for ip in self.ips if ip.interface is None or ip.interface == wanted)


@dataclass(frozen=True)
class CNIErrorInfo:
    """The error object a failing plugin prints on stdout (CNI spec "Error")."""

    code: int
    msg: str
    details: str = ""


def _load(raw: bytes | str | Mapping[str, Any], what: str) -> Mapping[str, Any]:
    if isinstance(raw, Mapping):
        return raw
    try:
        doc = jsontext.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{what} is {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} is not a JSON object")
    return doc


def _str(value: Any, field_name: str, *, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ValueError(f"{field_name} must be a {'non-empty ' if required else ''}string")
    return value


def _str_list(value: Any, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field_name} must be a list of strings")
    return tuple(value)


def _list(doc: Mapping[str, Any], key: str) -> list[Any]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list")
    return value


def _ip(value: Any, field_name: str) -> IPAddress:
    try:
        return ipaddress.ip_address(_str(value, field_name, required=True))
    except ValueError:
        raise ValueError(f"{field_name}: {value!r} is not an IP address") from None


def _interface(doc: Any, i: int) -> Interface:
    where = f"interfaces[{i}]"
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must be an object")
    name = _str(doc.get("name"), f"{where}.name", required=True)
    mac = _str(doc.get("mac"), f"{where}.mac")
    if mac and not _MAC.fullmatch(mac):
        raise ValueError(f"{where}.mac: {mac!r} is not a hardware address")
    return Interface(name=name, mac=mac.lower(), sandbox=_str(doc.get("sandbox"), f"{where}.sandbox"))


def _ip_config(doc: Any, i: int, n_interfaces: int) -> IPConfig:
    where = f"ips[{i}]"
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must be an object")
    text = _str(doc.get("address"), f"{where}.address", required=True)
    if "/" not in text:
        raise ValueError(f"{where}.address: {text!r} is not in CIDR notation")
    try:
        address = ipaddress.ip_interface(text)
    except ValueError:
        raise ValueError(f"{where}.address: {text!r} is not an address in CIDR notation") from None
    version = doc.get("version")
    # 0.3.x/0.4.0 name the family; a mismatch means the result is garbled.
    if version is not None and str(version) != str(address.version):
        raise ValueError(f"{where}.version: {version!r} does not match address {text}")
    gateway = None
    if doc.get("gateway") not in (None, ""):
        gateway = _ip(doc["gateway"], f"{where}.gateway")
        if gateway.version != address.version:
            raise ValueError(f"{where}.gateway: {gateway} is not in the family of {text}")
    index = doc.get("interface")
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_interfaces:
            raise ValueError(f"{where}.interface: {index!r} does not index interfaces "
                             f"(there are {n_interfaces})")
    return IPConfig(address=address, gateway=gateway, interface=index)


def _route(doc: Any, i: int) -> Route:
    where = f"routes[{i}]"
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must be an object")
    text = _str(doc.get("dst"), f"{where}.dst", required=True)
    try:
        # strict=False: a dst with host bits set still names its network.
        dst = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{where}.dst: {text!r} is not a network in CIDR notation") from None
    gw = None
    if doc.get("gw") not in (None, ""):
        gw = _ip(doc["gw"], f"{where}.gw")
        if gw.version != dst.version:
            raise ValueError(f"{where}.gw: {gw} is not in the family of {text}")
    return Route(dst=dst, gw=gw)


def _dns(doc: Any) -> DNS:
    if doc is None:
        return DNS()
    if not isinstance(doc, dict):
        raise ValueError("dns must be an object")
    return DNS(nameservers=_str_list(doc.get("nameservers"), "dns.nameservers"),
               domain=_str(doc.get("domain"), "dns.domain"),
               search=_str_list(doc.get("search"), "dns.search"),
               options=_str_list(doc.get("options"), "dns.options"))


def parse_result(raw: bytes | str | Mapping[str, Any]) -> CNIResult:
    """Parse the result of a CNI ADD (the last plugin's stdout, or a cached copy)."""
    doc = _load(raw, "CNI result")
    version = _str(doc.get("cniVersion"), "cniVersion", required=True)
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"cniVersion {version!r} is not supported (supported: {', '.join(SUPPORTED_VERSIONS)})")
    interfaces = tuple(_interface(d, i) for i, d in enumerate(_list(doc, "interfaces")))
    ips = tuple(_ip_config(d, i, len(interfaces)) for i, d in enumerate(_list(doc, "ips")))
    routes = tuple(_route(d, i) for i, d in enumerate(_list(doc, "routes")))
    return CNIResult(cni_version=version, interfaces=interfaces, ips=ips, routes=routes,
                     dns=_dns(doc.get("dns")))


def parse_error(raw: bytes | str) -> CNIErrorInfo | None:
    """The CNI error object in a failing plugin's stdout, None if there is none.

    Never raises: a plugin that crashed may print anything, and the caller
    then falls back to stderr and the exit status.
    """
    try:
        doc = jsontext.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    code, msg = doc.get("code"), doc.get("msg")
    if isinstance(code, bool) or not isinstance(code, int) or not isinstance(msg, str):
        return None
    details = doc.get("details")
    return CNIErrorInfo(code=code, msg=msg, details=details if isinstance(details, str) else "")
