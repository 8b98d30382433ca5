"""`podvisorctl image build`: OCI layout that other tools read, pushed with our
client, pulled by the agent into the very same base disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.integration.agentproc import AgentProcess
from tests.integration.registry_fixture import RunningRegistry

CTL = [sys.executable, "-m", "agent.cli.main"]


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, *args], capture_output=True, text=True, timeout=300)


def test_build_push_pull_round_trip(running_agent: AgentProcess, registry: RunningRegistry,
                                    tmp_path: Path) -> None:
    disk = tmp_path / "guest.raw"
    disk.write_bytes(os.urandom(3 << 20))
    layout = tmp_path / "layout"
    ref = f"{registry.host}/built/{uuid.uuid4().hex[:10]}:1.0"
    r = ctl("image", "build", "--disk", str(disk), "--tag", ref, "--output", str(layout), "--push")
    assert r.returncode == 0, r.stderr
    assert f"pushed {ref.rsplit(':', 1)[0]}:1.0@sha256:" in r.stdout

    # Any OCI tool reads the layout.
    inspect = subprocess.run(["skopeo", "inspect", f"oci:{layout}:1.0"], capture_output=True,
                             text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["Architecture"] == "amd64"

    image_id = running_agent.images.PullImage(
        pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120).image_ref
    st = running_agent.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image_id),
                                                                verbose=True), timeout=10)
    info = json.loads(st.info["info"])
    (base,) = info["disks"]
    assert base["pathInImage"] == "/disk/guest.raw" and base["format"] == "raw"
    assert Path(base["hostPath"]).read_bytes() == disk.read_bytes()
    assert st.image.uid.value == 107


def test_build_is_reproducible_and_refuses_bad_disks(tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    digests = []
    for n in range(2):
        r = ctl("image", "build", "--disk", str(disk), "--tag", "example.test/a/b:1",
                "--output", str(tmp_path / f"out{n}"))
        assert r.returncode == 0, r.stderr
        digests.append(r.stdout.split("manifest ")[1].split()[0])
    assert digests[0] == digests[1]

    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw",
                    str(evil), "8M"], check=True)
    r = ctl("image", "build", "--disk", str(evil), "--tag", "example.test/a/b:1",
            "--output", str(tmp_path / "evil"))
    assert r.returncode == 1 and "backing file" in r.stderr
    r = ctl("image", "build", "--disk", str(tmp_path / "missing"), "--tag", "x/y:1", "--output", "/tmp/z")
    assert r.returncode == 1 and "no such file" in r.stderr
