#!/usr/bin/env python3
"""bench/volumes: pod volumes over virtiofs on the stock Debian 12 guest
(images/debian) under TCG, each against a baseline measured in the same run.

- Sequential read of a 100 MiB file over virtiofs (a read-only CRI mount)
  vs. the same file copied onto the VM's own disk, timed inside the guest
  (``dd`` to /dev/null, 1 MiB blocks), the guest's page cache dropped before
  every run; the two alternate. Printed: median MiB/s each, and the ratio.
  (Both are served from the host's page cache once warm: the share's file
  directly, the disk through its qcow2 overlay with cache=writeback.)
- What the share adds to StartContainer: StartContainer of a VM with three
  mounts vs. the same VM without, alternating, each VM hard-stopped and its
  pod removed right after it started (no boot). Printed: median seconds and
  the ratio.

One Debian VM boots (for the reads); no pod network (ExecSync goes through
the QEMU guest agent). Everything is made under its own directory and goes at
the end, even on failure.

Usage: python bench/volumes.py [--runs 5] [--start-runs 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import libvirt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from agent.api.gen.runtime.v1 import api_pb2 as pb  # noqa: E402
from agent.api.gen.runtime.v1 import api_pb2_grpc  # noqa: E402
from bench.common import debian_image, start_agent, stop_process  # noqa: E402

MEMORY = 768 << 20  # what the stock Debian guest is comfortable in (images/debian/README.md)
FILE_SIZE = 100 << 20
BOOT_TIMEOUT_S = 900
SHARE_PATH = "/mnt/volume"
DISK_COPY = "/var/tmp/big"
# Timed inside the guest: only dd's own read, not the ExecSync round trip.
READ_SCRIPT = ('sync; echo 3 > /proc/sys/vm/drop_caches; t0=$(date +%s.%N); '
               'dd if="$1" of=/dev/null bs=1M status=none; t1=$(date +%s.%N); echo "$t0 $t1"')


class Bench:
    def __init__(self, rt: Any, image: str, work: Path) -> None:
        self.rt = rt
        self.image = image
        self.work = work
        self.sandboxes: list[str] = []

    def pod(self, name: str, mounts: list[pb.Mount]) -> tuple[str, str]:
        sb_cfg = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace="bench", uid=uuid.uuid4().hex),
            hostname=name, log_directory=str(self.work / "logs"))
        sid = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
        self.sandboxes.append(sid)
        cfg = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=self.image),
            log_path=f"{name}.log", mounts=mounts,
            linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=MEMORY)))
        cid = self.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg),
                                      timeout=120).container_id
        return sid, cid

    def remove(self, sid: str) -> None:
        self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        self.sandboxes.remove(sid)

    def exec_sync(self, cid: str, cmd: list[str], timeout: int = 120) -> str:
        r = self.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout), timeout=timeout + 60)
        if r.exit_code != 0:
            raise SystemExit(f"ExecSync {cmd} exited {r.exit_code}: {r.stderr!r}")
        return str(r.stdout.decode())

    def read_s(self, cid: str, path: str) -> float:
        t0, t1 = (float(x) for x in self.exec_sync(cid, ["sh", "-c", READ_SCRIPT, "read", path]).split())
        return t1 - t0

    def start_s(self, name: str, mounts: list[pb.Mount]) -> float:
        sid, cid = self.pod(name, mounts)
        try:
            t0 = time.perf_counter()
            self.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
            return time.perf_counter() - t0
        finally:
            self.remove(sid)


def cleanup(conn: Any, work: Path) -> None:
    """What the agent did not remove: domains on our files."""
    for dom in conn.listAllDomains():
        try:
            if str(work) in dom.XMLDesc(0):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError:
            pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5, help="100 MiB reads per side")
    ap.add_argument("--start-runs", type=int, default=5, help="StartContainer runs per side")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pv-bench-vol-", dir="/var/tmp"))
    work.chmod(0o711)
    data = work / "volume"
    data.mkdir()
    with open(data / "big", "wb") as f:
        f.write(os.urandom(FILE_SIZE))
    extra = [work / "cfg", work / "scratch"]
    for d in extra:
        d.mkdir()
    (work / "termination-log").write_text("")
    conn = libvirt.open("qemu:///system")
    proc = None
    channel: grpc.Channel | None = None
    bench: Bench | None = None
    try:
        with debian_image(work) as image:
            proc, sock = start_agent(work / "agent", virt_type="qemu")
            channel = grpc.insecure_channel(f"unix:{sock}")
            grpc.channel_ready_future(channel).result(timeout=30)
            rt = api_pb2_grpc.RuntimeServiceStub(channel)
            api_pb2_grpc.ImageServiceStub(channel).PullImage(
                pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=600)
            bench = Bench(rt, image, work)

            mounts = [pb.Mount(container_path=SHARE_PATH, host_path=str(data), readonly=True),
                      pb.Mount(container_path="/etc/cfg", host_path=str(extra[0]), readonly=True),
                      pb.Mount(container_path="/var/scratch", host_path=str(extra[1])),
                      pb.Mount(container_path="/dev/termination-log", host_path=str(work / "termination-log"))]
            with_s: list[float] = []
            without_s: list[float] = []
            for i in range(args.start_runs):
                pair = [(with_s, mounts), (without_s, [])]
                for out, m in pair if i % 2 == 0 else reversed(pair):
                    out.append(bench.start_s(f"bench-vol-start-{i}-{len(m)}", m))

            _sid, cid = bench.pod("bench-vol-read", mounts[:1])
            t_boot = time.monotonic()
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
            bench.exec_sync(cid, ["true"], timeout=BOOT_TIMEOUT_S)
            bench.exec_sync(cid, ["sh", "-c", "cloud-init status --wait >/dev/null; true"], timeout=BOOT_TIMEOUT_S)
            boot_s = time.monotonic() - t_boot
            bench.exec_sync(cid, ["sh", "-c", f"cp {SHARE_PATH}/big {DISK_COPY} && sync && "
                                              f"cmp {SHARE_PATH}/big {DISK_COPY}"], timeout=600)
            print(f"bench/volumes: TCG, stock Debian 12 guest {MEMORY >> 20} MiB "
                  f"(booted and cloud-init done {boot_s:.0f} s after StartContainer)", flush=True)
            bench.read_s(cid, f"{SHARE_PATH}/big")  # warm the host's page cache for both
            bench.read_s(cid, DISK_COPY)
            share_s: list[float] = []
            disk_s: list[float] = []
            for i in range(args.runs):
                pair = [(share_s, f"{SHARE_PATH}/big"), (disk_s, DISK_COPY)]
                for out, path in pair if i % 2 == 0 else reversed(pair):
                    out.append(bench.read_s(cid, path))

        mib = FILE_SIZE / (1 << 20)
        s50, d50 = statistics.median(share_s), statistics.median(disk_s)
        print(f"  sequential read of 100 MiB in the guest, caches dropped ({args.runs} runs each, interleaved)")
        print(f"    virtiofs share        median {mib / s50:7.1f} MiB/s   best {mib / min(share_s):7.1f} MiB/s")
        print(f"    the VM's own disk     median {mib / d50:7.1f} MiB/s   best {mib / min(disk_s):7.1f} MiB/s")
        print(f"    ratio (share / disk throughput) {d50 / s50:.2f}x")
        w50, o50 = statistics.median(with_s), statistics.median(without_s)
        print(f"  StartContainer ({args.start_runs} runs each, interleaved)")
        print(f"    with 4 mounts (virtiofsd started)   median {w50:6.2f} s")
        print(f"    without mounts                      median {o50:6.2f} s")
        print(f"    ratio {w50 / o50:.2f}x   (the share adds {w50 - o50:+.2f} s)", flush=True)
        return 0
    finally:
        if bench is not None:
            for sid in list(bench.sandboxes):
                try:
                    bench.remove(sid)
                except grpc.RpcError:
                    pass
        if channel is not None:
            channel.close()
        stop_process(proc, 30)
        cleanup(conn, work)
        conn.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
