"""podvisorctl's operator verbs, the pure parts: reading manifests, the CRI
requests they become, CRI log parsing and following, the one-line errors.
Against a real agent: tests/integration/test_image_import.py and
tests/e2e/test_podvisorctl_vms.py."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from agent.cli import manifests, views
from agent.cli.main import build_parser
from agent.cli.vmref import CtlError, rpc

ROOT = Path(__file__).resolve().parents[2]
TESTVM = ROOT / "examples" / "testvm.yaml"


def test_testvm_becomes_one_manifest_with_its_containerdisk_image() -> None:
    [m] = manifests.load(str(TESTVM), "default")
    assert (m.kind, m.name, m.namespace, m.image, m.hostname) == (
        "VirtualMachine", "testvm", "default", "kubevirt/cirros-registry-disk-demo", "testvm")
    assert m.source == str(TESTVM)
    sandbox = manifests._sandbox_config(m, Path("/logs"))
    assert (sandbox.metadata.name, sandbox.metadata.namespace, sandbox.metadata.uid) == ("testvm", "default", m.uid)
    assert sandbox.log_directory == f"/logs/default_testvm_{m.uid}"
    assert sandbox.annotations[manifests.HASH_KEY] == m.digest
    assert sandbox.labels["kubevirt.io/vm"] == "testvm"
    container = manifests._container_config(m)
    assert container.image.image == m.image and container.metadata.name == "compute"
    assert json.loads(container.annotations["podvisor.io/vm"]) == m.document
    assert "podvisor.io/memory" not in container.annotations


def test_image_and_memory_overrides_change_the_digest() -> None:
    [plain] = manifests.load(str(TESTVM), "default")
    [again] = manifests.load(str(TESTVM), "default")
    assert plain.digest == again.digest  # stable: unchanged on re-apply
    [m] = manifests.load(str(TESTVM), "ns1", image="127.0.0.1:5000/tiny:1", memory="128Mi")
    assert m.image == "127.0.0.1:5000/tiny:1" and m.namespace == "ns1"
    assert m.digest != plain.digest
    volumes = m.document["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["containerDisk"]["image"] == "127.0.0.1:5000/tiny:1"
    assert manifests._container_config(m).annotations["podvisor.io/memory"] == "128Mi"


def test_multi_document_files_and_their_errors(tmp_path: Path) -> None:
    doc = TESTVM.read_text()
    two = tmp_path / "two.yaml"
    two.write_text(doc + "---\n" + doc.replace("name: testvm\n", "name: other\n  namespace: ns2\n", 1))
    ms = manifests.load(str(two), "default")
    assert [(m.name, m.namespace, m.source) for m in ms] == [
        ("testvm", "default", f"{two}#1"), ("other", "ns2", f"{two}#2")]
    dup = tmp_path / "dup.yaml"
    dup.write_text(doc + "---\n" + doc)
    with pytest.raises(CtlError, match="appears twice"):
        manifests.load(str(dup), "default")
    cases = {
        "": "no documents",
        "a: [": "not valid YAML",
        "- 1\n": "not a mapping",
        "apiVersion: v1\nkind: Pod\n": "is not a VirtualMachine",
        doc.replace("memory: 64M", "memory: lots"): "resources.requests.memory",
        doc.replace("containerDisk:\n            image: kubevirt/cirros-registry-disk-demo",
                    "emptyDisk:\n            capacity: 1Gi"): "volumes[0]",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(CtlError, match=message.replace("[", r"\[")) as err:
            manifests.load(str(bad), "default")
        assert err.value.code == "INVALID_ARGUMENT"
    with pytest.raises(CtlError, match="--memory"):
        manifests.load(str(TESTVM), "default", memory="much")
    with pytest.raises(CtlError) as missing:
        manifests.load(str(tmp_path / "nope.yaml"), "default")
    assert str(missing.value).startswith("INVALID_ARGUMENT: -f ")


def test_errors_are_one_line_with_code_message_and_hint() -> None:
    err = CtlError("NOT_FOUND", "no VM 'x'", "see `podvisorctl get vms`")
    assert str(err) == "NOT_FOUND: no VM 'x' — see `podvisorctl get vms`"
    assert str(CtlError("INTERNAL", "boom")).startswith("INTERNAL: boom — a bug in podvisor-agent")

    class Refused(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.FAILED_PRECONDITION

        def details(self) -> str:
            return "image 'x' is not present"

    with pytest.raises(CtlError) as caught, rpc("pull it first"):
        raise Refused()
    assert str(caught.value) == "FAILED_PRECONDITION: image 'x' is not present — pull it first"


def test_cri_log_records_become_console_lines() -> None:
    records = [
        b"2026-01-01T00:00:00.000000000Z stdout F hello world\n",
        b"2026-01-01T00:00:00.000000001Z stdout P part one, \n",
        b"2026-01-01T00:00:00.000000002Z stdout F part two\n",
        b"2026-01-01T00:00:00.000000003Z stdout F \n",
        b"not a record\n",
    ]
    assert list(views.parse_cri_log(records)) == ["hello world", "part one, part two", "", "not a record"]


def test_follow_prints_appended_lines_until_the_vm_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "0.log"
    log.write_bytes(b"2026-01-01T00:00:00Z stdout F first\n")
    running = threading.Event()
    running.set()
    out = io.StringIO()
    monkeypatch.setattr(views, "STATE_POLL_SECONDS", 0.05)
    monkeypatch.setattr(views, "FOLLOW_POLL_SECONDS", 0.01)
    t = threading.Thread(target=views.follow, args=(str(log), running.is_set, out))
    t.start()
    with open(log, "ab") as f:
        # A record cut in the middle by the writer, and a line in two records.
        f.write(b"2026-01-01T00:00:01Z stdout F second\n2026-01-01T00:00:02Z stdout P th")
        f.flush()
        time.sleep(0.3)
        f.write(b"i\n2026-01-01T00:00:02Z stdout F rd\n")
        f.flush()
        time.sleep(0.3)
        f.write(b"2026-01-01T00:00:03Z stdout F last\n")
    time.sleep(0.3)
    running.clear()
    t.join(10)
    assert not t.is_alive()
    assert out.getvalue() == "first\nsecond\nthird\nlast\n"


def test_tail_and_parsers() -> None:
    p = build_parser()
    args = p.parse_args(["get", "vms", "-o", "yaml", "-A"])
    assert (args.what, args.format, args.all_namespaces) == ("vms", "yaml", True)
    args = p.parse_args(["-o", "json", "get", "images"])
    assert (args.output, args.format) == ("json", None)
    args = p.parse_args(["apply", "-f", "x.yaml", "--image", "r/i:1", "--memory", "1Gi", "--recreate"])
    assert (args.filename, args.image, args.memory, args.recreate) == ("x.yaml", "r/i:1", "1Gi", True)
    args = p.parse_args(["logs", "-f", "--tail", "5", "testvm"])
    assert (args.follow, args.tail, args.name) == (True, 5, "testvm")
    args = p.parse_args(["image", "import", "disk.qcow2", "--tag", "import.local/a:1"])
    assert (args.source, args.tag) == ("disk.qcow2", "import.local/a:1")
    args = p.parse_args(["demo", "--cleanup"])
    assert args.cleanup and args.filename == manifests.Path(ROOT / "examples" / "testvm.yaml")
