"""What the operator verbs share: one-line errors with a hint, and finding a VM by name or id.

A VM, for podvisorctl, is a pod sandbox and the VM container in it (the
shape ``apply -f`` makes, and the one kubelet makes for a VM pod). Verbs
name it by the manifest's ``metadata.name`` (the pod's name) in a namespace
(``default`` unless ``-n``), or by a pod sandbox id or container id (a
unique prefix of either).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from agent.api.gen.podvisor.v1 import podvisor_pb2_grpc
from agent.api.gen.runtime.v1 import api_pb2, api_pb2_grpc
from agent.cli.main import PROG, Client, CliError

# What to do next, per gRPC code, when the agent refuses a call.
HINTS = {
    "INVALID_ARGUMENT": "fix the field named above in the manifest or the command line",
    "NOT_FOUND": f"see `{PROG} get vms` and `{PROG} get images`",
    "FAILED_PRECONDITION": "see the message; the agent's log (journalctl -u podvisor-agent) has details",
    "ALREADY_EXISTS": f"delete it first (`{PROG} delete -f FILE`)",
    "RESOURCE_EXHAUSTED": "free resources on the host (VMs, images) or retry later",
    "UNAVAILABLE": "is podvisor-agent running and libvirtd reachable? see `podvisorctl status`",
    "DEADLINE_EXCEEDED": "retry with a longer --timeout",
    "PERMISSION_DENIED": "run as root or as a member of the socket's group",
    "UNIMPLEMENTED": "this agent does not offer that call; upgrade podvisor-agent",
    "INTERNAL": "a bug in podvisor-agent: its log (journalctl -u podvisor-agent) says more",
}
MIN_ID_PREFIX = 4


class CtlError(CliError):
    """One line: ``<gRPC code>: <message> — <what to do>``."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        self.code = code
        self.message = message
        self.hint = hint or HINTS.get(code, "")
        super().__init__(f"{code}: {message}" + (f" — {self.hint}" if self.hint else ""))


@contextlib.contextmanager
def rpc(hint: str = "") -> Iterator[None]:
    """Turn the agent's refusals into ``CtlError`` (code, its message, a hint)."""
    try:
        yield
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else str(exc)) or code.name.lower()
        raise CtlError(code.name, details, hint or HINTS.get(code.name, "")) from None


def images_stub(client: Client) -> Any:
    """runtime.v1.ImageService on the client's channel."""
    return api_pb2_grpc.ImageServiceStub(client.channel)


def import_stub(client: Client) -> Any:
    """podvisor.v1.Images on the client's channel."""
    return podvisor_pb2_grpc.ImagesStub(client.channel)


@dataclass
class VM:
    """A pod sandbox and its newest VM container (None: the pod has none)."""

    pod: Any  # runtime.v1.PodSandbox
    container: Any | None  # runtime.v1.Container

    @property
    def name(self) -> str:
        return str(self.pod.metadata.name)

    @property
    def namespace(self) -> str:
        return str(self.pod.metadata.namespace)


def list_vms(client: Client) -> list[VM]:
    """Every pod sandbox with its newest container, newest pods first."""
    with rpc():
        pods = client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=client.timeout).items
        containers = client.runtime.ListContainers(api_pb2.ListContainersRequest(),
                                                   timeout=client.timeout).containers
    newest: dict[str, Any] = {}
    for c in sorted(containers, key=lambda c: c.created_at):
        newest[c.pod_sandbox_id] = c
    return [VM(p, newest.get(p.id)) for p in sorted(pods, key=lambda p: p.created_at, reverse=True)]


def by_name(vms: list[VM], name: str, namespace: str) -> list[VM]:
    """The pods called ``name`` in ``namespace``, ready ones first."""
    found = [v for v in vms if v.name == name and v.namespace == namespace]
    return sorted(found, key=lambda v: v.pod.state != api_pb2.SANDBOX_READY)


def find_vm(client: Client, ref: str, namespace: str) -> VM:
    """The VM ``ref`` names: a name in ``namespace``, else a unique pod or container id prefix."""
    vms = list_vms(client)
    named = by_name(vms, ref, namespace)
    if named:
        return named[0]
    if len(ref) >= MIN_ID_PREFIX:
        hits = [v for v in vms if v.pod.id.startswith(ref)]
        hits += [VM(v.pod, c) for v in vms for c in _containers_of(client, v) if c.id.startswith(ref)]
        unique = {(v.pod.id, v.container.id if v.container else ""): v for v in hits}
        if len(unique) == 1:
            return next(iter(unique.values()))
        if len(unique) > 1:
            raise CtlError("INVALID_ARGUMENT", f"id prefix {ref!r} matches {len(unique)} pods or containers",
                           "give more of the id")
    raise CtlError("NOT_FOUND", f"no VM {ref!r} in namespace {namespace!r} (nor a pod or container id "
                   "starting with it)", f"see `{PROG} get vms` (add -n NAMESPACE for another namespace)")


def _containers_of(client: Client, vm: VM) -> list[Any]:
    """The pod's containers (exited ones too): a container id may name an older attempt."""
    if vm.container is None:
        return []
    with rpc():
        flt = api_pb2.ContainerFilter(pod_sandbox_id=vm.pod.id)
        return list(client.runtime.ListContainers(api_pb2.ListContainersRequest(filter=flt),
                                                  timeout=client.timeout).containers)
