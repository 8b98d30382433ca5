#!/usr/bin/env python3
"""bench/tls: the mTLS endpoint's cost — Version and ListPodSandbox over mutual
TLS 1.3 on TCP vs. the unix socket, same agent, same run.

One agent with [mtls] on 127.0.0.1 and ``--sandboxes`` sandboxes; one channel
on each path, each connection made once and reused (as a control-plane shim
keeps its connection). The four calls are made in turn, so machine noise hits
every path alike; the result is the ratio of the p50 latencies.
Target: p50(mTLS) <= 1.5 x p50(unix socket) for both calls.

Usage: python bench/tls.py [--sandboxes 110] [--calls 1000]
"""

from __future__ import annotations

import argparse
import json
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
from agent.cli import certs  # noqa: E402
from bench.common import percentile, start_agent, stop_process  # noqa: E402

TARGET = 1.5


def listen_port(log: Path, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "mTLS endpoint listening":
                return int(event["address"].rsplit(":", 1)[1])
        time.sleep(0.05)
    raise SystemExit(f"the mTLS endpoint did not start; see {log}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sandboxes", type=int, default=110)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pv-bench-tls-", dir="/tmp"))
    tls = workdir / "tls"
    certs.init(tls, server_name="localhost", sans=[], client_name="bench", days=1)
    proc, sock = start_agent(workdir, extra_config=(
        f'[mtls]\nlisten = "127.0.0.1:0"\ncert_file = "{tls}/server.crt"\nkey_file = "{tls}/server.key"\n'
        f'client_ca_file = "{tls}/ca.crt"\nallowed_clients = ["dns:bench"]\n'))
    try:
        port = listen_port(workdir / "agent.log")
        local = grpc.insecure_channel(f"unix:{sock}")
        remote = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(
            (tls / "ca.crt").read_bytes(), (tls / "client.key").read_bytes(), (tls / "client.crt").read_bytes()))
        grpc.channel_ready_future(local).result(timeout=30)
        grpc.channel_ready_future(remote).result(timeout=30)
        unix_rt = api_pb2_grpc.RuntimeServiceStub(local)
        tls_rt = api_pb2_grpc.RuntimeServiceStub(remote)
        for i in range(args.sandboxes):
            unix_rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(
                metadata=pb.PodSandboxMetadata(name=f"vm-{i}", namespace="bench", uid=f"uid-{i:04d}"),
                hostname=f"vm-{i}", labels={"app": f"app-{i % 7}", "io.kubernetes.pod.name": f"vm-{i}"},
            )), timeout=30)
        version_req = pb.VersionRequest(version="v1")
        list_req = pb.ListPodSandboxRequest()
        assert len(tls_rt.ListPodSandbox(list_req, timeout=30).items) == args.sandboxes

        paths = {"unix": unix_rt, "mtls": tls_rt}
        ms: dict[tuple[str, str], list[float]] = {(c, p): [] for c in ("Version", "ListPodSandbox") for p in paths}
        clock = time.perf_counter
        for i in range(args.warmup + args.calls):
            for path, rt in paths.items():
                t0 = clock()
                rt.Version(version_req, timeout=10)
                t1 = clock()
                rt.ListPodSandbox(list_req, timeout=10)
                t2 = clock()
                if i >= args.warmup:
                    ms[("Version", path)].append((t1 - t0) * 1000)
                    ms[("ListPodSandbox", path)].append((t2 - t1) * 1000)
        local.close()
        remote.close()
    finally:
        stop_process(proc, 30)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"bench/tls: {args.calls} calls each, {args.sandboxes} sandboxes, {os.cpu_count()} CPUs, "
          "one reused connection per path")
    worst = 0.0
    for call in ("Version", "ListPodSandbox"):
        u, t = ms[(call, "unix")], ms[(call, "mtls")]
        u50, t50 = statistics.median(u), statistics.median(t)
        ratio = t50 / u50
        worst = max(worst, ratio)
        print(f"  {call:15} unix p50 {u50:7.3f} ms p99 {percentile(u, 99):7.3f} ms   "
              f"mTLS p50 {t50:7.3f} ms p99 {percentile(t, 99):7.3f} ms   ratio p50 {ratio:.2f}x")
    print(f"  worst p50 ratio {worst:.2f}x (target <= {TARGET:.2f}x: {'met' if worst <= TARGET else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
