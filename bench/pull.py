#!/usr/bin/env python3
"""bench/pull: cold PullImage of a ~200 MiB containerDisk vs `skopeo copy`, same run.

Both pull the same image from the same local docker-registry on 127.0.0.1.
skopeo only downloads and writes blobs into an OCI layout; the agent's time
includes that plus extracting the disk from the layer, validating it with
qemu-img and recording the image. Runs alternate (skopeo, agent, skopeo, ...)
so machine noise hits both alike; the ratio of medians is the result.
Target: cold pull <= 1.0x skopeo. Also: warm pull (image present), target < 20 ms.

Usage: python bench/pull.py [--size-mib 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.adapters.registry import RegistryClient  # noqa: E402
from agent.api.gen.runtime.v1 import api_pb2 as pb  # noqa: E402
from agent.api.gen.runtime.v1 import api_pb2_grpc  # noqa: E402
from agent.cli import oci_layout  # noqa: E402
from agent.domain.imageref import RemoteRepository  # noqa: E402
from bench.common import start_agent, stop_process  # noqa: E402
from tests.integration.registry_fixture import run_registry  # noqa: E402


def make_disk(path: Path, size_mib: int) -> None:
    """Half incompressible, half repetitive (like a real guest disk with free space)."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size_mib):
            f.write(os.urandom(1 << 20) if i % 2 == 0 else chunk)




def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warm-calls", type=int, default=50)
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pv-bench-pull-", dir="/var/tmp"))
    workdir.chmod(0o711)  # QEMU's user traverses it (checked at start)
    proc = None
    try:
        with run_registry(workdir / "registry") as registry:
            disk = workdir / "disk.raw"
            make_disk(disk, args.size_mib)
            layout = workdir / "layout"
            built = oci_layout.build(disk, layout, "v1")
            repo = RemoteRepository(registry=registry.host, host=registry.host, name="bench/disk")
            with RegistryClient(timeout=300) as client:
                oci_layout.push(client, layout, built, repo, "v1")
            ref = f"{registry.host}/bench/disk:v1"
            layer_mib = built.layers[0].size / (1 << 20)

            proc, sock = start_agent(workdir / "agent")
            channel = grpc.insecure_channel(f"unix:{sock}")
            grpc.channel_ready_future(channel).result(timeout=30)
            images = api_pb2_grpc.ImageServiceStub(channel)
            spec = pb.ImageSpec(image=ref)

            skopeo_s: list[float] = []
            agent_s: list[float] = []
            for run in range(args.runs):
                dest = workdir / f"skopeo-{run}"
                t0 = time.perf_counter()
                subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                                f"docker://{ref}", f"oci:{dest}:v1"], check=True, timeout=600)
                skopeo_s.append(time.perf_counter() - t0)
                shutil.rmtree(dest)

                t0 = time.perf_counter()
                images.PullImage(pb.PullImageRequest(image=spec), timeout=600)
                agent_s.append(time.perf_counter() - t0)
                if run < args.runs - 1:
                    # Removing the image collects its blobs: the next pull is cold again.
                    images.RemoveImage(pb.RemoveImageRequest(image=spec), timeout=60)

            warm_ms = []
            for _ in range(args.warm_calls):
                t0 = time.perf_counter()
                images.PullImage(pb.PullImageRequest(image=spec), timeout=60)
                warm_ms.append((time.perf_counter() - t0) * 1000)
            channel.close()
    finally:
        phases = []
        if proc is not None:
            stop_process(proc, 30)
            for line in (workdir / "agent" / "agent.log").read_text(errors="replace").splitlines():
                if '"image pulled"' in line:
                    doc = json.loads(line)
                    phases.append(" ".join(f"{k[:-2]} {doc[k]:.2f}s" for k in
                                           ("resolve_s", "download_s", "extract_s", "check_install_s")))
        shutil.rmtree(workdir, ignore_errors=True)

    sk, ag = statistics.median(skopeo_s), statistics.median(agent_s)
    warm_ms.sort()
    w50, w95 = statistics.median(warm_ms), warm_ms[int(0.95 * (len(warm_ms) - 1))]
    print(f"bench/pull: {args.size_mib} MiB disk, {layer_mib:.0f} MiB gzip layer, {args.runs} runs each")
    print(f"  skopeo copy docker:// -> oci:   median {sk:6.2f} s   runs {', '.join(f'{s:.2f}' for s in skopeo_s)}")
    print(f"  agent cold PullImage (+extract, qemu-img):   median {ag:6.2f} s   runs "
          f"{', '.join(f'{s:.2f}' for s in agent_s)}")
    for p in phases:
        print(f"    agent phases: {p}")
    print(f"  ratio {ag / sk:.2f}x   (target <= 1.00x: {'met' if ag / sk <= 1.0 else 'NOT met'})")
    print(f"  warm PullImage (present): p50 {w50:.1f} ms   p95 {w95:.1f} ms   "
          f"(target < 20 ms: {'met' if w50 < 20 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
