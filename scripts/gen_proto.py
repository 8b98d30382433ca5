#!/usr/bin/env python3
"""Generate the protobuf/gRPC modules of proto/ into agent/api/gen/.

One generator for every route to a working agent: `make proto` (a checkout,
`PYTHONPATH=$PWD` or an editable install) and the setuptools build hook in
setup.py (`pip install .`, `pip wheel .`, a wheel built from the sdist).
The output is never committed, so it cannot go stale against proto/.

protoc names the generated modules after the proto packages (`runtime.v1`,
`podvisor.v1`: the wire names, which must not change) and writes absolute
imports between them (`from runtime.v1 import api_pb2`). Those are rewritten
to the package the modules live in (`from agent.api.gen.runtime.v1 import
api_pb2`), so they import under `agent` without anything added to sys.path.

Usage: gen_proto.py [--proto DIR] [--out DIR] [--package NAME]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PACKAGE = "agent.api.gen"


def rewrite_imports(text: str, top_levels: list[str], package: str) -> str:
    """Point protoc's absolute imports of generated top-level packages into `package`.

    `from runtime.v1 import api_pb2 as x` becomes
    `from agent.api.gen.runtime.v1 import api_pb2 as x`; imports of anything
    else (google.protobuf, grpc) are left alone.
    """
    if not top_levels:
        return text
    names = "|".join(re.escape(n) for n in sorted(top_levels))
    return re.sub(rf"^(\s*)from ({names})\.", rf"\1from {package}.\2.", text, flags=re.MULTILINE)


def generate(proto_root: Path, out: Path, package: str = DEFAULT_PACKAGE) -> list[Path]:
    """Compile every .proto under proto_root into out (replaced whole); return the files written."""
    from grpc_tools import protoc  # a build/dev dependency only, not needed at run time

    protos = sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"gen_proto: no .proto files under {proto_root}")
    well_known = resources.files("grpc_tools") / "_proto"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    argv = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}",
            f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    # No --pyi_out: mypy always reads stubs, and strict mode over the agent's use of
    # them is a change of its own; without stubs the modules are Any to the checker.
    if protoc.main(argv) != 0:
        raise SystemExit(f"gen_proto: protoc failed on {' '.join(protos)}")

    top_levels = sorted(p.name for p in out.iterdir() if p.is_dir())
    written: list[Path] = []
    for path in sorted(out.rglob("*")):
        if path.suffix == ".py":
            path.write_text(rewrite_imports(path.read_text(), top_levels, package))
            written.append(path)
    # Regular packages (not namespace ones), so setuptools, mypy and ruff see them alike.
    (out / "__init__.py").write_text('"""Generated protobuf/gRPC modules (scripts/gen_proto.py); not in git."""\n')
    for directory in sorted(p for p in out.rglob("*") if p.is_dir()):
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")
    written.extend(sorted(out.rglob("__init__.py")))
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line entry: generate with the defaults of this checkout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proto", type=Path, default=ROOT / "proto")
    parser.add_argument("--out", type=Path, default=ROOT / "agent" / "api" / "gen")
    parser.add_argument("--package", default=DEFAULT_PACKAGE)
    args = parser.parse_args(argv)
    generate(args.proto, args.out, args.package)
    return 0


if __name__ == "__main__":
    sys.exit(main())
