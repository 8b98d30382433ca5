"""ContainerService and pod volumes, on recording fakes: host paths checked before
anything is written, the VM's virtiofsd started right before its domain and
stopped after it, on removal and by recovery, the termination message, the
guest's mount problems in the status."""

from __future__ import annotations

import dataclasses

import pytest

from agent.domain.errors import FailedPrecondition, NotFound, Unavailable
from agent.domain.vm import Container, ContainerState
from agent.domain.volumes import (
    DEFAULT_TERMINATION_PATH,
    FALLBACK_TO_LOGS,
    TERMINATION_PATH_ANNOTATION,
    TERMINATION_POLICY_ANNOTATION,
    Mount,
    Share,
)
from agent.services.containers import ContainerService
from tests.services.container_fakes import ContainerFakes, cspec, record

CONFIG = Mount("/etc/config", "/var/lib/kubelet/pods/u/volumes/kubernetes.io~configmap/cfg", readonly=True)
TERMLOG = Mount(DEFAULT_TERMINATION_PATH, "/var/lib/kubelet/pods/u/containers/vm/abc")
MOUNTS = (CONFIG, TERMLOG)


@pytest.fixture
def fakes() -> ContainerFakes:
    f = ContainerFakes()
    f.volumes.paths.update({CONFIG.host_path: True, TERMLOG.host_path: False})
    return f


@pytest.fixture
def service(fakes: ContainerFakes) -> ContainerService:
    return ContainerService(fakes.ports)


def _socket(c: Container) -> str:
    return f"/run/podvisor/vm/{c.id[:32]}.fs"


def _running(service: ContainerService, fakes: ContainerFakes, **overrides: object) -> Container:
    c = service.create(cspec(mounts=MOUNTS, **overrides))
    service.start(c.id)
    fakes.journal.clear()
    return service.get(c.id)


def test_create_checks_host_paths_and_records_the_shares(fakes: ContainerFakes, service: ContainerService) -> None:
    c = service.create(cspec(mounts=MOUNTS))
    assert c.shares == (Share(CONFIG, "0", True), Share(TERMLOG, "1", False))
    assert c.mounts == MOUNTS
    assert fakes.store.rows[c.id].shares == c.shares
    # Host paths are looked at before anything is written.
    assert fakes.journal.events.index(("volumes.inspect", 2)) < fakes.journal.events.index(
        ("store.save", c.id, ContainerState.CREATING))
    # The seed makes the guest mount them.
    [(request, _, _)] = fakes.vm.seed_calls
    assert request.cloud_init.volumes == c.shares
    # Nothing runs before StartContainer.
    assert fakes.journal.of("volumes.start") == []


def test_a_missing_host_path_fails_create_before_anything_is_written(fakes: ContainerFakes,
                                                                     service: ContainerService) -> None:
    missing = Mount("/data", "/nowhere")
    with pytest.raises(NotFound, match=r"config\.mounts\[1\]\.host_path"):
        service.create(cspec(mounts=(CONFIG, missing)))
    assert fakes.journal.of("store.") == [] and fakes.journal.of("files.") == []
    assert fakes.store.rows == {}


def test_a_container_without_mounts_never_touches_volumes(fakes: ContainerFakes, service: ContainerService) -> None:
    c = service.create(cspec())
    service.start(c.id)
    service.stop(c.id, 0)
    service.remove(c.id)
    assert fakes.journal.of("volumes.") == []
    [(request, _, _)] = fakes.vm.seed_calls
    assert request.cloud_init.volumes == ()


def test_an_agent_without_volumes_refuses_mounts(fakes: ContainerFakes) -> None:
    service = ContainerService(dataclasses.replace(fakes.ports, volumes=None))
    with pytest.raises(FailedPrecondition, match="config.mounts"):
        service.create(cspec(mounts=MOUNTS))
    assert fakes.store.rows == {}


def test_start_runs_virtiofsd_right_before_the_domain(fakes: ContainerFakes, service: ContainerService) -> None:
    c = service.create(cspec(mounts=MOUNTS))
    fakes.journal.clear()
    service.start(c.id)
    names = [e[0] for e in fakes.journal.events]
    assert names.index("volumes.start") < names.index("libvirt.start_domain")
    assert ("volumes.start", _socket(c), 2) in fakes.journal.events
    assert fakes.volumes.running == {_socket(c)}


def test_a_virtiofsd_that_cannot_start_leaves_the_container_created(fakes: ContainerFakes,
                                                                    service: ContainerService) -> None:
    c = service.create(cspec(mounts=MOUNTS))
    fakes.volumes.start_error = FailedPrecondition("virtiofsd for the pod volumes did not start: boom")
    with pytest.raises(FailedPrecondition, match="boom"):
        service.start(c.id)
    assert fakes.journal.of("libvirt.start_domain") == []
    assert service.get(c.id).state is ContainerState.CREATED
    assert fakes.console.following == set()


def test_a_domain_that_cannot_start_stops_its_virtiofsd(fakes: ContainerFakes, service: ContainerService) -> None:
    c = service.create(cspec(mounts=MOUNTS))

    def refuse(name: str) -> None:
        raise Unavailable("libvirt said no")
    fakes.libvirt.hooks["start_domain"] = refuse
    with pytest.raises(Unavailable):
        service.start(c.id)
    assert fakes.volumes.running == set()
    assert service.get(c.id).state is ContainerState.CREATED


def test_stop_ends_virtiofsd_after_the_domain(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    service.stop(c.id, 0)
    names = [e[0] for e in fakes.journal.events]
    assert names.index("libvirt.destroy_domain") < names.index("volumes.stop")
    assert fakes.volumes.running == set()


def test_a_guest_power_off_seen_by_the_event_ends_virtiofsd(fakes: ContainerFakes,
                                                            service: ContainerService) -> None:
    c = _running(service, fakes)
    fakes.libvirt.set_state(c.domain_name, "shutoff", "shutdown")
    service.on_domain_event(c.domain_name, "stopped", "shutdown")
    assert service.get(c.id).state is ContainerState.EXITED
    assert fakes.volumes.running == set()


def test_remove_and_remove_of_the_sandbox_end_virtiofsd(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    service.remove(c.id)
    assert ("volumes.stop", _socket(c)) in fakes.journal.events
    assert fakes.volumes.running == set()


# The termination message ---------------------------------------------------------------------


def test_the_termination_file_becomes_the_message(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    fakes.volumes.files[TERMLOG.host_path] = b"all done\n"
    service.stop(c.id, 0)
    got = service.get(c.id)
    assert (got.exit_code, got.reason, got.message) == (137, "Killed", "all done\n")


def test_the_termination_message_is_at_most_4096_bytes(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    fakes.volumes.files[TERMLOG.host_path] = b"x" * 5000
    service.stop(c.id, 0)
    assert service.get(c.id).message == "x" * 4096


def test_the_annotation_names_the_termination_path(fakes: ContainerFakes, service: ContainerService) -> None:
    other = Mount("/tmp/why", "/var/lib/kubelet/pods/u/containers/vm/why")
    fakes.volumes.paths[other.host_path] = False
    fakes.volumes.files[other.host_path] = b"custom path"
    fakes.volumes.files[TERMLOG.host_path] = b"default path"
    c = service.create(cspec(mounts=(*MOUNTS, other), annotations={TERMINATION_PATH_ANNOTATION: "/tmp/why"}))
    service.start(c.id)
    service.stop(c.id, 0)
    assert service.get(c.id).message == "custom path"


@pytest.mark.parametrize(("policy", "message"), [
    (FALLBACK_TO_LOGS, "line 2\nline 3\n"),
    ("File", "the guest did not shut down within 0s; hard stop"),
])
def test_an_empty_file_falls_back_to_the_log_only_when_asked(fakes: ContainerFakes, service: ContainerService,
                                                             policy: str, message: str) -> None:
    c = _running(service, fakes, annotations={TERMINATION_POLICY_ANNOTATION: policy})
    fakes.volumes.files[c.console_log] = b"".join(f"line {i}\n".encode() for i in range(1, 4))[7:]
    service.stop(c.id, 0)
    assert service.get(c.id).message == message


def test_a_clean_exit_never_falls_back_to_the_log(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes, annotations={TERMINATION_POLICY_ANNOTATION: FALLBACK_TO_LOGS})
    fakes.volumes.files[c.console_log] = b"noise\n"
    fakes.libvirt.set_state(c.domain_name, "shutoff", "shutdown")
    service.on_domain_event(c.domain_name, "stopped", "shutdown")
    got = service.get(c.id)
    assert (got.exit_code, got.message) == (0, "the guest powered off")


# The guest's report ---------------------------------------------------------------------------


def test_a_guest_that_cannot_mount_says_so_in_the_status(fakes: ContainerFakes, service: ContainerService) -> None:
    c = _running(service, fakes)
    assert service.get(c.id).message == ""
    fakes.files.volume_reports[c.directory] = b"error: cannot mount the pod volumes: no virtiofs\n"
    got = service.get(c.id)
    assert (got.state, got.reason, got.message) == (
        ContainerState.RUNNING, "VolumesNotMounted", "cannot mount the pod volumes: no virtiofs")
    fakes.files.volume_reports[c.directory] = b"ok\n"
    assert service.get(c.id).message == ""


# Recovery ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [ContainerState.CREATED, ContainerState.EXITED])
def test_recovery_ends_a_virtiofsd_an_interrupted_start_left(fakes: ContainerFakes, state: ContainerState) -> None:
    c = dataclasses.replace(record("7" * 64, state), shares=(Share(CONFIG, "0", True),))
    fakes.store.rows[c.id] = c
    fakes.volumes.running.add(_socket(c))
    ContainerService(fakes.ports).recover()
    assert fakes.volumes.running == set()


def test_recovery_keeps_the_virtiofsd_of_a_running_vm(fakes: ContainerFakes) -> None:
    c = dataclasses.replace(record("8" * 64, ContainerState.RUNNING), shares=(Share(CONFIG, "0", True),))
    fakes.store.rows[c.id] = c
    fakes.libvirt.xml[c.domain_name] = f"<domain><name>{c.domain_name}</name></domain>"
    fakes.libvirt.set_state(c.domain_name, "running")
    fakes.volumes.running.add(_socket(c))
    ContainerService(fakes.ports).recover()
    assert fakes.volumes.running == {_socket(c)}


def test_recovery_rolls_back_a_creating_record_and_its_share(fakes: ContainerFakes) -> None:
    c = dataclasses.replace(record("9" * 64, ContainerState.CREATING), shares=(Share(CONFIG, "0", True),))
    fakes.store.rows[c.id] = c
    ContainerService(fakes.ports).recover()
    assert fakes.store.rows == {}
    assert ("volumes.stop", _socket(c)) in fakes.journal.events
