"""What every benchmark needs: a real agent process on its own state, socket
and (optional) CNI configuration, and percentiles."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TINY_DIR = Path("/var/cache/podvisor/images/tiny")
DEBIAN_DIR = Path("/var/cache/podvisor/images/debian")


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; nothing for None or a process already gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def private_cni_network(work: Path, bridge_prefix: str, name: str) -> tuple[str, dict[str, Any]]:
    """A bridge + host-local + portmap network of the benchmark's own (a fresh
    bridge name and a random /24 in 10.230-249.x), written to ``work/net.d``.
    Returns the bridge name (to delete at the end) and the configuration list."""
    suffix = secrets.token_hex(3)
    bridge = f"{bridge_prefix}{suffix}"
    conflist: dict[str, Any] = {
        "cniVersion": "1.0.0", "name": f"{name}-{suffix}",
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local",
                      "ranges": [[{"subnet": f"10.{230 + secrets.randbelow(20)}.{secrets.randbelow(250)}.0/24"}]],
                      "dataDir": str(work / "ipam"), "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}
    (work / "net.d").mkdir()
    (work / "net.d" / "10-bench.conflist").write_text(json.dumps(conflist))
    return bridge, conflist


@contextmanager
def pushed_image(disk: Path, workdir: Path, repository: str, tag: str,
                 timeout: float = 120) -> Iterator[str]:
    """``disk`` pushed as a containerDisk to a loopback registry under
    ``workdir``; yields its reference while the registry runs."""
    from agent.adapters.registry import RegistryClient
    from agent.cli import oci_layout
    from agent.domain.imageref import RemoteRepository
    from tests.integration.registry_fixture import run_registry

    with run_registry(workdir / "registry") as registry:
        layout = workdir / "layout"
        built = oci_layout.build(disk, layout, tag)
        with RegistryClient(timeout=timeout) as client:
            oci_layout.push(client, layout, built, RemoteRepository(
                registry=registry.host, host=registry.host, name=repository), tag)
        yield f"{registry.host}/{repository}:{tag}"


@contextmanager
def tiny_image(workdir: Path, repository: str = "bench/tiny") -> Iterator[str]:
    """The tiny test guest (built once per machine) as a containerDisk in a
    loopback registry under ``workdir``; yields its reference while the
    registry runs."""
    subprocess.run([str(ROOT / "images/tiny/build.sh"), str(TINY_DIR)], check=True)
    with pushed_image(TINY_DIR / "tiny.qcow2", workdir, repository, "1") as ref:
        yield ref


@contextmanager
def debian_image(workdir: Path, repository: str = "bench/debian") -> Iterator[str]:
    """The stock Debian 12 guest (images/debian, built once per machine) as a
    containerDisk in a loopback registry under ``workdir``."""
    subprocess.run([str(ROOT / "images/debian/build.sh"), str(DEBIAN_DIR)], check=True, timeout=3600)
    with pushed_image(DEBIAN_DIR / "debian.qcow2", workdir, repository, "12", timeout=600) as ref:
        yield ref


def start_agent(workdir: Path, *, virt_type: str = "auto", cni_conf_dir: Path | None = None,
                extra_config: str = "") -> tuple[subprocess.Popen[bytes], Path]:
    """Start podvisor-agent under ``workdir``; pod networking only with ``cni_conf_dir``;
    ``extra_config``: more TOML sections."""
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
        "[metrics]\nport = 0\n"  # never the fixed port another agent may hold
        + extra_config
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
