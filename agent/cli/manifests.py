"""``podvisorctl apply -f`` / ``delete -f``: KubeVirt manifests → the CRI calls kubelet makes.

Each ``VirtualMachine`` or ``VirtualMachineInstance`` document of the file
(YAML, several documents allowed; JSON is YAML) becomes one pod sandbox and
one VM container, made the way kubelet makes a VM pod:

1. ``RunPodSandbox``: metadata name = ``metadata.name``, namespace =
   ``metadata.namespace`` (else ``-n``, else ``default``), uid =
   ``metadata.uid`` or a new one; the log directory kubelet would use
   (``<log dir>/<namespace>_<name>_<uid>``).
2. ``PullImage`` of the containerDisk image, when the agent does not have it.
3. ``CreateContainer`` named ``compute`` (virt-launcher's container) with the
   containerDisk image as its image and the whole manifest, as JSON, in the
   ``podvisor.io/vm`` annotation: the agent reads the VMI spec from there
   (agent/domain/kubevirt.py), so what the manifest asks for is decided by
   the agent, exactly as when kubelet passes the same annotation.
4. ``StartContainer``.

Re-applying is idempotent: the sandbox carries the SHA-256 of what was
applied (``ctl.podvisor.io/manifest-sha256``); a VM whose pod is ready,
whose container runs and whose hash matches is ``unchanged``. A changed
manifest is refused (a VM's hardware cannot change under a running guest):
``apply --recreate`` deletes and applies it again, as ``kubectl replace
--force`` would. ``delete -f`` stops and removes the pod (its VM with it)
and the pod's log directory, and succeeds when it is already gone.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.api.gen.runtime.v1 import api_pb2
from agent.cli.main import PROG, Client
from agent.cli.vmref import VM, CtlError, by_name, images_stub, list_vms, rpc
from agent.domain import annotations as ann
from agent.domain.errors import InvalidArgument
from agent.domain.kubevirt import KIND_VM, KIND_VMI, vmi_from_document

CONTAINER_NAME = "compute"  # virt-launcher's VM container
HASH_KEY = "ctl.podvisor.io/manifest-sha256"
KIND_KEY = "ctl.podvisor.io/kind"
LOG_DIR_KEY = "ctl.podvisor.io/log-directory"
MANAGED_LABEL = "ctl.podvisor.io/managed"
LOG_DIR_ENV = "PODVISOR_POD_LOG_DIR"
DEFAULT_LOG_DIR = "/var/log/pods"
PULL_TIMEOUT = 600.0
STOP_GRACE_SECONDS = 30


@dataclass(frozen=True)
class Manifest:
    """One VM document of a file, checked, with its CRI identity."""

    kind: str
    name: str
    namespace: str
    uid: str
    image: str
    hostname: str
    document: dict[str, Any]
    source: str  # "FILE[#n]" for messages

    @property
    def digest(self) -> str:
        text = json.dumps(self.document, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _set_image(doc: dict[str, Any], image: str) -> None:
    """Point the containerDisk volume at ``image`` (``apply --image``)."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == KIND_VM:
        spec = (spec.get("template") or {}).get("spec") or {}
    for volume in spec.get("volumes") or []:
        if isinstance(volume, dict) and isinstance(volume.get("containerDisk"), dict):
            volume["containerDisk"]["image"] = image


def load(path: str, namespace: str, *, image: str | None = None, memory: str | None = None) -> list[Manifest]:
    """The VM documents of ``path`` ("-": stdin), checked as the agent will check them."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CtlError("INVALID_ARGUMENT", f"-f {path}: {exc.strerror}", "give a readable manifest file") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise CtlError("INVALID_ARGUMENT", f"-f {path}: not valid YAML ({exc})".replace("\n", " "),
                       "fix the file's syntax") from None
    if not documents:
        raise CtlError("INVALID_ARGUMENT", f"-f {path}: no documents", "give a VirtualMachine manifest")
    out: list[Manifest] = []
    seen: set[tuple[str, str]] = set()
    for i, doc in enumerate(documents):
        source = path if len(documents) == 1 else f"{path}#{i + 1}"
        if not isinstance(doc, dict):
            raise CtlError("INVALID_ARGUMENT", f"{source}: a document is not a mapping",
                           "give VirtualMachine or VirtualMachineInstance manifests")
        if doc.get("kind") not in (KIND_VM, KIND_VMI):
            raise CtlError("INVALID_ARGUMENT", f"{source}.kind: {doc.get('kind')!r} is not a {KIND_VM} "
                           f"or {KIND_VMI}", f"{PROG} applies KubeVirt VM manifests only")
        doc = json.loads(json.dumps(doc, default=str))  # a deep copy, with YAML timestamps as text
        if image:
            _set_image(doc, image)
        try:
            vmi = vmi_from_document(doc, field=source)
            if memory:
                ann.parse_memory(memory)
        except InvalidArgument as exc:
            raise CtlError("INVALID_ARGUMENT", exc.message if hasattr(exc, "message") else str(exc)) from None
        except ValueError as exc:
            raise CtlError("INVALID_ARGUMENT", f"--memory {memory}: {exc}", "e.g. --memory 128Mi") from None
        if vmi.container_disk is None:
            raise CtlError("INVALID_ARGUMENT", f"{source}: no containerDisk volume",
                           "the VM boots from a containerDisk image; add one to spec volumes")
        metadata = doc.get("metadata") or {}
        ns = str(metadata.get("namespace") or namespace)
        name = str(vmi.name)
        if (ns, name) in seen:
            raise CtlError("INVALID_ARGUMENT", f"{source}: {ns}/{name} appears twice in the file",
                           "give each VM its own metadata.name")
        seen.add((ns, name))
        if memory:
            doc.setdefault("metadata", {}).setdefault("annotations", {})[ann.MEMORY] = memory
        out.append(Manifest(
            kind=str(doc["kind"]), name=name, namespace=ns, uid=str(metadata.get("uid") or uuid.uuid4()),
            image=vmi.container_disk.image, hostname=vmi.hostname or name, document=doc, source=source))
    return out


def log_root(args: argparse.Namespace) -> Path:
    return Path(args.log_dir or os.environ.get(LOG_DIR_ENV) or DEFAULT_LOG_DIR)


def _sandbox_config(m: Manifest, logs: Path) -> api_pb2.PodSandboxConfig:
    labels = {
        "io.kubernetes.pod.name": m.name,
        "io.kubernetes.pod.namespace": m.namespace,
        "io.kubernetes.pod.uid": m.uid,
        MANAGED_LABEL: "true",
    }
    labels.update({k: str(v) for k, v in ((m.document.get("metadata") or {}).get("labels") or {}).items()})
    directory = str(logs / f"{m.namespace}_{m.name}_{m.uid}")
    annotations = {HASH_KEY: m.digest, KIND_KEY: m.kind, LOG_DIR_KEY: directory}
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=m.name, namespace=m.namespace, uid=m.uid, attempt=0),
        hostname=m.hostname[:63],
        log_directory=directory,
        labels=labels,
        annotations=annotations,
    )


def _container_config(m: Manifest) -> api_pb2.ContainerConfig:
    annotations = {ann.VM: json.dumps(m.document, sort_keys=True)}
    memory = (m.document.get("metadata") or {}).get("annotations", {}).get(ann.MEMORY)
    if memory:
        annotations[ann.MEMORY] = memory
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=CONTAINER_NAME, attempt=0),
        image=api_pb2.ImageSpec(image=m.image),
        log_path=f"{CONTAINER_NAME}/0.log",
        labels={
            "io.kubernetes.container.name": CONTAINER_NAME,
            "io.kubernetes.pod.name": m.name,
            "io.kubernetes.pod.namespace": m.namespace,
            "io.kubernetes.pod.uid": m.uid,
        },
        annotations=annotations,
    )


def _ensure_image(client: Client, image: str, say: Any) -> None:
    with rpc():
        status = images_stub(client).ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image)), timeout=client.timeout)
    if status.HasField("image") and status.image.id:
        return
    say(f"pulling {image}")
    with rpc(f"push the image, or load it with `{PROG} image import`; check the agent's [registries] "
             "configuration for plain-HTTP registries"):
        images_stub(client).PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)),
                                        timeout=max(client.timeout, PULL_TIMEOUT))


def _remove_pod(client: Client, pod_id: str) -> None:
    with rpc():
        # The VM first, with the ACPI grace period kubelet would give it.
        containers = client.runtime.ListContainers(api_pb2.ListContainersRequest(
            filter=api_pb2.ContainerFilter(pod_sandbox_id=pod_id)), timeout=client.timeout).containers
        for c in containers:
            if c.state == api_pb2.CONTAINER_RUNNING:
                client.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=c.id,
                                                                          timeout=STOP_GRACE_SECONDS),
                                             timeout=client.timeout + STOP_GRACE_SECONDS)
        client.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                      timeout=max(client.timeout, 120))
        client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                        timeout=max(client.timeout, 120))


def _remove_logs(pod: Any) -> None:
    """The log directory apply made for ``pod`` (kubelet removes a pod's logs; the runtime does not).

    Only a directory named as apply names them (``<namespace>_<name>_<uid>``)
    is removed, and only when it is on this host.
    """
    directory = pod.annotations.get(LOG_DIR_KEY, "")
    uid = pod.metadata.uid
    expected = f"{pod.metadata.namespace}_{pod.metadata.name}_{uid}"
    if directory and uid and Path(directory).name == expected and os.path.isdir(directory):
        shutil.rmtree(directory, ignore_errors=True)


def apply_one(client: Client, m: Manifest, logs: Path, *, recreate: bool, say: Any) -> str:
    """Make ``m`` exist; returns what happened ("created", "unchanged", "recreated")."""
    vms = list_vms(client)
    existing = by_name(vms, m.name, m.namespace)
    verb = "created"
    for vm in existing:
        ready = vm.pod.state == api_pb2.SANDBOX_READY
        same = vm.pod.annotations.get(HASH_KEY) == m.digest
        running = vm.container is not None and vm.container.state == api_pb2.CONTAINER_RUNNING
        if ready and same and running:
            return "unchanged"
        if ready and not recreate:
            why = "its manifest changed" if not same else (
                "its VM is not running" if vm.container is not None else "its pod has no VM")
            raise CtlError("FAILED_PRECONDITION", f"{m.kind} {m.namespace}/{m.name} exists and {why}",
                           f"`{PROG} delete -f FILE` then apply again, or `{PROG} apply --recreate -f FILE`")
        say(f"removing the old pod {vm.pod.id[:13]} of {m.namespace}/{m.name}")
        _remove_pod(client, vm.pod.id)
        _remove_logs(vm.pod)
        verb = "recreated" if ready else verb
    _ensure_image(client, m.image, say)
    cfg = _sandbox_config(m, logs)
    with rpc():
        pod_id = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cfg),
                                              timeout=max(client.timeout, 120)).pod_sandbox_id
    try:
        with rpc():
            cid = client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=_container_config(m), sandbox_config=cfg),
                timeout=max(client.timeout, 120)).container_id
            client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid),
                                          timeout=max(client.timeout, 120))
    except BaseException:
        # Nothing half-made stays behind: the next apply starts clean. The
        # error reported is the one that stopped the apply.
        with contextlib.suppress(Exception):
            _remove_pod(client, pod_id)
        shutil.rmtree(cfg.log_directory, ignore_errors=True)
        raise
    return verb


def _kind_word(kind: str) -> str:
    return "virtualmachine" if kind == KIND_VM else "virtualmachineinstance"


def cmd_apply(client: Client, args: argparse.Namespace) -> None:
    manifests = load(args.filename, args.namespace, image=args.image, memory=args.memory)

    def say(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    for m in manifests:
        verb = apply_one(client, m, log_root(args), recreate=args.recreate, say=say)
        print(f"{_kind_word(m.kind)}/{m.name} {verb} (namespace {m.namespace})", flush=True)


def cmd_delete(client: Client, args: argparse.Namespace) -> None:
    manifests = load(args.filename, args.namespace)
    vms = list_vms(client)
    for m in manifests:
        mine: list[VM] = by_name(vms, m.name, m.namespace)
        for vm in mine:
            _remove_pod(client, vm.pod.id)
            _remove_logs(vm.pod)
        word = "deleted" if mine else "already gone"
        print(f"{_kind_word(m.kind)}/{m.name} {word} (namespace {m.namespace})", flush=True)


def wait_running(client: Client, m: Manifest, timeout: float) -> VM:
    """The applied VM once its container runs (apply returns after StartContainer already)."""
    deadline = time.monotonic() + timeout
    while True:
        found = by_name(list_vms(client), m.name, m.namespace)
        if found and found[0].container is not None and found[0].container.state == api_pb2.CONTAINER_RUNNING:
            return found[0]
        if time.monotonic() > deadline:
            raise CtlError("DEADLINE_EXCEEDED", f"{m.namespace}/{m.name} is not running after {timeout:.0f}s",
                           f"see `{PROG} describe vm {m.name}`")
        time.sleep(0.5)


def add_parsers(sub: Any, add: Any) -> None:
    apply = add("apply", cmd_apply, "create KubeVirt VirtualMachine/VirtualMachineInstance manifests as VM pods")
    delete = add("delete", cmd_delete, "stop and remove the VMs of KubeVirt manifests (succeeds if gone)")
    for p in (apply, delete):
        p.add_argument("-f", "--filename", required=True, metavar="FILE", help="manifest file (YAML; - for stdin)")
        p.add_argument("-n", "--namespace", default="default",
                       help="namespace for documents without metadata.namespace (default: default)")
        p.add_argument("--log-dir", default=None, metavar="DIR",
                       help=f"root of pod log directories (default: ${LOG_DIR_ENV} or {DEFAULT_LOG_DIR})")
    apply.add_argument("--image", default=None, metavar="REF",
                       help="boot this image instead of the manifest's containerDisk image")
    apply.add_argument("--memory", default=None, metavar="QUANTITY",
                       help="guest memory over the manifest's (podvisor.io/memory), e.g. 128Mi")
    apply.add_argument("--recreate", action="store_true",
                       help="a VM whose manifest changed is deleted and created again")
