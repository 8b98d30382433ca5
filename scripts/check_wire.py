#!/usr/bin/env python3
"""Check that proto/runtime/v1/api.proto speaks upstream's CRI wire format.

kubelet and crictl are built against k8s.io/cri-api; a field number, a type,
a label, an enum value or a method signature that differs from upstream breaks
them silently. proto/runtime/v1/wire.json records upstream's facts as data:

    {"package": "runtime.v1",
     "messages": {"runtime.v1.X": {"field": {"number": 1, "type": "string", "label": "optional"}}},
     "enums":    {"runtime.v1.E": {"VALUE": 0}},
     "services": {"runtime.v1.S": {"Method": {"input": "runtime.v1.A", "output": "runtime.v1.B",
                                             "client_streaming": false, "server_streaming": false}}}}

Scalar types are protobuf's names (string, int64, ...); message and enum types,
map entries included, are full names. This script compiles the proto with
grpc_tools.protoc into a descriptor set, describes it in the same shape and
reports every difference: anything missing, changed or added.

Usage: check_wire.py [--proto FILE] [--include DIR] [--wire FILE] [--descriptor-set FILE]
Exit status 0 when identical, 1 with one line per difference otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "runtime" / "v1" / "api.proto"
WIRE = ROOT / "proto" / "runtime" / "v1" / "wire.json"

Wire = dict[str, Any]

_FieldProto = descriptor_pb2.FieldDescriptorProto
_LABELS = {_FieldProto.LABEL_OPTIONAL: "optional", _FieldProto.LABEL_REPEATED: "repeated",
           _FieldProto.LABEL_REQUIRED: "required"}


def compile_proto(proto: Path, include: Path) -> descriptor_pb2.FileDescriptorSet:
    """Run protoc over one file (and its imports) and return the parsed descriptor set."""
    from grpc_tools import protoc  # a dev dependency: the agent itself never compiles protos

    with tempfile.TemporaryDirectory(prefix="check-wire-") as tmp:
        out = Path(tmp) / "set.pb"
        argv = ["grpc_tools.protoc", f"-I{include}", "--include_imports",
                f"--descriptor_set_out={out}", str(proto.resolve().relative_to(include.resolve()))]
        if protoc.main(argv) != 0:
            raise SystemExit(f"check_wire: protoc could not compile {proto}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _field_type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type in (_FieldProto.TYPE_MESSAGE, _FieldProto.TYPE_ENUM):
        return str(field.type_name).lstrip(".")
    # TYPE_STRING -> "string", TYPE_UINT64 -> "uint64", ...
    return str(_FieldProto.Type.Name(field.type)).removeprefix("TYPE_").lower()


def _walk_message(prefix: str, message: descriptor_pb2.DescriptorProto, wire: Wire) -> None:
    name = f"{prefix}.{message.name}"
    wire["messages"][name] = {
        f.name: {"number": f.number, "type": _field_type(f), "label": _LABELS[f.label]} for f in message.field
    }
    for enum in message.enum_type:
        _add_enum(name, enum, wire)
    for nested in message.nested_type:
        _walk_message(name, nested, wire)


def _add_enum(prefix: str, enum: descriptor_pb2.EnumDescriptorProto, wire: Wire) -> None:
    wire["enums"][f"{prefix}.{enum.name}"] = {v.name: v.number for v in enum.value}


def describe(fds: descriptor_pb2.FileDescriptorSet, package: str) -> Wire:
    """The wire facts of every file of `package` in the set, in wire.json's shape."""
    wire: Wire = {"package": package, "messages": {}, "enums": {}, "services": {}}
    for file in fds.file:
        if file.package != package:
            continue  # an imported file of another package is checked on its own
        for message in file.message_type:
            _walk_message(package, message, wire)
        for enum in file.enum_type:
            _add_enum(package, enum, wire)
        for service in file.service:
            wire["services"][f"{package}.{service.name}"] = {
                m.name: {"input": m.input_type.lstrip("."), "output": m.output_type.lstrip("."),
                         "client_streaming": m.client_streaming, "server_streaming": m.server_streaming}
                for m in service.method
            }
    return wire


def _diff_members(kind: str, owner: str, want: dict[str, Any], have: dict[str, Any]) -> list[str]:
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    problems = [f"{kind} {owner}.{name}: missing (upstream: {want[name]})" for name in missing]
    problems += [f"{kind} {owner}.{name}: not upstream ({have[name]})" for name in extra]
    for name in sorted(want.keys() & have.keys()):
        upstream, ours = want[name], have[name]
        if isinstance(upstream, dict) and isinstance(ours, dict):
            # Name the attribute that drifted: "field X.y: number upstream 1, ours 7".
            problems += [f"{kind} {owner}.{name}: {attr} upstream {upstream.get(attr)!r}, ours {ours.get(attr)!r}"
                         for attr in sorted(upstream.keys() | ours.keys()) if upstream.get(attr) != ours.get(attr)]
        elif upstream != ours:
            problems.append(f"{kind} {owner}.{name}: upstream {upstream!r}, ours {ours!r}")
    return problems


def compare(expected: Wire, actual: Wire) -> list[str]:
    """Every difference between upstream's facts and ours, one readable line each."""
    problems: list[str] = []
    if expected["package"] != actual["package"]:
        problems.append(f"package: upstream {expected['package']}, ours {actual['package']}")
    for section, kind in (("messages", "field"), ("enums", "enum value"), ("services", "method")):
        want, have = expected[section], actual[section]
        singular = section.rstrip("s")
        problems += [f"{singular} {name}: missing" for name in sorted(want.keys() - have.keys())]
        problems += [f"{singular} {name}: not upstream" for name in sorted(have.keys() - want.keys())]
        for name in sorted(want.keys() & have.keys()):
            problems += _diff_members(kind, name, want[name], have[name])
    return problems


def check(proto: Path = PROTO, include: Path | None = None, wire: Path = WIRE,
          descriptor_set: Path | None = None) -> list[str]:
    """Compile `proto` (or read a ready descriptor set) and compare it with `wire`."""
    expected: Wire = json.loads(wire.read_text())
    if descriptor_set is not None:
        fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    else:
        fds = compile_proto(proto, include if include is not None else proto.parents[2])
    return compare(expected, describe(fds, expected["package"]))


def main(argv: list[str] | None = None) -> int:
    """Command line entry: print the differences; non-zero exit when there are any."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proto", type=Path, default=PROTO, help="the .proto to check")
    parser.add_argument("--include", type=Path, help="protoc include root (default: three levels above --proto)")
    parser.add_argument("--wire", type=Path, default=WIRE, help="upstream's wire facts (JSON)")
    parser.add_argument("--descriptor-set", type=Path, help="check this compiled FileDescriptorSet instead")
    args = parser.parse_args(argv)
    problems = check(args.proto, args.include, args.wire, args.descriptor_set)
    for line in problems:
        print(line)
    expected = json.loads(args.wire.read_text())
    counts = ", ".join(f"{len(expected[s])} {s}" for s in ("messages", "enums", "services"))
    if problems:
        print(f"check_wire: {len(problems)} difference(s) from upstream {expected['package']}", file=sys.stderr)
        return 1
    print(f"check_wire: {args.proto.name} is wire-identical to upstream {expected['package']} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
