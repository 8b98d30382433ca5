#!/usr/bin/env python3
"""bench/lifecycle: the CRI pod sandbox lifecycle against the agent and, in
the same run, against Debian's containerd 1.6 (runc, the CRI plugin).

Each pod goes through RunPodSandbox, PodSandboxStatus, StopPodSandbox and
RemovePodSandbox, serially, pod networking on (one hostPort each, so portmap
works too). The two runtimes take turns pod by pod, so a busy moment of the
machine hits both. Both read the same CNI configuration list (a private
bridge + host-local + portmap network, bench/common.py) from the same
directory, with the same plugin directory, and are called by the same code
through the project's generated runtime.v1 stubs. p50/p95 per call and the
ratios (agent / containerd) per step and for the whole lifecycle are printed.
Target: every step and the total at or below containerd's p50.

containerd is what users would otherwise run, started here on its own: its
own root, state, gRPC socket, runc root and cgroup parent under the work
directory, the overlayfs snapshotter, the cgroupfs driver and
``restrict_oom_score_adj`` (not PID 1 of a systemd host). Debian packages no
pause image, so one is built: bench/pause.c compiled statically with gcc, a
single-layer OCI image pushed with skopeo to a docker-registry of the
bench's own on 127.0.0.1 (no auth), named as containerd's sandbox_image.

Nothing is left behind, also on failure: every sandbox either runtime still
lists is stopped and removed, both daemons and the registry are stopped, any
process in the bench's cgroup (pause, shims) is killed, mounts under the work
directory are detached, recorded namespaces deleted, the bridge, the cgroup
and the work directory removed. ``--json`` writes what was measured and
what was found left over before that clean-up (the test reads it).

Usage: python bench/lifecycle.py [--pods 100] [--json FILE] [--leave-one]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from agent.api.gen.runtime.v1 import api_pb2 as pb  # noqa: E402
from agent.api.gen.runtime.v1 import api_pb2_grpc  # noqa: E402
from bench.common import percentile, private_cni_network, start_agent, stop_process  # noqa: E402

CNI_BIN = Path("/usr/lib/cni")
CONTAINERD = "/usr/bin/containerd"
STEPS = ("RunPodSandbox", "PodSandboxStatus", "StopPodSandbox", "RemovePodSandbox")
CALL_TIMEOUT = 120.0
RUNTIMES = ("agent", "containerd")
SHIM_RUN_DIR = Path("/run/containerd")
LIBCNI_CACHE = Path("/var/lib/cni/results")


# The pause image ----------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = _digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def build_pause_image(work: Path, tag: str) -> Path:
    """bench/pause.c, statically linked, as the only file (/pause) of a
    single-layer OCI image in an OCI layout under ``work``; returns the layout."""
    binary = work / "pause"
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(binary), str(ROOT / "bench" / "pause.c")],
                   check=True, timeout=300)
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("pause")
        info.size = binary.stat().st_size
        info.mode = 0o755
        with binary.open("rb") as f:
            tar.addfile(info, f)
    layer_tar = tar_bytes.getvalue()
    layer = gzip.compress(layer_tar, mtime=0)
    layout = work / "pause-oci"
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(layout, layer)}
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/pause"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer_tar)]},
    }).encode()
    config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json", **_blob(layout, config)}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config_desc, "layers": [layer_desc]}).encode()
    manifest_desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **_blob(layout, manifest),
                     "annotations": {"org.opencontainers.image.ref.name": tag}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return layout


@contextmanager
def pause_image(work: Path) -> Iterator[str]:
    """The pause image in a loopback registry of its own; yields its reference."""
    from tests.integration.registry_fixture import run_registry

    tag = "bench"
    layout = build_pause_image(work, tag)
    with run_registry(work / "registry") as registry:
        ref = f"{registry.host}/podvisor-bench/pause:{tag}"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                        f"docker://{ref}"], check=True, timeout=300, capture_output=True)
        yield ref


# containerd ---------------------------------------------------------------------------


@dataclass
class Containerd:
    """A containerd of the bench's own (see the module docstring)."""

    base: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def runc_root(self) -> Path:
        return self.base / "runc"

    def config(self, sandbox_image: str, registry_host: str, cni_conf_dir: Path) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        hosts = self.base / "certs.d" / registry_host
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(
            f'server = "http://{registry_host}"\n\n[host."http://{registry_host}"]\n'
            '  capabilities = ["pull", "resolve"]\n')
        return f"""version = 2
root = "{self.base / 'root'}"
state = "{self.base / 'state'}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.base / 'containerd.sock.ttrpc'}"

[debug]
  address = ""

[metrics]
  address = ""

[{cri}]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{self.runc_root}"

[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{cni_conf_dir}"
  max_conf_num = 1

[{cri}.registry]
  config_path = "{self.base / 'certs.d'}"
"""

    def start(self, sandbox_image: str, registry_host: str, cni_conf_dir: Path) -> None:
        self.base.mkdir(parents=True)
        cfg = self.base / "config.toml"
        cfg.write_text(self.config(sandbox_image, registry_host, cni_conf_dir))
        log = open(self.base / "containerd.log", "wb")
        self.process = subprocess.Popen([CONTAINERD, "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"containerd did not start; see {self.base / 'containerd.log'}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.process, 30)


# Host state the bench made --------------------------------------------------------------


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_dirs(parent: str) -> list[Path]:
    """``parent`` in every cgroup hierarchy (v1: one per controller; v2: one)."""
    rel = parent.strip("/")
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT / rel]
    return [d / rel for d in sorted(CGROUP_ROOT.iterdir()) if d.is_dir() and not d.is_symlink()]


def cgroup_pids(parent: str) -> list[int]:
    pids: set[int] = set()
    for d in cgroup_dirs(parent):
        if not d.exists():
            continue
        for procs in d.rglob("cgroup.procs"):
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except OSError:
                continue
    return sorted(pids)


def remove_cgroup(parent: str) -> None:
    for d in cgroup_dirs(parent):
        if not d.exists():
            continue
        for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                sub.rmdir()
            except OSError:
                pass
        try:
            d.rmdir()
        except OSError:
            pass


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (mountinfo), deepest first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(root) or point.startswith(f"{root}/"):
            found.append(point)
    return sorted(set(found), key=len, reverse=True)


def processes_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (the bench's own paths)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def cni_del(conflist: dict[str, Any], sandbox_id: str, netns_path: str, host_port: int) -> None:
    """DEL through the network's plugins in reverse, by hand (best effort),
    with the pod's port mapping (portmap deletes nothing without it)."""
    mapping = {"portMappings": [{"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}]}
    for plugin in reversed(conflist["plugins"]):
        conf = dict(plugin, name=conflist["name"], cniVersion=conflist["cniVersion"])
        if plugin.get("capabilities", {}).get("portMappings"):
            conf["runtimeConfig"] = mapping
        env = dict(os.environ, CNI_COMMAND="DEL", CNI_CONTAINERID=sandbox_id, CNI_IFNAME="eth0",
                   CNI_NETNS=netns_path if netns_path and netns_mounted(netns_path) else "", CNI_PATH=str(CNI_BIN))
        subprocess.run([str(CNI_BIN / plugin["type"])], input=json.dumps(conf).encode(), env=env,
                       capture_output=True, timeout=60)


def libcni_cache(conflist: dict[str, Any]) -> list[str]:
    """containerd's (libcni's) cached ADD results for the bench's network
    (its name is the bench's own): none may stay after DEL."""
    return sorted(str(p) for p in LIBCNI_CACHE.glob(f"{conflist['name']}-*"))


def shim_sockets(ctrd: Containerd, sides: dict[str, Side]) -> list[Path]:
    """Where containerd 1.6's shims of the bench's sandboxes listen: a fixed
    directory, a file named by the hash of containerd's socket, namespace and id."""
    side = sides.get("containerd")
    ids = side.ids if side is not None else []
    return [SHIM_RUN_DIR / "s" / hashlib.sha256(f"{ctrd.socket}/k8s.io/{sid}".encode()).hexdigest()
            for sid in ids]


def netns_mounted(path: str) -> bool:
    return any(line.split()[4] == path and " - nsfs " in line
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


# The measurement ----------------------------------------------------------------------------


@dataclass
class Side:
    """One runtime under test: its client, what it made, what it took."""

    name: str
    stub: api_pb2_grpc.RuntimeServiceStub
    channel: grpc.Channel
    times: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STEPS})
    totals: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    live: set[str] = field(default_factory=set)
    netns: dict[str, str] = field(default_factory=dict)  # sandbox id → its namespace (containerd)
    ports: dict[str, int] = field(default_factory=dict)  # sandbox id → its hostPort
    errors: list[str] = field(default_factory=list)


def pod_config(i: int, side: str, work: Path, host_port: int, cgroup_parent: str) -> pb.PodSandboxConfig:
    """What kubelet sends for a pod with one hostPort (the same for both runtimes)."""
    uid = uuid.uuid4().hex
    name = f"life-{side}-{i}"
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="bench", uid=uid, attempt=0),
        hostname=name,
        log_directory=str(work / "pod-logs" / f"bench_{name}_{uid}"),
        dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["bench.svc.cluster.local"],
                                options=["ndots:5"]),
        port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=host_port)],
        labels={"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": "bench"},
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=f"{cgroup_parent}/pod{uid}",
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD))),
    )


def timed(side: Side, step: str, call: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = call()
    side.times[step].append(time.perf_counter() - t0)
    return out


def lifecycle(side: Side, config: pb.PodSandboxConfig, *, finish: bool = True) -> None:
    """One pod through the four calls, each timed; raises on the first failure.
    Without ``finish`` the pod is left running after Status."""
    rt = side.stub
    sid = timed(side, "RunPodSandbox", lambda: rt.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config), timeout=CALL_TIMEOUT).pod_sandbox_id)
    side.ids.append(sid)
    side.live.add(sid)
    side.ports[sid] = config.port_mappings[0].host_port
    status = timed(side, "PodSandboxStatus", lambda: rt.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=CALL_TIMEOUT)).status
    if status.state != pb.SANDBOX_READY or not status.network.ip:
        raise RuntimeError(f"{side.name}: sandbox {sid} is {pb.PodSandboxState.Name(status.state)} "
                           f"with IP {status.network.ip!r} after RunPodSandbox")
    if side.name == "containerd":
        # Untimed: where containerd put the pod's namespace, to check it is gone afterwards.
        info = json.loads(rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True),
                                              timeout=CALL_TIMEOUT).info.get("info", "{}"))
        for ns in info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network" and ns.get("path"):
                side.netns[sid] = os.path.realpath(ns["path"])  # /var/run is /run
    if not finish:
        return
    timed(side, "StopPodSandbox", lambda: rt.StopPodSandbox(
        pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=CALL_TIMEOUT))
    timed(side, "RemovePodSandbox", lambda: rt.RemovePodSandbox(
        pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=CALL_TIMEOUT))
    side.live.discard(sid)
    side.totals.append(sum(side.times[s][-1] for s in STEPS))


def connect(name: str, sock: Path) -> Side:
    channel = grpc.insecure_channel(f"unix:{sock}")
    grpc.channel_ready_future(channel).result(timeout=60)
    return Side(name=name, stub=api_pb2_grpc.RuntimeServiceStub(channel), channel=channel)


def leftovers(side: Side, ipam_dir: Path, extra: dict[str, list[str]]) -> dict[str, list[str]]:
    """What this runtime still holds of the bench's pods, kind by kind, while it runs."""
    from bench import leaks

    # Only ids count here (no state directory is named in links or rules).
    marks = leaks.Marks(state_dir=Path(f"/nonexistent-{secrets.token_hex(8)}"), runtime_dir=Path("/"))
    for sid in side.ids:
        marks.add_sandbox(sid)
    listed = side.stub.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=CALL_TIMEOUT).items
    found = {
        "sandboxes": sorted(s.id for s in listed),
        "netns": leaks.netns(marks) + [p for p in side.netns.values() if netns_mounted(p)],
        "links": leaks.links(marks),
        "iptables": leaks.iptables_rules(marks),
        "leases": [f for f in leaks.leases(ipam_dir) if any(sid in (ipam_dir / f).read_text() for sid in side.ids)],
    }
    found.update(extra)
    return found


def run(pods: int, *, leave_one: bool = False, on_pod: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The whole bench; returns what it measured and found (see --json)."""
    work = Path(tempfile.mkdtemp(prefix="pv-bench-life-", dir="/var/tmp"))
    work.chmod(0o711)  # QEMU's user traverses it (the agent checks it at start)
    cgroup_parent = f"/podvisor-bench-{secrets.token_hex(4)}"
    bridge, conflist = private_cni_network(work, "pvbl", "life")
    ipam_dir = Path(conflist["plugins"][0]["ipam"]["dataDir"])
    ctrd = Containerd(base=work / "containerd")
    sides: dict[str, Side] = {}
    report: dict[str, Any] = {"pods": pods, "errors": [], "leftovers": {}, "after_cleanup": {}}
    agent_proc: subprocess.Popen[bytes] | None = None
    # The shims' socket directory is fixed (/run/containerd/s); removed at
    # the end (when empty) only if this run made it.
    made_run_dir = not SHIM_RUN_DIR.exists()
    try:
        with ExitStack() as stack:
            image = stack.enter_context(pause_image(work))
            registry_host = image.split("/", 1)[0]
            ctrd.start(image, registry_host, work / "net.d")
            agent_proc, agent_sock = start_agent(work / "agent", cni_conf_dir=work / "net.d")
            sides["agent"] = connect("agent", agent_sock)
            sides["containerd"] = connect("containerd", ctrd.socket)
            # containerd pulls its sandbox image once, before anything is timed.
            images = api_pb2_grpc.ImageServiceStub(sides["containerd"].channel)
            images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
            # One untimed warm-up pod each (the bridge is made, caches are filled).
            port = 30000 + secrets.randbelow(2000) * 10
            for name in RUNTIMES:
                warm = Side(name=name, stub=sides[name].stub, channel=sides[name].channel)
                try:
                    lifecycle(warm, pod_config(-1, name, work, port, cgroup_parent))
                finally:
                    sides[name].ids += warm.ids
                    sides[name].netns.update(warm.netns)
                    sides[name].ports.update(warm.ports)
                    sides[name].live |= warm.live
                port += 1
            for i in range(pods):
                for name in RUNTIMES if i % 2 == 0 else reversed(RUNTIMES):
                    last = leave_one and i == pods - 1
                    try:
                        lifecycle(sides[name], pod_config(i, name, work, port, cgroup_parent), finish=not last)
                    except grpc.RpcError as exc:
                        raise RuntimeError(f"{name}, pod {i}: {exc.code().name}: {exc.details()}") from None
                    port += 1
                if on_pod is not None:
                    on_pod(i)
            ctrd_extra = {
                "processes": [str(p) for p in cgroup_pids(cgroup_parent)],
                "runc state": sorted(str(p.relative_to(ctrd.runc_root)) for p in ctrd.runc_root.glob("*/*")),
                "mounts": mounts_under(ctrd.base),
                "CNI cache": libcni_cache(conflist),
            }
            agent_state = work / "agent" / "state" / "sandboxes"
            agent_extra = {
                "state files": sorted(p.name for p in agent_state.iterdir()) if agent_state.exists() else [],
            }
            report["leftovers"] = {
                "agent": leftovers(sides["agent"], ipam_dir, agent_extra),
                "containerd": leftovers(sides["containerd"], ipam_dir, ctrd_extra),
            }
    except BaseException as exc:
        report["errors"].append(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, KeyboardInterrupt):
            raise  # after the clean-up below
    finally:
        for side in sides.values():
            for sid in list(side.live):
                try:
                    side.stub.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=CALL_TIMEOUT)
                    side.stub.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                               timeout=CALL_TIMEOUT)
                except grpc.RpcError as exc:
                    report["errors"].append(f"clean-up of {side.name} sandbox {sid}: {exc.details()}")
            side.channel.close()
        report["results"] = {name: {"times": side.times, "totals": side.totals}
                             for name, side in sides.items()}
        report["after_cleanup"] = clean_up(work, ctrd, agent_proc, cgroup_parent, bridge, conflist, sides)
        if made_run_dir:
            for d in (SHIM_RUN_DIR / "s", SHIM_RUN_DIR):
                try:
                    d.rmdir()
                except OSError:
                    pass
    return report


def clean_up(work: Path, ctrd: Containerd, agent_proc: subprocess.Popen[bytes] | None, cgroup_parent: str,
             bridge: str, conflist: dict[str, Any], sides: dict[str, Side]) -> dict[str, list[str]]:
    """Stop and remove everything the bench made; returns what could not be removed."""
    stop_process(agent_proc, 60)
    ctrd.stop()
    # Shims outlive containerd by design, and their pause processes with them.
    for pid in processes_naming(str(ctrd.socket)) + cgroup_pids(cgroup_parent):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.2)
    ctrd_side = sides.get("containerd")
    if ctrd_side is not None:
        # Pods containerd could not tear down (it died): CNI DEL as it would
        # have run it, so portmap's rules and the lease go too.
        for sid in sorted(ctrd_side.live):
            cni_del(conflist, sid, ctrd_side.netns.get(sid, ""), ctrd_side.ports.get(sid, 0))
        for sock in shim_sockets(ctrd, sides):
            sock.unlink(missing_ok=True)
    for entry in libcni_cache(conflist):
        Path(entry).unlink(missing_ok=True)
    for point in mounts_under(work):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    for side in sides.values():
        for path in side.netns.values():
            if netns_mounted(path):
                subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)
                Path(path).unlink(missing_ok=True)
        for sid in side.ids:
            subprocess.run(["ip", "netns", "del", f"podvisor-{sid}"], capture_output=True, timeout=30)
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
    remove_cgroup(cgroup_parent)
    left = {
        "processes": [str(p) for p in processes_naming(str(work)) + cgroup_pids(cgroup_parent)],
        "mounts": mounts_under(work),
        "netns": [p for s in sides.values() for p in s.netns.values() if netns_mounted(p)],
        "containerd's CNI cache": libcni_cache(conflist),
        "shim sockets": [str(p) for p in shim_sockets(ctrd, sides) if p.exists()],
        "cgroups": [str(d) for d in cgroup_dirs(cgroup_parent) if d.exists()],
    }
    shutil.rmtree(work, ignore_errors=True)
    left["work directory"] = [str(work)] if work.exists() else []
    return left


def _ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000 if values else float("nan")


def print_report(report: dict[str, Any]) -> bool:
    """The table; True when every step and the total are at or below containerd's p50."""
    res = report["results"]
    a, c = res.get("agent"), res.get("containerd")
    if not a or not c or not a["totals"] or not c["totals"]:
        return False
    print(f"bench/lifecycle: {report['pods']} pods each, serial, pod networking on (bridge + host-local "
          "+ portmap); agent vs containerd 1.6 + runc")
    print(f"  {'call':<18} {'agent p50':>10} {'p95':>8}   {'containerd p50':>14} {'p95':>8}   {'ratio p50':>9}")
    met = True
    rows = [(s, a["times"][s], c["times"][s]) for s in STEPS] + [("total", a["totals"], c["totals"])]
    for step, av, cv in rows:
        ratio = percentile(av, 50) / percentile(cv, 50)
        met &= ratio <= 1.0
        print(f"  {step:<18} {_ms(av, 50):8.1f}ms {_ms(av, 95):6.1f}ms   {_ms(cv, 50):12.1f}ms {_ms(cv, 95):6.1f}ms"
              f"   {ratio:8.2f}x")
    print(f"  target: every step and the total <= 1.00x containerd's p50: {'met' if met else 'NOT met'}")
    return met


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--json", type=Path, help="write what was measured and found left over here")
    ap.add_argument("--leave-one", action="store_true",
                    help="leave the last pod of each runtime running (the leak check must see it)")
    args = ap.parse_args()
    report = run(args.pods, leave_one=args.leave_one)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    for err in report["errors"]:
        print(f"error: {err}", file=sys.stderr)
    left = {f"{runtime}: {kind}": items for runtime, kinds in report["leftovers"].items()
            for kind, items in kinds.items() if items}
    left.update({f"after clean-up: {kind}": items for kind, items in report["after_cleanup"].items() if items})
    for what, items in left.items():
        print(f"left behind: {what}: {items}", file=sys.stderr)
    if not args.leave_one:
        print_report(report)
    return 1 if report["errors"] or left else 0


if __name__ == "__main__":
    sys.exit(main())
