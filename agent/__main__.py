"""podvisor-agent: flags, config, logging, then run the daemon."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import structlog

from agent import __version__, logs
from agent.config import LOG_FORMATS, LOG_LEVELS, ConfigError, load, override


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="podvisor-agent",
        description="Podvisor node agent: runs VMs as Kubernetes pods over the CRI.",
    )
    p.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    p.add_argument("--socket", type=Path, help="unix socket to serve on")
    p.add_argument("--state-dir", type=Path, help="state directory")
    p.add_argument("--log-format", choices=LOG_FORMATS)
    p.add_argument("--log-level", choices=LOG_LEVELS)
    p.add_argument("--version", action="version", version=f"podvisor-agent {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = override(load(args.config), socket=args.socket, state_dir=args.state_dir,
                       log_format=args.log_format, log_level=args.log_level)
    except ConfigError as exc:
        print(f"podvisor-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(cfg.log.format, cfg.log.level)
    # Imported after logging is set up so import-time warnings are formatted.
    from agent.daemon import Daemon, StartupError
    from agent.domain.errors import PodvisorError

    try:
        return Daemon(cfg).run()
    except (StartupError, PodvisorError) as exc:
        structlog.get_logger("agent").error("cannot start", error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
