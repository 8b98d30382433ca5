"""Choosing the virtualisation type: kvm only where guests really run on it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KvmFacts:
    """What the host tells about /dev/kvm (gathered by agent.adapters.kvm)."""

    device_present: bool
    device_usable: bool  # opened read-write here, and openable by libvirt's QEMU user
    pvm: bool  # /sys/module/kvm_pvm exists: a paravirtual PVM device
    # Result of booting firmware under KVM: None when not run.
    probe_ok: bool | None = None
    probe_detail: str = ""


@dataclass(frozen=True)
class VirtChoice:
    virt_type: str  # "kvm" or "qemu"
    reason: str


def needs_probe(configured: str, facts: KvmFacts) -> bool:
    """Whether a firmware boot under KVM must decide (auto mode, nothing decisive yet)."""
    return (
        configured == "auto"
        and facts.device_present
        and facts.device_usable
        and not facts.pvm
        and facts.probe_ok is None
    )


def choose(configured: str, facts: KvmFacts) -> VirtChoice:
    """Pure decision from the configured value and the host facts."""
    if configured == "qemu":
        return VirtChoice("qemu", "configured virt_type = qemu (TCG)")
    if configured == "kvm":
        return VirtChoice("kvm", "configured virt_type = kvm")
    if not facts.device_present:
        return VirtChoice("qemu", "no /dev/kvm on this host: using TCG")
    if not facts.device_usable:
        return VirtChoice(
            "qemu", "/dev/kvm cannot be opened read-write by QEMU (want group kvm, mode 0660): using TCG"
        )
    if facts.pvm:
        return VirtChoice(
            "qemu",
            "/dev/kvm is a paravirtual PVM device (kvm_pvm loaded), on which ordinary "
            "guests do not boot: using TCG",
        )
    if facts.probe_ok is False:
        detail = f" ({facts.probe_detail})" if facts.probe_detail else ""
        return VirtChoice("qemu", f"a test guest failed under KVM{detail}: using TCG")
    if facts.probe_ok is None:
        return VirtChoice("qemu", "KVM was not probed: using TCG")
    return VirtChoice("kvm", "/dev/kvm works: a test guest booted under KVM")
