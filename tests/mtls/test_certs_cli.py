"""``podvisorctl certs init`` and the endpoint flags of ``agent.cli.connect``."""

from __future__ import annotations

import argparse
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.cli import connect, main


def test_certs_init_writes_a_working_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "tls"
    assert main.main(["certs", "init", str(d), "--server-name", "node1.example", "--san", "10.0.0.5",
                      "--client-name", "shim-a"]) == 0
    out = capsys.readouterr().out
    assert 'allowed_clients = ["dns:shim-a"]' in out and "--endpoint tcp://node1.example:10010" in out
    for name in ("ca.key", "server.key", "client.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    server = x509.load_pem_x509_certificate((d / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"node1.example", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1", "10.0.0.5"}
    client = x509.load_pem_x509_certificate((d / "client.crt").read_bytes())
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # the pieces fit: OpenSSL loads the pairs and trusts the chain
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "server.crt", d / "server.key")
    ctx.load_verify_locations(d / "ca.crt")


def test_certs_init_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    assert main.main(["certs", "init", str(d)]) == 0
    before = (d / "ca.key").read_bytes()
    with pytest.raises(SystemExit, match="already holds ca.crt"):
        main.main(["certs", "init", str(d)])
    assert (d / "ca.key").read_bytes() == before


@pytest.mark.parametrize("endpoint, target", [
    ("tcp://node1:10010", "node1:10010"), ("tcp://10.0.0.5:1", "10.0.0.5:1"), ("tcp://[::1]:10010", "[::1]:10010"),
    ("unix:///run/podvisor/podvisor.sock", None),
])
def test_endpoints(endpoint: str, target: str | None) -> None:
    assert connect.tcp_target(endpoint) == target


@pytest.mark.parametrize("endpoint, message", [
    ("tcp://node1", "needs a port"), ("http://node1:80", "expected unix:///PATH or tcp://HOST:PORT"),
    ("tcp://node1:99999", "needs a port"), ("node1:10010", "expected unix"),
])
def test_bad_endpoints(endpoint: str, message: str) -> None:
    with pytest.raises(connect.EndpointError, match=message):
        connect.tcp_target(endpoint)


def test_tcp_needs_all_three_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main.main(["--endpoint", "tcp://127.0.0.1:1", "--cert", "c.crt", "version"]) == 1
    assert "mutual TLS needs --key, --ca" in capsys.readouterr().err
    assert main.main(["--endpoint", "tcp://127.0.0.1:1", "--cert", "c", "--key", "k", "--ca",
                      str(tmp_path / "missing.crt"), "version"]) == 1
    assert "--ca" in capsys.readouterr().err
    args = argparse.Namespace(endpoint="unix:///tmp/x.sock", socket="/run/other.sock")
    assert connect.remote_channel(args) is None and args.socket == "/tmp/x.sock"
