"""What every benchmark needs: a real agent process on its own state, socket
and (optional) CNI configuration, and percentiles."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_DIR = Path("/var/cache/podvisor/images/tiny")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


@contextmanager
def tiny_image(workdir: Path, repository: str = "bench/tiny") -> Iterator[str]:
    """The tiny test guest (built once per machine) pushed as a containerDisk
    to a loopback registry under ``workdir``; yields its reference while the
    registry runs."""
    from agent.adapters.registry import RegistryClient
    from agent.cli import oci_layout
    from agent.domain.imageref import RemoteRepository
    from tests.integration.registry_fixture import run_registry

    subprocess.run([str(ROOT / "images/tiny/build.sh"), str(TINY_DIR)], check=True)
    with run_registry(workdir / "registry") as registry:
        layout = workdir / "layout"
        built = oci_layout.build(TINY_DIR / "tiny.qcow2", layout, "1")
        with RegistryClient(timeout=120) as client:
            oci_layout.push(client, layout, built, RemoteRepository(
                registry=registry.host, host=registry.host, name=repository), "1")
        yield f"{registry.host}/{repository}:1"


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
    deadline = time.monotonic() + 180  # a loaded machine: recovery and the libvirt probe take a while
    while not sock.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()  # never left running behind the benchmark
            proc.wait(30)
            raise SystemExit(f"agent did not start; see {workdir / 'agent.log'}")
        time.sleep(0.05)
    return proc, sock
