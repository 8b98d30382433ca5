#!/usr/bin/env python3
"""bench/network: RunPodSandbox with CNI vs. the same CNI ADD run by hand.

The baseline creates a fresh network namespace with `ip netns add` and runs
the same configuration list's plugins (bridge + host-local, portmap) directly,
chaining prevResult, as a runtime minimally must. The agent's time includes
that plus recording the sandbox and wiring the namespace for a VM (bridge,
veth; the DHCP responder starts later, with the VM). Runs alternate, each
after a pause for the kernel's asynchronous namespace cleanup of the one
before; ratio of medians printed.
Target: <= 1.3x at p50.

Only this benchmark's own bridge, /24 subnet and namespaces are touched; all
are removed at the end.

Usage: python bench/network.py [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from agent.api.gen.runtime.v1 import api_pb2 as pb  # noqa: E402
from agent.api.gen.runtime.v1 import api_pb2_grpc  # noqa: E402
from bench.common import private_cni_network, start_agent, stop_process  # noqa: E402

CNI_BIN = "/usr/lib/cni"
SETTLE_S = 0.3


def run_plugin(conf: dict[str, Any], command: str, netns: str, cid: str, prev: Any = None) -> Any:
    net = dict(conf)
    if prev is not None:
        net["prevResult"] = prev
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_NETNS=netns, CNI_IFNAME="eth0",
               CNI_PATH=CNI_BIN)
    out = subprocess.run([f"{CNI_BIN}/{conf['type']}"], input=json.dumps(net).encode(), env=env,
                         capture_output=True, timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"{conf['type']} {command} failed: {out.stdout.decode()} {out.stderr.decode()}")
    return json.loads(out.stdout) if out.stdout.strip() else None


def by_hand(conflist: dict[str, Any], host_port: int) -> float:
    name = f"pvbench-{secrets.token_hex(4)}"
    cid = uuid.uuid4().hex
    plugins = [dict(p, name=conflist["name"], cniVersion=conflist["cniVersion"]) for p in conflist["plugins"]]
    plugins[1]["runtimeConfig"] = {"portMappings": [{"hostPort": host_port, "containerPort": 80,
                                                     "protocol": "tcp"}]}
    t0 = time.perf_counter()
    subprocess.run(["ip", "netns", "add", name], check=True)
    path = f"/run/netns/{name}"
    result = None
    for p in plugins:
        result = run_plugin(p, "ADD", path, cid, result) or result
    took = time.perf_counter() - t0
    for p in reversed(plugins):
        run_plugin(dict(p, prevResult=result), "DEL", path, cid)
    subprocess.run(["ip", "netns", "del", name], check=True)
    settle()
    return took


def settle() -> None:
    """Let the kernel finish tearing down a deleted namespace (asynchronous,
    in a kernel worker) before the next measurement, so neither side is
    timed while the other's cleanup still runs."""
    time.sleep(SETTLE_S)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pv-bench-net-", dir="/var/tmp"))
    work.chmod(0o711)  # QEMU's user traverses it (checked at start)
    bridge, conflist = private_cni_network(work, "pvbn", "bench")
    proc, sock = start_agent(work / "agent", cni_conf_dir=work / "net.d")
    agent_s: list[float] = []
    hand_s: list[float] = []
    try:
        channel = grpc.insecure_channel(f"unix:{sock}")
        grpc.channel_ready_future(channel).result(timeout=30)
        rt = api_pb2_grpc.RuntimeServiceStub(channel)
        by_hand(conflist, 31000)  # warm-up: creates the bridge
        for i in range(args.runs):
            port = 31001 + i
            req = pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(
                metadata=pb.PodSandboxMetadata(name=f"b{i}", namespace="bench", uid=uuid.uuid4().hex),
                hostname=f"b{i}", port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=80,
                                                                host_port=port)]))
            t0 = time.perf_counter()
            sid = rt.RunPodSandbox(req, timeout=120).pod_sandbox_id
            agent_s.append(time.perf_counter() - t0)
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
            settle()
            hand_s.append(by_hand(conflist, port + 1000))
        channel.close()
    finally:
        stop_process(proc, 60)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    a, h = statistics.median(agent_s), statistics.median(hand_s)
    print(f"bench/network: {args.runs} runs, bridge + host-local + portmap")
    print(f"  CNI ADD by hand (netns add + plugins)  p50 {h * 1000:6.1f} ms")
    print(f"  agent RunPodSandbox (CNI + VM wiring)   p50 {a * 1000:6.1f} ms")
    print(f"  ratio {a / h:.2f}x   (target <= 1.30x: {'met' if a / h <= 1.3 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
