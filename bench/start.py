#!/usr/bin/env python3
"""bench/start: VM start through the agent vs. the same domain started directly.

For each run the agent does CreateContainer + StartContainer (timed from the
request to the domain running). The baseline then defines and starts, with
libvirt-python, a copy of exactly that domain XML, over its own overlay and
seed prepared beforehand (the agent's own preparation is part of its time).
Runs alternate so machine noise hits both alike. Also: time to the guest's
ready line for both, 20 VMs started concurrently, and the agent's RSS with 0
and with 20 VMs.

Targets: overhead ratio <= 1.2 and <= 100 ms added, at p50; 20 concurrent
starts without error; agent RSS growth <= 1 MiB per VM.

Usage: python bench/start.py [--runs 20] [--ready-runs 5] [--concurrent 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import libvirt
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from agent.api.gen.runtime.v1 import api_pb2 as pb  # noqa: E402
from agent.api.gen.runtime.v1 import api_pb2_grpc  # noqa: E402
from bench.common import percentile, start_agent, stop_process, tiny_image  # noqa: E402

MEMORY = 96 << 20  # the tiny guest needs 76 MiB




def wait_for(path: Path, text: str, timeout: float = 180) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in path.read_text(errors="replace"):
                return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{text!r} never appeared in {path}")




class Bench:
    def __init__(self, rt: object, image: str, logs: Path) -> None:
        self.rt = rt
        self.image = image
        self.logs = logs
        self.n = 0

    def sandbox(self) -> tuple[str, pb.PodSandboxConfig]:
        self.n += 1
        cfg = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=f"bench-{self.n}", namespace="bench", uid=uuid.uuid4().hex),
            hostname=f"bench-{self.n}", log_directory=str(self.logs / f"bench-{self.n}"))
        sid = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id  # type: ignore[attr-defined]
        return sid, cfg

    def create_start(self, sid: str, cfg: pb.PodSandboxConfig) -> tuple[str, float]:
        ccfg = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=self.image), log_path="vm.log",
            linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=MEMORY)))
        t0 = time.perf_counter()
        cid = self.rt.CreateContainer(pb.CreateContainerRequest(  # type: ignore[attr-defined]
            pod_sandbox_id=sid, config=ccfg, sandbox_config=cfg), timeout=120).container_id
        self.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)  # type: ignore[attr-defined]
        return cid, time.perf_counter() - t0

    def remove(self, sid: str) -> None:
        self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)  # type: ignore[attr-defined]
        self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)  # type: ignore[attr-defined]


def baseline_xml(agent_xml: str, workdir: Path, info: dict[str, str], i: int) -> tuple[str, str, Path]:
    """A copy of the agent's domain on its own overlay, seed and console."""
    base_dir = workdir / f"base-{i}"
    base_dir.mkdir(mode=0o711)
    overlay, seed, console = base_dir / "disk.qcow2", base_dir / "seed.iso", base_dir / "console.raw"
    backing = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", info["overlay"]],
                                        capture_output=True, check=True).stdout)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing["backing-filename-format"],
                    "-b", backing["backing-filename"], str(overlay)], check=True)
    shutil.copy(info["seed"], seed)
    root = ET.fromstring(agent_xml)
    name = f"pvbench-base-{uuid.uuid4().hex[:12]}"
    root.find("name").text = name  # type: ignore[union-attr]
    root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
    md = root.find("metadata")
    if md is not None:
        root.remove(md)  # not a Podvisor domain: the agent must ignore it
    for src in root.iter("source"):
        if src.get("file") == info["overlay"]:
            src.set("file", str(overlay))
        elif src.get("file") == info["seed"]:
            src.set("file", str(seed))
        if src.get("path") == info["serialSocket"]:
            src.set("path", str(base_dir / "serial.sock"))
    for lg in root.iter("log"):
        lg.set("file", str(console))
    return ET.tostring(root, encoding="unicode"), name, console


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--ready-runs", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=20)
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pv-bench-start-", dir="/var/tmp"))
    workdir.chmod(0o711)
    conn = libvirt.open("qemu:///system")
    proc = None
    base_domains: list[str] = []
    try:
        with tiny_image(workdir) as image:
            proc, sock = start_agent(workdir / "agent", virt_type="qemu")
            channel = grpc.insecure_channel(f"unix:{sock}")
            grpc.channel_ready_future(channel).result(timeout=30)
            rt = api_pb2_grpc.RuntimeServiceStub(channel)
            api_pb2_grpc.ImageServiceStub(channel).PullImage(
                pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
            bench = Bench(rt, image, workdir / "logs")
            agent_proc = psutil.Process(proc.pid)

            agent_s, base_s, agent_ready, base_ready = [], [], [], []
            for i in range(args.runs):
                sid, cfg = bench.sandbox()
                t_req = time.monotonic()
                cid, took = bench.create_start(sid, cfg)
                agent_s.append(took)
                status = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid, verbose=True), timeout=30)
                info = json.loads(status.info["info"])
                ready_run = i < args.ready_runs
                if ready_run:
                    agent_ready.append(wait_for(Path(status.status.log_path), "PODVISOR-READY") - t_req)
                # The baseline's overlay and seed are prepared before timing it.
                xml, name, console = baseline_xml(info["domainXML"], workdir, info, i)
                bench.remove(sid)

                t_base = time.monotonic()
                t0 = time.perf_counter()
                dom = conn.defineXML(xml)
                base_domains.append(name)
                dom.create()
                base_s.append(time.perf_counter() - t0)
                if ready_run:
                    base_ready.append(wait_for(console, "PODVISOR-READY") - t_base)
                dom.destroy()
                dom.undefine()
                base_domains.remove(name)

            rss_0 = agent_proc.memory_info().rss
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrent) as pool:
                sandboxes = [bench.sandbox() for _ in range(args.concurrent)]
                results = list(pool.map(lambda sc: bench.create_start(*sc), sandboxes))
            running = 0
            for cid, _ in results:
                st = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=30).status
                running += st.state == pb.CONTAINER_RUNNING
            concurrent_s = time.perf_counter() - t0
            time.sleep(2)
            rss_n = agent_proc.memory_info().rss
            for sid, _ in sandboxes:
                bench.remove(sid)
            channel.close()
    finally:
        for name in base_domains:
            try:
                dom = conn.lookupByName(name)
                dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
        stop_process(proc, 60)
        shutil.rmtree(workdir, ignore_errors=True)

    a50, a95 = statistics.median(agent_s), percentile(agent_s, 95)
    b50, b95 = statistics.median(base_s), percentile(base_s, 95)
    print(f"bench/start: {args.runs} runs, TCG, tiny guest {MEMORY >> 20} MiB")
    print(f"  agent Create+Start -> running   p50 {a50 * 1000:7.1f} ms   p95 {a95 * 1000:7.1f} ms")
    print(f"  libvirt define+start (baseline)  p50 {b50 * 1000:7.1f} ms   p95 {b95 * 1000:7.1f} ms")
    added = (a50 - b50) * 1000
    print(f"  ratio p50 {a50 / b50:.2f}x  added {added:.0f} ms   "
          f"(targets <= 1.20x and <= 100 ms: {'met' if a50 / b50 <= 1.2 and added <= 100 else 'NOT met'})")
    if agent_ready:
        print(f"  to ready line: agent p50 {statistics.median(agent_ready):.2f} s   "
              f"baseline p50 {statistics.median(base_ready):.2f} s   ({len(agent_ready)} runs)")
    print(f"  {args.concurrent} concurrent Create+Start: {running}/{args.concurrent} running in {concurrent_s:.1f} s")
    growth = (rss_n - rss_0) / max(1, args.concurrent) / (1 << 20)
    print(f"  agent RSS: {rss_0 / (1 << 20):.1f} MiB with 0 VMs, {rss_n / (1 << 20):.1f} MiB with "
          f"{args.concurrent}: {growth:.2f} MiB per VM (target <= 1 MiB: {'met' if growth <= 1 else 'NOT met'})")
    return 0 if running == args.concurrent else 1


if __name__ == "__main__":
    sys.exit(main())
