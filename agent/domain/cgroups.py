"""The pod's cgroup: where kubelet wants a sandbox's processes, and how the VM gets there (pure).

kubelet creates a cgroup per pod before RunPodSandbox and passes it as
``linux.cgroup_parent``; its limits and eviction see what runs below it. Its
spelling depends on kubelet's cgroup driver:

* ``cgroupfs``: a path in the cgroup hierarchy, ``/kubepods/burstable/pod<uid>``;
* ``systemd``: a slice name, ``kubepods-burstable-pod<uid_with_underscores>.slice``,
  which systemd places at ``/kubepods.slice/kubepods-burstable.slice/…`` (every
  dash-separated prefix is a parent slice).

libvirt's ``<resource><partition>`` names a cgroup in its own convention: on a
host without systemd it appends ``.partition`` to every path component that
has no dot (except a top-level ``machine``, ``system`` or ``user``), so
``/kubepods/burstable/pod<uid>`` would become
``/kubepods.partition/burstable.partition/pod<uid>.partition``, not kubelet's
cgroup; with systemd (machined) it turns ``/a/b/c`` into the slice
``a-b-c.slice``. So:

* a slice name becomes the partition ``/kubepods/burstable/pod<uid>``, which
  libvirt's machined support maps back to exactly kubelet's slice;
* a cgroupfs path cannot be named as a partition: the agent itself moves QEMU
  into ``<cgroup_parent>/<container id>`` right after the domain starts
  (``PodCgroup.partition`` is then "").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.domain.errors import InvalidArgument

FIELD = "config.linux.cgroup_parent"

_SLICE_UNIT = re.compile(r"^[A-Za-z0-9_.:]+(-[A-Za-z0-9_.:]+)*\.slice$")
_COMPONENT = re.compile(r"^[A-Za-z0-9_.:@+=-]+$")
MAX_CGROUP_PATH = 1024


@dataclass(frozen=True)
class PodCgroup:
    """A sandbox's ``cgroup_parent``, resolved."""

    driver: str  # "cgroupfs" or "systemd"
    path: str  # the cgroup's path inside every hierarchy, "/kubepods/burstable/pod<uid>"
    # libvirt's <resource><partition> for this cgroup; "" when the agent places QEMU itself.
    partition: str

    @property
    def placed_by_agent(self) -> bool:
        return not self.partition


def _slice(name: str) -> PodCgroup:
    stem = name.removesuffix(".slice")
    parts = stem.split("-")
    if any(not p or p.startswith(".") for p in parts):
        raise InvalidArgument(FIELD, f"{name!r} is not a systemd slice name such as kubepods-burstable-pod<uid>.slice")
    path = "/" + "/".join("-".join(parts[:i + 1]) + ".slice" for i in range(len(parts)))
    return PodCgroup(driver="systemd", path=path, partition="/" + "/".join(parts))


def pod_cgroup(cgroup_parent: str) -> PodCgroup | None:
    """Resolve ``linux.cgroup_parent`` (None when kubelet gave none); InvalidArgument names the field."""
    if not cgroup_parent:
        return None
    if len(cgroup_parent) > MAX_CGROUP_PATH:
        raise InvalidArgument(FIELD, f"longer than {MAX_CGROUP_PATH} characters")
    if not cgroup_parent.startswith("/"):
        if _SLICE_UNIT.fullmatch(cgroup_parent):
            return _slice(cgroup_parent)
        raise InvalidArgument(FIELD, f"{cgroup_parent[:80]!r} is neither an absolute cgroup path (cgroupfs driver) "
                                     "nor a slice name (systemd driver)")
    parts = cgroup_parent.strip("/").split("/")
    if cgroup_parent == "/" or any(p in ("", ".", "..") or not _COMPONENT.fullmatch(p) for p in parts):
        raise InvalidArgument(FIELD, f"{cgroup_parent[:80]!r} must be a normalised cgroup path below the root, "
                                     "of letters, digits and '_.:@+=-'")
    return PodCgroup(driver="cgroupfs", path="/" + "/".join(parts), partition="")
