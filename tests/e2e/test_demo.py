"""``make demo``, run as a user would, with a timeout: it must boot the VM,
say what runs, and (with ``PODVISOR_DEMO_CLEANUP=1``) leave nothing behind.

The demo gets its own directory (``PODVISOR_DEMO_DIR``, state and socket of
the agent it starts) and a socket nothing answers on (``PODVISOR_SOCKET``),
so it never touches another test's agent or the host's. ``-o setup``: the
test machine is set up already (``make test`` did it) and the shared venv
must not be reinstalled from here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import domains_under, purge_domains, tiny_disk  # noqa: F401

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def registry_pids() -> set[int]:
    """docker-registry processes a demo started (their config is in a podvisor-demo-registry-* dir)."""
    return set(processes_mentioning("podvisor-demo-registry-"))


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="pv-demo-", dir="/var/tmp"))
    base.chmod(0o711)
    try:
        yield base / "demo"
    finally:
        for pid in processes_mentioning(str(base)):
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        purge_domains(base)
        shutil.rmtree(base, ignore_errors=True)


def test_make_demo(demo_dir: Path, tiny_disk: Path) -> None:  # noqa: F811
    registries_before = registry_pids()
    env = dict(os.environ, PODVISOR_DEMO_DIR=str(demo_dir), PODVISOR_DEMO_CLEANUP="1",
               PODVISOR_SOCKET=str(demo_dir.parent / "nobody.sock"),
               PODVISOR_TINY_IMAGE_DIR=str(tiny_disk.parent))
    venv = Path(sys.executable).parent.parent
    result = subprocess.run(["make", "-o", "setup", "demo", f"VENV={venv}", f"TINY_IMAGE_DIR={tiny_disk.parent}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = result.stdout
    agent_log = demo_dir / "agent.log"
    assert result.returncode == 0, (f"{out[-4000:]}\n{result.stderr[-4000:]}\nagent log:\n"
                                    f"{agent_log.read_text()[-3000:] if agent_log.exists() else ''}")
    assert "starting one for the demo" in out
    assert "throwaway registry on 127.0.0.1:" in out
    assert "virtualmachine/testvm created" in out
    assert "Hello from testvm" in out  # the manifest's own cloud-init script, on the console
    assert "It said: PODVISOR-READY hostname=testvm" in out
    assert "stopped the demo's podvisor-agent" in out
    # Nothing left: no VM, no agent, no registry of the demo's.
    assert domains_under(demo_dir) == []
    assert processes_mentioning(str(demo_dir / "agent.toml")) == []
    assert registry_pids() <= registries_before
    assert not (demo_dir / "agent.pid").exists()
    sandboxes = demo_dir / "state" / "sandboxes"
    assert not sandboxes.exists() or list(sandboxes.iterdir()) == []
