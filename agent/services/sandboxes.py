"""Pod sandbox use cases: run, stop, remove, status, list.

The service keeps an in-memory view of all sandboxes (kubelet relists every
second; reads must not touch the disk) and writes every change through to the
store before it becomes visible. Multi-step operations first persist an
intermediate state (CREATING, REMOVING) so recovery can finish or undo them
after a crash.

A sandbox's VM container is an explicit collaborator, ``SandboxMembers``
(the container service), given at construction. The two services need each
other (the container service looks sandboxes up), so the composition root
builds the sandbox service with a ``LateMembers`` and binds it, once, to the
container service as soon as that exists, before any call is served or any
recovery runs. Until it is bound a sandbox has no members.

Each sandbox has a lock (``hold``): Stop and Remove hold it across their
handling of the sandbox's members and state, CreateContainer across its
READY check and the whole creation, so a VM is either created before the
sandbox goes (and then stopped and removed with it) or refused.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Iterable
from contextlib import AbstractContextManager

import structlog

from agent import faults
from agent.concurrency import KeyedLock
from agent.domain.errors import AlreadyExists, InvalidArgument, NotFound
from agent.domain.sandbox import (
    NetworkMode,
    Sandbox,
    SandboxFilter,
    SandboxSpec,
    SandboxState,
    cri_visible,
    matches,
    resolve_id,
)
from agent.domain.validation import validate_id, validate_sandbox_spec
from agent.services.ports import Ports, SandboxMembers

log = structlog.get_logger(__name__)

# RuntimeClass handlers this runtime serves; "" is kubelet's default.
RUNTIME_HANDLERS = ("", "podvisor")


def new_id() -> str:
    """64 hex characters, like containerd's ids (crictl shortens them to 13)."""
    return secrets.token_hex(32)


class LateMembers:
    """A ``SandboxMembers`` that forwards to the one bound later (see the
    module docstring); unbound, a sandbox has no members."""

    def __init__(self) -> None:
        self._members: SandboxMembers | None = None

    def bind(self, members: SandboxMembers) -> None:
        """Forward to ``members`` from now on (once: a second binding is a wiring bug)."""
        if self._members is not None:
            raise RuntimeError("sandbox members are already bound")
        self._members = members

    def stop_in_sandbox(self, sandbox_id: str) -> None:
        """Stop the sandbox's VM, if any."""
        if self._members is not None:
            self._members.stop_in_sandbox(sandbox_id)

    def remove_in_sandbox(self, sandbox_id: str) -> None:
        """Remove the sandbox's containers, if any."""
        if self._members is not None:
            self._members.remove_in_sandbox(sandbox_id)


class SandboxService:
    def __init__(self, ports: Ports, members: SandboxMembers) -> None:
        self._ports = ports
        self._members = members
        self._lock = threading.RLock()
        self._sandbox_locks = KeyedLock()
        self._by_id: dict[str, Sandbox] = {}
        self._by_name: dict[str, str] = {}
        # Immutable snapshot for lock-free reads; replaced on every change.
        self._snapshot: tuple[Sandbox, ...] = ()

    # In-memory view ------------------------------------------------------

    def load(self, sandboxes: Iterable[Sandbox]) -> None:
        """Install the sandboxes recovery kept (start-up only)."""
        with self._lock:
            for sb in sandboxes:
                self._by_id[sb.id] = sb
                self._by_name[sb.spec.metadata.reservation_key] = sb.id
            self._publish()

    def _publish(self) -> None:
        self._snapshot = tuple(sorted(self._by_id.values(), key=lambda s: s.created_at_ns))

    def _put(self, sb: Sandbox) -> None:
        with self._lock:
            self._by_id[sb.id] = sb
            self._by_name[sb.spec.metadata.reservation_key] = sb.id
            self._publish()

    def _drop(self, sb: Sandbox) -> None:
        with self._lock:
            self._by_id.pop(sb.id, None)
            if self._by_name.get(sb.spec.metadata.reservation_key) == sb.id:
                del self._by_name[sb.spec.metadata.reservation_key]
            self._publish()

    def _find(self, sandbox_id: str, field_name: str) -> Sandbox | None:
        validate_id(sandbox_id, field_name)
        snapshot = self._snapshot
        full = resolve_id(sandbox_id, (s.id for s in cri_visible(snapshot)), field_name)
        if full is None:
            return None
        return self._by_id.get(full)

    def hold(self, sandbox_id: str) -> AbstractContextManager[None]:
        """The sandbox's lock (see the module docstring); ``sandbox_id`` is a full id."""
        return self._sandbox_locks.hold(sandbox_id)

    # Use cases -----------------------------------------------------------

    def run(self, spec: SandboxSpec) -> Sandbox:
        """RunPodSandbox: validate, reserve the name, create the sandbox's state."""
        validate_sandbox_spec(spec)
        if spec.runtime_handler not in RUNTIME_HANDLERS:
            raise InvalidArgument(
                "runtime_handler",
                f"{spec.runtime_handler!r} is not served here (handlers: "
                f"{', '.join(repr(h) for h in RUNTIME_HANDLERS)})",
            )
        key = spec.metadata.reservation_key
        with self._lock:
            existing = self._by_name.get(key)
            if existing is not None:
                # containerd and CRI-O refuse a second sandbox with the same
                # name/namespace/uid/attempt until the first is removed.
                raise AlreadyExists(
                    f"sandbox name {key!r} is reserved for {existing}; "
                    "remove that sandbox first or use another attempt number"
                )
            sb = Sandbox(id=new_id(), spec=spec, state=SandboxState.CREATING,
                         created_at_ns=self._ports.clock.now_ns())
            self._ports.store.insert_sandbox(sb)
            faults.point("sandbox.run.recorded")
            self._by_id[sb.id] = sb
            self._by_name[key] = sb.id
            self._publish()
        try:
            workdir = self._ports.files.create_sandbox_dir(sb.id)
            faults.point("sandbox.run.dir")
            self._ports.files.ensure_log_directory(spec.log_directory)
            faults.point("sandbox.run.log_dir")
            ready = dataclasses.replace(sb, state=SandboxState.READY)
            network = self._ports.network
            if network is not None and spec.network_mode is NetworkMode.POD:
                md = spec.metadata
                net = network.add(sb.id, md.name, md.namespace, md.uid, spec.port_mappings, spec.dns,
                                  spec.hostname or md.name, workdir)
                ready = dataclasses.replace(ready, ip=net.ip, additional_ips=tuple(net.additional_ips))
            elif spec.network_mode is NetworkMode.NODE:
                # hostNetwork: the VM gets a user-mode NIC behind the node's
                # own address (docs/networking.md).
                host = self._ports.host
                ready = dataclasses.replace(ready, ip=host.node_ip() if host is not None else "")
            self._ports.store.update_sandbox(ready)
            faults.point("sandbox.run.ready")
        except BaseException:
            self._roll_back(sb)
            raise
        self._put(ready)
        log.info("sandbox ready", sandbox_id=sb.id, name=key)
        return ready

    def _roll_back(self, sb: Sandbox) -> None:
        log.warning("rolling back sandbox creation", sandbox_id=sb.id)
        self.remove_network(sb)
        self._ports.files.remove_sandbox_dir(sb.id)
        self._ports.store.delete_sandbox(sb.id)
        self._drop(sb)

    def stop(self, sandbox_id: str) -> None:
        """StopPodSandbox. CRI: idempotent, and no error if already reclaimed."""
        sb = self._find(sandbox_id, "pod_sandbox_id")
        if sb is None:
            return
        # CRI: any running container is forcibly stopped (kubelet normally
        # stopped it gracefully before); then the pod network goes (CNI DEL,
        # idempotent, from the on-disk cache).
        with self.hold(sb.id):
            self._members.stop_in_sandbox(sb.id)
            self.remove_network(sb)
            with self._lock:
                sb = self._by_id.get(sb.id)
                if sb is None or sb.state is not SandboxState.READY:
                    return
                stopped = dataclasses.replace(sb, state=SandboxState.NOTREADY,
                                              stopped_at_ns=self._ports.clock.now_ns())
                self._ports.store.update_sandbox(stopped)
                self._put(stopped)
        log.info("sandbox stopped", sandbox_id=sb.id)

    def remove(self, sandbox_id: str) -> None:
        """RemovePodSandbox. CRI: forcibly stops first; no error if already removed."""
        sb = self._find(sandbox_id, "pod_sandbox_id")
        if sb is None:
            return
        # Held until the sandbox is REMOVING: a CreateContainer waiting for
        # it then finds the sandbox not ready (or gone) and creates nothing.
        with self.hold(sb.id):
            self._members.stop_in_sandbox(sb.id)
            self._members.remove_in_sandbox(sb.id)
            with self._lock:
                sb = self._by_id.get(sb.id)
                if sb is None:
                    return
                removing = dataclasses.replace(sb, state=SandboxState.REMOVING)
                self._ports.store.update_sandbox(removing)
                faults.point("sandbox.remove.recorded")
                self._put(removing)
        self.finish_removal(removing)

    def remove_network(self, sb: Sandbox) -> None:
        """Tear the pod network down; a no-op when there is none (idempotent)."""
        network = self._ports.network
        if network is not None and sb.spec.network_mode is NetworkMode.POD:
            network.remove(sb.id, self._ports.files.sandbox_dir(sb.id))

    def finish_removal(self, sb: Sandbox) -> None:
        """Delete everything a sandbox owned; safe to repeat (recovery calls it)."""
        self.remove_network(sb)
        self._ports.files.remove_sandbox_dir(sb.id)
        faults.point("sandbox.remove.files")
        self._ports.store.delete_sandbox(sb.id)
        faults.point("sandbox.remove.deleted")
        self._drop(sb)
        log.info("sandbox removed", sandbox_id=sb.id)

    def get(self, sandbox_id: str) -> Sandbox:
        sb = self._find(sandbox_id, "pod_sandbox_id")
        if sb is None:
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return sb

    def state_counts(self) -> dict[str, int]:
        """How many sandboxes are in each state, as recorded (metrics)."""
        states = [s.state.value for s in self._snapshot]
        return {state.value: states.count(state.value) for state in SandboxState}

    def list(self, flt: SandboxFilter | None = None) -> list[Sandbox]:
        snapshot = self._snapshot
        visible = [s for s in snapshot if s.state is not SandboxState.CREATING]
        if flt is None:
            return visible
        return [s for s in visible if matches(s, flt)]
