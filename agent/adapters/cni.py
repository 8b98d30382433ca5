"""CNI on the host: finding the network configuration (plugins run here later)."""

from __future__ import annotations

from pathlib import Path

from agent.domain import cni
from agent.domain.cni import ConfigLookup


def find_config(conf_dirs: tuple[Path, ...], bin_dirs: tuple[Path, ...]) -> ConfigLookup:
    """The first valid configuration in lexical order, as libcni picks it."""
    skipped: list[str] = []
    for conf_dir in conf_dirs:
        try:
            entries = sorted(p for p in conf_dir.iterdir() if p.suffix in cni.CONFIG_SUFFIXES)
        except OSError:
            continue
        for path in entries:
            try:
                parsed = cni.parse(path.read_bytes())
            except (OSError, ValueError) as exc:
                skipped.append(f"{path}: {exc}")
                continue
            missing = [t for t in parsed.plugin_types
                       if not any((d / t).is_file() for d in bin_dirs)]
            if missing:
                skipped.append(f"{path}: plugin binaries not found: {', '.join(missing)}")
                continue
            return ConfigLookup(path, parsed, f"using {path} (network {parsed.name})")
    dirs = ", ".join(str(d) for d in conf_dirs)
    detail = f"; skipped {'; '.join(skipped)}" if skipped else ""
    return ConfigLookup(None, None, f"no valid CNI network configuration in {dirs}{detail}")
