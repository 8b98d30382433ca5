"""The libvirt adapter's guest_shutdown (QGA guest-shutdown, for guests that
ignore ACPI) against the real libvirtd: it fails cleanly, and soon, where
there is no agent to ask, and is a no-op on a domain that is not running.
StopContainer asks it aside and never waits on it (tests/services); this
shows what it meets in practice.

The domains are the renderer's minimal ones (no OS on the disk, no NIC),
under unique names, removed at the end.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.libvirt import Libvirt
from agent.domain.errors import PodvisorError
from tests.integration.test_domain_xml_libvirt import _define, _prepare, _undefine, _virsh, qemu_dir  # noqa: F401


@pytest.fixture
def hypervisor() -> Iterator[Libvirt]:
    lv = Libvirt("qemu:///system")
    try:
        yield lv
    finally:
        lv.close()


def _call(fn: object, name: str) -> BaseException | None:
    """Run ``fn(name)`` in a thread; its exception (None if it returned). A liveness
    guard, not a timing target: the call must end."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn(name)  # type: ignore[operator]
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "guest_shutdown never returned"
    return outcome[0]


@pytest.mark.parametrize("with_channel", [False, True], ids=["no-agent-channel", "agent-channel-no-agent"])
def test_guest_shutdown_without_an_agent_fails_cleanly(hypervisor: Libvirt, qemu_dir: Path,  # noqa: F811
                                                       with_channel: bool) -> None:
    spec = _prepare("no-nic", qemu_dir)
    if with_channel:
        spec = dataclasses.replace(spec, guest_agent_socket=str(qemu_dir / "qga.sock"))
    try:
        _define(spec, qemu_dir)
        _virsh("start", spec.name)
        error = _call(hypervisor.guest_shutdown, spec.name)
        assert isinstance(error, PodvisorError), error
        assert "agent" in error.message.lower()
        assert _virsh("domstate", spec.name).stdout.strip() == "running"  # nothing else happened to it
    finally:
        _virsh("destroy", spec.name, check=False)
        _undefine(spec.name)


def test_guest_shutdown_of_a_domain_that_is_not_running_is_a_no_op(hypervisor: Libvirt,
                                                                   qemu_dir: Path) -> None:  # noqa: F811
    spec = _prepare("no-nic", qemu_dir)
    try:
        _define(spec, qemu_dir)
        assert _call(hypervisor.guest_shutdown, spec.name) is None
    finally:
        _undefine(spec.name)
