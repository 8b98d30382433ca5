"""The pod's resolver and kernel settings as the guest gets them (pure).

A container sees the pod's ``dns_config`` as its ``/etc/resolv.conf`` and
the sandbox's ``linux.sysctls`` in its kernel; a VM gets both through its
cloud-init seed (``agent.render.cloudinit``). This module checks them as
RunPodSandbox receives them, and says what the guest's files hold.

Limits are kubelet's (``pkg/kubelet/network/dns``): at most 32 search
domains, 2048 characters for the whole ``search`` line. glibc reads only
the first 3 name servers; more are accepted (up to 32) as containerd does.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from agent.domain.errors import InvalidArgument
from agent.domain.sandbox import DNSConfig

DNS_FIELD = "config.dns_config"
SYSCTLS_FIELD = "config.linux.sysctls"

MAX_DNS_SERVERS = 32
MAX_DNS_SEARCHES = 32
MAX_DNS_SEARCH_CHARS = 2048
MAX_DNS_OPTIONS = 32
MAX_DNS_OPTION = 253
MAX_SYSCTLS = 256
MAX_SYSCTL_NAME = 253
MAX_SYSCTL_VALUE = 4096

# A search domain: RFC 1123 labels, an optional trailing dot (Kubernetes' check).
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")
# resolv.conf(5) options: a word, or word:value (ndots:5, timeout:2, attempts:3).
_OPTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(:[A-Za-z0-9_.-]+)?$")
_NUMERIC_OPTIONS = frozenset({"ndots", "timeout", "attempts"})
# Kubernetes' sysctl name: segments of [a-z0-9_-] joined by '.' or '/'.
_SYSCTL_SEGMENT = r"[a-z0-9]([-_a-z0-9]*[a-z0-9])?"
_SYSCTL_NAME = re.compile(rf"^({_SYSCTL_SEGMENT}[./])*{_SYSCTL_SEGMENT}$")
# Nothing that could end a line of resolv.conf or sysctl.d, nor any other control character.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def has_dns(dns: DNSConfig) -> bool:
    return bool(dns.servers or dns.searches or dns.options)


def validate_dns(dns: DNSConfig, field: str = DNS_FIELD) -> None:
    """Servers are IP addresses, searches domain names within kubelet's limits,
    options ``name`` or ``name:value`` (a number for ndots, timeout, attempts).
    InvalidArgument names the list and shows the entry."""
    if len(dns.servers) > MAX_DNS_SERVERS:
        raise InvalidArgument(f"{field}.servers", f"more than {MAX_DNS_SERVERS} entries")
    for server in dns.servers:
        if not server:
            raise InvalidArgument(f"{field}.servers", "is required (an empty entry)")
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise InvalidArgument(f"{field}.servers", f"{server[:64]!r} is not an IP address") from None
    if len(dns.searches) > MAX_DNS_SEARCHES:
        raise InvalidArgument(f"{field}.searches", f"more than {MAX_DNS_SEARCHES} entries (kubelet's limit)")
    for search in dns.searches:
        if not search:
            raise InvalidArgument(f"{field}.searches", "is required (an empty entry)")
        if len(search) > 254 or not _DOMAIN.fullmatch(search):
            raise InvalidArgument(f"{field}.searches", f"{search[:64]!r} is not a domain name")
    line = " ".join(dns.searches)
    if len(line) > MAX_DNS_SEARCH_CHARS:
        raise InvalidArgument(f"{field}.searches",
                              f"{len(line)} characters in all; at most {MAX_DNS_SEARCH_CHARS} (kubelet's limit)")
    if len(dns.options) > MAX_DNS_OPTIONS:
        raise InvalidArgument(f"{field}.options", f"more than {MAX_DNS_OPTIONS} entries")
    for option in dns.options:
        if not option:
            raise InvalidArgument(f"{field}.options", "is required (an empty entry)")
        if len(option) > MAX_DNS_OPTION:
            raise InvalidArgument(f"{field}.options", f"longer than {MAX_DNS_OPTION} bytes")
        if not _OPTION.fullmatch(option):
            raise InvalidArgument(f"{field}.options",
                                  f"{option[:64]!r} is not a resolv.conf option (name or name:value, "
                                  "such as ndots:5)")
        name, _, value = option.partition(":")
        if name in _NUMERIC_OPTIONS and not value.isdigit():
            raise InvalidArgument(f"{field}.options", f"{option!r}: {name} takes a number ({name}:N)")


def resolv_conf_lines(dns: DNSConfig) -> list[str]:
    """The lines of the guest's /etc/resolv.conf (a checked ``dns``)."""
    lines = [f"nameserver {s}" for s in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return lines


def validate_sysctls(sysctls: Mapping[str, str], field: str = SYSCTLS_FIELD) -> None:
    """Names like Kubernetes' (``net.ipv4.ip_forward``, or ``net/ipv4/conf/eth0.1/rp_filter``),
    one-line non-empty values. InvalidArgument naming the key."""
    if len(sysctls) > MAX_SYSCTLS:
        raise InvalidArgument(field, f"more than {MAX_SYSCTLS} entries")
    for name, value in sysctls.items():
        where = f"{field}[{name[:64]!r}]"
        if len(name) > MAX_SYSCTL_NAME or not _SYSCTL_NAME.fullmatch(name):
            raise InvalidArgument(where, "not a sysctl name (lower-case segments of letters, digits, '_' "
                                         "and '-' joined by '.' or '/', such as net.ipv4.ip_forward)")
        if not value.strip():
            raise InvalidArgument(where, "the value must not be empty")
        if len(value.encode("utf-8", "surrogatepass")) > MAX_SYSCTL_VALUE:
            raise InvalidArgument(where, f"the value is longer than {MAX_SYSCTL_VALUE} bytes")
        bad = _CONTROL.search(value)
        if bad:
            raise InvalidArgument(where, f"the value must be one line without control characters "
                                         f"(found U+{ord(bad.group()):04X})")


def sysctl_proc_path(name: str) -> str:
    """Where a (checked) sysctl lives under /proc/sys.

    As in Kubernetes and runc: when the first separator is '.', dots separate
    and a '/' stands for a literal dot (``net.ipv4.conf.eth0/1.rp_filter`` is
    interface ``eth0.1``); when it is '/', the name is the path.
    """
    first = re.search(r"[./]", name)
    if first is None or first.group() == "/":
        return "/proc/sys/" + name
    return "/proc/sys/" + name.translate(str.maketrans("./", "/."))
