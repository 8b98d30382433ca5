"""The libvirt adapter's guest-agent command against the real libvirt (qemu:///system, TCG).

The domains have no operating system (an empty disk), so their agent never
connects: exactly what a booting guest looks like to libvirt. A domain with
the channel answers "not ready" (the exec service waits on that), one
without it "no channel", a stopped one "not running", an unknown name
NotFound. The guest answering real commands is proven end to end on the
Debian guest (tests/e2e/test_exec.py).
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.libvirt import Libvirt
from agent.domain.errors import FailedPrecondition, GuestAgentNotReady, NotFound
from agent.domain.vm import DomainSpec
from tests.integration.test_domain_xml_libvirt import URI, _define, _prepare, _undefine, _virsh, qemu_dir  # noqa: F401

PING = {"execute": "guest-ping"}


@pytest.fixture(scope="module")
def libvirt() -> Iterator[Libvirt]:
    conn = Libvirt(URI)
    conn.start()
    try:
        yield conn
    finally:
        conn.close()


def _spec(root: Path, channel: bool) -> DomainSpec:
    # The "no-nic" case: no bridge needed; the agent channel added or not.
    spec = _prepare("no-nic", root)
    return dataclasses.replace(spec, guest_agent_socket=str(root / "qga.sock") if channel else "")


def _started(root: Path, channel: bool) -> str:
    spec = _spec(root, channel)
    _define(spec, root)
    _virsh("start", spec.name)
    return spec.name


def _gone(name: str) -> None:
    _virsh("destroy", name, check=False)
    _undefine(name)


def test_a_channel_nobody_answers_on_is_not_ready(libvirt: Libvirt, qemu_dir: Path) -> None:  # noqa: F811
    name = _started(qemu_dir, channel=True)
    try:
        assert (qemu_dir / "qga.sock").is_socket()
        with pytest.raises(GuestAgentNotReady, match="did not answer"):
            libvirt.guest_agent_command(name, PING, 1)
    finally:
        _gone(name)


def test_a_domain_without_the_channel_says_so(libvirt: Libvirt, qemu_dir: Path) -> None:  # noqa: F811
    name = _started(qemu_dir, channel=False)
    try:
        with pytest.raises(FailedPrecondition, match="no guest agent channel.*guest-agent"):
            libvirt.guest_agent_command(name, PING, 1)
    finally:
        _gone(name)


def test_a_stopped_domain_is_not_running(libvirt: Libvirt, qemu_dir: Path) -> None:  # noqa: F811
    spec = _spec(qemu_dir, channel=True)
    _define(spec, qemu_dir)
    try:
        with pytest.raises(FailedPrecondition, match="not running"):
            libvirt.guest_agent_command(spec.name, PING, 1)
    finally:
        _undefine(spec.name)


def test_an_unknown_domain_is_not_found(libvirt: Libvirt) -> None:
    with pytest.raises(NotFound):
        libvirt.guest_agent_command("podvisor-test-no-such-domain", PING, 1)


def test_virsh_is_still_usable() -> None:
    assert subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=60).returncode == 0
