"""Decision table for the virtualisation type (agent.domain.virt)."""

from __future__ import annotations

import pytest

from agent.domain.virt import KvmFacts, choose, needs_probe


def facts(
    present: bool = True,
    usable: bool = True,
    pvm: bool = False,
    probe_ok: bool | None = None,
    detail: str = "",
) -> KvmFacts:
    return KvmFacts(device_present=present, device_usable=usable, pvm=pvm, probe_ok=probe_ok,
                    probe_detail=detail)


WORKING = facts(probe_ok=True)
UNPROBED = facts()
NO_DEVICE = facts(present=False, usable=False)
NOT_USABLE = facts(usable=False)
PVM = facts(pvm=True)
PVM_PROBED_OK = facts(pvm=True, probe_ok=True)
PROBE_FAILED = facts(probe_ok=False, detail="KVM internal error. Suberror: 1")
PROBE_FAILED_NO_DETAIL = facts(probe_ok=False)

# (configured, facts, virt_type, words expected in the reason)
TABLE: list[tuple[str, KvmFacts, str, str]] = [
    # Configured values win whatever the host says.
    ("kvm", WORKING, "kvm", "configured virt_type = kvm"),
    ("kvm", NO_DEVICE, "kvm", "configured virt_type = kvm"),
    ("kvm", PVM, "kvm", "configured virt_type = kvm"),
    ("kvm", PROBE_FAILED, "kvm", "configured virt_type = kvm"),
    ("qemu", WORKING, "qemu", "configured virt_type = qemu"),
    ("qemu", NO_DEVICE, "qemu", "configured virt_type = qemu"),
    ("qemu", PVM, "qemu", "configured virt_type = qemu"),
    # auto: kvm only when a test guest booted under KVM.
    ("auto", WORKING, "kvm", "test guest booted under KVM"),
    ("auto", NO_DEVICE, "qemu", "no /dev/kvm"),
    ("auto", facts(present=False, usable=True, probe_ok=True), "qemu", "no /dev/kvm"),
    ("auto", NOT_USABLE, "qemu", "cannot be opened read-write"),
    ("auto", facts(usable=False, probe_ok=True), "qemu", "cannot be opened read-write"),
    ("auto", PVM, "qemu", "PVM"),
    ("auto", PVM_PROBED_OK, "qemu", "PVM"),
    ("auto", PROBE_FAILED, "qemu", "(KVM internal error. Suberror: 1)"),
    ("auto", PROBE_FAILED_NO_DETAIL, "qemu", "a test guest failed under KVM: using TCG"),
    ("auto", UNPROBED, "qemu", "not probed"),
]


@pytest.mark.parametrize(("configured", "host", "virt_type", "reason"), TABLE)
def test_choose(configured: str, host: KvmFacts, virt_type: str, reason: str) -> None:
    choice = choose(configured, host)
    assert choice.virt_type == virt_type
    assert reason in choice.reason


def test_failed_probe_without_detail_has_no_empty_parentheses() -> None:
    assert "()" not in choose("auto", PROBE_FAILED_NO_DETAIL).reason


@pytest.mark.parametrize(
    ("configured", "host", "expected"),
    [
        ("auto", UNPROBED, True),
        ("auto", WORKING, False),  # already probed
        ("auto", PROBE_FAILED, False),
        ("auto", NO_DEVICE, False),
        ("auto", NOT_USABLE, False),
        ("auto", PVM, False),  # never boot a guest on PVM to find out
        ("kvm", UNPROBED, False),
        ("qemu", UNPROBED, False),
    ],
)
def test_needs_probe(configured: str, host: KvmFacts, expected: bool) -> None:
    assert needs_probe(configured, host) is expected


def test_probe_then_choose_flow() -> None:
    """What the daemon does: probe only when asked to, then choose."""
    before = UNPROBED
    assert needs_probe("auto", before)
    good = facts(probe_ok=True)
    bad = facts(probe_ok=False, detail="SeaBIOS stopped")
    assert not needs_probe("auto", good)
    assert choose("auto", good).virt_type == "kvm"
    assert choose("auto", bad).virt_type == "qemu"
    assert "SeaBIOS stopped" in choose("auto", bad).reason
