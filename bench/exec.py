#!/usr/bin/env python3
"""bench/exec: ExecSync, port-forward and streaming Exec on the stock Debian 12
guest (images/debian) under TCG, each against a baseline measured in the same
run on the same VM.

- ExecSync of ``true`` through the agent's gRPC API vs. the same
  ``guest-exec`` + ``guest-exec-status`` polling (the agent's own back-off:
  2 ms, x1.5, at most 100 ms) sent by hand with libvirt-python
  (``libvirt_qemu.qemuAgentCommand``) on the same domain. Warm-up first, then
  the two alternate. Target: p50 ratio <= 1.2x (p95 printed).
- Port-forward throughput: a 100 MiB file in the guest's /dev/shm served by
  ``python3 -m http.server`` (started through ExecSync), downloaded through
  the agent's PortForward URL with the WebSocket port-forward protocol
  (websocket-client, v4.channel.k8s.io; kubectl speaks SPDY, which the same
  server also serves) vs. a direct TCP connection from the host to the pod
  IP. Runs alternate; best and median throughput. Target: median ratio >= 0.5x.
- Exec to first output byte: gRPC Exec of ``echo hi`` -> URL -> WebSocket
  remotecommand session (v5/v4.channel.k8s.io) -> first stdout byte; p50.
  No target; for comparison the same over SSH alone (the agent's own SSH
  adapter and the VM's key, in this process: connect, session, ``echo hi``),
  and the SSH connection's share, alternating with the agent's runs.

Everything is made under its own directory, bridge, /24 and names, and all of
it (pods, domains, pod networks, bridge, registry) goes at the end, even on
failure.

Usage: python bench/exec.py [--runs 30] [--pf-runs 3] [--exec-runs 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import libvirt
import libvirt_qemu
import websocket

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from agent.api.gen.runtime.v1 import api_pb2 as pb  # noqa: E402
from agent.api.gen.runtime.v1 import api_pb2_grpc  # noqa: E402
from agent.cli.streams import PORTFORWARD, REMOTECOMMAND, STDOUT, connect  # noqa: E402
from bench.common import debian_image, percentile, private_cni_network, start_agent, stop_process  # noqa: E402

MEMORY = 768 << 20  # what the stock Debian guest is comfortable in (images/debian/README.md)
HTTP_PORT = 8080
FILE_SIZE = 100 << 20
BOOT_TIMEOUT_S = 900
# The agent's guest-exec-status back-off (agent/services/exec.py), for the baseline.
POLL_FIRST_S, POLL_FACTOR, POLL_MAX_S = 0.002, 1.5, 0.1


def by_hand(dom: Any, cmd: list[str]) -> float:
    """guest-exec + guest-exec-status polling through libvirt-python; seconds."""
    t0 = time.perf_counter()
    start = json.dumps({"execute": "guest-exec",
                        "arguments": {"path": cmd[0], "arg": cmd[1:], "capture-output": True}})
    pid = json.loads(libvirt_qemu.qemuAgentCommand(dom, start, 10, 0))["return"]["pid"]
    status = json.dumps({"execute": "guest-exec-status", "arguments": {"pid": pid}})
    pause = POLL_FIRST_S
    while True:
        answer = json.loads(libvirt_qemu.qemuAgentCommand(dom, status, 10, 0))["return"]
        if answer.get("exited"):
            break
        time.sleep(pause)
        pause = min(POLL_MAX_S, pause * POLL_FACTOR)
    took = time.perf_counter() - t0
    if answer.get("exitcode") != 0:
        raise SystemExit(f"{cmd} by hand exited {answer}")
    return took


def http_get(send: Any, recv: Any) -> int:
    """One GET of /big over a byte pipe; the body's length once all of it came."""
    send(b"GET /big HTTP/1.0\r\nHost: pod\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = recv()
        if not chunk:
            raise SystemExit(f"the download ended in its headers: {buf[:200]!r}")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    got = len(body)
    while got < length:
        chunk = recv()
        if not chunk:
            raise SystemExit(f"the download ended after {got} of {length} bytes")
        got += len(chunk)
    return got


def direct_download(ip: str) -> float:
    with socket.create_connection((ip, HTTP_PORT), timeout=60) as s:
        t0 = time.perf_counter()
        got = http_get(s.sendall, lambda: s.recv(1 << 20))
        took = time.perf_counter() - t0
    assert got == FILE_SIZE
    return took


def forwarded_download(rt: Any, sid: str) -> float:
    """Request to last byte: PortForward URL, WebSocket session, the GET."""
    t0 = time.perf_counter()
    url = rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=sid, port=[HTTP_PORT]), timeout=30).url
    ws = connect(f"{url}{'&' if '?' in url else '?'}port={HTTP_PORT}", PORTFORWARD)
    seen: set[int] = set()
    errors: list[bytes] = []

    def recv() -> bytes:
        while True:
            try:
                opcode, data = ws.recv_data()
            except websocket.WebSocketConnectionClosedException:
                return b""
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return b""
            if not data:
                continue
            channel, payload = data[0], data[1:]
            if channel not in seen:  # each channel's first frame starts with the port
                seen.add(channel)
                payload = payload[2:]
            if channel == 1 and payload:
                errors.append(payload)
            elif channel == 0 and payload:
                return bytes(payload)

    try:
        got = http_get(lambda b: ws.send_binary(b"\x00" + b), recv)
        took = time.perf_counter() - t0
    finally:
        ws.close()
    if errors or got != FILE_SIZE:
        raise SystemExit(f"port-forward failed: {b''.join(errors)!r}, {got} bytes")
    return took


def exec_first_byte(rt: Any, cid: str) -> float:
    """gRPC Exec of ``echo hi`` to the first stdout byte on the WebSocket session."""
    t0 = time.perf_counter()
    url = rt.Exec(pb.ExecRequest(container_id=cid, cmd=["echo", "hi"], stdout=True, stderr=True),
                  timeout=30).url
    ws = connect(url, REMOTECOMMAND)
    took = None
    out = b""
    try:
        while True:
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            if data and data[0] == STDOUT and len(data) > 1:
                if took is None:
                    took = time.perf_counter() - t0
                out += data[1:]
    except websocket.WebSocketConnectionClosedException:
        pass
    finally:
        ws.close()
    if took is None or out != b"hi\n":
        raise SystemExit(f"exec of echo hi gave {out!r}")
    return took


class FirstWrite:
    """An Output that notes when its first bytes came."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.data = b""

    def write(self, data: bytes) -> None:
        if self.at is None and data:
            self.at = time.perf_counter()
        self.data += data


def ssh_direct(pod_ip: str, directory: str) -> tuple[float, float]:
    """What the agent does over SSH for the same Exec, in this process with the
    agent's own adapter and the VM's key: (connect, connect to first byte)."""
    from agent.adapters.exec_keys import ExecKeys
    from agent.adapters.ssh import GuestSSH
    from agent.streaming.backend import Streams
    credentials = ExecKeys().load(directory)
    out = FirstWrite()
    t0 = time.perf_counter()
    session = GuestSSH().connect(pod_ip, credentials, 30)
    connected = time.perf_counter() - t0
    try:
        status = session.run("echo hi", False, Streams(stdin=None, stdout=out, stderr=FirstWrite(), resize=None))
    finally:
        session.close()
    if status.code != 0 or out.at is None or out.data != b"hi\n":
        raise SystemExit(f"echo hi over SSH gave {out.data!r}, {status}")
    return connected, out.at - t0


def cleanup(conn: Any, work: Path, state: Path) -> None:
    """What the agent did not remove: domains on our files, pod networks in our cache."""
    for dom in conn.listAllDomains():
        try:
            if str(work) in dom.XMLDesc(0):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError:
            pass
    cache = state / "cni"
    if cache.exists():
        from agent.adapters.network.pod_network import PodNetworkManager
        manager = PodNetworkManager([], [Path("/usr/lib/cni")], cache, "pvunused0", "10.255.255.0/24")
        for sid in manager.cached_sandbox_ids():
            try:
                manager.remove(sid, state / "sandboxes" / sid)
            except Exception:  # noqa: BLE001 - best effort, the bridge goes below
                pass


def ms(v: float) -> str:
    return f"{v * 1000:7.1f} ms"


def report_exec_sync(agent_s: list[float], hand_s: list[float]) -> None:
    a50, a95 = statistics.median(agent_s), percentile(agent_s, 95)
    h50, h95 = statistics.median(hand_s), percentile(hand_s, 95)
    print(f"  ExecSync `true` ({len(agent_s)} runs each, interleaved)")
    print(f"    agent gRPC ExecSync                    p50 {ms(a50)}   p95 {ms(a95)}")
    print(f"    guest-exec + status by hand (libvirt)  p50 {ms(h50)}   p95 {ms(h95)}")
    print(f"    ratio p50 {a50 / h50:.2f}x  p95 {a95 / h95:.2f}x   "
          f"(target <= 1.20x at p50: {'met' if a50 / h50 <= 1.2 else 'NOT met'})", flush=True)


def report_port_forward(direct_s: list[float], forward_s: list[float]) -> None:
    mib = FILE_SIZE / (1 << 20)
    d_mbs = [mib / s for s in direct_s]
    f_mbs = [mib / s for s in forward_s]
    d50, f50 = statistics.median(d_mbs), statistics.median(f_mbs)
    print(f"  port-forward, 100 MiB download ({len(direct_s)} runs each, interleaved)")
    print(f"    direct TCP to the pod IP         median {d50:7.1f} MiB/s   best {max(d_mbs):7.1f} MiB/s")
    print(f"    agent PortForward (WebSocket)    median {f50:7.1f} MiB/s   best {max(f_mbs):7.1f} MiB/s")
    print(f"    ratio {f50 / d50:.2f}x   (target >= 0.50x: {'met' if f50 / d50 >= 0.5 else 'NOT met'})",
          flush=True)


def report_exec(first_s: list[float], ssh: list[tuple[float, float]]) -> None:
    e50 = statistics.median(first_s)
    c50 = statistics.median([c for c, _ in ssh])
    s50 = statistics.median([f for _, f in ssh])
    print(f"  streaming Exec `echo hi`, request to first stdout byte ({len(first_s)} runs, interleaved)")
    print(f"    agent: gRPC Exec -> URL -> WebSocket session -> byte  p50 {ms(e50)}   p95 "
          f"{ms(percentile(first_s, 95))}")
    print(f"    the same over SSH alone (agent's adapter, in-process)  p50 {ms(s50)}   p95 "
          f"{ms(percentile([f for _, f in ssh], 95))}")
    print(f"      of which the SSH connection (TCP, kex, auth)       p50 {ms(c50)}  ({c50 / e50:.0%} of the agent's)",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30, help="ExecSync runs per side")
    ap.add_argument("--pf-runs", type=int, default=3, help="100 MiB downloads per side")
    ap.add_argument("--exec-runs", type=int, default=10, help="streaming Exec runs")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pv-bench-exec-", dir="/var/tmp"))
    work.chmod(0o711)  # QEMU's user traverses it (checked at start)
    bridge, conflist = private_cni_network(work, "pvbe", "bench-exec")
    conn = libvirt.open("qemu:///system")
    proc = None
    rt: Any = None
    channel: grpc.Channel | None = None
    sid = ""
    try:
        with debian_image(work) as image:
            proc, sock = start_agent(work / "agent", virt_type="qemu", cni_conf_dir=work / "net.d")
            channel = grpc.insecure_channel(f"unix:{sock}")
            grpc.channel_ready_future(channel).result(timeout=30)
            rt = api_pb2_grpc.RuntimeServiceStub(channel)
            api_pb2_grpc.ImageServiceStub(channel).PullImage(
                pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=600)
            name = str(conflist["name"])  # bench-exec-<suffix>, unique to this run
            sb_cfg = pb.PodSandboxConfig(
                metadata=pb.PodSandboxMetadata(name=name, namespace="bench", uid=uuid.uuid4().hex),
                hostname=name, log_directory=str(work / "logs"))
            sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
            cfg = pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=image), log_path="vm.log",
                linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=MEMORY)))
            cid = rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg), timeout=120).container_id
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
            info = json.loads(rt.ContainerStatus(
                pb.ContainerStatusRequest(container_id=cid, verbose=True), timeout=30).info["info"])
            pod_ip = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid),
                                         timeout=30).status.network.ip
            dom = conn.lookupByName(info["domain"])

            def exec_sync(cmd: list[str], timeout: int = 60) -> pb.ExecSyncResponse:
                r = rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout),
                                timeout=timeout + 60)
                if r.exit_code != 0:
                    raise SystemExit(f"ExecSync {cmd} exited {r.exit_code}: {r.stderr!r}")
                return r

            # Boot: the first ExecSync waits for the guest's agent; then for
            # cloud-init (which installs the exec key for sshd).
            t_boot = time.monotonic()
            exec_sync(["true"], timeout=BOOT_TIMEOUT_S)
            exec_sync(["sh", "-c", "cloud-init status --wait >/dev/null; true"], timeout=BOOT_TIMEOUT_S)
            boot_s = time.monotonic() - t_boot
            print(f"bench/exec: TCG, stock Debian 12 guest {MEMORY >> 20} MiB "
                  f"(booted and cloud-init done {boot_s:.0f} s after StartContainer)", flush=True)

            # ExecSync vs. guest-exec by hand, interleaved after a warm-up.
            for _ in range(3):
                exec_sync(["true"])
                by_hand(dom, ["true"])
            agent_s: list[float] = []
            hand_s: list[float] = []
            for i in range(args.runs):
                pair = [("agent", lambda: exec_sync(["true"])), ("hand", lambda: by_hand(dom, ["true"]))]
                for who, fn in pair if i % 2 == 0 else reversed(pair):
                    t0 = time.perf_counter()
                    took = fn()
                    if who == "agent":
                        agent_s.append(time.perf_counter() - t0)
                    else:
                        assert isinstance(took, float)
                        hand_s.append(took)
            report_exec_sync(agent_s, hand_s)

            # The server and its file, in RAM (the guest's /dev/shm).
            exec_sync(["sh", "-c", f"head -c {FILE_SIZE} /dev/urandom > /dev/shm/big"], timeout=300)
            exec_sync(["sh", "-c", f"cd /dev/shm && setsid python3 -m http.server {HTTP_PORT} "
                       "</dev/null >/dev/null 2>&1 &"])
            deadline = time.monotonic() + 120
            while True:
                try:
                    socket.create_connection((pod_ip, HTTP_PORT), timeout=5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("the guest's http.server never listened") from None
                    time.sleep(0.5)
            direct_download(pod_ip)  # warm-up: the file's pages, both paths
            forwarded_download(rt, sid)
            direct_s: list[float] = []
            forward_s: list[float] = []
            for i in range(args.pf_runs):
                if i % 2 == 0:
                    direct_s.append(direct_download(pod_ip))
                    forward_s.append(forwarded_download(rt, sid))
                else:
                    forward_s.append(forwarded_download(rt, sid))
                    direct_s.append(direct_download(pod_ip))
            report_port_forward(direct_s, forward_s)

            # Streaming Exec to its first output byte; the SSH connection apart.
            exec_first_byte(rt, cid)  # warm-up
            first_s: list[float] = []
            ssh: list[tuple[float, float]] = []
            for i in range(args.exec_runs):
                if i % 2 == 0:
                    first_s.append(exec_first_byte(rt, cid))
                    ssh.append(ssh_direct(pod_ip, info["directory"]))
                else:
                    ssh.append(ssh_direct(pod_ip, info["directory"]))
                    first_s.append(exec_first_byte(rt, cid))
            report_exec(first_s, ssh)
    finally:
        # Each step on its own: one failing must not keep the next from running.
        if rt is not None and sid:
            try:
                rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
                rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
            except Exception as exc:  # noqa: BLE001 - the domain and network go below
                print(f"removing the pod through the agent failed: {exc}", file=sys.stderr)
        if channel is not None:
            channel.close()
        stop_process(proc, 60)
        try:
            cleanup(conn, work, work / "agent" / "state")
        except Exception as exc:  # noqa: BLE001
            print(f"cleanup failed: {exc}", file=sys.stderr)
        conn.close()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    return 0


if __name__ == "__main__":
    sys.exit(main())
