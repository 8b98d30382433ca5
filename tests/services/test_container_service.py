"""ContainerService on recording fakes: exact port calls, states and events."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import pytest

from agent.domain.errors import FailedPrecondition, Internal, InvalidArgument, NotFound, Unavailable
from agent.domain.hypervisor import DomainState
from agent.domain.vm import Container, ContainerState, WorkloadExit
from agent.domain.vmrequest import CRIResources, cri_sizes
from agent.services.container_events import ContainerEvent
from agent.services.containers import ContainerFilter, ContainerService
from tests.services.container_fakes import (
    BASE_PATH,
    IMAGE_ID,
    IMAGE_REF,
    LOG_DIR,
    OTHER_SANDBOX_ID,
    REQUEST,
    SANDBOX_ID,
    SEED,
    STATE_ROOT,
    ContainerFakes,
    MiB,
    cspec,
    record,
    sandbox,
)

ID = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture
def fakes() -> ContainerFakes:
    return ContainerFakes()


@pytest.fixture
def service(fakes: ContainerFakes) -> ContainerService:
    return ContainerService(fakes.ports)


def _created(service: ContainerService, fakes: ContainerFakes, **overrides: object) -> Container:
    c = service.create(cspec(**overrides))
    fakes.journal.clear()
    return c


def _running(service: ContainerService, fakes: ContainerFakes, **overrides: object) -> Container:
    c = service.create(cspec(**overrides))
    service.start(c.id)
    fakes.journal.clear()
    return service.get(c.id)


# create ----------------------------------------------------------------------------------


def test_create_records_created_with_exact_calls_in_order(fakes: ContainerFakes,
                                                          service: ContainerService) -> None:
    c = service.create(cspec())
    assert ID.match(c.id)
    d = f"{STATE_ROOT}/{SANDBOX_ID}/containers/{c.id}"
    dom = f"podvisor-{c.id}"
    assert fakes.journal.events == [
        ("images.get", IMAGE_REF),
        ("images.base_disk_path", IMAGE_ID, "cirros.qcow2"),
        ("store.save", c.id, ContainerState.CREATING),
        ("files.create_container_dir", d),
        ("files.create_overlay", str(BASE_PATH), "qcow2", f"{d}/disk.qcow2"),
        ("files.write_seed", f"{d}/cloudinit.iso", SEED),
        ("render_domain", dom),
        ("libvirt.define_domain", dom),
        ("store.save", c.id, ContainerState.CREATED),
    ]
    assert c.state is ContainerState.CREATED
    assert c.domain_name == dom
    assert c.directory == d
    assert c.overlay_path == f"{d}/disk.qcow2"
    assert c.seed_path == f"{d}/cloudinit.iso"
    assert c.console_log == f"{d}/console.raw"
    assert c.log_path == f"{LOG_DIR}/vm/0.log"
    assert c.image == IMAGE_REF
    assert c.image_id == IMAGE_ID
    assert (c.vcpus, c.max_vcpus, c.memory_bytes, c.max_memory_bytes, c.cpu_shares) == (
        1, 4, 256 * MiB, 1024 * MiB, 512)
    assert c.labels == {"app": "web"}
    assert fakes.store.rows == {c.id: c}
    assert fakes.libvirt.states[dom] == DomainState("shutoff", "unknown")
    assert service.list() == [c]
    assert service.get(c.id) == c
    assert service.image_ids_in_use() == {IMAGE_ID}


def test_create_asks_the_vm_builder_with_the_containers_values(fakes: ContainerFakes,
                                                               service: ContainerService) -> None:
    c = service.create(cspec())
    [(spec, sb)] = fakes.vm.requests
    assert spec == cspec() and sb.id == SANDBOX_ID
    [(request, seeded, sb)] = fakes.vm.seed_calls
    assert request == REQUEST
    assert seeded.id == c.id and seeded.state is ContainerState.CREATING
    assert sb.id == SANDBOX_ID


def test_create_emits_nothing_but_created(fakes: ContainerFakes, service: ContainerService) -> None:
    c = service.create(cspec())
    assert fakes.console.following == set()
    assert fakes.journal.of("console.") == []
    assert fakes.journal.of("libvirt.start") == []
    assert c.started_at_ns == 0


@pytest.mark.parametrize(("override", "field"), [
    ({"name": ""}, "config.metadata.name"),
    ({"image": ""}, "config.image.image"),
])
def test_create_requires_name_and_image(fakes: ContainerFakes, service: ContainerService,
                                        override: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        service.create(cspec(**override))
    assert exc.value.field == field
    assert field in exc.value.message
    assert fakes.journal.events == []
    assert fakes.store.rows == {}


@pytest.mark.parametrize("log_path", ["/var/log/x.log", "../escape.log", "vm/../../x.log", "..",
                                      "0\x00.log", "vm/0\x01.log", "vm/0.log\n", "vm\x1b[2J/0.log",
                                      "vm/0\x9b.log", "vm/"])
def test_create_rejects_absolute_or_escaping_log_path(fakes: ContainerFakes, service: ContainerService,
                                                      log_path: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        service.create(cspec(log_path=log_path))
    assert exc.value.field == "config.log_path"
    assert fakes.journal.events == []
    assert service.list() == []


def test_create_accepts_dots_inside_names(service: ContainerService) -> None:
    c = service.create(cspec(log_path="vm/..0.log"))
    assert c.log_path == f"{LOG_DIR}/vm/..0.log"


def test_create_without_log_path_has_no_cri_log(service: ContainerService) -> None:
    assert service.create(cspec(log_path="")).log_path == ""


def test_create_in_a_not_ready_sandbox_fails(fakes: ContainerFakes, service: ContainerService) -> None:
    with pytest.raises(FailedPrecondition) as exc:
        service.create(cspec(sandbox_id="f" * 64))
    assert "f" * 64 in exc.value.message
    assert "not ready" in exc.value.message
    assert fakes.journal.events == []
    assert fakes.store.rows == {}


def test_create_in_an_unknown_sandbox_is_not_found(fakes: ContainerFakes, service: ContainerService) -> None:
    with pytest.raises(NotFound):
        service.create(cspec(sandbox_id="9" * 64))
    assert fakes.store.rows == {}


def test_second_live_container_in_a_sandbox_is_refused(fakes: ContainerFakes,
                                                        service: ContainerService) -> None:
    first = _created(service, fakes)
    with pytest.raises(FailedPrecondition) as exc:
        service.create(cspec(name="vm-2"))
    assert first.id in exc.value.message
    assert "exactly one VM" in exc.value.message
    # Refused before any record or file.
    assert fakes.journal.of("store.") == []
    assert fakes.journal.of("files.") == []
    assert fakes.journal.of("libvirt.") == []
    assert [c.id for c in service.list()] == [first.id]


def test_running_container_also_blocks_a_second(fakes: ContainerFakes, service: ContainerService) -> None:
    _running(service, fakes)
    with pytest.raises(FailedPrecondition):
        service.create(cspec(name="vm-2"))


def test_another_sandbox_is_not_blocked(fakes: ContainerFakes, service: ContainerService) -> None:
    a = service.create(cspec())
    b = service.create(cspec(sandbox_id=OTHER_SANDBOX_ID))
    assert a.id != b.id
    assert [c.id for c in service.list()] == [a.id, b.id]


def test_an_exited_container_does_not_block_a_new_one(fakes: ContainerFakes,
                                                       service: ContainerService) -> None:
    old = _running(service, fakes)
    service.stop(old.id, 0)
    assert service.get(old.id).state is ContainerState.EXITED
    new = service.create(cspec(attempt=1))
    assert new.state is ContainerState.CREATED
    assert [c.id for c in service.list()] == [old.id, new.id]


def test_failure_in_define_rolls_back(fakes: ContainerFakes, service: ContainerService) -> None:
    fakes.libvirt.fail["define_domain"] = Internal("defineXML: boom")
    with pytest.raises(Internal, match="boom"):
        service.create(cspec())
    [save] = fakes.journal.of("store.save")
    cid = save[1]
    d = f"{STATE_ROOT}/{SANDBOX_ID}/containers/{cid}"
    dom = f"podvisor-{cid}"
    assert fakes.journal.events[-6:] == [
        ("files.write_seed", f"{d}/cloudinit.iso", SEED),
        ("render_domain", dom),
        ("libvirt.define_domain", dom),
        ("libvirt.undefine_domain", dom),
        ("files.remove_container_dir", d),
        ("store.delete", cid),
    ]
    assert fakes.files.dirs == set()
    assert fakes.store.rows == {}
    assert service.list() == []
    assert service.in_sandbox(SANDBOX_ID) == []
    # The slot is free again.
    del fakes.libvirt.fail["define_domain"]
    assert service.create(cspec()).state is ContainerState.CREATED


def test_a_domain_defined_as_libvirtd_went_away_is_undefined_once_it_is_back(
        fakes: ContainerFakes, service: ContainerService) -> None:
    """libvirtd defined the domain but the answer was lost with the connection;
    the rollback cannot undefine it then. The reconnect hook does, later."""
    real_define = fakes.libvirt.define_domain

    def define_and_lose_the_answer(xml: str) -> None:
        real_define(xml)
        fakes.libvirt.fail["undefine_domain"] = Unavailable("libvirtd connection lost")
        raise Unavailable("libvirtd connection lost")
    fakes.libvirt.define_domain = define_and_lose_the_answer  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        service.create(cspec())
    [dom] = fakes.libvirt.xml
    assert service.list() == [] and fakes.store.rows == {}
    service.reconcile_all()  # still down: kept for the next reconnect
    assert list(fakes.libvirt.xml) == [dom]
    del fakes.libvirt.fail["undefine_domain"]
    service.reconcile_all()  # libvirtd is back
    assert fakes.libvirt.xml == {}
    fakes.journal.events.clear()
    service.reconcile_all()  # done once
    assert fakes.journal.of("libvirt.undefine_domain") == []


def test_failure_in_seed_rolls_back_and_never_defines(fakes: ContainerFakes,
                                                      service: ContainerService) -> None:
    fakes.vm.seed_error = RuntimeError("seed")
    with pytest.raises(RuntimeError):
        service.create(cspec())
    assert fakes.journal.of("libvirt.define_domain") == []
    assert len(fakes.journal.of("libvirt.undefine_domain")) == 1
    assert fakes.journal.events[-1][0] == "store.delete"
    assert fakes.files.dirs == set()
    assert fakes.store.rows == {}
    assert service.list() == []


def test_create_starts_the_pods_dhcp_server(fakes: ContainerFakes, service: ContainerService) -> None:
    service.create(cspec())
    assert fakes.vm.dhcp_started == [SANDBOX_ID]


def test_create_of_a_vm_without_nic_starts_no_dhcp_server(fakes: ContainerFakes,
                                                           service: ContainerService) -> None:
    fakes.vm.request_value = dataclasses.replace(REQUEST, pod_network=False)
    service.create(cspec())
    assert fakes.vm.dhcp_started == []


def test_a_dhcp_server_that_cannot_start_fails_create_and_rolls_back(fakes: ContainerFakes,
                                                                      service: ContainerService) -> None:
    fakes.vm.dhcp_error = Internal("dnsmasq for sandbox x exited right after starting")
    with pytest.raises(Internal, match="dnsmasq"):
        service.create(cspec())
    assert fakes.journal.of("libvirt.define_domain") == []
    assert fakes.journal.events[-1][0] == "store.delete"
    assert fakes.files.dirs == set()
    assert fakes.store.rows == {}
    assert service.list() == []


# start -----------------------------------------------------------------------------------


def test_start_runs_the_domain_and_follows_the_console(fakes: ContainerFakes,
                                                       service: ContainerService) -> None:
    c = _created(service, fakes)
    started = service.start(c.id)
    assert started.state is ContainerState.RUNNING
    assert started.started_at_ns > c.created_at_ns
    assert fakes.journal.events == [
        ("console.follow", c.id, c.console_log, f"{LOG_DIR}/vm/0.log", f"{c.directory}/console.state"),
        ("libvirt.start_domain", c.domain_name),
        ("store.save", c.id, ContainerState.RUNNING),
    ]
    assert fakes.console.following == {c.id}
    assert service.get(c.id).state is ContainerState.RUNNING


def test_start_by_unique_prefix(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _created(service, fakes)
    assert service.start(c.id[:12]).id == c.id


def test_start_twice_fails(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _created(service, fakes)
    service.start(c.id)
    fakes.journal.clear()
    with pytest.raises(FailedPrecondition) as exc:
        service.start(c.id)
    assert "running" in exc.value.message
    assert fakes.journal.of("libvirt.start_domain") == []
    assert fakes.journal.of("console.") == []


def test_start_unknown_is_not_found(service: ContainerService) -> None:
    with pytest.raises(NotFound):
        service.start("0" * 64)


def test_start_of_an_exited_container_fails(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    service.stop(c.id, 0)
    with pytest.raises(FailedPrecondition):
        service.start(c.id)


# stop ------------------------------------------------------------------------------------


def test_stop_when_the_guest_obeys_acpi_completes(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    fakes.journal.clear()
    service.stop(c.id, 5)
    got = service.get(c.id)
    assert (got.state, got.exit_code, got.reason) == (ContainerState.EXITED, 0, "Completed")
    assert got.message == "shut down on ACPI request"
    assert got.stop_requested is False
    assert got.finished_at_ns > got.started_at_ns
    lib = [e for e in fakes.journal.of("libvirt.") if e[0] != "libvirt.domain_state"]
    assert lib == [("libvirt.shutdown_domain", c.domain_name), ("libvirt.destroy_domain", c.domain_name)]
    # The destroy found nothing running: no hard stop took place.
    assert fakes.libvirt.states[c.domain_name] == DomainState("shutoff", "shutdown")
    assert fakes.journal.of("console.") == [("console.unfollow", c.id)]
    assert fakes.store.rows[c.id] == got


class _InlineExecutor(Executor):
    """Runs submitted work at once, so the guest agent's shutdown lands on the fake timeline."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the future, as an executor does
            future.set_exception(exc)
        return future


@pytest.fixture
def inline_service(fakes: ContainerFakes) -> ContainerService:
    return ContainerService(fakes.ports, aside=_InlineExecutor())


def _timeline(fakes: ContainerFakes, *methods: str) -> list[tuple[str, float]]:
    """Record when (fake seconds) each libvirt method is called."""
    seen: list[tuple[str, float]] = []
    for method in methods:
        fakes.libvirt.hooks[method] = lambda _name, m=method: seen.append((m, fakes.timer.monotonic()))
    return seen


def test_stop_when_the_guest_ignores_acpi_and_has_no_agent_kills_within_the_timeout(
        fakes: ContainerFakes, inline_service: ContainerService) -> None:
    c = _running(inline_service, fakes)
    fakes.libvirt.acpi_powers_off = False
    seen = _timeline(fakes, "shutdown_domain", "destroy_domain")

    def no_agent(_name: str) -> None:
        seen.append(("guest_shutdown", fakes.timer.monotonic()))
        raise FailedPrecondition("QEMU guest agent is not configured")
    fakes.libvirt.hooks["guest_shutdown"] = no_agent
    began = fakes.timer.monotonic()
    inline_service.stop(c.id, 30)
    # ACPI at once; the agent halfway through the graceful 28 s; the hard stop
    # 2 s before the timeout, so that destroying the domain ends within it.
    assert [(m, t - began) for m, t in seen] == [
        ("shutdown_domain", 0.0), ("guest_shutdown", pytest.approx(14.0, abs=0.11)),
        ("destroy_domain", pytest.approx(28.0))]
    got = inline_service.get(c.id)
    assert (got.state, got.exit_code, got.reason) == (ContainerState.EXITED, 137, "Killed")
    assert "within 30s" in got.message
    assert fakes.libvirt.states[c.domain_name] == DomainState("shutoff", "destroyed")


@pytest.mark.parametrize(("timeout", "hard_at"), [(1, 0.75), (2, 1.5), (8, 6.0), (300, 298.0)])
def test_the_hard_stop_leaves_room_for_the_destroy(fakes: ContainerFakes, inline_service: ContainerService,
                                                   timeout: int, hard_at: float) -> None:
    c = _running(inline_service, fakes)
    fakes.libvirt.acpi_powers_off = False
    seen = _timeline(fakes, "destroy_domain")
    # A destroy as slow as the room left for it (libvirt: SIGTERM, then SIGKILL).
    slow_destroy = timeout - hard_at
    fakes.libvirt.hooks["destroy_domain"] = lambda _n: (seen.append(("destroy_domain", fakes.timer.monotonic())),
                                                        fakes.timer.advance(slow_destroy))
    began = fakes.timer.monotonic()
    inline_service.stop(c.id, timeout)
    assert seen == [("destroy_domain", pytest.approx(began + hard_at))]
    assert fakes.timer.monotonic() - began == pytest.approx(timeout)  # the whole call, destroy included
    assert inline_service.get(c.id).exit_code == 137


def test_stop_when_the_guest_ignores_acpi_its_agent_powers_it_off(
        fakes: ContainerFakes, inline_service: ContainerService) -> None:
    c = _running(inline_service, fakes)
    fakes.libvirt.acpi_powers_off = False
    fakes.libvirt.agent_powers_off = True
    seen = _timeline(fakes, "guest_shutdown")
    began = fakes.timer.monotonic()
    inline_service.stop(c.id, 10)
    assert [(m, t - began) for m, t in seen] == [("guest_shutdown", pytest.approx(4.0, abs=0.11))]
    got = inline_service.get(c.id)
    assert (got.state, got.exit_code, got.reason) == (ContainerState.EXITED, 0, "Completed")
    assert "guest agent" in got.message
    # destroy found nothing running: no hard stop.
    assert fakes.libvirt.states[c.domain_name] == DomainState("shutoff", "shutdown")
    assert fakes.timer.monotonic() - began < 10


def test_a_guest_that_obeys_acpi_is_never_asked_through_its_agent(
        fakes: ContainerFakes, inline_service: ContainerService) -> None:
    c = _running(inline_service, fakes)
    inline_service.stop(c.id, 30)
    assert fakes.journal.of("libvirt.guest_shutdown") == []
    assert fakes.timer.slept == 0


def test_the_agents_shutdown_runs_aside_and_never_holds_the_stop_up(fakes: ContainerFakes,
                                                                    service: ContainerService) -> None:
    # The real executor: an agent call that blocks (libvirt waits for the
    # guest) must not delay the hard stop.
    c = _running(service, fakes)
    fakes.libvirt.acpi_powers_off = False
    release = threading.Event()
    fakes.libvirt.hooks["guest_shutdown"] = lambda _n: release.wait(60)
    try:
        service.stop(c.id, 4)
        got = service.get(c.id)
        assert (got.exit_code, got.reason) == (137, "Killed")
    finally:
        release.set()


def test_a_huge_stop_timeout_is_capped(fakes: ContainerFakes) -> None:
    # #10 item 12: the CRI's timeout is the pod author's grace period; uncapped,
    # one StopContainer of a guest that ignores ACPI holds a thread for ever.
    service = ContainerService(fakes.ports, max_stop_timeout=1)
    c = _running(service, fakes)
    fakes.libvirt.acpi_powers_off = False
    t = threading.Thread(target=service.stop, args=(c.id, 10**15), daemon=True)
    t.start()
    t.join(60)  # a liveness guard, not a timing target
    assert not t.is_alive()
    got = service.get(c.id)
    assert (got.exit_code, got.reason) == (137, "Killed")
    assert "within 1s" in got.message
    assert fakes.journal.of("libvirt.destroy_domain") == [("libvirt.destroy_domain", c.domain_name)]


def test_stop_with_zero_timeout_kills_without_acpi(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    service.stop(c.id, 0)
    got = service.get(c.id)
    assert (got.exit_code, got.reason) == (137, "Killed")
    assert fakes.journal.of("libvirt.shutdown_domain") == []


def test_stop_records_the_guests_power_off_seen_by_the_event(fakes: ContainerFakes,
                                                             service: ContainerService) -> None:
    c = _running(service, fakes)

    def power_off(name: str) -> None:  # libvirt's event arrives before destroy is tried
        fakes.libvirt.set_state(name, "shutoff", "shutdown")
        service.on_domain_event(name, "stopped", "shutdown")
    fakes.libvirt.acpi_powers_off = False
    fakes.libvirt.hooks["shutdown_domain"] = power_off
    service.stop(c.id, 5)
    got = service.get(c.id)
    assert (got.exit_code, got.reason, got.message) == (0, "Completed", "the guest powered off")
    assert len(fakes.journal.of("store.save")) == 2  # stop_requested, then EXITED once


def test_stop_of_unknown_id_is_not_an_error(fakes: ContainerFakes, service: ContainerService) -> None:
    service.stop("0" * 64, 10)
    assert fakes.journal.events == []


def test_stop_of_a_created_container_exits_it_without_libvirt(fakes: ContainerFakes,
                                                              service: ContainerService) -> None:
    c = _created(service, fakes)
    service.stop(c.id, 10)
    got = service.get(c.id)
    assert (got.state, got.exit_code, got.reason) == (ContainerState.EXITED, 0, "Completed")
    assert fakes.journal.of("libvirt.") == []


def test_stop_twice_is_not_an_error(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    service.stop(c.id, 0)
    first = service.get(c.id)
    fakes.journal.clear()
    service.stop(c.id, 0)
    assert service.get(c.id) == first
    assert fakes.journal.of("libvirt.destroy_domain") == []
    assert fakes.journal.of("store.") == []


# libvirt events and reconciliation -----------------------------------------------------------


@pytest.mark.parametrize(("kind", "detail"), [("stopped", "shutdown")])
def test_guest_power_off_event_completes(fakes: ContainerFakes, service: ContainerService,
                                         kind: str, detail: str) -> None:
    c = _running(service, fakes)
    fakes.libvirt.set_state(c.domain_name, "shutoff", "shutdown")
    service.on_domain_event(c.domain_name, kind, detail)
    got = service.get(c.id)
    assert (got.state, got.exit_code, got.reason, got.message) == (
        ContainerState.EXITED, 0, "Completed", "the guest powered off")
    assert fakes.console.following == set()
    assert fakes.store.rows[c.id] == got


def test_destroy_outside_podvisor_is_an_error(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    fakes.libvirt.set_state(c.domain_name, "shutoff", "destroyed")
    service.on_domain_event(c.domain_name, "stopped", "destroyed")
    got = service.get(c.id)
    assert (got.state, got.exit_code, got.reason) == (ContainerState.EXITED, 1, "Error")
    assert "outside Podvisor" in got.message


def test_crash_event_is_an_error(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    fakes.libvirt.set_state(c.domain_name, "crashed")
    service.on_domain_event(c.domain_name, "crashed", "crashed")
    got = service.get(c.id)
    assert (got.exit_code, got.reason, got.message) == (1, "Error", "the guest crashed")


def test_events_for_other_domains_or_kinds_are_ignored(fakes: ContainerFakes,
                                                       service: ContainerService) -> None:
    c = _running(service, fakes)
    service.on_domain_event("someone-else", "stopped", "destroyed")
    service.on_domain_event(c.domain_name, "started", "booted")
    service.on_domain_event(c.domain_name, "suspended", "paused")
    assert service.get(c.id).state is ContainerState.RUNNING
    assert fakes.journal.of("store.") == []


def test_event_for_a_created_container_is_ignored(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _created(service, fakes)
    service.on_domain_event(c.domain_name, "stopped", "destroyed")
    assert service.get(c.id).state is ContainerState.CREATED


def test_reconcile_marks_a_missing_domain_exited(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    del fakes.libvirt.states[c.domain_name]  # gone after a libvirtd restart
    got = service.get(c.id)
    assert (got.state, got.exit_code, got.reason) == (ContainerState.EXITED, 1, "Error")
    assert got.message == "the libvirt domain no longer exists"
    assert fakes.console.following == set()
    assert fakes.store.rows[c.id].state is ContainerState.EXITED


def test_reconcile_in_list_catches_a_missed_event(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    fakes.libvirt.set_state(c.domain_name, "shutoff", "failed")
    [got] = service.list()
    assert (got.id, got.state, got.exit_code, got.message) == (
        c.id, ContainerState.EXITED, 1, "QEMU failed or was killed")


def test_reconcile_keeps_last_state_when_libvirt_is_unreachable(fakes: ContainerFakes,
                                                                 service: ContainerService) -> None:
    c = _running(service, fakes)
    fakes.libvirt.fail["domain_state"] = Internal("libvirt down")
    assert service.get(c.id).state is ContainerState.RUNNING


# remove ----------------------------------------------------------------------------------


def test_remove_undefines_and_forgets(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _created(service, fakes)
    service.remove(c.id)
    assert fakes.journal.events == [
        ("store.save", c.id, ContainerState.REMOVING),
        ("libvirt.destroy_domain", c.domain_name),
        ("console.unfollow", c.id),
        ("libvirt.undefine_domain", c.domain_name),
        ("files.remove_container_dir", c.directory),
        ("store.delete", c.id),
    ]
    assert fakes.files.dirs == set()
    assert fakes.libvirt.xml == {}
    assert fakes.store.rows == {}
    assert service.list() == []
    with pytest.raises(NotFound):
        service.get(c.id)


def test_remove_of_a_running_container_hard_stops_it(fakes: ContainerFakes,
                                                     service: ContainerService) -> None:
    c = _running(service, fakes)
    service.remove(c.id)
    assert fakes.journal.of("libvirt.destroy_domain") == [("libvirt.destroy_domain", c.domain_name)]
    assert fakes.console.following == set()
    assert service.list() == []
    # The destroy's own event, arriving late, finds nothing.
    service.on_domain_event(c.domain_name, "stopped", "destroyed")
    assert fakes.store.rows == {}


def test_remove_is_idempotent(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _created(service, fakes)
    service.remove(c.id)
    fakes.journal.clear()
    service.remove(c.id)
    service.remove("0" * 64)
    assert fakes.journal.events == []


def test_remove_frees_the_sandbox_slot(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _created(service, fakes)
    service.remove(c.id)
    assert service.create(cspec()).state is ContainerState.CREATED


# list --------------------------------------------------------------------------------------


def test_list_filters(fakes: ContainerFakes, service: ContainerService) -> None:
    a = service.create(cspec(labels={"app": "web", "tier": "front"}))
    service.start(a.id)
    b = service.create(cspec(sandbox_id=OTHER_SANDBOX_ID, labels={"app": "db"}))
    assert [c.id for c in service.list()] == [a.id, b.id]
    assert [c.id for c in service.list(ContainerFilter())] == [a.id, b.id]
    assert [c.id for c in service.list(ContainerFilter(id=a.id))] == [a.id]
    assert [c.id for c in service.list(ContainerFilter(id=b.id[:8]))] == [b.id]
    assert [c.id for c in service.list(ContainerFilter(sandbox_id=OTHER_SANDBOX_ID))] == [b.id]
    assert [c.id for c in service.list(ContainerFilter(sandbox_id=SANDBOX_ID[:6]))] == [a.id]
    assert [c.id for c in service.list(ContainerFilter(state=ContainerState.RUNNING))] == [a.id]
    assert [c.id for c in service.list(ContainerFilter(state=ContainerState.CREATED))] == [b.id]
    assert service.list(ContainerFilter(state=ContainerState.EXITED)) == []
    assert [c.id for c in service.list(ContainerFilter(label_selector={"app": "db"}))] == [b.id]
    assert [c.id for c in service.list(ContainerFilter(label_selector={"app": "web", "tier": "front"}))] == [a.id]
    assert service.list(ContainerFilter(label_selector={"app": "web", "tier": "back"})) == []
    assert service.list(ContainerFilter(id="0" * 64)) == []
    assert service.list(ContainerFilter(id=a.id, sandbox_id=OTHER_SANDBOX_ID)) == []


def test_list_hides_a_container_being_created(fakes: ContainerFakes, service: ContainerService) -> None:
    seen: list[list[Container]] = []
    fakes.libvirt.hooks["define_domain"] = lambda _name: seen.append(service.list())
    c = service.create(cspec())
    assert seen == [[]]
    assert service.list() == [c]


# update_resources ----------------------------------------------------------------------------


def test_update_resources_of_a_running_vm_is_live(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    got = service.update_resources(c.id, CRIResources(memory_limit_in_bytes=512 * MiB, cpu_quota=2 * 100_000))
    assert fakes.journal.of("libvirt.set_") == [
        ("libvirt.set_domain_memory", c.domain_name, 512 * MiB, True),
        ("libvirt.set_domain_vcpus", c.domain_name, 2, True),
    ]
    assert (got.memory_bytes, got.vcpus, got.state) == (512 * MiB, 2, ContainerState.RUNNING)
    assert fakes.store.rows[c.id] == got


def test_update_resources_of_a_created_vm_is_config_only(fakes: ContainerFakes,
                                                         service: ContainerService) -> None:
    c = _created(service, fakes)
    got = service.update_resources(c.id, CRIResources(memory_limit_in_bytes=1024 * MiB, cpu_quota=4 * 100_000))
    assert fakes.journal.of("libvirt.set_") == [
        ("libvirt.set_domain_memory", c.domain_name, 1024 * MiB, False),
        ("libvirt.set_domain_vcpus", c.domain_name, 4, False),
    ]
    assert (got.memory_bytes, got.vcpus) == (1024 * MiB, 4)


def test_update_resources_to_current_values_calls_nothing(fakes: ContainerFakes,
                                                          service: ContainerService) -> None:
    c = _running(service, fakes)
    service.update_resources(c.id, CRIResources(memory_limit_in_bytes=256 * MiB, cpu_quota=1 * 100_000))
    assert fakes.journal.of("libvirt.set_") == []


def test_update_resources_beyond_the_maximum_is_refused(fakes: ContainerFakes,
                                                        service: ContainerService) -> None:
    c = _running(service, fakes)
    with pytest.raises(InvalidArgument) as exc:
        service.update_resources(c.id, CRIResources(memory_limit_in_bytes=1024 * MiB + 1))
    assert exc.value.field == "linux.memory_limit_in_bytes"
    assert str(1024 * MiB) in exc.value.message
    with pytest.raises(InvalidArgument) as exc:
        service.update_resources(c.id, CRIResources(memory_limit_in_bytes=8 * MiB))
    assert exc.value.field == "linux.memory_limit_in_bytes"
    with pytest.raises(InvalidArgument) as exc:
        service.update_resources(c.id, CRIResources(cpu_quota=5 * 100_000))
    assert exc.value.field == "linux.cpu_quota"
    assert fakes.journal.of("libvirt.set_") == []
    assert fakes.store.rows[c.id].memory_bytes == 256 * MiB


@pytest.mark.parametrize(("resources", "field"), [
    pytest.param(CRIResources(cpu_quota=200_000, cpu_period=-100_000), "linux.cpu_period", id="negative-period"),
    pytest.param(CRIResources(cpu_quota=200_000, cpu_period=10), "linux.cpu_period", id="period-below-1ms"),
    pytest.param(CRIResources(cpu_quota=200_000, cpu_period=2_000_000), "linux.cpu_period", id="period-above-1s"),
    pytest.param(CRIResources(cpu_quota=-5), "linux.cpu_quota", id="quota-below-minus-one"),
    pytest.param(CRIResources(cpu_quota=999), "linux.cpu_quota", id="quota-below-1ms"),
    pytest.param(CRIResources(cpu_quota=2**62, cpu_period=1000), "linux.cpu_quota", id="quota-too-many-vcpus"),
    pytest.param(CRIResources(cpu_shares=-1), "linux.cpu_shares", id="negative-shares"),
    pytest.param(CRIResources(cpu_shares=1 << 20), "linux.cpu_shares", id="shares-above-kernel-max"),
    pytest.param(CRIResources(memory_limit_in_bytes=-1), "linux.memory_limit_in_bytes", id="negative-memory"),
])
def test_update_resources_checks_the_cri_fields_as_create_does(
        fakes: ContainerFakes, service: ContainerService, resources: CRIResources, field: str) -> None:
    """Issue #10 item 9: a negative period used to become a negative vCPU count sent to libvirt."""
    c = _running(service, fakes)
    with pytest.raises(InvalidArgument) as exc:
        service.update_resources(c.id, resources)
    assert exc.value.field == field
    # The same values, as CreateContainer fields, fail on the same field.
    with pytest.raises(InvalidArgument) as created:
        cri_sizes(resources, "config.linux.resources")
    assert created.value.field == field.replace("linux.", "config.linux.resources.")
    assert fakes.journal.of("libvirt.set_") == []
    assert fakes.store.rows[c.id].vcpus == 1


def test_update_resources_does_not_resurrect_a_container_that_exited_meanwhile(
        fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)

    def guest_powers_off(name: str) -> None:  # the event thread runs while libvirt is called
        fakes.libvirt.set_state(name, "shutoff", "shutdown")
        service.on_domain_event(name, "stopped", "shutdown")
    fakes.libvirt.hooks["set_domain_memory"] = guest_powers_off
    service.update_resources(c.id, CRIResources(memory_limit_in_bytes=512 * MiB))
    assert fakes.store.rows[c.id].state is ContainerState.EXITED


def test_stop_keeps_an_exit_recorded_by_the_event_thread_during_reconcile(
        fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    calls = {"n": 0}

    # Read "running" first, then have the crash recorded before stop() marks stop_requested.
    original = fakes.libvirt.domain_state

    def domain_state(name: str) -> DomainState:
        st = original(name)
        if not calls["n"]:
            calls["n"] = 1
            fakes.libvirt.set_state(name, "crashed")
            service.on_domain_event(name, "crashed", "crashed")
        return st
    fakes.libvirt.domain_state = domain_state  # type: ignore[method-assign]
    service.stop(c.id, 5)
    got = service.get(c.id)
    assert (got.exit_code, got.reason, got.message) == (1, "Error", "the guest crashed")


# reopen_log / stats --------------------------------------------------------------------------


def test_reopen_log_of_a_running_container(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    service.reopen_log(c.id)
    assert fakes.journal.of("console.") == [("console.reopen", c.id, f"{LOG_DIR}/vm/0.log")]


def test_reopen_log_of_a_stopped_container_fails(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _created(service, fakes)
    with pytest.raises(FailedPrecondition):
        service.reopen_log(c.id)


def test_stats_read_libvirt_only_when_running(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _created(service, fakes)
    s = service.stats(service.get(c.id))
    assert (s.cpu_time_ns, s.rss_bytes, s.writable_bytes) == (0, 0, 4096)
    service.start(c.id)
    s = service.stats(service.get(c.id))
    assert (s.cpu_time_ns, s.rss_bytes, s.balloon_bytes, s.guest_available_bytes, s.writable_bytes) == (
        5, 6, 7, 8, 4096)


# events() ------------------------------------------------------------------------------------


def _subscribe(service: ContainerService) -> tuple[list[ContainerEvent], threading.Event, threading.Thread]:
    got: list[ContainerEvent] = []
    stop = threading.Event()

    def run() -> None:
        for ev in service.events(stop):
            got.append(ev)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    # events() subscribes on its first next(): wait until the generator has registered.
    deadline = time.monotonic() + 5
    while not service._events.subscriber_count() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service._events.subscriber_count()
    return got, stop, t


def test_events_stream_the_lifecycle_in_order(fakes: ContainerFakes, service: ContainerService) -> None:
    got, stop, t = _subscribe(service)
    c = service.create(cspec())
    service.start(c.id)
    service.stop(c.id, 0)
    service.remove(c.id)
    deadline = time.monotonic() + 5
    while len(got) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(timeout=5)
    assert not t.is_alive()
    assert [(e.container_id, e.sandbox_id, e.kind) for e in got] == [
        (c.id, SANDBOX_ID, "created"), (c.id, SANDBOX_ID, "started"),
        (c.id, SANDBOX_ID, "stopped"), (c.id, SANDBOX_ID, "deleted"),
    ]
    assert [e.at_ns for e in got] == sorted(e.at_ns for e in got)
    assert service._events.subscriber_count() == 0


def test_close_streams_ends_every_subscriber(service: ContainerService) -> None:
    got, stop, t = _subscribe(service)
    service.close_streams()
    t.join(timeout=5)
    assert not t.is_alive()
    assert got == []
    assert not stop.is_set()


def test_a_rolled_back_create_emits_nothing(fakes: ContainerFakes, service: ContainerService) -> None:
    got, stop, t = _subscribe(service)
    fakes.libvirt.fail["define_domain"] = Internal("boom")
    with pytest.raises(Internal):
        service.create(cspec())
    del fakes.libvirt.fail["define_domain"]
    c = service.create(cspec(sandbox_id=OTHER_SANDBOX_ID))
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(timeout=5)
    assert [(e.container_id, e.kind) for e in got] == [(c.id, "created")]


# recover() -----------------------------------------------------------------------------------


def _domain_xml(c: Container, root: str = str(STATE_ROOT)) -> str:
    return (f"<domain><name>{c.domain_name}</name><metadata><podvisor container='{c.id}'/></metadata>"
            f"<disk><source file='{root}/{c.sandbox_id}/containers/{c.id}/disk.qcow2'/></disk></domain>")


def test_recover_rolls_back_adopts_and_undefines_orphans(fakes: ContainerFakes) -> None:
    creating = record("1" * 64, ContainerState.CREATING, created_at_ns=100)
    running = record("2" * 64, ContainerState.RUNNING, sandbox_id=OTHER_SANDBOX_ID, created_at_ns=200)
    created = record("3" * 64, ContainerState.CREATED, sandbox_id="f" * 64, created_at_ns=300)
    for c in (creating, running, created):
        fakes.store.rows[c.id] = c
    orphan = record("4" * 64, ContainerState.RUNNING)  # ours, but its record is gone
    foreign_plain = "someones-vm"
    foreign_other_agent = record("5" * 64, ContainerState.RUNNING)
    lib = fakes.libvirt
    lib.xml = {
        creating.domain_name: _domain_xml(creating),
        running.domain_name: _domain_xml(running),
        created.domain_name: _domain_xml(created),
        orphan.domain_name: _domain_xml(orphan),
        foreign_plain: "<domain><name>someones-vm</name><disk><source file='/state/sandboxes/x'/></disk></domain>",
        foreign_other_agent.domain_name: _domain_xml(foreign_other_agent, root="/other-agent/sandboxes"),
    }
    lib.set_state(creating.domain_name, "shutoff", "unknown")
    lib.set_state(running.domain_name, "running")
    lib.set_state(created.domain_name, "shutoff", "unknown")
    lib.set_state(orphan.domain_name, "running")
    lib.set_state(foreign_plain, "running")
    lib.set_state(foreign_other_agent.domain_name, "running")
    fakes.files.dirs = {c.directory for c in (creating, running, created, orphan)}

    service = ContainerService(fakes.ports)
    service.recover()

    # CREATING: rolled back.
    assert fakes.store.rows.keys() == {running.id, created.id}
    assert creating.directory not in fakes.files.dirs
    assert creating.domain_name not in lib.xml
    # RUNNING: adopted, its console followed again.
    assert fakes.journal.of("console.") == [
        ("console.follow", running.id, running.console_log, running.log_path,
         f"{running.directory}/console.state"),
    ]
    assert service.get(running.id).state is ContainerState.RUNNING
    assert service.get(created.id).state is ContainerState.CREATED
    assert [c.id for c in service.list()] == [running.id, created.id]
    # Orphan of this agent: hard-stopped and undefined.
    assert ("libvirt.destroy_domain", orphan.domain_name) in fakes.journal.events
    assert ("libvirt.undefine_domain", orphan.domain_name) in fakes.journal.events
    assert orphan.domain_name not in lib.xml
    # Foreign domains untouched.
    for name in (foreign_plain, foreign_other_agent.domain_name):
        assert [e for e in fakes.journal.events if len(e) > 1 and e[1] == name
                and e[0] != "libvirt.domain_state"] == []
        assert name in lib.xml
        assert lib.states[name] == DomainState("running")
    # Adopted domains were neither destroyed nor undefined.
    for c in (running, created):
        assert ("libvirt.destroy_domain", c.domain_name) not in fakes.journal.events
        assert ("libvirt.undefine_domain", c.domain_name) not in fakes.journal.events
        assert c.domain_name in lib.xml
    assert lib.states[running.domain_name] == DomainState("running")


def test_recover_marks_a_running_container_whose_domain_vanished(fakes: ContainerFakes) -> None:
    running = record("2" * 64, ContainerState.RUNNING)
    fakes.store.rows[running.id] = running
    service = ContainerService(fakes.ports)
    service.recover()
    got = service.get(running.id)
    assert (got.state, got.exit_code, got.reason) == (ContainerState.EXITED, 1, "Error")
    assert fakes.console.following == set()


def test_recover_finishes_a_removal(fakes: ContainerFakes) -> None:
    removing = dataclasses.replace(record("6" * 64, ContainerState.REMOVING), stop_requested=True)
    fakes.store.rows[removing.id] = removing
    fakes.libvirt.xml[removing.domain_name] = _domain_xml(removing)
    fakes.files.dirs.add(removing.directory)
    service = ContainerService(fakes.ports)
    service.recover()
    assert fakes.store.rows == {}
    assert fakes.files.dirs == set()
    assert fakes.libvirt.xml == {}
    assert service.list() == []


def test_recover_adopts_a_created_container_whose_domain_runs(fakes: ContainerFakes) -> None:
    # The agent died in StartContainer after the domain started, before RUNNING was recorded.
    created = record("3" * 64, ContainerState.CREATED)
    fakes.store.rows[created.id] = created
    fakes.libvirt.xml[created.domain_name] = _domain_xml(created)
    fakes.libvirt.set_state(created.domain_name, "running")
    service = ContainerService(fakes.ports)
    service.recover()
    got = service.get(created.id)
    assert got.state is ContainerState.RUNNING and got.started_at_ns > 0
    assert fakes.store.rows[created.id].state is ContainerState.RUNNING
    assert fakes.console.following == {created.id}
    assert ("libvirt.destroy_domain", created.domain_name) not in fakes.journal.events


def test_recover_without_libvirt_still_loads_records(fakes: ContainerFakes) -> None:
    created = record("3" * 64, ContainerState.CREATED)
    fakes.store.rows[created.id] = created
    fakes.libvirt.list_domains = lambda: (_ for _ in ()).throw(Internal("down"))  # type: ignore[method-assign]
    service = ContainerService(fakes.ports)
    service.recover()
    assert [c.id for c in service.list()] == [created.id]


def test_recovered_slot_still_blocks_a_second_container(fakes: ContainerFakes) -> None:
    created = record("3" * 64, ContainerState.CREATED)
    fakes.store.rows[created.id] = created
    service = ContainerService(fakes.ports)
    service.recover()
    with pytest.raises(FailedPrecondition):
        service.create(cspec())


# the pod's cgroup (issue #10, item 5) -------------------------------------------------------------

POD_CGROUP = "/kubepods/burstable/pod-uid-1"


def _in_cgroup(fakes: ContainerFakes, cgroup_parent: str = POD_CGROUP, exists: bool = True) -> str:
    sid = "c" * 64
    fakes.sandboxes.by_id[sid] = sandbox(sid, cgroup_parent=cgroup_parent)
    if exists:
        fakes.cgroups.existing.add(POD_CGROUP)
    return sid


def test_a_missing_pod_cgroup_fails_create_before_anything_is_written(fakes: ContainerFakes,
                                                                      service: ContainerService) -> None:
    sid = _in_cgroup(fakes, exists=False)
    with pytest.raises(FailedPrecondition, match="cgroup /kubepods/burstable/pod-uid-1 .* does not exist"):
        service.create(cspec(sandbox_id=sid))
    assert fakes.journal.of("store.") == [] and fakes.journal.of("files.") == []
    assert fakes.journal.of("libvirt.") == []


def test_start_places_the_vm_in_the_pod_cgroup_and_removal_releases_it(fakes: ContainerFakes,
                                                                       service: ContainerService) -> None:
    sid = _in_cgroup(fakes)
    c = service.create(cspec(sandbox_id=sid))
    service.start(c.id)
    assert fakes.cgroups.placed == {f"{POD_CGROUP}/{c.id}": 4242}
    events = [e[0] for e in fakes.journal.events]
    assert events.index("libvirt.start_domain") < events.index("libvirt.domain_pid") < events.index(
        "cgroups.place")
    service.remove(c.id)
    assert fakes.cgroups.placed == {}
    assert ("cgroups.remove", POD_CGROUP, c.id) in fakes.journal.events


def test_a_vm_that_cannot_be_placed_does_not_run(fakes: ContainerFakes, service: ContainerService) -> None:
    sid = _in_cgroup(fakes)
    c = service.create(cspec(sandbox_id=sid))
    fakes.cgroups.fail_place = FailedPrecondition("cannot move the VM's QEMU process into the pod's cgroup")
    with pytest.raises(FailedPrecondition, match="cannot move"):
        service.start(c.id)
    assert fakes.libvirt.states[c.domain_name].state == "shutoff"
    assert service.get(c.id).state is ContainerState.CREATED
    assert c.id not in fakes.console.following


def test_a_pod_cgroup_removed_after_create_fails_start_cleanly(fakes: ContainerFakes,
                                                               service: ContainerService) -> None:
    sid = _in_cgroup(fakes)
    c = service.create(cspec(sandbox_id=sid))
    fakes.cgroups.existing.clear()
    fakes.journal.clear()
    with pytest.raises(FailedPrecondition, match="does not exist"):
        service.start(c.id)
    assert fakes.journal.of("libvirt.start_domain") == []


def test_a_systemd_slice_is_left_to_libvirt(fakes: ContainerFakes, service: ContainerService) -> None:
    """kubelet's systemd driver: libvirt's <resource><partition> places the VM (VMBuilder renders it)."""
    sid = "c" * 64
    fakes.sandboxes.by_id[sid] = sandbox(sid, cgroup_parent="kubepods-burstable-pod12.slice")
    fakes.cgroups.existing.add("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice")
    c = service.create(cspec(sandbox_id=sid))
    service.start(c.id)
    assert fakes.journal.of("cgroups.place") == [] and fakes.journal.of("libvirt.domain_pid") == []


def test_a_hot_plugged_vcpu_is_moved_back_into_the_pod_cgroup(fakes: ContainerFakes,
                                                              service: ContainerService) -> None:
    sid = _in_cgroup(fakes)
    c = _running(service, fakes, sandbox_id=sid)
    service.update_resources(c.id, CRIResources(cpu_quota=200_000, cpu_period=100_000))
    assert [e[0] for e in fakes.journal.events if e[0] in ("libvirt.set_domain_vcpus", "cgroups.place")] == [
        "libvirt.set_domain_vcpus", "cgroups.place"]


# the command as the VM's workload --------------------------------------------------------


@pytest.mark.parametrize(("code", "reason"), [(0, "Completed"), (3, "Error"), (137, "Error")])
def test_the_commands_exit_code_is_the_containers(fakes: ContainerFakes, service: ContainerService,
                                                  code: int, reason: str) -> None:
    c = _running(service, fakes, command=("/usr/bin/job",))
    fakes.files.workload_exits[c.directory] = WorkloadExit(code=code)
    fakes.libvirt.set_state(c.domain_name, "shutoff", "shutdown")
    service.on_domain_event(c.domain_name, "stopped", "shutdown")
    got = service.get(c.id)
    assert (got.state, got.exit_code, got.reason) == (ContainerState.EXITED, code, reason)
    assert got.message == f"the command exited with code {code}; the guest powered off"


def test_the_exit_code_is_read_when_the_power_off_was_missed(fakes: ContainerFakes,
                                                             service: ContainerService) -> None:
    # No event (the agent was down): the next read reconciles with libvirt.
    c = _running(service, fakes, command=("/usr/bin/job",))
    fakes.files.workload_exits[c.directory] = WorkloadExit(code=2)
    fakes.libvirt.set_state(c.domain_name, "shutoff", "shutdown")
    got = service.get(c.id)
    assert (got.exit_code, got.reason) == (2, "Error")


def test_a_power_off_before_the_command_reported_is_an_error(fakes: ContainerFakes,
                                                             service: ContainerService) -> None:
    c = _running(service, fakes, command=("/usr/bin/job",))
    fakes.files.workload_exits[c.directory] = WorkloadExit(code=None)
    fakes.libvirt.set_state(c.domain_name, "shutoff", "shutdown")
    service.on_domain_event(c.domain_name, "stopped", "shutdown")
    got = service.get(c.id)
    assert (got.exit_code, got.reason) == (1, "Error")
    assert "before the command reported" in got.message


def test_without_a_command_a_power_off_completes_as_before(fakes: ContainerFakes,
                                                           service: ContainerService) -> None:
    c = _running(service, fakes)
    fakes.libvirt.set_state(c.domain_name, "shutoff", "shutdown")
    service.on_domain_event(c.domain_name, "stopped", "shutdown")
    got = service.get(c.id)
    assert (got.exit_code, got.reason, got.message) == (0, "Completed", "the guest powered off")


def test_stopping_a_vm_whose_command_runs_is_a_stop_not_an_error(fakes: ContainerFakes,
                                                                 service: ContainerService) -> None:
    c = _running(service, fakes, command=("/usr/bin/server",))
    fakes.files.workload_exits[c.directory] = WorkloadExit(code=None)

    def power_off(name: str) -> None:  # the event arrives while StopContainer waits
        fakes.libvirt.set_state(name, "shutoff", "shutdown")
        service.on_domain_event(name, "stopped", "shutdown")
    fakes.libvirt.acpi_powers_off = False
    fakes.libvirt.hooks["shutdown_domain"] = power_off
    service.stop(c.id, 10)
    got = service.get(c.id)
    assert (got.exit_code, got.reason) == (0, "Completed")


def test_a_command_that_ends_during_a_stop_gives_its_code(fakes: ContainerFakes,
                                                          service: ContainerService) -> None:
    c = _running(service, fakes, command=("/usr/bin/job",))
    fakes.files.workload_exits[c.directory] = WorkloadExit(code=143)
    service.stop(c.id, 10)  # the guest obeys ACPI; no event reaches the service first
    got = service.get(c.id)
    assert (got.exit_code, got.reason) == (143, "Error")
