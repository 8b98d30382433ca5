"""Which CNI configuration applies: one choice for both `Status` and ADD (pure).

The adapter finds the facts (the candidate files in ``[cni] conf_dirs`` with
their bytes, the plugin binaries in ``bin_dirs``); :func:`choose` picks, as
libcni does, the first file that parses and whose plugins are all present,
else the built-in network, or nothing when pod networking is disabled. Its
message is what NetworkReady reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.domain.network.cni import NetworkConfig, builtin_default_config, load_config

BUILTIN_SOURCE = "builtin"
DISABLED_SOURCE = "disabled"
# What NetworkReady reports for the built-in network and for none at all.
BUILTIN_SUMMARY = NetworkConfig("podvisor", "1.0.0", ("bridge", "host-local", "portmap"))
DISABLED_SUMMARY = NetworkConfig("none", "", ())
DISABLED_MESSAGE = "pod networking is disabled ([cni] enabled = false): VMs get no NIC"


@dataclass(frozen=True)
class NetworkSettings:
    """The ``[cni]`` settings the choice depends on."""

    enabled: bool
    conf_dirs: tuple[Path, ...]
    bin_dirs: tuple[Path, ...]
    builtin_bridge: str
    builtin_subnet: str
    # host-local's lease directory for the built-in network (None: its default).
    ipam_data_dir: Path | None = None


@dataclass(frozen=True)
class ConfigFile:
    """A candidate configuration file: its bytes, or why it could not be read."""

    path: Path
    raw: bytes | None
    error: str = ""


@dataclass(frozen=True)
class CNIFacts:
    """What the host has: candidate files in search order, plugin binaries."""

    files: tuple[ConfigFile, ...]
    plugins: frozenset[str]


@dataclass(frozen=True)
class NetworkChoice:
    """The configuration to use, and NetworkReady's message about it."""

    message: str
    config: NetworkConfig
    # The file used; None for the built-in network or none at all.
    path: Path | None = None
    # The document ADD runs (a file's as read, or the built-in list); None
    # when pod networking is disabled.
    conflist: Mapping[str, Any] | None = None

    @property
    def source(self) -> str:
        """Where the configuration came from: the file, "builtin" or "disabled"."""
        if self.path is not None:
            return str(self.path)
        return BUILTIN_SOURCE if self.conflist is not None else DISABLED_SOURCE


def choose(settings: NetworkSettings, facts: CNIFacts | None) -> NetworkChoice:
    """The configuration ADD uses and `Status` reports (``facts`` may be None
    when networking is disabled: nothing is looked at then)."""
    if not settings.enabled or facts is None:
        return NetworkChoice(DISABLED_MESSAGE, DISABLED_SUMMARY)
    skipped: list[str] = []
    for candidate in facts.files:
        if candidate.raw is None:
            skipped.append(f"{candidate.path}: {candidate.error}")
            continue
        try:
            doc, parsed = load_config(candidate.raw)
        except ValueError as exc:
            skipped.append(f"{candidate.path}: {exc}")
            continue
        missing = [t for t in parsed.plugin_types if t not in facts.plugins]
        if missing:
            skipped.append(f"{candidate.path}: plugin binaries not found: {', '.join(missing)}")
            continue
        return NetworkChoice(f"using {candidate.path} (network {parsed.name})", parsed, candidate.path, doc)
    dirs = ", ".join(str(d) for d in settings.conf_dirs)
    detail = f"; skipped {'; '.join(skipped)}" if skipped else ""
    builtin = builtin_default_config(settings.builtin_bridge, settings.builtin_subnet,
                                     ipam_data_dir=settings.ipam_data_dir)
    return NetworkChoice(f"no valid CNI network configuration in {dirs}{detail}; using the built-in network "
                         f"(bridge {settings.builtin_bridge}, subnet {settings.builtin_subnet})",
                         BUILTIN_SUMMARY, None, builtin)
