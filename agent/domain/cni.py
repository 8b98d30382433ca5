"""CNI network configuration files: which one applies (pure parsing)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CONFIG_SUFFIXES = (".conflist", ".conf", ".json")


@dataclass(frozen=True)
class NetworkConfig:
    name: str
    cni_version: str
    plugin_types: tuple[str, ...]


def parse(raw: bytes) -> NetworkConfig:
    """Parse a .conflist (or a single-plugin .conf); ValueError says what is wrong."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("missing network name")
    if "plugins" in doc:
        plugins = doc["plugins"]
        if not isinstance(plugins, list) or not plugins:
            raise ValueError("'plugins' must be a non-empty list")
    else:
        plugins = [doc]  # a single-plugin .conf
    types = []
    for p in plugins:
        if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
            raise ValueError("every plugin needs a 'type'")
        types.append(p["type"])
    return NetworkConfig(name=name, cni_version=str(doc.get("cniVersion", "")),
                         plugin_types=tuple(types))


@dataclass(frozen=True)
class ConfigLookup:
    path: Path | None
    config: NetworkConfig | None
    # Why no config applies (or what was skipped), for NetworkReady's message.
    message: str
