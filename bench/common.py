"""What every benchmark needs: a real agent process on its own state, socket
and (optional) CNI configuration, and percentiles."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def start_agent(workdir: Path, *, virt_type: str = "auto",
                cni_conf_dir: Path | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    """Start podvisor-agent under ``workdir``; pod networking only with ``cni_conf_dir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    # QEMU's user must traverse to the state (the agent checks it at start).
    workdir.chmod(0o711)
    sock = workdir / "a.sock"
    cni = (f'[cni]\nenabled = true\nconf_dirs = ["{cni_conf_dir}"]\n' if cni_conf_dir is not None
           else "[cni]\nenabled = false\n")
    cfg = workdir / "agent.toml"
    cfg.write_text(
        f'state_dir = "{workdir / "state"}"\nruntime_dir = "{workdir}"\n[server]\nsocket = "{sock}"\n'
        f'[libvirt]\nvirt_type = "{virt_type}"\n{cni}[log]\nformat = "json"\nlevel = "info"\n'
    )
    log = open(workdir / "agent.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"agent did not start; see {workdir / 'agent.log'}")
        time.sleep(0.05)
    return proc, sock
