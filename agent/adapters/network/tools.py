"""Running the host's network tools (ip, iptables, dnsmasq): one timeout,
and their failures as domain errors."""

from __future__ import annotations

import subprocess

from agent.domain.errors import Internal

TIMEOUT = 30.0


def run(args: list[str], *, what: str, check: bool = True,
        stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a tool to completion; Internal when it is missing, hangs or (with
    ``check``) fails, naming ``what`` was being done and stderr's last line."""
    try:
        proc = subprocess.run(args, input=stdin, capture_output=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise Internal(f"{what}: {args[0]} took longer than {TIMEOUT:.0f}s") from None
    except FileNotFoundError:
        raise Internal(f"{what}: {args[0]} is not installed") from None
    if check and proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        raise Internal(f"{what}: {' '.join(args[:6])} failed: {message[-1] if message else proc.returncode}")
    return proc
