"""``podvisorctl image import`` and the operator verbs' errors, against a real agent.

A qcow2 disk and an OCI layout (written by ``podvisorctl image build``) are
imported through podvisor.v1 ``Images/Import`` into a real agent's store and
show up in ``get images``; hostile layouts (a tampered blob, a symbolic link
out of the layout, a layer that does not match the config) are refused with
FAILED_PRECONDITION before anything is stored. The one-line error format is
checked for an unknown VM and a bad manifest. Booting from imported images
is in tests/e2e/test_podvisorctl_vms.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain import oci
from tests.integration.agentproc import AgentProcess, agent_factory  # noqa: F401

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CTL = [sys.executable, "-m", "agent.cli.main"]
ERROR_LINE = re.compile(r"^podvisorctl: ([A-Z_]+): (.+) — (.+)$")


def ctl(agent: AgentProcess, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PODVISOR_SOCKET=str(agent.socket), PYTHONPATH=str(ROOT))
    return subprocess.run([*CTL, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def small_disk(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True, timeout=60)
    return path


def build_layout(agent: AgentProcess, disk: Path, layout: Path, tag: str) -> None:
    out = ctl(agent, "image", "build", "--disk", str(disk), "--tag", tag, "--output", str(layout))
    assert out.returncode == 0, out.stderr


def stored_refs(agent: AgentProcess) -> list[str]:
    images = agent.images.ListImages(pb.ListImagesRequest(), timeout=30).images
    return sorted(t for i in images for t in i.repo_tags)


def blob_files(agent: AgentProcess) -> list[str]:
    blobs = agent.state_dir / "images" / "blobs" / "sha256"
    return sorted(p.name for p in blobs.iterdir()) if blobs.is_dir() else []


@pytest.fixture
def agent(agent_factory: Any) -> AgentProcess:  # noqa: F811
    started: AgentProcess = agent_factory().start()
    return started


def test_import_a_qcow2_and_an_oci_layout(agent: AgentProcess, tmp_path: Path) -> None:
    disk = small_disk(tmp_path / "small.qcow2")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = ctl(agent, "image", "import", str(disk), "--tag", "import.local/vms/small:1", "--scratch-dir", str(scratch))
    assert out.returncode == 0, out.stderr
    assert "imported import.local/vms/small:1" in out.stdout
    image_id = re.search(r"image id (sha256:[0-9a-f]{64})", out.stdout)
    assert image_id is not None
    assert list(scratch.iterdir()) == []  # the temporary layout is gone

    layout = tmp_path / "layout"
    build_layout(agent, disk, layout, "build.local/vms/layout:v2")
    out = ctl(agent, "image", "import", f"{layout}:v2", "--tag", "import.local/vms/layout:2")
    assert out.returncode == 0, out.stderr
    # Same disk, same config: one image with both references.
    assert stored_refs(agent) == ["import.local/vms/layout:2", "import.local/vms/small:1"]
    status = agent.images.ImageStatus(pb.ImageStatusRequest(
        image=pb.ImageSpec(image="import.local/vms/layout:2"), verbose=True), timeout=30)
    assert status.image.id == image_id.group(1)
    info = json.loads(status.info["info"])
    assert info  # the base disk is installed

    # get images: table, json and yaml.
    table = ctl(agent, "get", "images")
    assert table.returncode == 0 and "import.local/vms/small:1" in table.stdout
    doc = json.loads(ctl(agent, "get", "images", "-o", "json").stdout)
    assert {t for i in doc["images"] for t in i["repo_tags"]} == {"import.local/vms/small:1",
                                                                "import.local/vms/layout:2"}
    ydoc = yaml.safe_load(ctl(agent, "get", "images", "-o", "yaml").stdout)
    assert ydoc == doc

    # Re-import: idempotent.
    again = ctl(agent, "image", "import", str(disk), "--tag", "import.local/vms/small:1")
    assert again.returncode == 0, again.stderr
    assert stored_refs(agent) == ["import.local/vms/layout:2", "import.local/vms/small:1"]


def _tamper_layer(layout: Path) -> Path:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / oci.digest_hex(index["manifests"][0]["digest"]))
                          .read_text())
    return layout / "blobs" / "sha256" / oci.digest_hex(manifest["layers"][0]["digest"])


def _hostile(kind: str, layout: Path, outside: Path) -> None:
    layer = _tamper_layer(layout)
    if kind == "tampered-blob":
        data = bytearray(layer.read_bytes())
        data[len(data) // 2] ^= 0xFF
        layer.write_bytes(bytes(data))
    elif kind == "symlink-blob":
        outside.write_bytes(layer.read_bytes())
        layer.unlink()
        layer.symlink_to(outside)
    elif kind == "symlinked-index":
        index = layout / "index.json"
        outside.write_bytes(index.read_bytes())
        index.unlink()
        index.symlink_to(outside)
    elif kind == "wrong-diff-id":
        index = json.loads((layout / "index.json").read_text())
        mpath = layout / "blobs" / "sha256" / oci.digest_hex(index["manifests"][0]["digest"])
        manifest = json.loads(mpath.read_text())
        cpath = layout / "blobs" / "sha256" / oci.digest_hex(manifest["config"]["digest"])
        config = json.loads(cpath.read_text())
        config["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
        cbytes = json.dumps(config).encode()
        manifest["config"] = {**manifest["config"], "digest": oci.sha256_digest(cbytes), "size": len(cbytes)}
        (layout / "blobs" / "sha256" / oci.digest_hex(oci.sha256_digest(cbytes))).write_bytes(cbytes)
        mbytes = json.dumps(manifest).encode()
        (layout / "blobs" / "sha256" / oci.digest_hex(oci.sha256_digest(mbytes))).write_bytes(mbytes)
        index["manifests"][0] = {**index["manifests"][0], "digest": oci.sha256_digest(mbytes), "size": len(mbytes)}
        (layout / "index.json").write_text(json.dumps(index))
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["tampered-blob", "symlink-blob", "symlinked-index", "wrong-diff-id"])
def test_a_hostile_layout_is_refused(agent: AgentProcess, tmp_path: Path, kind: str) -> None:
    disk = small_disk(tmp_path / "d.qcow2")
    layout = tmp_path / "layout"
    build_layout(agent, disk, layout, "build.local/hostile:1")
    _hostile(kind, layout, tmp_path / "outside")
    before = blob_files(agent)
    out = ctl(agent, "image", "import", str(layout), "--tag", "import.local/hostile:1")
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    match = ERROR_LINE.match(line)
    assert match is not None, line
    assert match.group(1) == "FAILED_PRECONDITION", line
    assert stored_refs(agent) == []
    assert blob_files(agent) == before  # nothing of it kept
    assert "Traceback" not in out.stderr


def test_import_errors_name_the_problem(agent: AgentProcess, tmp_path: Path) -> None:
    missing = ctl(agent, "image", "import", str(tmp_path / "nope.qcow2"))
    assert missing.returncode == 1 and ERROR_LINE.match(missing.stderr.strip()), missing.stderr
    assert missing.stderr.startswith("podvisorctl: INVALID_ARGUMENT: ")
    notlayout = tmp_path / "empty"
    notlayout.mkdir()
    out = ctl(agent, "image", "import", str(notlayout), "--tag", "import.local/x:1")
    assert out.returncode == 1
    assert out.stderr.startswith("podvisorctl: FAILED_PRECONDITION: ") and "oci-layout" in out.stderr
    badtag = ctl(agent, "image", "import", str(small_disk(tmp_path / "d.qcow2")), "--tag", "UPPER/Case:1")
    assert badtag.returncode == 1 and badtag.stderr.startswith("podvisorctl: INVALID_ARGUMENT: ")


def test_operator_verbs_fail_in_one_line(agent: AgentProcess, tmp_path: Path) -> None:
    for args in (("describe", "vm", "ghost"), ("logs", "ghost"), ("logs", "-n", "other", "-f", "ghost")):
        out = ctl(agent, *args)
        assert out.returncode == 1, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        match = ERROR_LINE.match(lines[0])
        assert match is not None and match.group(1) == "NOT_FOUND" and "ghost" in match.group(2), lines[0]
        assert "get vms" in match.group(3)
    empty = ctl(agent, "get", "vms", "-o", "json")
    assert empty.returncode == 0 and json.loads(empty.stdout) == {"vms": []}
    assert yaml.safe_load(ctl(agent, "get", "pods", "-o", "yaml").stdout) == {"pods": []}
    # Refused manifests: nothing reaches the agent.
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: bad}\n"
                   "spec: {template: {spec: {domain: {devices: {}}, volumes: "
                   "[{name: pvc, persistentVolumeClaim: {claimName: x}}]}}}\n")
    out = ctl(agent, "apply", "-f", str(bad))
    assert out.returncode == 1
    match = ERROR_LINE.match(out.stderr.strip())
    assert match is not None and match.group(1) == "INVALID_ARGUMENT", out.stderr
    assert "volumes[0]" in match.group(2)
    other = tmp_path / "pod.yaml"
    other.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
    out = ctl(agent, "apply", "-f", str(other))
    assert out.returncode == 1 and out.stderr.startswith("podvisorctl: INVALID_ARGUMENT: "), out.stderr
    assert agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items == []
    gone = ctl(agent, "delete", "-f", str(ROOT / "examples" / "testvm.yaml"))
    assert gone.returncode == 0 and "already gone" in gone.stdout


def test_a_refused_apply_leaves_nothing(agent: AgentProcess, tmp_path: Path) -> None:
    """CreateContainer refuses (more memory than the host has) after RunPodSandbox: the pod goes again."""
    disk = small_disk(tmp_path / "d.qcow2")
    assert ctl(agent, "image", "import", str(disk), "--tag", "import.local/d:1").returncode == 0
    logs = tmp_path / "pods"
    out = ctl(agent, "apply", "-f", str(ROOT / "examples" / "testvm.yaml"), "--image", "import.local/d:1",
              "--memory", "100Ti", "--log-dir", str(logs))
    assert out.returncode == 1
    match = ERROR_LINE.match(out.stderr.strip())
    assert match is not None and match.group(1) == "INVALID_ARGUMENT", out.stderr
    assert "podvisor.io/memory" in match.group(2)
    assert agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items == []
    assert not logs.exists() or list(logs.iterdir()) == []
