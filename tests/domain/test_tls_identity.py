"""The mTLS endpoint's identities: allow-list entries, certificate names, HOST:PORT."""

from __future__ import annotations

import pytest

from agent.domain.tls_identity import AllowList, describe, identities, parse_allow_entry, split_listen

PEER = {
    "subject": ((("countryName", "EU"),), (("commonName", "Shim One"),)),
    "subjectAltName": (("DNS", "Shim.Example."), ("URI", "spiffe://lab/shim"), ("IP Address", "10.0.0.7\n"),
                       ("IP Address", "2001:DB8:0:0:0:0:0:1"), ("email", "a@b")),
}


def test_identities_of_a_peer_certificate() -> None:
    names = identities(PEER)
    assert names == [("dns", "shim.example"), ("uri", "spiffe://lab/shim"), ("ip", "10.0.0.7"),
                     ("ip", "2001:db8::1"), ("cn", "Shim One")]
    assert describe(names) == "dns:shim.example,uri:spiffe://lab/shim,ip:10.0.0.7,ip:2001:db8::1,cn:Shim One"
    assert describe([]) == "(no names)"


@pytest.mark.parametrize("entry, admitted", [
    ("dns:SHIM.example", True), ("uri:spiffe://lab/shim", True), ("uri:spiffe://lab/SHIM", False),
    ("ip:10.0.0.7", True), ("ip:2001:db8::1", True), ("cn:Shim One", True), ("cn:shim one", False),
    ("dns:other.example", False), ("*", True),
])
def test_allow_list(entry: str, admitted: bool) -> None:
    assert AllowList([entry]).admits(identities(PEER)) is admitted


def test_an_empty_list_admits_nobody() -> None:
    assert not AllowList([]).admits(identities(PEER))


@pytest.mark.parametrize("entry", ["shim", "dns:", "email:a@b", "ip:10.0.0.300", ":x"])
def test_bad_entries(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_allow_entry(entry)


@pytest.mark.parametrize("text, result", [
    ("127.0.0.1:10010", ("127.0.0.1", 10010)), ("[::]:0", ("::", 0)), ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_split_listen(text: str, result: tuple[str, int]) -> None:
    assert split_listen(text) == result


@pytest.mark.parametrize("text", ["localhost:1", "127.0.0.1", ":80", "1.2.3.4:x", "1.2.3.4:65536", "::1:80"])
def test_split_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        split_listen(text)
