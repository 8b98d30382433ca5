"""podvisorctl: the operator's command line for one podvisor-agent.

A thin client: every subcommand is one gRPC call on the agent's unix socket,
through the same generated stubs the agent serves, followed by formatting.
Decisions (validation, idempotence, error codes) stay in the agent, so what
podvisorctl shows is exactly what kubelet or crictl would get.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from agent import __version__
from agent.api.gen.podvisor.v1 import podvisor_pb2, podvisor_pb2_grpc
from agent.api.gen.runtime.v1 import api_pb2, api_pb2_grpc
from agent.cli import certs, connect, image_build, streams

PROG = "podvisorctl"
DEFAULT_SOCKET = "/run/podvisor/podvisor.sock"
SOCKET_ENV = "PODVISOR_SOCKET"
SHORT_ID = 13  # as crictl prints sandbox ids


class CliError(Exception):
    """A failure to report as one line on stderr, with exit status 1."""


# Connection ---------------------------------------------------------------


def _check_socket(path: str) -> None:
    """Explain an unreachable agent before gRPC turns it into a vague UNAVAILABLE."""
    hint = f"is podvisor-agent running? (choose the socket with --socket or ${SOCKET_ENV})"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CliError(f"cannot reach podvisor-agent: no socket at {path}; {hint}") from None
    except OSError as exc:
        raise CliError(f"cannot reach podvisor-agent at {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise CliError(f"cannot reach podvisor-agent: {path} is not a unix socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(path)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.EACCES:
            why += "; the socket is mode 0660: run as root or as a member of its group"
        elif exc.errno == errno.ECONNREFUSED:
            why += f"; the socket is stale, nothing listens on it; {hint}"
        raise CliError(f"cannot reach podvisor-agent at {path}: {why}") from None
    finally:
        probe.close()


class Client:
    """Stubs for the services podvisorctl talks to, with one deadline for all calls."""

    def __init__(self, path: str, timeout: float, channel: grpc.Channel | None = None) -> None:
        if channel is None:  # the unix socket (else the mTLS channel of agent.cli.connect)
            _check_socket(path)
            channel = grpc.insecure_channel(f"unix:{path}")
        self.timeout = timeout
        self.channel = channel
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.host = podvisor_pb2_grpc.HostStub(self.channel)

    def close(self) -> None:
        self.channel.close()


# Formatting ---------------------------------------------------------------


def to_dict(msg: Message) -> dict[str, Any]:
    """A message as a JSON-ready dict with proto field names and zero values shown.

    Zero values matter here: SANDBOX_READY is enum value 0 and would otherwise
    vanish from the output.
    """
    convert: Any = json_format.MessageToDict
    try:
        doc = convert(msg, preserving_proto_field_name=True,
                      always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 5.26 spells the option differently
        doc = convert(msg, preserving_proto_field_name=True, including_default_value_fields=True)
    return dict(doc)


def expand_info(info: Any) -> dict[str, Any]:
    """Verbose ``info`` maps carry JSON documents as strings; show them as JSON."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=False))


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in (header, *rows):
        print("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_fields(pairs: Sequence[tuple[str, str]]) -> None:
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        print(f"{key.ljust(width)}   {value}".rstrip())


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def age(created_at_ns: int, now_ns: int | None = None) -> str:
    """Kubernetes-style age: 42s, 7m, 3h, 12d."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    seconds = max(0, (now_ns - created_at_ns) // 1_000_000_000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _state_name(state: int) -> str:
    return "Ready" if state == api_pb2.SANDBOX_READY else "NotReady"


# Subcommands --------------------------------------------------------------


def cmd_version(client: Client, args: argparse.Namespace) -> None:
    resp = client.runtime.Version(api_pb2.VersionRequest(), timeout=client.timeout)
    if args.output == "json":
        print_json(to_dict(resp))
        return
    print_fields([
        ("runtime", resp.runtime_name),
        ("runtime version", resp.runtime_version),
        ("runtime API version", resp.runtime_api_version),
        ("CRI version", resp.version),
        ("podvisorctl version", __version__),
    ])


def cmd_status(client: Client, args: argparse.Namespace) -> None:
    resp = client.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=client.timeout)
    if args.output == "json":
        doc = to_dict(resp)
        doc["info"] = expand_info(resp.info)
        print_json(doc)
        return
    print_table(
        ("CONDITION", "STATUS", "REASON", "MESSAGE"),
        [(c.type, str(c.status).lower(), c.reason, c.message) for c in resp.status.conditions],
    )
    handlers = ", ".join(repr(h.name) for h in resp.runtime_handlers)
    print()
    pairs = [("runtime handlers", handlers)]
    for key, value in sorted(resp.info.items()):
        pairs.append((key, value))
    print_fields(pairs)


def cmd_host_info(client: Client, args: argparse.Namespace) -> None:
    resp = client.host.Info(podvisor_pb2.HostInfoRequest(), timeout=client.timeout)
    if args.output == "json":
        print_json(to_dict(resp))
        return
    pairs = []
    for field in resp.DESCRIPTOR.fields:
        value = getattr(resp, field.name)
        if isinstance(value, bool):
            text = str(value).lower()
        elif field.name.endswith("_bytes"):
            text = f"{value} ({human_bytes(value)})"
        else:
            text = str(value)
        pairs.append((field.name, text))
    print_fields(pairs)


def cmd_pods(client: Client, args: argparse.Namespace) -> None:
    flt = api_pb2.PodSandboxFilter(label_selector=dict(args.label))
    if args.id:
        flt.id = args.id
    if args.state:
        flt.state.state = (api_pb2.SANDBOX_READY if args.state == "ready"
                           else api_pb2.SANDBOX_NOTREADY)
    resp = client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(filter=flt),
                                         timeout=client.timeout)
    items = sorted(resp.items, key=lambda s: s.created_at, reverse=True)
    if args.output == "json":
        print_json({"items": [to_dict(s) for s in items]})
        return
    now = time.time_ns()
    print_table(
        ("POD ID", "NAME", "NAMESPACE", "ATTEMPT", "STATE", "AGE"),
        [
            (s.id if args.no_trunc else s.id[:SHORT_ID], s.metadata.name, s.metadata.namespace,
             str(s.metadata.attempt), _state_name(s.state), age(s.created_at, now))
            for s in items
        ],
    )


def cmd_inspect_pod(client: Client, args: argparse.Namespace) -> None:
    resp = client.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=args.id, verbose=True),
        timeout=client.timeout,
    )
    doc = to_dict(resp)
    doc["info"] = expand_info(resp.info)
    print_json(doc)


def cmd_stop_pod(client: Client, args: argparse.Namespace) -> None:
    client.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=args.id),
                                  timeout=client.timeout)
    print(f"stopped pod sandbox {args.id}")


def cmd_rm_pod(client: Client, args: argparse.Namespace) -> None:
    client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=args.id),
                                    timeout=client.timeout)
    print(f"removed pod sandbox {args.id}")


# Into a VM: exec, attach, port-forward ---------------------------------------


def find_pod(client: Client, ref: str, namespace: str) -> Any:
    """The pod sandbox ``ref`` names: an id or unique id prefix, else a pod name in ``namespace``."""
    pods = client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=client.timeout).items
    by_id = [p for p in pods if p.id.startswith(ref)]
    if len(by_id) == 1:
        return by_id[0]
    if len(by_id) > 1:
        raise CliError(f"pod id prefix {ref!r} is ambiguous: it matches {len(by_id)} sandboxes; give more of it")
    by_name = [p for p in pods if p.metadata.name == ref and p.metadata.namespace == namespace]
    ready = [p for p in by_name if p.state == api_pb2.SANDBOX_READY]
    if ready or by_name:
        return (ready or by_name)[-1]
    raise CliError(f"no pod {ref!r} in namespace {namespace!r} (nor a sandbox id starting with it); "
                   f"see `{PROG} pods`")


def find_vm(client: Client, ref: str, namespace: str) -> Any:
    """The running VM container of the pod ``ref`` names (or the container ``ref`` is the id of)."""
    containers = client.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=client.timeout)
    running = [c for c in containers.containers if c.state == api_pb2.CONTAINER_RUNNING]
    direct = [c for c in running if c.id.startswith(ref)] if len(ref) >= 6 else []
    if len(direct) == 1:
        return direct[0]
    pod = find_pod(client, ref, namespace)
    mine = [c for c in running if c.pod_sandbox_id == pod.id]
    if not mine:
        raise CliError(f"pod {pod.metadata.name} ({pod.id[:SHORT_ID]}) has no running VM; "
                       f"start it, or see `{PROG} pods`")
    return mine[-1]


def _finish(code: int, message: str) -> None:
    if code != 0:
        if message:
            print(f"{PROG}: {message}", file=sys.stderr)
        raise SystemExit(code)


def cmd_exec(client: Client, args: argparse.Namespace) -> None:
    if not args.cmd:
        raise CliError("exec needs a command after --, e.g. `podvisorctl exec POD -- uname -a`")
    vm = find_vm(client, args.pod, args.namespace)
    resp = client.runtime.Exec(api_pb2.ExecRequest(
        container_id=vm.id, cmd=args.cmd, tty=args.tty, stdin=args.stdin, stdout=True,
        stderr=not args.tty), timeout=client.timeout)
    _finish(*run_stream(resp.url, args, detach_key=None))


def cmd_attach(client: Client, args: argparse.Namespace) -> None:
    vm = find_vm(client, args.pod, args.namespace)
    resp = client.runtime.Attach(api_pb2.AttachRequest(
        container_id=vm.id, tty=args.tty, stdin=args.stdin, stdout=True, stderr=not args.tty),
        timeout=client.timeout)
    if args.tty and args.stdin and os.isatty(0):
        print("[attached to the VM's console; Ctrl-] detaches]", file=sys.stderr, flush=True)
    _finish(*run_stream(resp.url, args, detach_key=streams.DETACH_KEY))


def run_stream(url: str, args: argparse.Namespace, detach_key: bytes | None) -> tuple[int, str]:
    try:
        return streams.run_remotecommand(url, stdin=args.stdin, tty_mode=args.tty,
                                         ca_file=args.stream_ca, detach_key=detach_key)
    except streams.StreamError as exc:
        raise CliError(str(exc)) from None


def _port_pair(text: str) -> tuple[int, int]:
    local, sep, remote = text.rpartition(":")
    try:
        remote_port = int(remote)
        local_port = int(local) if sep and local else (remote_port if not sep else 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not [LOCAL:]REMOTE (ports as numbers)") from None
    if not 1 <= remote_port <= 65535 or not 0 <= local_port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: ports are 1-65535 (LOCAL may be 0: any free port)")
    return local_port, remote_port


def cmd_port_forward(client: Client, args: argparse.Namespace) -> None:
    pod = find_pod(client, args.pod, args.namespace)
    listeners: list[tuple[socket.socket, int]] = []
    for local, remote in args.ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((args.address, local))
        except OSError as exc:
            raise CliError(f"cannot listen on {args.address}:{local}: {exc.strerror}") from None
        s.listen(64)
        listeners.append((s, remote))
        print(f"Forwarding from {args.address}:{s.getsockname()[1]} -> {remote}", flush=True)

    def new_url(port: int) -> str:
        resp = client.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=pod.id, port=[port]),
                                          timeout=client.timeout)
        return str(resp.url)

    try:
        streams.serve_forwards(listeners, new_url, args.stream_ca,
                               report=lambda line: print(line, flush=True))
    finally:
        for s, _ in listeners:
            s.close()


# Argument parsing ---------------------------------------------------------


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than zero")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect and drive a podvisor-agent over its CRI unix socket.",
    )
    connect.add_arguments(p, SOCKET_ENV, DEFAULT_SOCKET)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table",
                   help="output format (default: table)")
    p.add_argument("--timeout", type=_positive, default=10.0,
                   help="deadline for each call, in seconds (default: 10)")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[[Client, argparse.Namespace], None],
            help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(func=fn)
        return sp

    certs.add_parser(sub)
    add("version", cmd_version, "runtime name and versions (CRI Version)")
    add("status", cmd_status, "runtime conditions and verbose runtime info (CRI Status)")
    add("host-info", cmd_host_info, "host capabilities and free resources (podvisor.v1 Host/Info)")
    pods = add("pods", cmd_pods, "list pod sandboxes (CRI ListPodSandbox)")
    pods.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE",
                      help="only sandboxes with this label (repeatable; all must match)")
    pods.add_argument("--state", choices=("ready", "notready"), help="only sandboxes in this state")
    pods.add_argument("--id", default="", help="only sandboxes whose id starts with this")
    pods.add_argument("--no-trunc", action="store_true", help="show full 64-character ids")
    for name, fn, text in (
        ("inspect-pod", cmd_inspect_pod, "verbose status of a pod sandbox, as JSON"),
        ("stop-pod", cmd_stop_pod, "stop a pod sandbox (succeeds if it is already gone)"),
        ("rm-pod", cmd_rm_pod, "remove a pod sandbox, stopping it first (succeeds if gone)"),
    ):
        add(name, fn, text).add_argument("id", metavar="ID", help="sandbox id or unique prefix")
    # The operator verbs live in their own modules (they import this one).
    from agent.cli import demo, image_import, manifests, views  # noqa: PLC0415

    image_import.add_parser(image_build.add_parser(sub))
    manifests.add_parsers(sub, add)
    views.add_parsers(sub, add)
    demo.add_parser(sub)
    for name, fn, text in (
        ("exec", cmd_exec, "run a command in a pod's VM (CRI Exec; streams over the runtime's URL)"),
        ("attach", cmd_attach, "attach to a pod's VM serial console (CRI Attach)"),
    ):
        sp = add(name, fn, text)
        sp.add_argument("-i", "--stdin", action="store_true", help="pass stdin to the VM")
        sp.add_argument("-t", "--tty", action="store_true", help="a terminal (raw mode, resizes)")
        sp.add_argument("-n", "--namespace", default="default", help="the pod's namespace (default: default)")
        sp.add_argument("--stream-ca", default=None, metavar="FILE",
                        help="CA bundle for an https streaming URL")
        sp.add_argument("pod", metavar="POD", help="pod name, pod sandbox id (prefix) or container id")
        if name == "exec":
            sp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD",
                            help="the command and its arguments")
    pf = add("port-forward", cmd_port_forward, "forward local ports to a pod's VM (CRI PortForward)")
    pf.add_argument("-n", "--namespace", default="default", help="the pod's namespace (default: default)")
    pf.add_argument("--address", default="127.0.0.1", help="local address to listen on (default: 127.0.0.1)")
    pf.add_argument("--stream-ca", default=None, metavar="FILE", help="CA bundle for an https streaming URL")
    pf.add_argument("pod", metavar="POD", help="pod name or pod sandbox id (prefix)")
    pf.add_argument("ports", nargs="+", type=_port_pair, metavar="[LOCAL:]REMOTE",
                    help="ports to forward (LOCAL 0: any free port; default LOCAL = REMOTE)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    local = getattr(args, "local", None)
    if local is not None:  # commands that need no agent
        try:
            print(local(args))
        except image_build.BuildError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        channel = connect.remote_channel(args)
        client = Client(str(Path(args.socket)), args.timeout, channel)
        try:
            args.func(client, args)
        finally:
            client.close()
    except (CliError, connect.EndpointError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"{PROG}: {code.name}: {details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `podvisorctl pods | head`
        return 0
    return 0


if __name__ == "__main__":
    # As the module the other CLI modules import, so that their CliError is this one.
    from agent.cli.main import main as _main  # noqa: PLW0406

    sys.exit(_main())
