"""The service tier runs on fakes: it must collect and pass without libvirt-python installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Imported at interpreter start (sitecustomize): makes libvirt-python look uninstalled.
BLOCKER = '''
import sys

class _NoLibvirt:
    """A meta path finder that refuses libvirt, as if libvirt-python were not installed."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in ("libvirt", "libvirtmod", "libvirt_qemu", "libvirt_lxc", "libvirtaio"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _NoLibvirt)
'''


def test_services_tier_passes_with_libvirt_blocked(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    blocked = subprocess.run([sys.executable, "-c", "import libvirt"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert blocked.returncode != 0 and "blocked by the test" in blocked.stderr, blocked.stderr

    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/services"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join((run.stdout + run.stderr).splitlines()[-40:])
    assert run.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail, tail
