"""SandboxService on recording fakes: the exact port calls and their order."""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.domain.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from agent.domain.host import HostFacts
from agent.domain.sandbox import DNSConfig, NetworkMode, SandboxFilter, SandboxState
from agent.services.sandboxes import LateMembers, SandboxService
from tests.services.service_fakes import FakePorts, sandbox, spec

ID = re.compile(r"^[0-9a-f]{64}$")
UNKNOWN_ID = "0" * 64


@pytest.fixture
def fakes() -> FakePorts:
    return FakePorts()


@pytest.fixture
def service(fakes: FakePorts) -> SandboxService:
    return SandboxService(fakes.ports, fakes.members)


# run ---------------------------------------------------------------------------------


def test_run_makes_a_ready_sandbox(fakes: FakePorts, service: SandboxService) -> None:
    sb = service.run(spec())
    assert ID.match(sb.id)
    assert sb.state is SandboxState.READY
    assert sb.created_at_ns == 1_001_000  # the fake clock's first reading
    assert sb.stopped_at_ns == 0
    assert sb.spec == spec()
    assert service.get(sb.id) == sb
    assert service.list() == [sb]


def test_run_persists_creating_then_ready_in_order(fakes: FakePorts,
                                                   service: SandboxService) -> None:
    sb = service.run(spec(log_directory="/var/log/pods/x"))
    assert fakes.journal.events == [
        ("store.insert", sb.id, SandboxState.CREATING),
        ("files.create_sandbox_dir", sb.id),
        ("files.ensure_log_directory", "/var/log/pods/x"),
        ("store.update", sb.id, SandboxState.READY),
    ]
    assert fakes.store.rows == {sb.id: sb}
    assert fakes.files.dirs == {sb.id}
    assert fakes.files.log_dirs == {"/var/log/pods/x"}


def test_run_rejects_an_invalid_spec_before_touching_state(fakes: FakePorts,
                                                           service: SandboxService) -> None:
    with pytest.raises(InvalidArgument) as exc_info:
        service.run(spec(name=""))
    assert exc_info.value.field == "config.metadata.name"
    assert fakes.journal.events == []


@pytest.mark.parametrize(("changes", "field"), [
    ({"dns": DNSConfig(servers=("dns.example",))}, "config.dns_config.servers"),
    ({"dns": DNSConfig(searches=("not a domain",))}, "config.dns_config.searches"),
    ({"dns": DNSConfig(options=("ndots=5",))}, "config.dns_config.options"),
    ({"sysctls": {"kernel.pid_max": "1\nkernel.x = 1"}}, "config.linux.sysctls['kernel.pid_max']"),
    ({"sysctls": {"Kernel.PID": "1"}}, "config.linux.sysctls['Kernel.PID']"),
])
def test_run_rejects_bad_dns_config_or_sysctls_before_touching_state(
        fakes: FakePorts, service: SandboxService, changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as exc_info:
        service.run(dataclasses.replace(spec(), **changes))  # type: ignore[arg-type]
    assert exc_info.value.field == field
    assert fakes.journal.events == []


def test_run_rejects_an_unknown_runtime_handler(fakes: FakePorts,
                                                service: SandboxService) -> None:
    with pytest.raises(InvalidArgument) as exc_info:
        service.run(dataclasses.replace(spec(), runtime_handler="runc"))
    assert exc_info.value.field == "runtime_handler"
    assert "'runc'" in exc_info.value.message
    assert fakes.journal.events == []


@pytest.mark.parametrize("handler", ["", "podvisor"])
def test_run_accepts_served_handlers(service: SandboxService, handler: str) -> None:
    sb = service.run(dataclasses.replace(spec(), runtime_handler=handler))
    assert sb.spec.runtime_handler == handler


def test_duplicate_reservation_names_the_existing_id(fakes: FakePorts,
                                                     service: SandboxService) -> None:
    first = service.run(spec())
    fakes.journal.clear()
    with pytest.raises(AlreadyExists) as exc_info:
        service.run(spec())
    assert first.id in exc_info.value.message
    assert "vm-1_default_uid-1_0" in exc_info.value.message
    assert fakes.journal.events == []  # refused before any write
    assert service.list() == [first]


def test_another_attempt_is_a_new_sandbox(service: SandboxService) -> None:
    a = service.run(spec(attempt=0))
    b = service.run(spec(attempt=1))
    assert a.id != b.id
    assert len(service.list()) == 2


def test_name_can_be_reused_after_remove(fakes: FakePorts, service: SandboxService) -> None:
    first = service.run(spec())
    service.remove(first.id)
    second = service.run(spec())
    assert second.id != first.id
    assert service.list() == [second]
    assert set(fakes.store.rows) == {second.id}


def test_name_stays_reserved_after_stop(service: SandboxService) -> None:
    first = service.run(spec())
    service.stop(first.id)
    with pytest.raises(AlreadyExists):
        service.run(spec())


# Failures roll back -----------------------------------------------------------------------


def _assert_rolled_back(fakes: FakePorts, service: SandboxService) -> str:
    inserted = fakes.journal.of("store.insert")
    assert len(inserted) == 1
    sandbox_id = str(inserted[0][1])
    assert ("files.remove_sandbox_dir", sandbox_id) in fakes.journal.events
    assert fakes.journal.events[-1] == ("store.delete", sandbox_id)
    assert fakes.store.rows == {}
    assert fakes.files.dirs == set()
    assert service.list() == []
    with pytest.raises(NotFound):
        service.get(sandbox_id)
    return sandbox_id


def test_failed_dir_creation_rolls_back(fakes: FakePorts, service: SandboxService) -> None:
    fakes.files.fail_create = ResourceExhausted("cannot create dir: No space left on device")
    with pytest.raises(ResourceExhausted, match="No space left"):
        service.run(spec())
    sandbox_id = _assert_rolled_back(fakes, service)
    # Nothing after the failure but the rollback.
    assert fakes.journal.events == [
        ("store.insert", sandbox_id, SandboxState.CREATING),
        ("files.create_sandbox_dir", sandbox_id),
        ("files.remove_sandbox_dir", sandbox_id),
        ("store.delete", sandbox_id),
    ]


def test_failed_log_directory_rolls_back(fakes: FakePorts, service: SandboxService) -> None:
    fakes.files.fail_log_directory = InvalidArgument("config.log_directory", "cannot create")
    with pytest.raises(InvalidArgument) as exc_info:
        service.run(spec())
    assert exc_info.value.field == "config.log_directory"
    _assert_rolled_back(fakes, service)


def test_failed_ready_update_rolls_back(fakes: FakePorts, service: SandboxService) -> None:
    fakes.store.fail_update = Unavailable("disk I/O error")
    with pytest.raises(Unavailable):
        service.run(spec())
    _assert_rolled_back(fakes, service)


def test_unexpected_exception_also_rolls_back(fakes: FakePorts, service: SandboxService) -> None:
    fakes.files.fail_create = ZeroDivisionError("bug")
    with pytest.raises(ZeroDivisionError):
        service.run(spec())
    _assert_rolled_back(fakes, service)


def test_name_is_free_again_after_a_rollback(fakes: FakePorts, service: SandboxService) -> None:
    fakes.files.fail_create = ResourceExhausted("full")
    with pytest.raises(ResourceExhausted):
        service.run(spec())
    fakes.files.fail_create = None
    sb = service.run(spec())
    assert service.list() == [sb]


# stop ----------------------------------------------------------------------------------


def test_stop_marks_notready(fakes: FakePorts, service: SandboxService) -> None:
    sb = service.run(spec())
    fakes.journal.clear()
    service.stop(sb.id)
    stopped = service.get(sb.id)
    assert stopped.state is SandboxState.NOTREADY
    assert stopped.stopped_at_ns > sb.created_at_ns
    # CRI: the VM is forcibly stopped first.
    assert fakes.journal.events == [("members.stop", sb.id), ("store.update", sb.id, SandboxState.NOTREADY)]
    assert fakes.store.rows[sb.id] == stopped
    # The directory stays until RemovePodSandbox.
    assert fakes.files.dirs == {sb.id}


def test_stop_is_idempotent(fakes: FakePorts, service: SandboxService) -> None:
    sb = service.run(spec())
    service.stop(sb.id)
    first = service.get(sb.id)
    fakes.journal.clear()
    service.stop(sb.id)
    service.stop(sb.id[:13])
    # Only the (idempotent) stop of its VM; nothing is written.
    assert fakes.journal.events == [("members.stop", sb.id), ("members.stop", sb.id)]
    assert service.get(sb.id) == first  # stopped_at_ns not moved


def test_stop_unknown_id_is_ok(fakes: FakePorts, service: SandboxService) -> None:
    service.stop(UNKNOWN_ID)
    service.stop("deadbeef")
    assert fakes.journal.events == []


def test_stop_by_prefix(service: SandboxService) -> None:
    sb = service.run(spec())
    service.stop(sb.id[:13])
    assert service.get(sb.id).state is SandboxState.NOTREADY


@pytest.mark.parametrize("op", ["stop", "remove", "get"])
def test_empty_id_is_invalid(service: SandboxService, op: str) -> None:
    call: Callable[[str], object] = getattr(service, op)
    with pytest.raises(InvalidArgument) as exc_info:
        call("")
    assert exc_info.value.field == "pod_sandbox_id"


# remove -------------------------------------------------------------------------------


def test_remove_deletes_everything(fakes: FakePorts, service: SandboxService) -> None:
    sb = service.run(spec())
    fakes.journal.clear()
    service.remove(sb.id)
    assert fakes.journal.events == [
        ("members.stop", sb.id),
        ("members.remove", sb.id),
        ("store.update", sb.id, SandboxState.REMOVING),
        ("files.remove_sandbox_dir", sb.id),
        ("store.delete", sb.id),
    ]
    assert fakes.store.rows == {}
    assert fakes.files.dirs == set()
    assert service.list() == []
    with pytest.raises(NotFound):
        service.get(sb.id)


def test_remove_of_a_ready_sandbox_works_without_stop(service: SandboxService) -> None:
    sb = service.run(spec())
    service.remove(sb.id)
    assert service.list() == []


def test_remove_unknown_is_ok(fakes: FakePorts, service: SandboxService) -> None:
    service.remove(UNKNOWN_ID)
    assert fakes.journal.events == []


def test_remove_twice_is_ok(fakes: FakePorts, service: SandboxService) -> None:
    sb = service.run(spec())
    service.remove(sb.id)
    fakes.journal.clear()
    service.remove(sb.id)
    assert fakes.journal.events == []


def test_remove_leaves_other_sandboxes(service: SandboxService) -> None:
    a = service.run(spec(name="a", uid="ua"))
    b = service.run(spec(name="b", uid="ub"))
    service.remove(a.id)
    assert service.list() == [b]


# get / list ---------------------------------------------------------------------------


def test_get_unknown_is_not_found(service: SandboxService) -> None:
    with pytest.raises(NotFound) as exc_info:
        service.get(UNKNOWN_ID)
    assert UNKNOWN_ID in exc_info.value.message


def test_get_by_unique_prefix(service: SandboxService) -> None:
    sb = service.run(spec())
    assert service.get(sb.id[:5]) == sb


def test_get_by_ambiguous_prefix_is_invalid(service: SandboxService) -> None:
    # Sandboxes whose ids share a prefix: load them directly.
    service.load([sandbox("ab" + "1" * 62, SandboxState.READY, "one", 1),
                  sandbox("ab" + "2" * 62, SandboxState.READY, "two", 2)])
    with pytest.raises(InvalidArgument) as exc_info:
        service.get("ab")
    assert exc_info.value.field == "pod_sandbox_id"
    assert service.get("ab1").spec.metadata.name == "one"


def test_list_filters(service: SandboxService) -> None:
    web = service.run(spec(name="web", uid="u1", labels={"app": "web", "tier": "front"}))
    db = service.run(spec(name="db", uid="u2", labels={"app": "db"}))
    cache = service.run(spec(name="cache", uid="u3", labels={"app": "web", "tier": "back"}))
    service.stop(db.id)

    def ids(flt: SandboxFilter | None) -> list[str]:
        return [s.id for s in service.list(flt)]

    assert ids(None) == [web.id, db.id, cache.id]  # creation order
    assert ids(SandboxFilter()) == [web.id, db.id, cache.id]
    assert ids(SandboxFilter(ready=True)) == [web.id, cache.id]
    assert ids(SandboxFilter(ready=False)) == [db.id]
    assert ids(SandboxFilter(id=db.id)) == [db.id]
    assert ids(SandboxFilter(id=cache.id[:13])) == [cache.id]
    assert ids(SandboxFilter(id=UNKNOWN_ID)) == []
    assert ids(SandboxFilter(label_selector={"app": "web"})) == [web.id, cache.id]
    assert ids(SandboxFilter(label_selector={"app": "web", "tier": "back"})) == [cache.id]
    assert ids(SandboxFilter(ready=False, label_selector={"app": "web"})) == []


def test_list_hides_sandboxes_being_created(fakes: FakePorts, service: SandboxService) -> None:
    seen: list[list[str]] = []
    original = fakes.files.create_sandbox_dir

    def peek(sandbox_id: str) -> Path:
        seen.append([s.id for s in service.list()])
        with pytest.raises(NotFound):
            service.get(sandbox_id)
        return original(sandbox_id)

    fakes.files.create_sandbox_dir = peek  # type: ignore[method-assign]
    sb = service.run(spec())
    assert seen == [[]]
    assert [s.id for s in service.list()] == [sb.id]


def test_load_installs_recovered_sandboxes(service: SandboxService) -> None:
    kept = [sandbox("b" * 64, SandboxState.NOTREADY, "late", 20),
            sandbox("a" * 64, SandboxState.READY, "early", 10)]
    service.load(kept)
    assert [s.id for s in service.list()] == ["a" * 64, "b" * 64]
    with pytest.raises(AlreadyExists):
        service.run(spec(name="early", uid="uid-early"))


# Concurrency ---------------------------------------------------------------------------


def _run_in_threads(n: int, target: Callable[[int], None]) -> None:
    """Run target(0..n-1) on n threads started together; fail if any thread failed or hung."""
    barrier = threading.Barrier(n)
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            target(i)
        except BaseException as exc:  # noqa: BLE001 - an exception in a thread would be lost
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_concurrent_runs_of_distinct_sandboxes() -> None:
    fakes = FakePorts(store_delay=0.001)
    service = SandboxService(fakes.ports, fakes.members)
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            sb = service.run(spec(name=f"vm-{i}", uid=f"uid-{i}"))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            with lock:
                errors.append(exc)
            return
        with lock:
            ids.append(sb.id)

    _run_in_threads(50, run)
    assert errors == []
    assert len(ids) == 50
    assert len(set(ids)) == 50
    assert set(fakes.store.rows) == set(ids)
    assert all(s.state is SandboxState.READY for s in fakes.store.rows.values())
    assert {s.id for s in service.list()} == set(ids)
    assert fakes.files.dirs == set(ids)


def test_concurrent_runs_of_the_same_name_let_exactly_one_win() -> None:
    fakes = FakePorts(store_delay=0.001)
    service = SandboxService(fakes.ports, fakes.members)
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(_: int) -> None:
        try:
            sb = service.run(spec())
        except BaseException as exc:  # noqa: BLE001
            with lock:
                errors.append(exc)
            return
        with lock:
            ids.append(sb.id)

    _run_in_threads(10, run)
    assert len(ids) == 1
    assert len(errors) == 9
    assert all(isinstance(e, AlreadyExists) for e in errors), errors
    assert all(ids[0] in e.message for e in errors if isinstance(e, AlreadyExists))
    assert list(fakes.store.rows) == ids
    assert len(fakes.journal.of("store.insert")) == 1
    assert [s.id for s in service.list()] == ids


# members and host ---------------------------------------------------------------------


def test_late_members_forward_once_bound() -> None:
    fakes = FakePorts()
    late = LateMembers()
    service = SandboxService(fakes.ports, late)
    sb = service.run(spec())
    service.stop(sb.id)  # unbound: the sandbox has no members yet
    assert fakes.journal.of("members.") == []
    late.bind(fakes.members)
    service.remove(sb.id)
    assert fakes.journal.of("members.") == [("members.stop", sb.id), ("members.remove", sb.id)]
    with pytest.raises(RuntimeError):
        late.bind(fakes.members)


class FixedHost:
    def facts(self) -> HostFacts:
        raise AssertionError("not used by sandboxes")

    def node_ip(self) -> str:
        return "192.0.2.10"


def test_a_host_network_sandbox_reports_the_nodes_address() -> None:
    fakes = FakePorts()
    ports = dataclasses.replace(fakes.ports, host=FixedHost())
    service = SandboxService(ports, fakes.members)
    sb = service.run(dataclasses.replace(spec(), network_mode=NetworkMode.NODE))
    assert sb.ip == "192.0.2.10"
    assert service.get(sb.id).ip == "192.0.2.10"


def test_a_host_network_sandbox_without_host_facts_reports_no_address(service: SandboxService) -> None:
    sb = service.run(dataclasses.replace(spec(), network_mode=NetworkMode.NODE))
    assert sb.ip == ""
