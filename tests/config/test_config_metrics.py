"""[metrics]: on by default on loopback at the documented fixed port; checked keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.config import DEFAULT_METRICS_PORT, AgentConfig, ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _load(tmp_path: Path, text: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return config.load(path)


def test_on_by_default_on_loopback_at_the_documented_port() -> None:
    m = AgentConfig().metrics
    assert (m.enabled, m.address, m.port) == (True, "127.0.0.1", DEFAULT_METRICS_PORT)
    assert f"127.0.0.1:{DEFAULT_METRICS_PORT}/metrics" in (ROOT / "docs/operations.md").read_text()


def test_settings_are_loaded(tmp_path: Path) -> None:
    m = _load(tmp_path, '[metrics]\nenabled = false\naddress = "::1"\nport = 0\n').metrics
    assert (m.enabled, m.address, m.port) == (False, "::1", 0)


@pytest.mark.parametrize(("text", "message"), [
    ("[metrics]\nport = 65536\n", "[metrics] port: must be 0 (ephemeral) to 65535"),
    ("[metrics]\nport = -1\n", "[metrics] port: expected a non-negative integer"),
    ('[metrics]\nport = "9847"\n', "[metrics] port: expected a non-negative integer"),
    ('[metrics]\naddress = "localhost"\n', "[metrics] address: 'localhost' is not an IP address"),
    ('[metrics]\nenabled = "no"\n', "[metrics] enabled: expected true or false"),
    ("[metrics]\npath = \"/m\"\n", "[metrics] path: unknown setting (known: address, enabled, port)"),
])
def test_bad_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert str(err.value) == message
