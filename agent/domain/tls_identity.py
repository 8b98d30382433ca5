"""Client identities of the mTLS endpoint: allow-list entries and certificate names (pure)."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable
from typing import Any

ALLOW_ANY = "*"
_KINDS = ("dns", "uri", "ip", "cn")


def parse_allow_entry(entry: str) -> tuple[str, str]:
    """``dns:NAME``, ``uri:URI``, ``ip:ADDRESS``, ``cn:NAME`` or ``*``; raises ValueError."""
    if entry == ALLOW_ANY:
        return (ALLOW_ANY, "")
    kind, sep, value = entry.partition(":")
    kind = kind.lower()
    if not sep or kind not in _KINDS or not value:
        raise ValueError(f"{entry!r} is not one of dns:NAME, uri:URI, ip:ADDRESS, cn:NAME or *")
    if kind == "ip":
        value = str(ipaddress.ip_address(value))  # ValueError names the bad address
    elif kind == "dns":
        value = value.lower().rstrip(".")
    return (kind, value)


def identities(peercert: dict[str, Any]) -> list[tuple[str, str]]:
    """A verified peer certificate's names, from ``SSLSocket.getpeercert()``."""
    out: list[tuple[str, str]] = []
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "DNS":
            out.append(("dns", str(value).lower().rstrip(".")))
        elif kind == "URI":
            out.append(("uri", str(value)))
        elif kind == "IP Address":
            with contextlib.suppress(ValueError):
                out.append(("ip", str(ipaddress.ip_address(str(value).strip()))))
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                out.append(("cn", str(value)))
    return out


def describe(names: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{k}:{v}" for k, v in names) or "(no names)"


class AllowList:
    def __init__(self, entries: Iterable[str]) -> None:
        self._entries = frozenset(parse_allow_entry(e) for e in entries)

    def admits(self, names: list[tuple[str, str]]) -> bool:
        if (ALLOW_ANY, "") in self._entries:
            return True
        return any(n in self._entries for n in names)


def split_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); raises ValueError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: an IPv6 address goes in brackets ([::1]:PORT)")
    ipaddress.ip_address(host)
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is not 0-65535")
    return host, port
