"""linux.cgroup_parent → the pod's cgroup and how the VM reaches it (agent/domain/cgroups.py)."""

from __future__ import annotations

import pytest

from agent.domain.cgroups import FIELD, PodCgroup, pod_cgroup
from agent.domain.errors import InvalidArgument


@pytest.mark.parametrize(("parent", "expected"), [
    ("", None),
    ("/kubepods/burstable/pod6c1f4f0e-3b7a-4d59-9a52-1f0d2b9e7c11",
     PodCgroup("cgroupfs", "/kubepods/burstable/pod6c1f4f0e-3b7a-4d59-9a52-1f0d2b9e7c11", "")),
    ("/kubepods/pod12/", PodCgroup("cgroupfs", "/kubepods/pod12", "")),
    ("kubepods-burstable-pod6c1f4f0e_3b7a.slice",
     PodCgroup("systemd", "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6c1f4f0e_3b7a.slice",
               "/kubepods/burstable/pod6c1f4f0e_3b7a")),
    ("kubepods.slice", PodCgroup("systemd", "/kubepods.slice", "/kubepods")),
])
def test_cgroup_parents_resolve(parent: str, expected: PodCgroup | None) -> None:
    assert pod_cgroup(parent) == expected


def test_only_cgroupfs_paths_are_placed_by_the_agent() -> None:
    cgroupfs, slice_ = pod_cgroup("/kubepods/pod1"), pod_cgroup("kubepods-pod1.slice")
    assert cgroupfs is not None and cgroupfs.placed_by_agent
    assert slice_ is not None and not slice_.placed_by_agent


@pytest.mark.parametrize("parent", [
    "kubepods", "/", "/kubepods/../etc", "/kubepods//pod1", "/kubepods/./pod1", "/kube pods/pod1",
    "/kubepods/pod1\n", "/kubepods/pod\u00011", "kubepods--pod1.slice", "-kubepods.slice", "a.slice/b",
    "/" + "a" * 2000,
])
def test_malformed_cgroup_parents_are_invalid_arguments(parent: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        pod_cgroup(parent)
    assert exc.value.field == FIELD
