#!/usr/bin/env python3
"""bench/rpc: ListPodSandbox with 110 sandboxes vs. Version, same agent, same run.

kubelet relists sandboxes every second, so ListPodSandbox must cost about as
little as an RPC that does no work. Version is that floor: the two are called
alternately (so machine noise hits both alike) and the ratio of their
latencies is the result. Target: p99(ListPodSandbox) <= 2 x p99(Version).

Usage: python bench/rpc.py [--sandboxes 110] [--calls 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.api.gen.runtime.v1 import api_pb2 as pb  # noqa: E402
from agent.api.gen.runtime.v1 import api_pb2_grpc  # noqa: E402
from bench.common import percentile, start_agent, stop_process  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sandboxes", type=int, default=110)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pv-bench-", dir="/tmp"))
    proc, sock = start_agent(workdir)
    try:
        channel = grpc.insecure_channel(f"unix:{sock}")
        grpc.channel_ready_future(channel).result(timeout=30)
        rt = api_pb2_grpc.RuntimeServiceStub(channel)
        for i in range(args.sandboxes):
            rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(
                metadata=pb.PodSandboxMetadata(name=f"vm-{i}", namespace="bench",
                                               uid=f"uid-{i:04d}"),
                hostname=f"vm-{i}",
                # What kubelet sets on a typical pod.
                labels={"app": f"app-{i % 7}", "io.kubernetes.pod.name": f"vm-{i}",
                        "io.kubernetes.pod.namespace": "bench",
                        "io.kubernetes.pod.uid": f"uid-{i:04d}"},
                annotations={"kubernetes.io/config.seen": "2026-11-25T00:00:00Z",
                             "kubernetes.io/config.source": "api"},
            )), timeout=30)
        version_req = pb.VersionRequest(version="v1")
        list_req = pb.ListPodSandboxRequest()
        n = len(rt.ListPodSandbox(list_req, timeout=30).items)
        assert n == args.sandboxes, n

        for _ in range(args.warmup):
            rt.Version(version_req, timeout=10)
            rt.ListPodSandbox(list_req, timeout=10)
        version_ms: list[float] = []
        list_ms: list[float] = []
        clock = time.perf_counter
        for _ in range(args.calls):
            t0 = clock()
            rt.Version(version_req, timeout=10)
            t1 = clock()
            rt.ListPodSandbox(list_req, timeout=10)
            t2 = clock()
            version_ms.append((t1 - t0) * 1000)
            list_ms.append((t2 - t1) * 1000)
        channel.close()
    finally:
        stop_process(proc, 30)
        shutil.rmtree(workdir, ignore_errors=True)

    v50, v99 = statistics.median(version_ms), percentile(version_ms, 99)
    l50, l99 = statistics.median(list_ms), percentile(list_ms, 99)
    print(f"bench/rpc: {args.calls} calls each, {args.sandboxes} sandboxes, "
          f"{os.cpu_count()} CPUs")
    print(f"  Version         p50 {v50:7.3f} ms   p99 {v99:7.3f} ms   (floor)")
    print(f"  ListPodSandbox  p50 {l50:7.3f} ms   p99 {l99:7.3f} ms")
    ratio = l99 / v99
    print(f"  ratio p50 {l50 / v50:.2f}x   p99 {ratio:.2f}x   "
          f"(target p99 <= 2.00x: {'met' if ratio <= 2.0 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
