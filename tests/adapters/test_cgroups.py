"""PodCgroups (agent/adapters/cgroups.py) over a fake mountinfo and plain directories.

The real cgroup filesystems are exercised by tests/e2e/test_vm_cgroup.py;
here, ordinary files stand in for the cgroup knobs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.adapters.cgroups import PodCgroups, hierarchies
from agent.domain.errors import FailedPrecondition

POD = "/kubepods/burstable/pod1"


def _mountinfo(tmp_path: Path) -> Path:
    root = tmp_path / "cg"
    lines = [
        "22 1 0:20 / / rw,relatime - ext4 /dev/sda1 rw",
        f"30 22 0:26 / {root}/cpuset rw,relatime - cgroup cgroup rw,cpuset",
        f"31 22 0:27 / {root}/memory rw,relatime - cgroup cgroup rw,memory",
        f"32 22 0:27 / {root}/memory-again rw,relatime - cgroup cgroup rw,memory",  # same hierarchy twice
        f"33 22 0:28 / {root}/uni\\040fied rw,relatime - cgroup2 cgroup2 rw",
        f"34 22 0:29 /nested {root}/ns rw,relatime - cgroup cgroup rw,pids",  # a cgroup namespace's view
        f"35 22 0:30 / {root}/devices rw,relatime - cgroup cgroup rw,devices",
    ]
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return path


def _pod(tmp_path: Path, *hierarchy: str) -> None:
    for h in hierarchy:
        d = tmp_path / "cg" / h / POD.lstrip("/")
        d.mkdir(parents=True)
        if h == "cpuset":
            (d / "cpuset.cpus").write_text("0-1\n")
            (d / "cpuset.mems").write_text("0\n")


def test_hierarchies_are_read_once_each_with_escapes_undone(tmp_path: Path) -> None:
    found = hierarchies(_mountinfo(tmp_path))
    assert [(h.mount.name, h.version, sorted(h.controllers)) for h in found] == [
        ("cpuset", 1, ["cpuset", "rw"]), ("memory", 1, ["memory", "rw"]), ("uni fied", 2, []),
        ("ns", 1, ["pids", "rw"]), ("devices", 1, ["devices", "rw"])]
    ns = found[-2]
    assert ns.directory("/nested/kubepods") == ns.mount / "kubepods"
    assert ns.directory("/kubepods") is None


def test_place_creates_the_vm_cgroup_and_moves_the_process(tmp_path: Path) -> None:
    cg = PodCgroups(_mountinfo(tmp_path))
    _pod(tmp_path, "cpuset", "memory", "uni fied", "devices")
    for h in ("cpuset",):  # a new cpuset cgroup starts empty, as the kernel makes it
        child = tmp_path / "cg" / h / POD.lstrip("/") / "c1"
        child.mkdir()
        (child / "cpuset.cpus").write_text("")
        (child / "cpuset.mems").write_text("")
    assert cg.exists(POD)
    cg.place(POD, "c1", 4242)
    for h in ("cpuset", "memory", "uni fied"):
        assert (tmp_path / "cg" / h / POD.lstrip("/") / "c1" / "cgroup.procs").read_text() == "4242"
    # libvirt's device whitelist keeps QEMU.
    assert not (tmp_path / "cg" / "devices" / POD.lstrip("/") / "c1").exists()
    child = tmp_path / "cg" / "cpuset" / POD.lstrip("/") / "c1"
    assert ((child / "cpuset.cpus").read_text(), (child / "cpuset.mems").read_text()) == ("0-1\n", "0\n")
    assert (tmp_path / "cg/memory" / POD.lstrip("/") / "c1/memory.move_charge_at_immigrate").read_text() == "3"


def test_a_missing_pod_cgroup_is_a_failed_precondition(tmp_path: Path) -> None:
    cg = PodCgroups(_mountinfo(tmp_path))
    assert not cg.exists(POD)
    with pytest.raises(FailedPrecondition, match="does not exist in any cgroup hierarchy"):
        cg.place(POD, "c1", 4242)


def test_remove_takes_the_vm_cgroup_away_and_tolerates_a_busy_one(tmp_path: Path) -> None:
    cg = PodCgroups(_mountinfo(tmp_path))
    _pod(tmp_path, "memory", "uni fied")
    cg.place(POD, "c1", 1)
    # Plain directories with a file inside behave like a busy cgroup: rmdir fails.
    cg.remove(POD, "c1")
    assert (tmp_path / "cg/memory" / POD.lstrip("/") / "c1").exists()
    for h in ("memory", "uni fied"):
        for f in (tmp_path / "cg" / h / POD.lstrip("/") / "c1").iterdir():
            f.unlink()
    cg.remove(POD, "c1")
    assert not (tmp_path / "cg/memory" / POD.lstrip("/") / "c1").exists()
    cg.remove(POD, "c1")  # again: nothing to do
