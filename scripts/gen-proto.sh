#!/bin/sh
# Generate the Python gRPC modules from proto/ into agent/api/gen/ (not committed:
# they are produced at install time by `make proto`, so they can never go stale).
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT=agent/api/gen
rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -m grpc_tools.protoc -I proto \
    --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
    proto/runtime/v1/api.proto proto/podvisor/v1/podvisor.proto
cat > "$OUT/__init__.py" <<'PYEOF'
"""Generated protobuf/gRPC modules (see scripts/gen-proto.sh)."""

import os as _os
import sys as _sys

# protoc writes absolute imports ("from runtime.v1 import api_pb2"), so the
# generated tree must be importable as top-level packages.
_here = _os.path.dirname(__file__)
if _here not in _sys.path:
    _sys.path.insert(0, _here)
PYEOF
for d in runtime runtime/v1 podvisor podvisor/v1; do touch "$OUT/$d/__init__.py"; done
