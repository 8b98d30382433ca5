#!/bin/sh
# Generate agent/api/gen/ from proto/ (see scripts/gen_proto.py; not committed:
# `make proto` and the package build both regenerate it, so it never goes stale).
set -eu
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" scripts/gen_proto.py "$@"
