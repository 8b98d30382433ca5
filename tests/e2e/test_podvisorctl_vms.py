"""podvisorctl as the operator's tool, end to end: real agent, real registry on
127.0.0.1, the tiny guest booted through real libvirt (TCG).

``apply -f examples/testvm.yaml`` (its containerDisk pointed at the test's
registry with ``--image``, and ``--memory 128Mi`` since the tiny guest's
kernel cannot boot in the manifest's 64M) → ``get vms`` shows it running →
``logs`` shows the guest's console → re-apply says unchanged → ``delete -f``
leaves nothing (no domain, no sandbox, no files). Then images imported with
``image import`` (a qcow2 and an OCI layout) boot two VMs of one
multi-document manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import domains_under, purge_domains, tiny_disk, tiny_image  # noqa: F401
from tests.integration.agentproc import AgentProcess
from tests.integration.registry_fixture import registry  # noqa: F401

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TESTVM = ROOT / "examples" / "testvm.yaml"
CTL = [sys.executable, "-m", "agent.cli.main"]
READY = "PODVISOR-READY"


class Ctl:
    def __init__(self, agent: AgentProcess, logs: Path) -> None:
        self.agent = agent
        self.logs = logs
        self.env = dict(os.environ, PODVISOR_SOCKET=str(agent.socket), PODVISOR_POD_LOG_DIR=str(logs),
                        PYTHONPATH=str(ROOT))

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([*CTL, *args], capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        if check:
            assert out.returncode == 0, (f"podvisorctl {' '.join(args)}: {out.stderr}\n"
                                         f"agent:\n{self.agent.log()[-3000:]}")
        return out

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*CTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, cwd=ROOT)

    def wait_console(self, name: str, text: str, timeout: float = 300, namespace: str = "default") -> str:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            result = self("logs", "-n", namespace, name, check=False)
            out = result.stdout
            if text in out:
                return out
            time.sleep(1)
        raise AssertionError(f"{text!r} not in the console of {name} after {timeout}s:\n{out[-3000:]}\n"
                             f"agent:\n{self.agent.log()[-3000:]}")


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctl]:
    state = Path(tempfile.mkdtemp(prefix="pv-e2e-ctl-", dir="/var/tmp"))
    state.chmod(0o711)
    agent = AgentProcess(tmp_path_factory.mktemp("ctl-agent"), state_dir=state / "state")
    agent.config_path.write_text(agent.config_path.read_text().replace(
        "[libvirt]\n", '[libvirt]\nvirt_type = "qemu"\n'))
    agent.start()
    try:
        yield Ctl(agent, state / "pods")
    finally:
        try:
            for sb in agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
                agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sb.id), timeout=120)
                agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=120)
        except Exception:  # noqa: BLE001 - the agent may be dead; virsh cleans below
            pass
        agent.cleanup()
        purge_domains(state)
        shutil.rmtree(state, ignore_errors=True)


def nothing_left(ctl: Ctl) -> None:
    agent = ctl.agent
    assert agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items == []
    assert agent.runtime.ListContainers(pb.ListContainersRequest(), timeout=30).containers == []
    assert domains_under(agent.state_dir) == []
    assert not list((agent.state_dir / "sandboxes").iterdir())
    assert not list(ctl.logs.iterdir()) if ctl.logs.exists() else True
    db = sqlite3.connect(agent.state_dir / "podvisor.db")
    try:
        assert db.execute("SELECT count(*) FROM containers").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM sandboxes").fetchone()[0] == 0
    finally:
        db.close()


def test_apply_get_logs_reapply_delete(ctl: Ctl, tiny_image: str) -> None:  # noqa: F811
    applied = ctl("apply", "-f", str(TESTVM), "--image", tiny_image, "--memory", "128Mi")
    assert applied.stdout.strip() == "virtualmachine/testvm created (namespace default)"

    table = ctl("get", "vms").stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "NAMESPACE", "STATE", "IP"]
    row = next(line.split() for line in table[1:] if line.split()[0] == "testvm")
    assert row[1:3] == ["default", "Running"]
    assert tiny_image in row

    vms = json.loads(ctl("get", "vms", "-o", "json").stdout)["vms"]
    assert [(v["name"], v["namespace"], v["state"], v["image"], v["kind"]) for v in vms] == [
        ("testvm", "default", "Running", tiny_image, "VirtualMachine")]
    assert yaml.safe_load(ctl("get", "vms", "-o", "yaml").stdout) == {"vms": vms}
    pods = json.loads(ctl("get", "pods", "-o", "json").stdout)["pods"]
    assert [(p["name"], p["state"]) for p in pods] == [("testvm", "Ready")]
    assert yaml.safe_load(ctl("get", "pods", "-o", "yaml").stdout) == {"pods": pods}
    assert tiny_image in ctl("get", "images").stdout

    # The guest's console: the manifest's own cloud-init script ran.
    console = ctl.wait_console("testvm", READY)
    assert "Hello from testvm" in console and "PODVISOR-SCRIPT-END rc=0" in console
    # By pod id and by container id prefix too.
    assert READY in ctl("logs", vms[0]["pod_id"][:12]).stdout
    assert READY in ctl("logs", vms[0]["container_id"][:12], "--tail", "3").stdout

    described = ctl("describe", "vm", "testvm").stdout
    for text in ("Running", tiny_image, vms[0]["pod_id"], vms[0]["container_id"], "Last console lines:", READY):
        assert text in described, described
    doc = json.loads(ctl("describe", "vm", "testvm", "-o", "json").stdout)
    assert doc["container"]["state"] == "Running"
    assert doc["resources"]["memory_bytes"] == 128 << 20  # --memory won over the manifest's 64M

    # Idempotent re-apply; a changed manifest is refused in one line.
    assert ctl("apply", "-f", str(TESTVM), "--image", tiny_image, "--memory", "128Mi").stdout.strip() == \
        "virtualmachine/testvm unchanged (namespace default)"
    changed = ctl("apply", "-f", str(TESTVM), "--image", tiny_image, "--memory", "160Mi", check=False)
    assert changed.returncode == 1
    assert changed.stderr.startswith("podvisorctl: FAILED_PRECONDITION: VirtualMachine default/testvm exists "
                                     "and its manifest changed — "), changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1

    # logs -f follows until the VM stops; delete -f stops it.
    follower = ctl.popen("logs", "-f", "testvm")
    try:
        time.sleep(2)
        assert follower.poll() is None  # still following
        deleted = ctl("delete", "-f", str(TESTVM))
        assert deleted.stdout.strip() == "virtualmachine/testvm deleted (namespace default)"
        out, err = follower.communicate(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0, err
    assert READY in out
    nothing_left(ctl)
    assert "already gone" in ctl("delete", "-f", str(TESTVM)).stdout


def test_imported_images_boot(ctl: Ctl, tiny_disk: Path, tmp_path: Path) -> None:  # noqa: F811
    out = ctl("image", "import", str(tiny_disk), "--tag", "import.local/tiny-disk:1")
    assert "imported import.local/tiny-disk:1" in out.stdout
    layout = tmp_path / "layout"
    ctl("image", "build", "--disk", str(tiny_disk), "--tag", "build.local/tiny:layout", "--output", str(layout),
        "--no-compress")
    ctl("image", "import", f"{layout}:layout", "--tag", "import.local/tiny-layout:1")
    refs = {t for i in json.loads(ctl("get", "images", "-o", "json").stdout)["images"] for t in i["repo_tags"]}
    assert {"import.local/tiny-disk:1", "import.local/tiny-layout:1"} <= refs

    # One file, two documents: a VirtualMachine and a VirtualMachineInstance.
    manifest = tmp_path / "two.yaml"
    docs: list[dict[str, Any]] = []
    base = yaml.safe_load(TESTVM.read_text())
    for name, image in (("from-disk", "import.local/tiny-disk:1"), ("from-layout", "import.local/tiny-layout:1")):
        spec = json.loads(json.dumps(base["spec"]["template"]["spec"]))
        spec["domain"]["resources"]["requests"]["memory"] = "128Mi"
        spec["volumes"][0]["containerDisk"]["image"] = image
        if name == "from-disk":
            docs.append({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                         "metadata": {"name": name, "namespace": "imports"},
                         "spec": {"running": True, "template": {"spec": spec}}})
        else:
            docs.append({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                         "metadata": {"name": name, "namespace": "imports"}, "spec": spec})
    manifest.write_text(yaml.safe_dump_all(docs))
    applied = ctl("apply", "-f", str(manifest)).stdout.splitlines()
    assert applied == ["virtualmachine/from-disk created (namespace imports)",
                       "virtualmachineinstance/from-layout created (namespace imports)"]
    assert ctl("get", "vms").stdout.strip().splitlines()[1:] == []  # namespace default is empty
    for name in ("from-disk", "from-layout"):
        assert "Hello from testvm" in ctl.wait_console(name, READY, timeout=400, namespace="imports")
    listed = json.loads(ctl("get", "vms", "-n", "imports", "-o", "json").stdout)["vms"]
    assert sorted((v["name"], v["state"], v["image"]) for v in listed) == [
        ("from-disk", "Running", "import.local/tiny-disk:1"),
        ("from-layout", "Running", "import.local/tiny-layout:1")]
    ctl("delete", "-f", str(manifest))
    nothing_left(ctl)
