"""Start-up recovery over a real Store and real SandboxFiles in a tmp state dir."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.adapters.files import SandboxFiles
from agent.adapters.store import Store
from agent.domain.errors import AlreadyExists, NotFound
from agent.domain.sandbox import SandboxState
from agent.services.ports import Ports
from agent.services.recovery import recover, recover_sandboxes
from agent.services.sandboxes import LateMembers, SandboxService
from tests.services.service_fakes import FakeClock, FakePorts, sandbox, spec

CREATING_ID = "c" * 64
READY_ID = "1" * 64
NOTREADY_ID = "2" * 64
REMOVING_ID = "d" * 64
ORPHAN_ID = "e" * 64


@dataclass
class State:
    root: Path
    store: Store
    files: SandboxFiles
    ports: Ports

    def reopen(self) -> State:
        """What a restarted agent sees: a new Store on the same file."""
        self.store.close()
        store = Store(self.root / "podvisor.db")
        files = SandboxFiles(self.root / "sandboxes")
        return State(self.root, store, files, Ports(store=store, files=files, clock=FakeClock()))


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    store = Store(tmp_path / "podvisor.db")
    files = SandboxFiles(tmp_path / "sandboxes")
    st = State(tmp_path, store, files, Ports(store=store, files=files, clock=FakeClock()))
    yield st
    st.store.close()


@pytest.fixture
def crashed(state: State) -> Iterator[State]:
    """A state dir as a crash leaves it: one sandbox in each state, plus an orphan dir."""
    for sb in (
        sandbox(READY_ID, SandboxState.READY, "ready", 10),
        sandbox(NOTREADY_ID, SandboxState.NOTREADY, "notready", 20),
        sandbox(CREATING_ID, SandboxState.CREATING, "creating", 30),
        sandbox(REMOVING_ID, SandboxState.REMOVING, "removing", 40),
    ):
        state.store.insert_sandbox(sb)
        (state.files.create_sandbox_dir(sb.id) / "marker").write_text(sb.id)
    (state.files.create_sandbox_dir(ORPHAN_ID) / "overlay.qcow2").write_bytes(b"x")
    # Not an id: never touched by the agent's cleanup.
    (state.root / "sandboxes" / "lost+found").mkdir()
    reopened = state.reopen()
    yield reopened
    reopened.store.close()


def _dirs(state: State) -> set[str]:
    return {p.name for p in (state.root / "sandboxes").iterdir()}


def test_recovery_report(crashed: State) -> None:
    report = recover_sandboxes(crashed.ports, SandboxService(crashed.ports, LateMembers()))
    assert report.kept == [READY_ID, NOTREADY_ID]
    assert report.rolled_back == [CREATING_ID]
    assert report.finished_removal == [REMOVING_ID]
    assert report.orphan_dirs == [ORPHAN_ID]


def test_creating_rows_are_rolled_back(crashed: State) -> None:
    service = SandboxService(crashed.ports, LateMembers())
    recover_sandboxes(crashed.ports, service)
    assert CREATING_ID not in {s.id for s in crashed.store.load_sandboxes()}
    assert CREATING_ID not in _dirs(crashed)
    with pytest.raises(NotFound):
        service.get(CREATING_ID)
    # Its name is free again.
    again = service.run(spec(name="creating", uid="uid-creating"))
    assert again.id != CREATING_ID


def test_removing_rows_are_finished(crashed: State) -> None:
    service = SandboxService(crashed.ports, LateMembers())
    recover_sandboxes(crashed.ports, service)
    assert REMOVING_ID not in {s.id for s in crashed.store.load_sandboxes()}
    assert REMOVING_ID not in _dirs(crashed)
    with pytest.raises(NotFound):
        service.get(REMOVING_ID)
    service.run(spec(name="removing", uid="uid-removing"))


def test_ready_and_notready_are_kept(crashed: State) -> None:
    service = SandboxService(crashed.ports, LateMembers())
    recover_sandboxes(crashed.ports, service)
    assert [(s.id, s.state) for s in crashed.store.load_sandboxes()] == [
        (READY_ID, SandboxState.READY), (NOTREADY_ID, SandboxState.NOTREADY)]
    assert [(s.id, s.state) for s in service.list()] == [
        (READY_ID, SandboxState.READY), (NOTREADY_ID, SandboxState.NOTREADY)]
    assert service.get(READY_ID[:13]).spec.metadata.name == "ready"
    # Their directories and contents survive.
    for sid in (READY_ID, NOTREADY_ID):
        assert (crashed.root / "sandboxes" / sid / "marker").read_text() == sid
    # Their names stay reserved.
    with pytest.raises(AlreadyExists, match=READY_ID):
        service.run(spec(name="ready", uid="uid-ready"))


def test_orphan_dirs_are_deleted_and_foreign_dirs_kept(crashed: State) -> None:
    recover_sandboxes(crashed.ports, SandboxService(crashed.ports, LateMembers()))
    assert _dirs(crashed) == {READY_ID, NOTREADY_ID, "lost+found"}


def test_recovery_is_idempotent(crashed: State) -> None:
    recover_sandboxes(crashed.ports, SandboxService(crashed.ports, LateMembers()))
    again = crashed.reopen()
    crashed.store = again.store  # so the fixture closes the open one
    report = recover_sandboxes(again.ports, SandboxService(again.ports, LateMembers()))
    assert report.kept == [READY_ID, NOTREADY_ID]
    assert report.rolled_back == []
    assert report.finished_removal == []
    assert report.orphan_dirs == []
    assert _dirs(again) == {READY_ID, NOTREADY_ID, "lost+found"}


def test_recovery_of_an_empty_state_dir(state: State) -> None:
    service = SandboxService(state.ports, LateMembers())
    report = recover_sandboxes(state.ports, service)
    assert (report.kept, report.rolled_back, report.finished_removal, report.orphan_dirs) == (
        [], [], [], [])
    assert service.list() == []


def test_sandboxes_survive_a_restart_through_the_service(state: State) -> None:
    service = SandboxService(state.ports, LateMembers())
    a = service.run(spec(name="a", uid="ua"))
    b = service.run(spec(name="b", uid="ub"))
    service.stop(b.id)
    c = service.run(spec(name="c", uid="uc"))
    service.remove(c.id)

    restarted = state.reopen()
    state.store = restarted.store
    fresh = SandboxService(restarted.ports, LateMembers())
    report = recover_sandboxes(restarted.ports, fresh)
    assert report.kept == [a.id, b.id]
    assert [(s.id, s.state) for s in fresh.list()] == [(a.id, SandboxState.READY),
                                                       (b.id, SandboxState.NOTREADY)]
    assert fresh.get(b.id).stopped_at_ns == service.get(b.id).stopped_at_ns
    assert _dirs(restarted) == {a.id, b.id}


# With recording fakes: the order of the calls ---------------------------------------


def test_recovery_call_order_on_fakes() -> None:
    fakes = FakePorts()
    for sb in (
        sandbox(READY_ID, SandboxState.READY, "ready", 10),
        sandbox(CREATING_ID, SandboxState.CREATING, "creating", 30),
        sandbox(REMOVING_ID, SandboxState.REMOVING, "removing", 40),
    ):
        fakes.store.rows[sb.id] = sb
    fakes.files.dirs = {READY_ID, CREATING_ID, REMOVING_ID, ORPHAN_ID}
    service = SandboxService(fakes.ports, fakes.members)

    recover_sandboxes(fakes.ports, service)

    assert fakes.journal.events == [
        ("store.load",),
        # Roll back the half-created sandbox: files first, then the row.
        ("files.remove_sandbox_dir", CREATING_ID),
        ("store.delete", CREATING_ID),
        # Finish the removal.
        ("files.remove_sandbox_dir", REMOVING_ID),
        ("store.delete", REMOVING_ID),
        # Orphans last, once every known sandbox is settled.
        ("files.list_sandbox_dirs",),
        ("files.remove_sandbox_dir", ORPHAN_ID),
    ]
    assert set(fakes.store.rows) == {READY_ID}
    assert fakes.files.dirs == {READY_ID}
    assert [s.id for s in service.list()] == [READY_ID]


def test_recovery_with_pod_networks_on_fakes() -> None:
    """READY sandboxes keep their network if it is still there (and their VM's
    DHCP server is restarted: the adapter's job); a network lost in a reboot
    makes the sandbox NOTREADY; half-made sandboxes and cache entries without
    a sandbox lose theirs."""
    fakes = FakePorts(network=True)
    assert fakes.network is not None
    lost_id = "3" * 64
    for sb in (
        sandbox(READY_ID, SandboxState.READY, "ready", 10),
        sandbox(lost_id, SandboxState.READY, "lost", 15),
        sandbox(NOTREADY_ID, SandboxState.NOTREADY, "notready", 20),
        sandbox(CREATING_ID, SandboxState.CREATING, "creating", 30),
    ):
        fakes.store.rows[sb.id] = sb
    fakes.files.dirs = {READY_ID, lost_id, NOTREADY_ID, CREATING_ID}
    fakes.network.lost = {lost_id}
    fakes.network.cached = [READY_ID, ORPHAN_ID]
    service = SandboxService(fakes.ports, fakes.members)

    report = recover_sandboxes(fakes.ports, service)

    assert fakes.journal.of("network.") == [
        ("network.remove", CREATING_ID),
        ("network.recover", READY_ID),
        ("network.recover", lost_id),
        ("network.cached_sandbox_ids",),
        ("network.remove", ORPHAN_ID),
    ]
    assert report.network_lost == [lost_id]
    assert report.orphan_networks == [ORPHAN_ID]
    assert fakes.store.rows[lost_id].state is SandboxState.NOTREADY
    assert service.get(lost_id).state is SandboxState.NOTREADY
    assert service.get(READY_ID).state is SandboxState.READY


class RecordingRecovery:
    """A service's own recovery step (images, containers), recorded."""

    def __init__(self, fakes: FakePorts, name: str) -> None:
        self.fakes = fakes
        self.name = name

    def recover(self) -> None:
        self.fakes.journal.record(f"{self.name}.recover")


def test_one_recovery_runs_sandboxes_then_images_then_containers() -> None:
    fakes = FakePorts(network=True)
    assert fakes.network is not None
    fakes.store.rows[READY_ID] = sandbox(READY_ID, SandboxState.READY, "ready", 10)
    fakes.files.dirs = {READY_ID, ORPHAN_ID}
    service = SandboxService(fakes.ports, fakes.members)

    report = recover(fakes.ports, service, RecordingRecovery(fakes, "images"),
                     RecordingRecovery(fakes, "containers"))

    assert fakes.journal.events == [
        ("store.load",),
        ("network.recover", READY_ID),
        ("network.cached_sandbox_ids",),
        ("files.list_sandbox_dirs",),
        ("files.remove_sandbox_dir", ORPHAN_ID),
        ("images.recover",),
        ("containers.recover",),
    ]
    assert report.kept == [READY_ID]
    assert report.orphan_dirs == [ORPHAN_ID]
