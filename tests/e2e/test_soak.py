"""The soak (bench/soak.py) at 50 cycles: VM pods with pod networking, four
at a time, through one agent; afterwards nothing of theirs is left on the
host. Timing figures are the benchmark's business (`make bench`), not
asserted here.

A second run leaves one pod running on purpose and must see it as a leak of
every kind a running pod holds, so the search cannot pass by finding nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"domains", "netns", "links", "iptables", "dnsmasq", "state files", "runtime files", "leases",
         "child processes", "descriptors"}


def soak(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    if os.geteuid() != 0:
        pytest.skip("the soak needs root (libvirt's system instance, namespaces, iptables)")
    report = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--json", str(report), *args],
                          capture_output=True, text=True, timeout=3600, cwd=ROOT)
    output = done.stdout + done.stderr
    assert report.exists(), output
    return done.returncode, json.loads(report.read_text()), output


def test_fifty_cycles_leave_nothing_behind(tmp_path: Path) -> None:
    rc, report, output = soak(tmp_path, "--cycles", "50", "--parallel", "4")
    assert report["errors"] == [], output
    assert report["succeeded"] == 50, output
    assert set(report["leaks"]) == KINDS, output
    assert {kind: items for kind, items in report["leaks"].items() if items} == {}, output
    assert rc == 0, output


def test_a_pod_left_running_is_found_as_a_leak_of_every_kind_it_holds(tmp_path: Path) -> None:
    rc, report, output = soak(tmp_path, "--cycles", "2", "--parallel", "2", "--leave-one")
    assert rc == 1, output
    found = {kind for kind, items in report["leaks"].items() if items}
    assert found >= {"domains", "netns", "links", "iptables", "dnsmasq", "state files", "runtime files",
                     "leases"}, output
