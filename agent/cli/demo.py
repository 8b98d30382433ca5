"""``podvisorctl demo`` (``make demo``): a first VM in one command.

1. The tiny guest (images/tiny) is built if it is not cached yet.
2. A throwaway registry of its own: Debian's ``docker-registry`` with a
   generated configuration (no authentication, 127.0.0.1 on a free port,
   storage in a temporary directory), stopped and removed at the end. The
   system's registry (and its htpasswd default) is never used or touched.
3. The guest is pushed there as a containerDisk (``image build --push``'s code).
4. ``examples/testvm.yaml``, KubeVirt's classic testvm, is applied (``apply
   -f``) with ``--image`` pointing at the pushed guest (the manifest names
   ``kubevirt/cirros-registry-disk-demo`` on Docker Hub) and ``--memory
   128Mi`` (the manifest's 64M cannot boot Debian's kernel, which needs
   76 MiB; the tiny guest is not CirrOS).
5. The console is followed until the guest prints ``PODVISOR-READY``, then
   the demo says what runs and how to go on.

The agent: when one answers on ``--socket`` it is used. Otherwise the demo
starts one of its own, detached, with its own state directory and socket under
``$PODVISOR_DEMO_DIR`` (default /var/lib/podvisor-demo), and leaves it
running for the commands it prints; ``podvisorctl demo --stop`` deletes the
demo VM and stops that agent. ``--cleanup`` (or ``PODVISOR_DEMO_CLEANUP=1``)
does that at the end of the demo itself (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import structlog

from agent.adapters.registry import RegistryClient
from agent.cli import image_build, manifests, oci_layout, views
from agent.cli.main import PROG, Client, CliError
from agent.domain.errors import PodvisorError
from agent.domain.imageref import RemoteRepository

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "testvm.yaml"
TINY_BUILD = ROOT / "images" / "tiny" / "build.sh"
TINY_DIR_ENV = "PODVISOR_TINY_IMAGE_DIR"
DEFAULT_TINY_DIR = "/var/cache/podvisor/images/tiny"
DEMO_DIR_ENV = "PODVISOR_DEMO_DIR"
DEFAULT_DEMO_DIR = "/var/lib/podvisor-demo"
CLEANUP_ENV = "PODVISOR_DEMO_CLEANUP"
REGISTRY_BINARY = "/usr/bin/docker-registry"
LOOPBACK = "127.0.0.1"
REPOSITORY = "podvisor/demo-tiny"
TAG = "1"
MEMORY = "128Mi"
READY = "PODVISOR-READY"


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


# The agent --------------------------------------------------------------------


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def demo_dir() -> Path:
    return Path(os.environ.get(DEMO_DIR_ENV) or DEFAULT_DEMO_DIR)


def agent_paths(base: Path) -> dict[str, Path]:
    return {"config": base / "agent.toml", "state": base / "state", "run": base / "run",
            "socket": base / "run" / "agent.sock", "log": base / "agent.log", "pid": base / "agent.pid",
            "pods": base / "pods"}


def start_agent(base: Path) -> tuple[str, int]:
    """A podvisor-agent of the demo's own (detached); returns (socket, pid)."""
    p = agent_paths(base)
    base.mkdir(parents=True, exist_ok=True)
    for d in (p["state"], p["run"]):
        d.mkdir(parents=True, exist_ok=True)
    # QEMU (libvirt-qemu) must traverse to the VM's files.
    for d in (base, p["state"], p["run"]):
        d.chmod(0o711)
    p["config"].write_text(
        f'state_dir = "{p["state"]}"\n'
        f'runtime_dir = "{p["run"]}"\n'
        f'[server]\nsocket = "{p["socket"]}"\n'
        "[cni]\nenabled = false\n"
    )
    log = open(p["log"], "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(p["config"])],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    p["pid"].write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 90
    while not _answers(str(p["socket"])):
        if proc.poll() is not None:
            tail = p["log"].read_text(errors="replace")[-2000:]
            p["pid"].unlink(missing_ok=True)
            raise CliError(f"the demo's podvisor-agent exited with {proc.returncode}; its log ({p['log']}):\n{tail}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise CliError(f"the demo's podvisor-agent did not answer on {p['socket']} within 90 s; see {p['log']}")
        time.sleep(0.2)
    return str(p["socket"]), proc.pid


def stop_agent(base: Path) -> str:
    """Stop the agent the demo started (its pid file); returns what was done."""
    pid_file = agent_paths(base)["pid"]
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return "no demo agent was running"
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        mine = str(agent_paths(base)["config"]) in cmdline.read_bytes().decode(errors="replace")
    except OSError:
        mine = False
    if mine:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while cmdline.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if cmdline.exists():
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return f"stopped the demo's podvisor-agent (pid {pid})" if mine else "the demo agent had already stopped"


# The registry -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def throwaway_registry() -> Iterator[str]:
    """``docker-registry`` with a config of its own: no auth, 127.0.0.1:<free port>; yields host:port."""
    if not os.path.exists(REGISTRY_BINARY):
        raise CliError(f"{REGISTRY_BINARY} is missing: apt-get install docker-registry (make deps does)")
    work = Path(tempfile.mkdtemp(prefix="podvisor-demo-registry-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        storage = work / "storage"
        storage.mkdir()
        host = f"{LOOPBACK}:{_free_port()}"
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}},
            "http": {"addr": host, "secret": secrets.token_hex(16)},
        }
        (work / "config.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
        log = open(work / "registry.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(work / "config.yml")], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise CliError(f"docker-registry exited with {proc.returncode}: "
                               f"{(work / 'registry.log').read_text(errors='replace')[-1000:]}")
            try:
                if httpx.get(f"http://{host}/v2/", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise CliError(f"docker-registry did not answer on {host} within 20 s")
            time.sleep(0.1)
        yield host
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


# Steps ------------------------------------------------------------------------------


def tiny_disk() -> Path:
    directory = Path(os.environ.get(TINY_DIR_ENV) or DEFAULT_TINY_DIR)
    disk = directory / "tiny.qcow2"
    if disk.is_file():
        return disk
    if not TINY_BUILD.exists():
        raise CliError(f"the tiny guest is not at {disk} and this is not a source checkout; run `make guest`")
    say(f"building the tiny guest into {directory} (once per machine)")
    result = subprocess.run([str(TINY_BUILD), str(directory)], timeout=1800, check=False)
    if result.returncode != 0 or not disk.is_file():
        raise CliError(f"images/tiny/build.sh failed ({result.returncode}); run `make guest` to see why")
    return disk


def push(disk: Path, host: str) -> str:
    with tempfile.TemporaryDirectory(prefix="podvisor-demo-layout-") as tmp:
        built = oci_layout.build(disk, Path(tmp), TAG)
        repo = RemoteRepository(registry=host, host=host, name=REPOSITORY)
        with RegistryClient(timeout=120) as client:
            try:
                oci_layout.push(client, Path(tmp), built, repo, TAG)
            except PodvisorError as exc:
                raise CliError(f"push to the demo registry failed: {exc.message}") from None
    return f"{host}/{REPOSITORY}:{TAG}"


def follow_until_ready(client: Client, m: manifests.Manifest, timeout: float) -> str:
    """Print the console until the guest says it is ready; returns that line."""
    vm = manifests.wait_running(client, m, 120)
    assert vm.container is not None
    from agent.api.gen.runtime.v1 import api_pb2  # noqa: PLC0415 - only here

    st = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=vm.container.id),
                                        timeout=client.timeout).status
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        try:
            with open(st.log_path, "rb") as f:
                lines = list(views.parse_cri_log(f))
        except FileNotFoundError:
            lines = []
        for line in lines[seen:]:
            print(f"   | {line}", flush=True)
            if line.startswith(READY):
                return line
        seen = len(lines)
        state = client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=vm.container.id),
                                               timeout=client.timeout).status
        if state.state != api_pb2.CONTAINER_RUNNING:
            raise CliError(f"the VM stopped before it was ready: {state.reason} {state.message}".strip())
        time.sleep(0.5)
    raise CliError(f"the guest did not print {READY} within {timeout:.0f} s; see `{PROG} logs {m.name}`")


def run_demo(args: argparse.Namespace) -> str:
    try:
        return _run_demo(args)
    except CliError as exc:
        raise image_build.BuildError(str(exc)) from None


def _run_demo(args: argparse.Namespace) -> str:
    # The registry client's own log lines (debug, info) would drown the console.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    base = demo_dir()
    if args.stop:
        return stop_demo(args, base)
    if not Path(args.filename).is_file():
        raise CliError(f"no manifest at {args.filename} (examples/ ships with the source tree); give -f FILE")
    cleanup = args.cleanup or os.environ.get(CLEANUP_ENV, "") not in ("", "0")
    sock = args.socket
    started = False
    if not _answers(sock):
        say(f"no podvisor-agent answers on {sock}: starting one for the demo (state in {base})")
        sock, pid = start_agent(base)
        started = True
        say(f"podvisor-agent running (pid {pid}, socket {sock}, log {agent_paths(base)['log']})")
    logs = Path(os.environ.get(manifests.LOG_DIR_ENV) or (agent_paths(base)["pods"] if started
                                                          else manifests.DEFAULT_LOG_DIR))
    disk = tiny_disk()
    client = Client(sock, args.timeout)
    m: manifests.Manifest | None = None
    try:
        with throwaway_registry() as host:
            say(f"throwaway registry on {host} (no auth, its own storage; removed at the end)")
            image = push(disk, host)
            say(f"pushed the tiny guest ({disk}) as {image}")
            m = manifests.load(str(args.filename), args.namespace, image=image, memory=MEMORY)[0]
            say(f"applying {args.filename} ({m.kind} {m.name}) with --image {image} --memory {MEMORY}")
            verb = manifests.apply_one(client, m, logs, recreate=True, say=lambda t: say(t))
            say(f"{m.kind.lower()}/{m.name} {verb}; the guest's serial console:")
            ready = follow_until_ready(client, m, args.ready_timeout)
        vm = manifests.wait_running(client, m, 30)
        row = views.vm_row(client, vm)
    finally:
        if cleanup and m is not None:
            with contextlib.suppress(Exception):
                manifests.cmd_delete(client, argparse.Namespace(filename=str(args.filename),
                                                                namespace=args.namespace))
        client.close()
        if cleanup and started:
            say(stop_agent(base))
    env = "" if not started else f"PODVISOR_SOCKET={sock} "
    lines = [
        "",
        f"The VM {m.namespace}/{m.name} {'was' if cleanup else 'is'} running: KubeVirt's testvm manifest "
        f"({args.filename}) booted",
        "the tiny test guest as its containerDisk, inside pod sandbox "
        f"{row['pod_id'][:13]} (container {row['container_id'][:13]}).",
        f"It said: {ready}",
        "The registry is gone; the image stays in the agent's image store.",
    ]
    if cleanup:
        lines.append("Cleaned up (--cleanup): the VM was deleted" + (" and the demo agent stopped." if started
                                                                    else "."))
        return "\n".join(lines)
    lines += [
        "",
        "Go on with:",
        f"  {env}{PROG} get vms",
        f"  {env}{PROG} describe vm {m.name}",
        f"  {env}{PROG} logs -f {m.name}          # the serial console; Ctrl-C ends it",
        f"  {env}{PROG} attach -it {m.name}       # type into the console; Ctrl-] detaches",
        f"  {env}{PROG} delete -f {args.filename}",
    ]
    if started:
        lines += ["", f"The demo started its own podvisor-agent (state {base}); stop it (and the VM) with",
                  f"  {PROG} demo --stop      (or: make demo-stop)"]
    return "\n".join(lines)


def stop_demo(args: argparse.Namespace, base: Path) -> str:
    sock = str(agent_paths(base)["socket"])
    out = []
    target = sock if _answers(sock) else (args.socket if _answers(args.socket) else "")
    if target:
        client = Client(target, args.timeout)
        try:
            manifests.cmd_delete(client, argparse.Namespace(filename=str(args.filename), namespace=args.namespace))
        except CliError as exc:
            out.append(f"could not delete the demo VM: {exc}")
        finally:
            client.close()
    out.append(stop_agent(base))
    return "\n".join(out)


def add_parser(sub: Any) -> None:
    demo = sub.add_parser("demo", help="a first VM in one command: registry, push, apply, console",
                          description="Build the tiny guest if needed, push it to a throwaway registry, apply "
                                      "examples/testvm.yaml and follow the console until the guest is ready.")
    demo.add_argument("-f", "--filename", type=Path, default=EXAMPLE, metavar="FILE",
                      help=f"the VM manifest (default: {EXAMPLE})")
    demo.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")
    demo.add_argument("--ready-timeout", type=float, default=600.0, metavar="SECONDS",
                      help="how long to wait for the guest to be ready (default: 600)")
    demo.add_argument("--cleanup", action="store_true",
                      help=f"delete the VM and stop a demo-started agent at the end (or ${CLEANUP_ENV}=1)")
    demo.add_argument("--stop", action="store_true", help="delete the demo VM and stop the demo's own agent")
    demo.set_defaults(local=run_demo)
