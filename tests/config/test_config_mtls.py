"""[mtls]: the control-plane endpoint's settings and their checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.config import ConfigError, MTLSConfig

GOOD = '''
[mtls]
listen = "127.0.0.1:10010"
cert_file = "/etc/podvisor/tls/server.crt"
key_file = "/etc/podvisor/tls/server.key"
client_ca_file = "/etc/podvisor/tls/ca.crt"
allowed_clients = ["dns:shim.example", "uri:spiffe://lab/shim", "ip:10.0.0.7", "cn:Shim", "*"]
'''


def load(tmp_path: Path, text: str) -> config.AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return config.load(path)


def test_off_by_default() -> None:
    assert config.load(None).mtls == MTLSConfig()
    assert not MTLSConfig().enabled


def test_a_full_section(tmp_path: Path) -> None:
    m = load(tmp_path, GOOD).mtls
    assert m.enabled and m.listen == "127.0.0.1:10010"
    assert m.allowed_clients == ("dns:shim.example", "uri:spiffe://lab/shim", "ip:10.0.0.7", "cn:Shim", "*")
    assert (m.reload_interval_seconds, m.handshake_timeout_seconds, m.streaming_port) == (2.0, 10.0, 0)


@pytest.mark.parametrize("change, message", [
    ('listen = "localhost:10010"', r"\[mtls\] listen: .*HOST:PORT with an IP address"),
    ('listen = "127.0.0.1"', r"\[mtls\] listen"),
    ('listen = "127.0.0.1:70000"', r"\[mtls\] listen: port 70000"),
    ('cert_file = ""', r"\[mtls\] cert_file: required when listen is set"),
    ('key_file = "server.key"', r"\[mtls\] key_file: must be an absolute path"),
    ("allowed_clients = []", r"\[mtls\] allowed_clients: empty, so every client would be refused"),
    ('allowed_clients = ["shim"]', r"\[mtls\] allowed_clients: 'shim' is not one of"),
    ('allowed_clients = ["ip:10.0.0.300"]', r"\[mtls\] allowed_clients: .*10.0.0.300"),
    ("allowed_clients = [1]", r"\[mtls\] allowed_clients: expected a list of identities"),
    ('listen = "0.0.0.0:10010"', r"\[mtls\] streaming_url_host: required when the streaming server listens"),
    ('streaming_address = "host"', r"\[mtls\] streaming_address: 'host' is not an IP address"),
    ("handshake_timeout_seconds = 0", r"\[mtls\] handshake_timeout_seconds: must be greater than 0"),
    ("streaming_port = 70000", r"\[mtls\] streaming_port"),
    ("bogus = 1", r"\[mtls\] bogus: unknown setting"),
])
def test_bad_settings_name_the_key(tmp_path: Path, change: str, message: str) -> None:
    key = change.split(" ")[0]
    lines = [line for line in GOOD.splitlines() if not line.startswith(f"{key} ")]
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, "\n".join([*lines, change]) + "\n")


def test_wildcard_with_a_url_host(tmp_path: Path) -> None:
    text = GOOD.replace('"127.0.0.1:10010"', '"[::]:10010"') + 'streaming_url_host = "node1.example"\n'
    m = load(tmp_path, text).mtls
    assert m.listen == "[::]:10010" and m.streaming_url_host == "node1.example"
