#!/usr/bin/env python3
"""bench/soak: many VM pod lifecycles through one agent, then a search for
anything left behind.

Each cycle is RunPodSandbox → CreateContainer → StartContainer →
StopContainer (ACPI, then a hard stop after --stop-timeout seconds) →
RemovePodSandbox, with pod networking on (a private CNI configuration: its
own bridge, /24 subnet, IPAM directory, masquerading and a hostPort per pod),
booting the tiny guest under TCG, --parallel cycles at a time. Every second
cycle calls StopPodSandbox before RemovePodSandbox, as kubelet does; the
others leave the forced stop to RemovePodSandbox.

Afterwards it checks, for this run's sandboxes, containers, IPs and state
directory: libvirt domains, network namespaces, links, iptables rules,
dnsmasq processes, files under the state and runtime directories (beyond the
database and the pulled image), host-local IPAM leases, the agent's child
processes and its open descriptors (after vs. before the cycles, measured
after a warm-up round). It prints the agent's RSS growth and the latency
drift (p50 of the last 50 cycles over the first 50).

Targets: zero leaks of every kind (a leak or a failed cycle exits 1); RSS
growth < 10 MiB over 500 cycles; p50 of the last 50 within 10% of the first
50 (timing is printed, never a failure).

Usage: python bench/soak.py [--cycles 500] [--parallel 4] [--stop-timeout 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import libvirt
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from agent.api.gen.runtime.v1 import api_pb2 as pb  # noqa: E402
from agent.api.gen.runtime.v1 import api_pb2_grpc  # noqa: E402
from bench import leaks  # noqa: E402
from bench.common import percentile, start_agent, stop_process, tiny_image  # noqa: E402
from tests.integration.cni_conf import write_conflist  # noqa: E402

MEMORY = 96 << 20  # the tiny guest needs 76 MiB
WINDOW = 50  # cycles compared for the latency drift
SETTLE_S = 30.0  # how long leftovers may take to go (dnsmasq exiting, descriptors closing)
RSS_TARGET_MIB = 10.0
DRIFT_TARGET = 1.10
# Under the state directory: made once and reused by every sandbox.
KEPT_DIRS = ("sandboxes", "cni", "cni/results", "vm")


@dataclass
class Cycle:
    index: int
    seconds: float = 0.0
    steps: dict[str, float] | None = None
    error: str = ""


@dataclass
class Soak:
    rt: Any
    image: str
    logs: Path
    marks: leaks.Marks
    stop_timeout: int
    port_base: int
    leave: int = -1  # a cycle that leaves its pod running: proves the search finds leaks
    lock: threading.Lock = field(default_factory=threading.Lock)
    tag: str = field(default_factory=lambda: secrets.token_hex(3))

    def cycle(self, i: int) -> Cycle:
        steps: dict[str, float] = {}
        sid = ""
        t_start = time.perf_counter()

        def step(name: str, t0: float) -> float:
            now = time.perf_counter()
            steps[name] = now - t0
            return now

        try:
            cfg = pb.PodSandboxConfig(
                metadata=pb.PodSandboxMetadata(name=f"soak-{self.tag}-{i}", namespace="soak", uid=uuid.uuid4().hex),
                hostname=f"soak-{i}", log_directory=str(self.logs / f"soak-{i}"),
                port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=self.port_base + i)])
            t = time.perf_counter()
            sid = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
            ip = self.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid),
                                          timeout=30).status.network.ip
            with self.lock:
                self.marks.add_sandbox(sid, ip)
            t = step("run", t)
            ccfg = pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=self.image), log_path="vm.log",
                linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=MEMORY)))
            cid = self.rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=sid, config=ccfg, sandbox_config=cfg), timeout=120).container_id
            with self.lock:
                self.marks.add_container(cid)
            t = step("create", t)
            self.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
            t = step("start", t)
            if i == self.leave:
                return Cycle(i, time.perf_counter() - t_start, steps)
            self.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=self.stop_timeout),
                                  timeout=120 + self.stop_timeout)
            t = step("stop", t)
            if i % 2 == 0:
                self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
            self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
            step("remove", t)
        except grpc.RpcError as exc:
            self._clean_up_after_failure(sid)
            return Cycle(i, time.perf_counter() - t_start, steps,
                         f"cycle {i} (sandbox {sid[:12]}): {exc.code().name}: {exc.details()}")
        except Exception:  # noqa: BLE001 - reported, the run goes on
            self._clean_up_after_failure(sid)
            return Cycle(i, time.perf_counter() - t_start, steps, f"cycle {i}: {traceback.format_exc()}")
        return Cycle(i, time.perf_counter() - t_start, steps)

    def _clean_up_after_failure(self, sid: str) -> None:
        """What kubelet does with a pod whose start failed: remove its sandbox,
        retrying while the runtime is briefly unavailable. The cycle still
        counts as failed; only what even this cannot remove counts as a leak."""
        if not sid:
            return
        for _ in range(10):
            try:
                self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
                return
            except grpc.RpcError:
                time.sleep(3)


def write_cni(work: Path) -> dict[str, Any]:
    suffix = secrets.token_hex(3)
    net: dict[str, Any] = {"bridge": f"pvsk{suffix}", "name": f"soak-{suffix}", "ipam": work / "ipam",
                           "subnet": f"10.{100 + secrets.randbelow(40)}.{secrets.randbelow(250)}.0/24",
                           "conf": work / "net.d"}
    write_conflist(net["conf"], name=net["name"], bridge=net["bridge"], subnet=net["subnet"], ipam_dir=net["ipam"])
    return net


def find_leaks(marks: leaks.Marks, net: dict[str, Any], agent: psutil.Process,
               before: dict[str, Any]) -> dict[str, list[str]]:
    if not agent.is_running():
        return {"agent": [f"the agent (pid {agent.pid}) exited during the run"]}
    fds_now = leaks.fds(agent.pid)
    opened = [fds_now[fd] for fd in sorted(set(fds_now) - set(before["fds"]), key=int)]
    return {
        "domains": leaks.domains(marks),
        "netns": leaks.netns(marks),
        "links": leaks.links(marks),
        "iptables": leaks.iptables_rules(marks),
        "dnsmasq": leaks.dnsmasq(marks),
        "state files": leaks.new_files(marks.state_dir, before["state"], database="podvisor.db",
                                       keep_dirs=KEPT_DIRS),
        "runtime files": leaks.new_files(marks.runtime_dir, before["runtime"], keep_dirs=("vm",),
                                         skip=marks.state_dir),
        "leases": leaks.leases(net["ipam"]),
        "child processes": children(agent),
        "descriptors": leaks.normalise_fd_targets(opened) if len(fds_now) > len(before["fds"]) else [],
    }


def children(agent: psutil.Process) -> list[str]:
    """The agent's live child processes (one that exits while listed is gone, not leaked)."""
    found = []
    for child in agent.children(recursive=True):
        try:
            found.append(" ".join(child.cmdline()) or child.name())
        except psutil.Error:
            continue
    return found


def settle(check: Any) -> dict[str, list[str]]:
    """Leftovers that are still there after SETTLE_S (what goes by itself is not a leak)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        found = check()
        if not any(found.values()) or time.monotonic() > deadline:
            return dict(found)
        time.sleep(1)


def remove_all(rt: Any) -> None:
    """Remove, through the agent, every pod a failed or leaving cycle left."""
    try:
        for sb in rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=120)
    except grpc.RpcError as exc:
        print(f"bench/soak: could not remove the pods left: {exc.details()}", file=sys.stderr)


def cleanup(marks: leaks.Marks, net: dict[str, Any]) -> None:
    """Remove what a failed or leaking run left (the agent is stopped by then)."""
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError as exc:
        print(f"bench/soak: cannot clean domains up: {exc}", file=sys.stderr)
        conn = None
    try:
        for name in leaks.domains(marks) if conn is not None else []:
            try:
                dom = conn.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
    finally:
        if conn is not None:
            conn.close()
    for line in leaks.dnsmasq(marks):
        subprocess.run(["kill", line.split()[0]], capture_output=True)
    for name in leaks.netns(marks):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    for name in leaks.links(marks):
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    subprocess.run(["ip", "link", "del", net["bridge"]], capture_output=True)


def drift(cycles: list[Cycle]) -> tuple[float, float, int]:
    ok = [c.seconds for c in sorted(cycles, key=lambda c: c.index) if not c.error]
    n = min(WINDOW, len(ok) // 2)
    if n == 0:
        return 0.0, 0.0, 0
    return statistics.median(ok[:n]), statistics.median(ok[-n:]), n


def report(args: argparse.Namespace, cycles: list[Cycle], found: dict[str, list[str]], figures: dict[str, Any],
           took: float) -> dict[str, Any]:
    errors = [c.error for c in cycles if c.error]
    first, last, n = drift(cycles)
    ok = [c.seconds for c in cycles if not c.error]
    rss = figures["rss_end"] - figures["rss_start"]
    print(f"bench/soak: {len(cycles)} cycles, {args.parallel} at a time, TCG, tiny guest {MEMORY >> 20} MiB, "
          f"pod network on, stop timeout {args.stop_timeout}s; {took:.0f} s")
    if ok:
        print(f"  cycle p50 {statistics.median(ok):.2f} s   p95 {percentile(ok, 95):.2f} s   "
              f"({len(ok)} succeeded, {len(errors)} failed)")
        steps = {k: statistics.median(c.steps[k] for c in cycles if c.steps and k in c.steps)
                 for k in ("run", "create", "start", "stop", "remove")}
        print("  step p50  " + "   ".join(f"{k} {v * 1000:.0f} ms" for k, v in steps.items()))
    ratio = last / first if first else 0.0
    if n:
        print(f"  latency drift: p50 of the first {n} {first:.2f} s, of the last {n} {last:.2f} s: "
              f"ratio {ratio:.2f} (target <= {DRIFT_TARGET:.2f}: {'met' if ratio <= DRIFT_TARGET else 'NOT met'})")
    per500 = rss / (1 << 20) * 500 / max(1, len(cycles))
    print(f"  agent RSS {figures['rss_start'] / (1 << 20):.1f} -> {figures['rss_end'] / (1 << 20):.1f} MiB: "
          f"growth {rss / (1 << 20):+.1f} MiB ({per500:+.1f} MiB per 500 cycles; target < {RSS_TARGET_MIB:.0f}: "
          f"{'met' if per500 < RSS_TARGET_MIB else 'NOT met'}); peak {figures['rss_peak'] / (1 << 20):.1f} MiB")
    print(f"  agent descriptors {figures['fds_start']} -> {figures['fds_end']}, "
          f"threads {figures['threads_start']} -> {figures['threads_end']}")
    for kind, items in found.items():
        print(f"  leaked {kind:16} {len(items)}" + ("" if not items else "   " + "; ".join(items[:5])))
    for e in errors[:10]:
        print(f"  FAILED {e.strip()}")
    leaked = sum(len(v) for v in found.values())
    print(f"  leaks: {leaked} (target 0: {'met' if not leaked else 'NOT met'})")
    return {"cycles": len(cycles), "succeeded": len(ok), "errors": errors, "leaks": found,
            "rss_growth_mib": rss / (1 << 20), "latency_first_p50_s": first, "latency_last_p50_s": last,
            "latency_ratio": ratio, "seconds": took, **figures}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=500)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--stop-timeout", type=int, default=1,
                    help="StopContainer's timeout: ACPI first, a hard stop after it")
    ap.add_argument("--json", type=Path, help="also write the figures and leaks here")
    ap.add_argument("--leave-one", action="store_true",
                    help="leave the last cycle's pod running (a check that the leak search finds it)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pv-soak-", dir="/var/tmp"))
    work.chmod(0o711)  # QEMU (libvirt-qemu) traverses to the VM's files
    net = write_cni(work)
    marks = leaks.Marks(state_dir=work / "agent" / "state", runtime_dir=work / "agent")
    proc = None
    cycles: list[Cycle] = []
    found: dict[str, list[str]] = {}
    figures: dict[str, Any] = {}
    try:
        with tiny_image(work, "soak/tiny") as image:
            proc, sock = start_agent(work / "agent", virt_type="qemu", cni_conf_dir=net["conf"])
            agent = psutil.Process(proc.pid)
            channel = grpc.insecure_channel(f"unix:{sock}")
            grpc.channel_ready_future(channel).result(timeout=30)
            rt = api_pb2_grpc.RuntimeServiceStub(channel)
            api_pb2_grpc.ImageServiceStub(channel).PullImage(
                pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
            before: dict[str, Any] = {"state": leaks.tree(marks.state_dir),
                                      "runtime": leaks.tree(marks.runtime_dir, marks.state_dir)}
            soak = Soak(rt, image, work / "logs", marks, stop_timeout=args.stop_timeout,
                        port_base=20000 + secrets.randbelow(20000),
                        leave=args.cycles - 1 if args.leave_one else -1)
            t0 = time.monotonic()
            with ThreadPoolExecutor(args.parallel) as pool:
                # A warm-up round (not counted): lazy imports, thread pools, caches.
                warm = [c for c in pool.map(soak.cycle, range(args.cycles, args.cycles + args.parallel))]
                time.sleep(2)
                before["fds"] = leaks.fds(agent.pid)
                figures = {"rss_start": agent.memory_info().rss, "fds_start": len(before["fds"]),
                           "threads_start": agent.num_threads(), "rss_peak": 0}
                done = threading.Event()

                def sample() -> None:
                    while not done.wait(1):
                        figures["rss_peak"] = max(figures["rss_peak"], agent.memory_info().rss)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                cycles = list(pool.map(soak.cycle, range(args.cycles)))
                done.set()
                sampler.join()
            took = time.monotonic() - t0
            cycles += [c for c in warm if c.error]
            found = settle(lambda: find_leaks(marks, net, agent, before))
            if "agent" in found:
                raise SystemExit(f"bench/soak: {found['agent'][0]}; see {work / 'agent' / 'agent.log'}")
            figures.update(rss_end=agent.memory_info().rss, fds_end=agent.num_fds(), threads_end=agent.num_threads())
            figures["rss_peak"] = max(figures["rss_peak"], figures["rss_end"])
            summary = report(args, cycles, found, figures, took)
            if args.json:
                args.json.write_text(json.dumps(summary, indent=1))
            remove_all(rt)
            channel.close()
    finally:
        stop_process(proc, 60)
        cleanup(marks, net)
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(found.values()) or summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
