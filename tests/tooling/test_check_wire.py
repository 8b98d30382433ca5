"""scripts/check_wire.py: our CRI proto against upstream's wire facts, and that drift is caught."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "runtime" / "v1" / "api.proto"
WIRE = ROOT / "proto" / "runtime" / "v1" / "wire.json"


def _load(name: str) -> ModuleType:
    """A script of scripts/ by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_wire = _load("check_wire")


def drifted(tmp_path: Path, old: str, new: str, count: int = 1) -> Path:
    """A copy of api.proto with `old` replaced by `new` (exactly `count` times), in its own include root."""
    text = PROTO.read_text()
    assert text.count(old) == count, f"{old!r} occurs {text.count(old)} times"
    copy = tmp_path / "runtime" / "v1" / "api.proto"
    copy.parent.mkdir(parents=True)
    copy.write_text(text.replace(old, new))
    return copy


def problems_of(tmp_path: Path, old: str, new: str, count: int = 1) -> list[str]:
    return list(check_wire.check(drifted(tmp_path, old, new, count), tmp_path, WIRE))


def test_our_proto_is_wire_identical_to_upstream() -> None:
    assert check_wire.check() == []


def test_the_description_of_our_proto_is_exactly_the_upstream_facts() -> None:
    fds = check_wire.compile_proto(PROTO, ROOT / "proto")
    assert check_wire.describe(fds, "runtime.v1") == json.loads(WIRE.read_text())


def test_upstream_facts_cover_the_whole_cri() -> None:
    wire = json.loads(WIRE.read_text())
    assert wire["package"] == "runtime.v1"
    assert set(wire["services"]) == {"runtime.v1.RuntimeService", "runtime.v1.ImageService"}
    assert len(wire["messages"]) > 150
    assert wire["services"]["runtime.v1.RuntimeService"]["GetContainerEvents"]["server_streaming"] is True


def test_a_changed_field_number_fails(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "message VersionRequest {\n    string version = 1;",
                       "message VersionRequest {\n    string version = 2;") == [
        "field runtime.v1.VersionRequest.version: number upstream 1, ours 2"]


def test_a_changed_field_type_fails(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "message VersionRequest {\n    string version = 1;",
                       "message VersionRequest {\n    bytes version = 1;") == [
        "field runtime.v1.VersionRequest.version: type upstream 'string', ours 'bytes'"]


def test_a_changed_label_fails(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "message VersionRequest {\n    string version = 1;",
                       "message VersionRequest {\n    repeated string version = 1;") == [
        "field runtime.v1.VersionRequest.version: label upstream 'optional', ours 'repeated'"]


def test_a_changed_enum_value_fails(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "SANDBOX_NOTREADY = 1;", "SANDBOX_NOTREADY = 2;")
    assert problems == ["enum value runtime.v1.PodSandboxState.SANDBOX_NOTREADY: upstream 1, ours 2"]


def test_a_lost_stream_fails(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "returns (stream ContainerEventResponse)", "returns (ContainerEventResponse)")
    assert problems == [
        "method runtime.v1.RuntimeService.GetContainerEvents: server_streaming upstream True, ours False"]


def test_a_missing_method_and_an_extra_field_fail(tmp_path: Path) -> None:
    text = PROTO.read_text()
    method = re.search(r"\n\s*rpc Version\(VersionRequest\) returns \(VersionResponse\) \{\}", text)
    assert method is not None
    copy = drifted(tmp_path, method.group(0), "")
    copy.write_text(copy.read_text().replace("message VersionRequest {\n    string version = 1;",
                                             "message VersionRequest {\n    string version = 1;\n    bool extra = 9;"))
    assert check_wire.check(copy, tmp_path, WIRE) == [
        "field runtime.v1.VersionRequest.extra: not upstream ({'number': 9, 'type': 'bool', 'label': 'optional'})",
        "method runtime.v1.RuntimeService.Version: missing (upstream: {'client_streaming': False, "
        "'input': 'runtime.v1.VersionRequest', 'output': 'runtime.v1.VersionResponse', 'server_streaming': False})",
    ]


def test_a_missing_message_fails(tmp_path: Path) -> None:
    text = PROTO.read_text()
    block = re.search(r"\nmessage UserNamespace \{.*?\n\}\n", text, re.DOTALL)
    assert block is not None
    # Drop the message and the field that uses it, so the copy still compiles.
    copy = drifted(tmp_path, block.group(0), "\n")
    uses = re.findall(r"\n\s*UserNamespace \w+ = \d+;", copy.read_text())
    assert uses
    stripped = copy.read_text()
    for use in uses:
        stripped = stripped.replace(use, "")
    copy.write_text(stripped)
    problems = check_wire.check(copy, tmp_path, WIRE)
    assert "message runtime.v1.UserNamespace: missing" in problems
    assert any(p.startswith("field runtime.v1.NamespaceOption.userns_options: missing") for p in problems)


def test_the_command_line_exits_non_zero_on_drift(tmp_path: Path) -> None:
    copy = drifted(tmp_path, "SANDBOX_NOTREADY = 1;", "SANDBOX_NOTREADY = 2;")
    script = str(ROOT / "scripts" / "check_wire.py")
    bad = subprocess.run([sys.executable, script, "--proto", str(copy), "--include", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "SANDBOX_NOTREADY: upstream 1, ours 2" in bad.stdout
    good = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "wire-identical" in good.stdout


@pytest.mark.parametrize(("line", "expected"), [
    ("from runtime.v1 import api_pb2 as runtime_dot_v1_dot_api__pb2",
     "from agent.api.gen.runtime.v1 import api_pb2 as runtime_dot_v1_dot_api__pb2"),
    ("    from podvisor.v1 import podvisor_pb2", "    from agent.api.gen.podvisor.v1 import podvisor_pb2"),
    ("from google.protobuf import descriptor as _descriptor", "from google.protobuf import descriptor as _descriptor"),
    ("from runtimes.v1 import x", "from runtimes.v1 import x"),
])
def test_generated_imports_are_rewritten_into_the_agent_package(line: str, expected: str) -> None:
    gen_proto = _load("gen_proto")
    assert gen_proto.rewrite_imports(line, ["podvisor", "runtime"], "agent.api.gen") == expected


def test_generated_modules_import_under_agent_without_sys_path_changes() -> None:
    code = (
        "import sys; before = list(sys.path)\n"
        "import agent.api.server, agent.cli.main\n"
        "from agent.api.gen.runtime.v1 import api_pb2, api_pb2_grpc\n"
        "from agent.api.gen.podvisor.v1 import podvisor_pb2_grpc\n"
        "assert sys.path == before, set(sys.path) ^ set(before)\n"
        "assert not {'runtime', 'podvisor'} & set(sys.modules), 'a generated package imported top-level'\n"
        "assert api_pb2.DESCRIPTOR.package == 'runtime.v1'\n"
        "assert api_pb2_grpc.runtime_dot_v1_dot_api__pb2 is api_pb2\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
