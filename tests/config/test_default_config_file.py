"""The shipped systemd/agent.toml lists every setting at its built-in default."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from agent.config import AgentConfig, from_mapping, load

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = ROOT / "systemd" / "agent.toml"


def test_default_config_file_equals_built_in_defaults() -> None:
    assert load(CONFIG_FILE) == AgentConfig()


# Sections made of entries the operator adds (one table per registry, one per
# rewrite rule) have no default entries to show; the file shows them commented.
ENTRY_SECTIONS = {"registries"}


def test_default_config_file_names_every_setting() -> None:
    # Equal values could also come from keys left out; the file must show them all.
    data = tomllib.loads(CONFIG_FILE.read_text())
    top = AgentConfig()
    for f in dataclasses.fields(top):
        assert f.name in data, f"{f.name} missing from {CONFIG_FILE}"
        section = getattr(top, f.name)
        if dataclasses.is_dataclass(section) and f.name not in ENTRY_SECTIONS:
            missing = {g.name for g in dataclasses.fields(section)} - set(data[f.name])
            assert not missing, f"[{f.name}] lacks {sorted(missing)}"


def test_commented_registry_examples_load() -> None:
    # The commented registry examples must be valid when uncommented.
    lines = []
    for line in CONFIG_FILE.read_text().splitlines():
        if line.startswith(("# [registries", "# [[registries")):
            lines.append(line[2:])
        elif lines and line.strip() and not line.startswith("#"):
            break  # the next real section
        elif lines and line.startswith("# ") and "=" in line:
            lines.append(line[2:])
    cfg = from_mapping(tomllib.loads("\n".join(lines)))
    assert [name for name, _ in cfg.registries.hosts] == ["docker.io", "registry.example:5000"]
    assert len(cfg.registries.rewrites) == 1


def test_developer_example_config_loads() -> None:
    cfg = load(ROOT / "examples" / "agent-dev.toml")
    assert cfg.server.socket != AgentConfig().server.socket
    assert cfg.state_dir != AgentConfig().state_dir
