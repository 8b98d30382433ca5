"""``podvisorctl get vms|pods|images``, ``describe vm``, ``logs [-f]``: what runs, for an operator.

Tables by default; ``-o json`` or ``-o yaml`` print the same rows as
documents (YAML with PyYAML, a dependency of the agent already), stable keys
for scripts.

``logs`` reads the container's CRI log file (the VM's serial console, which
the agent writes in the CRI log format) from the path ``ContainerStatus``
gives, as ``crictl logs`` does: podvisorctl talks to the agent over its unix
socket, so it runs on the agent's host and the file is local; reading it
needs no new RPC and shows exactly what kubelet shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import yaml

from agent.api.gen.runtime.v1 import api_pb2
from agent.cli.main import PROG, SHORT_ID, Client, age, human_bytes, print_fields, print_table
from agent.cli.vmref import VM, CtlError, find_vm, images_stub, list_vms, rpc

FOLLOW_POLL_SECONDS = 0.25
STATE_POLL_SECONDS = 1.0
_CONTAINER_STATES = {
    api_pb2.CONTAINER_CREATED: "Created",
    api_pb2.CONTAINER_RUNNING: "Running",
    api_pb2.CONTAINER_EXITED: "Exited",
    api_pb2.CONTAINER_UNKNOWN: "Unknown",
}


def _iso(ns: int) -> str:
    if not ns:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def vm_state(vm: VM) -> str:
    if vm.pod.state != api_pb2.SANDBOX_READY:
        return "PodNotReady"
    if vm.container is None:
        return "NoVM"
    return _CONTAINER_STATES.get(vm.container.state, "Unknown")


def _pod_ip(client: Client, pod_id: str) -> str:
    with rpc():
        try:
            st = client.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id),
                                                 timeout=client.timeout).status
        except Exception:  # noqa: BLE001 - removed meanwhile
            return ""
    return str(st.network.ip)


def vm_row(client: Client, vm: VM) -> dict[str, Any]:
    c = vm.container
    return {
        "name": vm.name,
        "namespace": vm.namespace,
        "state": vm_state(vm),
        "ip": _pod_ip(client, vm.pod.id) if vm.pod.state == api_pb2.SANDBOX_READY else "",
        "image": c.image.image if c is not None else "",
        "pod_id": vm.pod.id,
        "container_id": c.id if c is not None else "",
        "created_at": _iso(vm.pod.created_at),
        "kind": vm.pod.annotations.get("ctl.podvisor.io/kind", ""),
    }


def _emit(args: argparse.Namespace, doc: Any) -> bool:
    fmt = args.format or ("json" if args.output == "json" else "table")
    if fmt == "json":
        print(json.dumps(doc, indent=2))
        return True
    if fmt == "yaml":
        print(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False), end="")
        return True
    return False


def _short(text: str, args: argparse.Namespace) -> str:
    return text if getattr(args, "no_trunc", False) else text[:SHORT_ID]


def get_vms(client: Client, args: argparse.Namespace) -> None:
    vms = [v for v in list_vms(client) if args.all_namespaces or v.namespace == args.namespace]
    rows = [vm_row(client, v) for v in vms]
    if _emit(args, {"vms": rows}):
        return
    now = time.time_ns()
    print_table(("NAME", "NAMESPACE", "STATE", "IP", "IMAGE", "AGE", "POD ID", "CONTAINER ID"), [
        (r["name"], r["namespace"], r["state"], r["ip"] or "-", r["image"] or "-", age(v.pod.created_at, now),
         _short(r["pod_id"], args), _short(r["container_id"], args) or "-")
        for r, v in zip(rows, vms, strict=True)
    ])


def get_pods(client: Client, args: argparse.Namespace) -> None:
    vms = [v for v in list_vms(client) if args.all_namespaces or v.namespace == args.namespace]
    rows = [{
        "id": v.pod.id, "name": v.name, "namespace": v.namespace, "uid": v.pod.metadata.uid,
        "attempt": v.pod.metadata.attempt,
        "state": "Ready" if v.pod.state == api_pb2.SANDBOX_READY else "NotReady",
        "created_at": _iso(v.pod.created_at), "labels": dict(v.pod.labels),
    } for v in vms]
    if _emit(args, {"pods": rows}):
        return
    now = time.time_ns()
    print_table(("POD ID", "NAME", "NAMESPACE", "STATE", "AGE"), [
        (_short(r["id"], args), r["name"], r["namespace"], r["state"], age(v.pod.created_at, now))
        for r, v in zip(rows, vms, strict=True)
    ])


def get_images(client: Client, args: argparse.Namespace) -> None:
    with rpc():
        images = images_stub(client).ListImages(api_pb2.ListImagesRequest(), timeout=client.timeout).images
    rows = [{"id": i.id, "repo_tags": list(i.repo_tags), "repo_digests": list(i.repo_digests),
             "size": int(i.size)} for i in images]
    if _emit(args, {"images": rows}):
        return
    table = []
    for r in rows:
        for ref in r["repo_tags"] or ["<none>"]:
            table.append((ref, _short(r["id"].removeprefix("sha256:"), args), human_bytes(r["size"])))
    print_table(("IMAGE", "IMAGE ID", "SIZE"), table)


def cmd_get(client: Client, args: argparse.Namespace) -> None:
    {"vms": get_vms, "vm": get_vms, "pods": get_pods, "pod": get_pods,
     "images": get_images, "image": get_images}[args.what](client, args)


# describe -----------------------------------------------------------------------


def tail_lines(path: str, count: int) -> list[str]:
    """The last ``count`` console lines of a CRI log file (text only)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 256 * 1024))
            last: deque[str] = deque(maxlen=count)
            for line in parse_cri_log(f):
                last.append(line)
    except OSError:
        return []
    return list(last)


def parse_cri_log(lines: Any) -> Iterator[str]:
    """``<time> <stream> <F|P> <text>`` records → the text, partial lines joined."""
    reader = CriLogReader()
    for raw in lines:
        yield from reader.records([raw.rstrip(b"\n") if isinstance(raw, bytes) else raw.rstrip("\n").encode()])


class CriLogReader:
    """Console lines from CRI log bytes that arrive in pieces (a file being written).

    Bytes after the last newline wait for the rest of their record; the text
    of ``P`` (partial) records waits for the ``F`` record that ends the line.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._partial = ""

    def feed(self, data: bytes) -> list[str]:
        *complete, self._pending = (self._pending + data).split(b"\n")
        return list(self.records(complete))

    def flush(self) -> list[str]:
        """At the end: what is left, even without its newline."""
        rest, self._pending = self._pending, b""
        out = list(self.records([rest])) if rest else []
        if self._partial:
            out.append(self._partial)
            self._partial = ""
        return out

    def records(self, raws: Any) -> Iterator[str]:
        for raw in raws:
            text = raw.decode("utf-8", "replace")
            parts = text.split(" ", 3)
            if len(parts) < 3 or parts[2] not in ("F", "P"):
                yield text  # not a CRI record: show it as it is
                continue
            content = parts[3] if len(parts) == 4 else ""
            if parts[2] == "P":
                self._partial += content
                continue
            yield self._partial + content
            self._partial = ""


def describe_doc(client: Client, vm: VM) -> dict[str, Any]:
    with rpc():
        pod = client.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=vm.pod.id),
                                              timeout=client.timeout).status
        cst = None
        info: dict[str, Any] = {}
        if vm.container is not None:
            resp = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(
                container_id=vm.container.id, verbose=True), timeout=client.timeout)
            cst = resp.status
            try:
                info = json.loads(resp.info.get("info", "{}"))
            except ValueError:
                info = {}
    doc: dict[str, Any] = {
        "name": vm.name, "namespace": vm.namespace, "state": vm_state(vm),
        "pod": {"id": pod.id, "uid": pod.metadata.uid, "attempt": pod.metadata.attempt,
                "state": "Ready" if pod.state == api_pb2.SANDBOX_READY else "NotReady",
                "ip": pod.network.ip, "created_at": _iso(pod.created_at), "labels": dict(pod.labels)},
    }
    if cst is not None:
        lim = cst.resources.linux
        doc["container"] = {
            "id": cst.id, "name": cst.metadata.name, "attempt": cst.metadata.attempt,
            "state": _CONTAINER_STATES.get(cst.state, "Unknown"), "image": cst.image.image,
            "image_id": cst.image_id or cst.image_ref, "created_at": _iso(cst.created_at),
            "started_at": _iso(cst.started_at), "finished_at": _iso(cst.finished_at),
            "exit_code": cst.exit_code, "reason": cst.reason, "message": cst.message, "log_path": cst.log_path,
        }
        doc["resources"] = {
            "vcpus": info.get("vcpus"), "max_vcpus": info.get("maxVcpus"),
            "memory_bytes": info.get("memoryBytes", lim.memory_limit_in_bytes),
            "max_memory_bytes": info.get("maxMemoryBytes"), "firmware": info.get("firmware"),
        }
        doc["domain"] = info.get("domain", "")
        doc["console"] = tail_lines(cst.log_path, 10) if cst.log_path else []
    return doc


def cmd_describe(client: Client, args: argparse.Namespace) -> None:
    vm = find_vm(client, args.name, args.namespace)
    doc = describe_doc(client, vm)
    if _emit(args, doc):
        return
    pod = doc["pod"]
    pairs = [("Name", doc["name"]), ("Namespace", doc["namespace"]), ("State", doc["state"]),
             ("IP", pod["ip"] or "-"), ("Pod", f"{pod['id']} ({pod['state']}, uid {pod['uid']})"),
             ("Pod created", pod["created_at"])]
    c = doc.get("container")
    if c is not None:
        r = doc["resources"]
        mem = r["memory_bytes"]
        pairs += [
            ("Container", f"{c['id']} ({c['name']}, attempt {c['attempt']})"),
            ("Container state", c["state"] + (f" (exit {c['exit_code']}, {c['reason']})"
                                              if c["state"] == "Exited" else "")),
            ("Image", f"{c['image']} ({c['image_id']})"),
            ("Resources", f"{r['vcpus']} vCPU (max {r['max_vcpus']}), "
                          f"{human_bytes(int(mem)) if mem else '?'} memory"
                          + (f" (max {human_bytes(int(r['max_memory_bytes']))})" if r["max_memory_bytes"] else "")
                          + (f", {r['firmware']} firmware" if r["firmware"] else "")),
            ("Domain", doc["domain"] or "-"),
            ("Created", c["created_at"]), ("Started", c["started_at"] or "-"),
            ("Finished", c["finished_at"] or "-"),
            ("Log", c["log_path"] or "-"),
        ]
        if c["message"]:
            pairs.append(("Message", c["message"]))
    else:
        pairs.append(("Container", "none (the pod has no VM)"))
    print_fields(pairs)
    console = doc.get("console") or []
    if console:
        print("\nLast console lines:")
        for line in console:
            print(f"  {line}")


# logs ---------------------------------------------------------------------------


def _container_state(client: Client, cid: str) -> int:
    with rpc():
        try:
            return int(client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid),
                                                      timeout=client.timeout).status.state)
        except Exception:  # noqa: BLE001 - removed: as good as exited
            return int(api_pb2.CONTAINER_EXITED)


def follow(path: str, is_running: Any, out: Any, *, tail: int = -1) -> None:
    """Print the log and, with ``is_running``, what is appended until it says the VM stopped."""
    reader = CriLogReader()

    def emit(lines: list[str]) -> None:
        for line in lines:
            out.write(line + "\n")
        out.flush()

    f = open(path, "rb")  # noqa: SIM115 - closed below
    try:
        if tail >= 0:
            emit(tail_lines(path, tail))
            f.seek(0, os.SEEK_END)
        else:
            emit(reader.feed(f.read()))
        if is_running is None:
            emit(reader.flush())
            return
        inode = os.fstat(f.fileno()).st_ino
        last_check = 0.0
        while True:
            chunk = f.read()
            if chunk:
                emit(reader.feed(chunk))
                continue
            now = time.monotonic()
            if now - last_check >= STATE_POLL_SECONDS:
                last_check = now
                if not is_running():
                    emit(reader.feed(f.read()) + reader.flush())
                    return
                try:
                    if os.stat(path).st_ino != inode:  # rotated (ReopenContainerLog): go on in the new file
                        f.close()
                        f = open(path, "rb")  # noqa: SIM115
                        inode = os.fstat(f.fileno()).st_ino
                        continue
                except FileNotFoundError:
                    pass
            time.sleep(FOLLOW_POLL_SECONDS)
    finally:
        f.close()


def cmd_logs(client: Client, args: argparse.Namespace) -> None:
    vm = find_vm(client, args.name, args.namespace)
    if vm.container is None:
        raise CtlError("FAILED_PRECONDITION", f"pod {vm.namespace}/{vm.name} has no VM container",
                       f"apply its manifest (`{PROG} apply -f FILE`)")
    with rpc():
        st = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=vm.container.id),
                                            timeout=client.timeout).status
    if not st.log_path:
        raise CtlError("FAILED_PRECONDITION", f"VM {vm.name} has no log path (its pod has no log directory)",
                       "create the pod with a log directory, as apply -f does")
    if not os.path.exists(st.log_path):
        raise CtlError("NOT_FOUND", f"log file {st.log_path} does not exist on this host",
                       "run podvisorctl on the agent's host; a VM that never started has no log yet")
    cid = vm.container.id
    running = (lambda: _container_state(client, cid) == api_pb2.CONTAINER_RUNNING) if args.follow else None
    try:
        follow(st.log_path, running, sys.stdout, tail=args.tail)
    except KeyboardInterrupt:
        return


def add_parsers(sub: Any, add: Any) -> None:
    def fmt(p: argparse.ArgumentParser) -> None:
        p.add_argument("-o", "--output", dest="format", choices=("table", "json", "yaml"), default=None,
                       help="output format (default: table)")
        p.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")

    get = add("get", cmd_get, "list VMs, pods or images (table, json or yaml)")
    get.add_argument("what", choices=("vms", "vm", "pods", "pod", "images", "image"), help="what to list")
    fmt(get)
    get.add_argument("-A", "--all-namespaces", action="store_true", help="VMs and pods of every namespace")
    get.add_argument("--no-trunc", action="store_true", help="show full ids")
    describe = add("describe", cmd_describe, "a VM's pod, container, state, IP, image, resources, console")
    describe.add_argument("what", choices=("vm",), help="what to describe")
    describe.add_argument("name", metavar="NAME", help="VM name, or a pod or container id (prefix)")
    fmt(describe)
    logs = add("logs", cmd_logs, "a VM's console log (the container log); -f follows it")
    logs.add_argument("name", metavar="NAME", help="VM name, or a pod or container id (prefix)")
    logs.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the VM stops or Ctrl-C")
    logs.add_argument("--tail", type=int, default=-1, metavar="N", help="only the last N lines (default: all)")
