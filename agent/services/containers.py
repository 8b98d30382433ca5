"""VM containers: create, start, stop, remove, status, stats, events, updates.

Data path of CreateContainer: check the sandbox and its VM slot → resolve the
image's base disk → merge sizes and cloud-init sources into a VMRequest →
record the container as CREATING → qcow2 overlay over the base → NoCloud seed
ISO → domain XML → define → record CREATED. A crash before CREATED is rolled
back by recovery (the domain, if defined, carries our metadata and is
undefined; files are deleted).

Status comes from libvirt: lifecycle events move RUNNING containers to EXITED
as they happen, and every read reconciles with the domain's state, so a
domain destroyed behind the agent's back, or gone after a libvirtd restart,
shows up as EXITED with a reason.

Beside it: ``vm_build`` decides what the VM is made of (request, seed,
domain XML, NIC; reached through the ``VMBuild`` port), ``container_events``
fans lifecycle events out to GetContainerEvents streams. The service is the
sandbox service's ``SandboxMembers``: StopPodSandbox and RemovePodSandbox stop
and remove the sandbox's VM through it. Start-up recovery (``recover``) is
one step of ``agent.services.recovery.recover``.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent import faults
from agent.domain import vm as vm_model
from agent.domain.cgroups import PodCgroup, pod_cgroup
from agent.domain.errors import FailedPrecondition, InvalidArgument, NotFound, PodvisorError
from agent.domain.filters import selected
from agent.domain.sandbox import Sandbox, SandboxState, resolve_id
from agent.domain.validation import validate_container_spec, validate_id
from agent.domain.vm import Container, ContainerSpec, ContainerState
from agent.domain.vmrequest import CRIResources, cri_sizes
from agent.domain.volumes import (
    MAX_TERMINATION_MESSAGE,
    Share,
    falls_back_to_logs,
    log_tail,
    termination_mount,
    volumes_problem,
)
from agent.services.container_events import ContainerEvent, EventHub
from agent.services.ports import ContainerPorts

log = structlog.get_logger(__name__)

EXIT_KILLED = 137
EXIT_ERROR = 1


@dataclass(frozen=True)
class ContainerFilter:
    id: str = ""
    sandbox_id: str = ""
    state: ContainerState | None = None
    label_selector: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ContainerStats:
    container: Container
    at_ns: int
    cpu_time_ns: int
    rss_bytes: int
    balloon_bytes: int
    guest_available_bytes: int
    writable_bytes: int


# The longest StopContainer waits for a guest's ACPI shutdown by default.
# kubelet passes the pod's terminationGracePeriodSeconds (30 s by default,
# KubeVirt's VMIs 180 s), a number the pod author chooses: uncapped, one call
# could hold a server thread for years.
MAX_STOP_TIMEOUT = 300

# StopContainer's timeline (``timeout`` seconds in all): the ACPI button at
# once; the guest agent's guest-shutdown too once ACPI_ALONE_SHARE of the
# graceful part has passed; the hard stop (destroy) when the graceful part
# ends, DESTROY_RESERVE_S before the timeout (or DESTROY_RESERVE_SHARE of it,
# when that is less), so that libvirt's destroy (SIGTERM to QEMU, SIGKILL
# after a while) still ends within the timeout.
DESTROY_RESERVE_S = 2.0
DESTROY_RESERVE_SHARE = 0.25
ACPI_ALONE_SHARE = 0.5
POLL_S = 0.1


class ContainerService:
    def __init__(self, ports: ContainerPorts, max_stop_timeout: int = MAX_STOP_TIMEOUT,
                 aside: Executor | None = None) -> None:
        self._p = ports
        self._max_stop_timeout = max_stop_timeout
        self._lock = threading.RLock()
        self._by_id: dict[str, Container] = {}
        self._op_locks: dict[str, threading.Lock] = {}
        self._events = EventHub()
        # Containers a StopContainer is handling right now: reconciliation
        # leaves them to it.
        self._stopping: set[str] = set()
        # Domains a rollback could not undefine (libvirtd went away between
        # defining and answering): undefined once libvirtd is back.
        self._undefine_later: set[str] = set()
        # Work done beside a call's own: the DHCP server's start in a create,
        # and the guest agent's shutdown during a stop.
        self._aside = aside or ThreadPoolExecutor(4, thread_name_prefix="container-aside")

    # In-memory view --------------------------------------------------------

    def _put(self, c: Container, persist: bool = True) -> Container:
        if persist:
            self._p.store.save_container(c)
        with self._lock:
            self._by_id[c.id] = c
        return c

    def _op_lock(self, container_id: str) -> threading.Lock:
        with self._lock:
            return self._op_locks.setdefault(container_id, threading.Lock())

    def image_ids_in_use(self) -> set[str]:
        with self._lock:
            return {c.image_id for c in self._by_id.values()}

    def in_sandbox(self, sandbox_id: str) -> list[Container]:
        with self._lock:
            return [c for c in self._by_id.values() if c.sandbox_id == sandbox_id]

    def _find(self, container_id: str) -> Container | None:
        validate_id(container_id, "container_id")
        with self._lock:
            visible = [c.id for c in self._by_id.values() if c.state is not ContainerState.CREATING]
        full = resolve_id(container_id, visible, "container_id")
        return self._by_id.get(full) if full else None

    def get(self, container_id: str) -> Container:
        c = self._find(container_id)
        if c is None:
            raise NotFound(f"container {container_id!r} not found")
        return self._with_volumes_problem(self._reconcile(c))

    # Events ------------------------------------------------------------------

    def _emit(self, c: Container, kind: str) -> None:
        self._events.publish(ContainerEvent(c.id, c.sandbox_id, kind, self._p.clock.now_ns()))

    def events(self, stop: threading.Event) -> Iterator[ContainerEvent]:
        """Lifecycle events from now on, until ``stop`` is set."""
        return self._events.stream(stop)

    def close_streams(self) -> None:
        """End every open event stream (the agent is stopping)."""
        self._events.close()

    # Create ------------------------------------------------------------------

    def create(self, spec: ContainerSpec) -> Container:
        validate_container_spec(spec)
        sandbox_id = self._p.sandboxes.get(spec.sandbox_id).id
        # The sandbox's lock, from the READY check to the end: a concurrent
        # Stop/RemovePodSandbox waits, then stops and removes this VM, or
        # took the sandbox down first and this create is refused.
        with self._p.sandboxes.hold(sandbox_id):
            sandbox = self._p.sandboxes.get(sandbox_id)
            if sandbox.state is not SandboxState.READY:
                raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
            return self._create_in(spec, sandbox)

    def _create_in(self, spec: ContainerSpec, sandbox: Sandbox) -> Container:
        image = self._p.images.get(spec.image)
        request = self._p.vm.request(spec, sandbox)
        shares = self._inspect_mounts(spec)
        if shares:
            request = dataclasses.replace(request, cloud_init=dataclasses.replace(request.cloud_init, volumes=shares))
        self._check_cgroup(sandbox)
        disk = image.disk_for(request.containerdisk_path)
        base_path = self._p.images.base_disk_path(image, disk)

        with self._lock:
            live = [c for c in self._by_id.values() if c.sandbox_id == sandbox.id and c.live]
            if live:
                raise FailedPrecondition(
                    f"pod sandbox {sandbox.id} already has a VM container ({live[0].id}, "
                    f"{live[0].state.value}); a sandbox holds exactly one VM"
                )
            cid = uuid.uuid4().hex + uuid.uuid4().hex
            paths = self._p.files.container_paths(sandbox.id, cid)
            log_path = str(Path(sandbox.spec.log_directory) / spec.log_path) if (
                sandbox.spec.log_directory and spec.log_path) else ""
            c = Container(
                id=cid, sandbox_id=sandbox.id, name=spec.name, attempt=spec.attempt, image=spec.image,
                image_id=image.id, state=ContainerState.CREATING, created_at_ns=self._p.clock.now_ns(),
                domain_name=vm_model.domain_name(cid), directory=paths.directory,
                overlay_path=paths.overlay, seed_path=paths.seed, console_log=paths.console_log,
                serial_socket=paths.serial_socket, log_path=log_path,
                vcpus=request.vcpus, max_vcpus=request.max_vcpus, memory_bytes=request.memory_bytes,
                max_memory_bytes=request.max_memory_bytes, cpu_shares=request.cpu_shares,
                firmware=request.firmware, labels=dict(spec.labels), annotations=dict(spec.annotations),
                shares=shares,
            )
            self._put(c)
            faults.point("container.create.recorded")
        # The pod's DHCP server starts while the disks are prepared.
        dhcp = self._aside.submit(self._p.vm.prepare_network, sandbox) if request.pod_network else None
        try:
            self._p.files.create_container_dir(paths)
            faults.point("container.create.dir")
            self._p.files.create_overlay(base_path, disk.format, paths.overlay)
            faults.point("container.create.overlay")
            self._p.files.write_seed(paths.seed, self._p.vm.seed(request, c, sandbox))
            faults.point("container.create.seed")
            xml = self._p.vm.domain_xml(c, sandbox, request, paths)
            if dhcp is not None:
                dhcp.result()
            self._p.hypervisor.define_domain(xml)
            faults.point("container.create.defined")
            c = self._put(dataclasses.replace(c, state=ContainerState.CREATED))
            faults.point("container.create.created")
        except BaseException:
            if dhcp is not None:
                wait([dhcp])
            self._roll_back(c)
            raise
        log.info("container created", container_id=c.id, sandbox_id=sandbox.id, domain=c.domain_name,
                 image=image.name, vcpus=c.vcpus, memory=c.memory_bytes)
        self._emit(c, "created")
        return c

    # Pod volumes ------------------------------------------------------------------

    def _inspect_mounts(self, spec: ContainerSpec) -> tuple[Share, ...]:
        """The VM's share entries (host paths checked; nothing written yet)."""
        if not spec.mounts:
            return ()
        if self._p.volumes is None:
            raise FailedPrecondition("this agent serves no pod volumes (config.mounts); see docs/volumes.md")
        return self._p.volumes.inspect(spec.mounts)

    def _start_volumes(self, c: Container) -> None:
        if not c.shares or self._p.volumes is None:
            return
        paths = self._p.files.container_paths(c.sandbox_id, c.id)
        self._p.volumes.start(c.directory, paths.virtiofs_socket, c.shares)

    def _stop_volumes(self, c: Container) -> None:
        """End the VM's virtiofsd (its domain is not running); also when a crash left one."""
        if not c.shares or self._p.volumes is None:
            return
        try:
            paths = self._p.files.container_paths(c.sandbox_id, c.id)
            self._p.volumes.stop(c.directory, paths.virtiofs_socket)
        except PodvisorError as exc:
            log.warning("could not stop the VM's virtiofsd", container_id=c.id, error=exc.message)

    def _termination_message(self, c: Container, exit_code: int) -> str:
        """What kubelet's terminationMessagePath/Policy make the message of an exited container ("" for none)."""
        if self._p.volumes is None:
            return ""
        text = ""
        mount = termination_mount(c.shares, dict(c.annotations))
        if mount is not None:
            text = self._p.volumes.read_head(mount.host_path, MAX_TERMINATION_MESSAGE).decode("utf-8", "replace")
        if not text.strip() and falls_back_to_logs(dict(c.annotations), exit_code):
            text = log_tail(self._p.volumes.read_tail(c.console_log, 64 * 1024))
        return text if text.strip() else ""

    def _with_volumes_problem(self, c: Container) -> Container:
        """A running VM whose guest could not mount its volumes says so in its status."""
        if c.state is not ContainerState.RUNNING or not c.shares or c.message:
            return c
        problem = volumes_problem(self._p.files.volumes_report(c.directory))
        if not problem:
            return c
        return dataclasses.replace(c, reason="VolumesNotMounted", message=problem)

    # The pod's cgroup ------------------------------------------------------------

    def _check_cgroup(self, sandbox: Sandbox) -> PodCgroup | None:
        """The sandbox's cgroup (None without one); FailedPrecondition when it does not exist here."""
        pc = pod_cgroup(sandbox.spec.cgroup_parent)
        if pc is not None and not self._p.cgroups.exists(pc.path):
            raise FailedPrecondition(
                f"the pod's cgroup {pc.path} (cgroup_parent {sandbox.spec.cgroup_parent!r} of pod sandbox "
                f"{sandbox.id}) does not exist on this host; kubelet creates it before RunPodSandbox, and the "
                "VM is accounted to it")
        return pc

    def _place(self, c: Container, pc: PodCgroup | None) -> None:
        """Move the running VM's QEMU into the pod's cgroup, where libvirt cannot put it (cgroupfs paths)."""
        if pc is None or not pc.placed_by_agent:
            return
        self._p.cgroups.place(pc.path, c.id, self._p.hypervisor.domain_pid(c.domain_name))

    def _release_cgroup(self, c: Container) -> None:
        """Remove the VM's own cgroup below the pod's (the VM is gone)."""
        try:
            pc = pod_cgroup(self._p.sandboxes.get(c.sandbox_id).spec.cgroup_parent)
        except PodvisorError:
            return
        if pc is not None and pc.placed_by_agent:
            self._p.cgroups.remove(pc.path, c.id)

    def _roll_back(self, c: Container) -> None:
        log.warning("rolling back container creation", container_id=c.id)
        try:
            self._p.hypervisor.undefine_domain(c.domain_name)
        except PodvisorError as exc:
            log.warning("could not undefine during rollback; retried when libvirtd is back",
                        container_id=c.id, error=exc.message)
            with self._lock:
                self._undefine_later.add(c.domain_name)
        self._stop_volumes(c)
        self._p.files.remove_container_dir(c.directory)
        self._p.store.delete_container(c.id)
        with self._lock:
            self._by_id.pop(c.id, None)

    # Start / stop ---------------------------------------------------------------

    def start(self, container_id: str) -> Container:
        begun = self._p.timer.monotonic()
        c = self._find(container_id)
        if c is None:
            raise NotFound(f"container {container_id!r} not found")
        with self._op_lock(c.id):
            c = self._reconcile(c)
            if c.state is not ContainerState.CREATED:
                raise FailedPrecondition(f"container {c.id} is {c.state.value}; only a created container can start")
            pc = self._check_cgroup(self._p.sandboxes.get(c.sandbox_id))
            self._p.console.follow(c.id, c.console_log, c.log_path, self._p.files.console_state(c.directory))
            faults.point("container.start.following")
            try:
                self._start_volumes(c)
                faults.point("container.start.virtiofsd")
                self._p.hypervisor.start_domain(c.domain_name)
                try:
                    self._place(c, pc)
                except BaseException:
                    # Never a VM outside the pod's accounting: it does not run.
                    self._p.hypervisor.destroy_domain(c.domain_name)
                    raise
                faults.point("container.start.started")
            except BaseException:
                self._p.console.unfollow(c.id)
                self._stop_volumes(c)
                raise
            c = self._put(dataclasses.replace(c, state=ContainerState.RUNNING, started_at_ns=self._p.clock.now_ns()))
            faults.point("container.start.running")
        self._p.metrics.vm_started(self._p.timer.monotonic() - begun)
        log.info("container started", container_id=c.id, domain=c.domain_name)
        self._emit(c, "started")
        return c

    def stop(self, container_id: str, timeout: int) -> None:
        """ACPI shutdown, then the guest agent's, then a hard stop; all within ``timeout`` seconds.

        ``timeout`` is capped at ``max_stop_timeout``; 0 is a hard stop at
        once. CRI: stopping a stopped (or unknown) container is not an error.
        """
        if timeout > self._max_stop_timeout:
            log.info("stop timeout capped", container_id=container_id, requested=timeout,
                     cap=self._max_stop_timeout)
            timeout = self._max_stop_timeout
        begun = self._p.timer.monotonic()
        c = self._find(container_id)
        if c is None:
            return
        with self._op_lock(c.id):
            c = self._reconcile(c)
            if c.state is not ContainerState.RUNNING:
                if c.state is ContainerState.CREATED:
                    self._finish(c, exit_code=0, reason="Completed", message="stopped before it started")
                return
            with self._lock:
                # The event thread may have recorded an exit since the read.
                current = self._by_id.get(c.id)
                if current is None or current.state is not ContainerState.RUNNING:
                    return
                c = self._put(dataclasses.replace(current, stop_requested=True))
                faults.point("container.stop.requested")
                self._stopping.add(c.id)
            try:
                self._stop_domain(c, timeout)
            finally:
                self._stopping.discard(c.id)
            self._p.metrics.vm_stopped(self._p.timer.monotonic() - begun)

    def _stop_domain(self, c: Container, timeout: int) -> None:
        """ACPI button; halfway through the graceful part, the guest agent's shutdown too;
        the hard stop early enough that destroying the domain ends within ``timeout``."""
        timer = self._p.timer
        asked_agent = False
        if timeout > 0:
            begun = timer.monotonic()
            graceful = timeout - min(DESTROY_RESERVE_S, timeout * DESTROY_RESERVE_SHARE)
            hard_at = begun + graceful
            agent_at = begun + graceful * ACPI_ALONE_SHARE
            self._p.hypervisor.shutdown_domain(c.domain_name)
            while True:
                state = self._p.hypervisor.domain_state(c.domain_name)
                if state.state in ("shutoff", "missing", "crashed"):
                    break
                now = timer.monotonic()
                if now >= hard_at:
                    break
                if not asked_agent and now >= agent_at:
                    asked_agent = True
                    self._aside.submit(self._ask_guest_agent, c)
                timer.sleep(min(POLL_S, hard_at - now))
        killed = self._p.hypervisor.destroy_domain(c.domain_name)
        faults.point("container.stop.destroyed")
        current = self._by_id.get(c.id, c)
        if current.state is ContainerState.EXITED:
            return  # the event handler recorded the guest's own power-off
        if killed:
            self._finish(current, exit_code=EXIT_KILLED, reason="Killed",
                         message=f"the guest did not shut down within {timeout}s; hard stop")
            return
        reported = self._workload_code(current)
        if reported is not None:
            self._finish(current, **reported)
        elif asked_agent:
            self._finish(current, exit_code=0, reason="Completed",
                         message="shut down on request (ACPI ignored; the guest agent's guest-shutdown)")
        else:
            self._finish(current, exit_code=0, reason="Completed", message="shut down on ACPI request")

    def _ask_guest_agent(self, c: Container) -> None:
        """The guest ignores the ACPI button: ask its agent (runs aside; errors only logged)."""
        try:
            self._p.hypervisor.guest_shutdown(c.domain_name)
            log.info("guest agent asked to shut down", container_id=c.id)
        except PodvisorError as exc:
            log.info("guest agent shutdown not possible", container_id=c.id, error=exc.message)

    def _workload_code(self, c: Container) -> dict[str, Any] | None:
        """The exit the VM's command reported (``_finish`` arguments); None when it has none."""
        try:
            reported = self._p.files.workload_exit(c.directory)
        except PodvisorError:
            return None
        if reported is None or reported.code is None:
            return None
        code = reported.code
        return {"exit_code": code, "reason": "Completed" if code == 0 else "Error",
                "message": f"the command exited with code {code}; the guest powered off"}

    def _finish(self, c: Container, *, exit_code: int, reason: str, message: str) -> Container:
        with self._lock:
            current = self._by_id.get(c.id)
            if current is None or current.state is ContainerState.EXITED:
                return current or c
            # The guest's own termination message (kubelet's terminationMessagePath) wins over ours;
            # it is the workload's text, so only its presence is logged.
            termination = self._termination_message(current, exit_code)
            done = dataclasses.replace(current, state=ContainerState.EXITED, finished_at_ns=self._p.clock.now_ns(),
                                       exit_code=exit_code, reason=reason, message=termination or message,
                                       stop_requested=False)
            self._put(done)
            faults.point("container.stop.exited")
        self._p.console.unfollow(c.id)
        self._stop_volumes(done)
        log.info("container exited", container_id=c.id, exit_code=exit_code, reason=reason, message=message,
                 termination_message=bool(termination))
        self._emit(done, "stopped")
        return done

    # libvirt → state ------------------------------------------------------------

    def on_domain_event(self, domain: str, kind: str, detail: str) -> None:
        """A lifecycle event from libvirt (event thread)."""
        if kind != "stopped" and kind != "crashed":
            return
        with self._lock:
            c = next((x for x in self._by_id.values() if x.domain_name == domain), None)
        if c is None or c.state is not ContainerState.RUNNING:
            return
        self._exit_from(c, detail)

    def _exit_from(self, c: Container, why: str) -> Container:
        if why == "shutdown":
            reported = self._workload_code(c)
            if reported is not None:
                return self._finish(c, **reported)
            if not c.stop_requested and self._has_workload(c):
                return self._finish(c, exit_code=EXIT_ERROR, reason="Error",
                                    message="the guest powered off before the command reported its exit code")
            return self._finish(c, exit_code=0, reason="Completed", message="the guest powered off")
        if c.stop_requested and why in ("destroyed", "shutoff", "unknown"):
            # Our own hard stop (also one a crashed agent did not get to record).
            return self._finish(c, exit_code=EXIT_KILLED, reason="Killed", message="hard stop")
        messages = {
            "destroyed": "the domain was destroyed outside Podvisor",
            "crashed": "the guest crashed",
            "failed": "QEMU failed or was killed",
            "daemon": "libvirtd lost the domain's QEMU process",
            "missing": "the libvirt domain no longer exists",
        }
        return self._finish(c, exit_code=EXIT_ERROR, reason="Error",
                            message=messages.get(why, f"the domain stopped ({why})"))

    def _has_workload(self, c: Container) -> bool:
        """Whether the VM runs a command (it has the exit port)."""
        try:
            return self._p.files.workload_exit(c.directory) is not None
        except PodvisorError:
            return False

    def _reconcile(self, c: Container) -> Container:
        """Bring a record in line with libvirt (a missed event, a vanished domain)."""
        if c.state is not ContainerState.RUNNING or c.id in self._stopping:
            return c
        try:
            state = self._p.hypervisor.domain_state(c.domain_name)
        except PodvisorError:
            return c  # libvirt unreachable: report the last known state
        if state.state in ("running", "paused"):
            return c
        if state.state == "missing":
            return self._exit_from(c, "missing")
        return self._exit_from(c, state.reason or state.state)

    def reconcile_all(self) -> None:
        """After libvirtd came back: undefine what rollbacks left, then check every running VM."""
        with self._lock:
            pending = sorted(self._undefine_later)
        for name in pending:
            try:
                self._p.hypervisor.destroy_domain(name)
                self._p.hypervisor.undefine_domain(name)
            except PodvisorError as exc:
                log.warning("rolled-back domain still not undefined", domain=name, error=exc.message)
                continue
            log.info("rolled-back domain undefined", domain=name)
            with self._lock:
                self._undefine_later.discard(name)
        with self._lock:
            running = [c for c in self._by_id.values() if c.state is ContainerState.RUNNING]
        for c in running:
            self._reconcile(c)

    # Remove -------------------------------------------------------------------------

    def remove(self, container_id: str) -> None:
        """Undefine the domain and delete overlay, seed and logs' state.

        CRI: removing a removed container is not an error; a running one is
        stopped first.
        """
        c = self._find(container_id)
        if c is None:
            return
        with self._op_lock(c.id):
            c = self._by_id.get(c.id)
            if c is None:
                return
            c = self._put(dataclasses.replace(c, state=ContainerState.REMOVING, stop_requested=True))
            faults.point("container.remove.recorded")
            self.finish_removal(c)

    def finish_removal(self, c: Container) -> None:
        self._p.hypervisor.destroy_domain(c.domain_name)
        self._p.console.unfollow(c.id)
        self._stop_volumes(c)
        self._p.hypervisor.undefine_domain(c.domain_name)
        self._release_cgroup(c)
        faults.point("container.remove.undefined")
        self._p.files.remove_container_dir(c.directory)
        faults.point("container.remove.files")
        self._p.store.delete_container(c.id)
        faults.point("container.remove.deleted")
        with self._lock:
            self._by_id.pop(c.id, None)
            self._op_locks.pop(c.id, None)
        log.info("container removed", container_id=c.id)
        self._emit(c, "deleted")

    # Queries ----------------------------------------------------------------------

    def state_counts(self) -> dict[str, int]:
        """How many containers are in each state, as recorded (metrics; no libvirt call)."""
        with self._lock:
            states = [c.state.value for c in self._by_id.values()]
        return {state.value: states.count(state.value) for state in ContainerState}

    def list(self, flt: ContainerFilter | None = None) -> list[Container]:
        with self._lock:
            items = [c for c in self._by_id.values()
                     if c.state not in (ContainerState.CREATING, ContainerState.REMOVING)]
        items = [self._reconcile(c) for c in items]
        items.sort(key=lambda c: c.created_at_ns)
        if flt is None:
            return items
        return [c for c in items
                if c.sandbox_id.startswith(flt.sandbox_id)
                and selected(c.id, c.labels, c.state, id_prefix=flt.id, wanted_state=flt.state,
                             label_selector=flt.label_selector)]

    def domain_xml(self, c: Container) -> str:
        try:
            return str(self._p.hypervisor.domain_xml(c.domain_name))
        except PodvisorError:
            return ""

    def stats(self, c: Container) -> ContainerStats:
        now = self._p.clock.now_ns()
        writable = self._p.files.allocated_bytes(c.overlay_path)
        if c.state is ContainerState.RUNNING:
            try:
                s = self._p.hypervisor.domain_stats(c.domain_name)
                return ContainerStats(c, now, s.cpu_time_ns, s.rss_bytes, s.balloon_bytes,
                                      s.guest_available_bytes, writable)
            except PodvisorError:
                pass
        return ContainerStats(c, now, 0, 0, 0, 0, writable)

    # Updates -----------------------------------------------------------------------

    def update_resources(self, container_id: str, resources: CRIResources) -> Container:
        """Resize to what the CRI fields state, checked exactly as CreateContainer checks them."""
        sizes = cri_sizes(resources, "linux")
        memory_bytes, vcpus = sizes.memory_bytes, sizes.vcpus
        c = self.get(container_id)
        with self._op_lock(c.id):
            if memory_bytes and memory_bytes > c.max_memory_bytes:
                raise InvalidArgument(
                    "linux.memory_limit_in_bytes",
                    f"{memory_bytes} bytes exceeds the VM's maximum of {c.max_memory_bytes} bytes set at "
                    "creation; recreate the VM to grow beyond it")
            if vcpus and vcpus > c.max_vcpus:
                raise InvalidArgument(
                    "linux.cpu_quota", f"{vcpus} vCPUs exceeds the VM's maximum of {c.max_vcpus} set at creation")
            if c.state in (ContainerState.RUNNING, ContainerState.CREATED):
                live = c.state is ContainerState.RUNNING
                if memory_bytes and memory_bytes != c.memory_bytes:
                    self._p.hypervisor.set_domain_memory(c.domain_name, memory_bytes, live=live)
                if vcpus and vcpus != c.vcpus:
                    self._p.hypervisor.set_domain_vcpus(c.domain_name, vcpus, live=live)
                    if live:
                        # libvirt puts a hot-plugged vCPU's thread in its own cgroup: back into the pod's.
                        self._place_again(c)
            with self._lock:
                # Re-read: an exit recorded meanwhile must not be overwritten.
                current = self._by_id.get(c.id, c)
                c = self._put(dataclasses.replace(current, memory_bytes=memory_bytes or current.memory_bytes,
                                                  vcpus=vcpus or current.vcpus))
        log.info("container resources updated", container_id=c.id, vcpus=c.vcpus, memory=c.memory_bytes)
        return c

    def _place_again(self, c: Container) -> None:
        try:
            self._place(c, pod_cgroup(self._p.sandboxes.get(c.sandbox_id).spec.cgroup_parent))
        except PodvisorError as exc:
            log.warning("could not move the VM back into the pod's cgroup", container_id=c.id, error=exc.message)

    def reopen_log(self, container_id: str) -> None:
        c = self.get(container_id)
        if c.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {c.id} is not running")
        if c.log_path:
            self._p.console.reopen(c.id, c.log_path)

    # Sandbox hooks --------------------------------------------------------------------

    def stop_in_sandbox(self, sandbox_id: str) -> None:
        """Hard-stop the sandbox's running VM (StopPodSandbox, RemovePodSandbox)."""
        for c in self.in_sandbox(sandbox_id):
            if c.state is ContainerState.RUNNING:
                self.stop(c.id, 0)

    def remove_in_sandbox(self, sandbox_id: str) -> None:
        """Remove every container of the sandbox (RemovePodSandbox)."""
        for c in self.in_sandbox(sandbox_id):
            self.remove(c.id)

    # Recovery ---------------------------------------------------------------------

    def _adopt_started(self, c: Container) -> Container:
        """A CREATED record whose domain runs: the agent died in StartContainer
        after the domain started and before RUNNING was recorded. The VM is
        booting: the start is finished (recorded RUNNING), not undone."""
        try:
            state = self._p.hypervisor.domain_state(c.domain_name)
        except PodvisorError:
            return c
        if state.state not in ("running", "paused"):
            return c
        log.warning("adopting a VM started by an interrupted StartContainer", container_id=c.id)
        return self._put(dataclasses.replace(c, state=ContainerState.RUNNING, started_at_ns=self._p.clock.now_ns()))

    def recover(self) -> None:
        """Adopt running domains, mark vanished ones, undo half-done creations,
        and undefine orphan domains this agent made."""
        stored = self._p.store.load_containers()
        try:
            domains = self._p.hypervisor.list_domains()
        except PodvisorError as exc:
            log.warning("libvirt unreachable during recovery; states will reconcile later", error=exc.message)
            domains = None
        keep: list[Container] = []
        for c in stored:
            if c.state is ContainerState.CREATING:
                self._roll_back(c)
                continue
            keep.append(c)
        with self._lock:
            for c in keep:
                self._by_id[c.id] = c
        for c in keep:
            if c.state is ContainerState.CREATED and domains is not None and c.domain_name in domains:
                c = self._adopt_started(c)
            if c.state is ContainerState.REMOVING:
                self.finish_removal(c)
            elif c.state in (ContainerState.CREATED, ContainerState.EXITED):
                # An interrupted StartContainer may have left the VM's virtiofsd running.
                self._stop_volumes(c)
            elif c.state is ContainerState.RUNNING:
                try:
                    self._p.console.follow(c.id, c.console_log, c.log_path,
                                           self._p.files.console_state(c.directory))
                except PodvisorError as exc:
                    log.warning("container log not followed", container_id=c.id, error=exc.message)
                self._reconcile(c)
        if domains is not None:
            known = {c.domain_name for c in keep}
            for name, xml in domains.items():
                if not self._p.vm.is_podvisor_domain(xml) or name in known:
                    continue  # not ours, or adopted
                if not self._p.files.owns(xml):
                    continue  # another agent's (its own state directory) on the same libvirtd
                log.warning("undefining orphan domain made by Podvisor", domain=name)
                self._p.hypervisor.destroy_domain(name)
                self._p.hypervisor.undefine_domain(name)
        log.info("containers recovered", containers=len(keep))

