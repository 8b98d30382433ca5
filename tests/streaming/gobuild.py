"""Building the Go test clients offline with Debian's toolchain and spdystream
(GOPATH mode); missing packages fail the test with what to install."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

GOPATH = Path("/usr/share/gocode")
APT = "apt-get install -y golang-go golang-github-docker-spdystream-dev"


def go_build(source: Path, out: Path) -> Path:
    go = shutil.which("go")
    if go is None or not (GOPATH / "src/github.com/moby/spdystream").is_dir():
        pytest.fail(f"the Go toolchain and the spdystream library are missing; install them with: {APT}")
    env = {**os.environ, "GOPATH": str(GOPATH), "GO111MODULE": "off", "GOFLAGS": ""}
    if not ({"GOCACHE", "XDG_CACHE_HOME", "HOME"} & env.keys()):
        env["GOCACHE"] = str(out.parent / "cache")
    built = subprocess.run([go, "build", "-o", str(out), "."], cwd=source, env=env, capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, f"go build failed:\n{built.stderr}"
    return out
