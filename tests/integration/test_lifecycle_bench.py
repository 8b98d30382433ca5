"""bench/lifecycle.py's code path with three pods against both runtimes, the
agent and Debian's containerd 1.6 (started by the bench on its own state,
socket, runc root and cgroup, with its own pause image in a loopback
registry): every call succeeds and nothing of either runtime is left, while
they run or after the bench's clean-up. Timing is the benchmark's business
(`make bench`), never asserted here.

A second run leaves one pod of each runtime running on purpose; the leak
check must then find it in every kind a running pod holds, so the check
cannot pass by finding nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("RunPodSandbox", "PodSandboxStatus", "StopPodSandbox", "RemovePodSandbox")
KINDS = {
    "agent": {"sandboxes", "netns", "links", "iptables", "leases", "state files"},
    "containerd": {"sandboxes", "netns", "links", "iptables", "leases", "processes", "runc state", "mounts",
                   "CNI cache"},
}
AFTER = {"processes", "mounts", "netns", "containerd's CNI cache", "shim sockets", "cgroups", "work directory"}


def bench(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    if os.geteuid() != 0:
        pytest.skip("the lifecycle bench needs root (namespaces, iptables, containerd)")
    for tool in ("containerd", "runc", "skopeo", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing: scripts/install-deps.sh --test")
    report = tmp_path / "lifecycle.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "lifecycle.py"), "--json", str(report), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    output = done.stdout + done.stderr
    assert report.exists(), output
    return done.returncode, json.loads(report.read_text()), output


def test_three_pods_on_each_runtime_succeed_and_leave_nothing(tmp_path: Path) -> None:
    rc, report, output = bench(tmp_path, "--pods", "3")
    assert report["errors"] == [], output
    for runtime in ("agent", "containerd"):
        times = report["results"][runtime]["times"]
        # Every call of every pod answered (the untimed warm-up pod is not counted).
        assert {step: len(times[step]) for step in STEPS} == dict.fromkeys(STEPS, 3), output
        assert len(report["results"][runtime]["totals"]) == 3, output
        assert set(report["leftovers"][runtime]) == KINDS[runtime], output
        assert {kind: items for kind, items in report["leftovers"][runtime].items() if items} == {}, output
    assert set(report["after_cleanup"]) == AFTER, output
    assert {kind: items for kind, items in report["after_cleanup"].items() if items} == {}, output
    assert rc == 0, output


def test_a_pod_left_running_is_found_by_the_leak_check(tmp_path: Path) -> None:
    rc, report, output = bench(tmp_path, "--pods", "2", "--leave-one")
    assert report["errors"] == [], output
    for runtime, must in (("agent", {"sandboxes", "netns", "links", "iptables", "leases", "state files"}),
                          ("containerd", {"sandboxes", "netns", "iptables", "leases", "processes", "runc state",
                                          "mounts", "CNI cache"})):
        found = {kind for kind, items in report["leftovers"][runtime].items() if items}
        assert found >= must, output
    # The bench's own clean-up still removes it all.
    assert {kind: items for kind, items in report["after_cleanup"].items() if items} == {}, output
    assert rc == 1, output
