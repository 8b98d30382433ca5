"""The package installs: a wheel and an sdist build from a copy of the tree (no
agent/api/gen in it), the wheel installs into a fresh virtual environment, and
the podvisor-agent of that environment serves the CRI on its own socket."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import __version__
from agent.api.gen.runtime.v1 import api_pb2

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GENERATED = [
    "agent/api/gen/__init__.py",
    "agent/api/gen/runtime/__init__.py",
    "agent/api/gen/runtime/v1/__init__.py",
    "agent/api/gen/runtime/v1/api_pb2.py",
    "agent/api/gen/runtime/v1/api_pb2_grpc.py",
    "agent/api/gen/podvisor/__init__.py",
    "agent/api/gen/podvisor/v1/__init__.py",
    "agent/api/gen/podvisor/v1/podvisor_pb2.py",
    "agent/api/gen/podvisor/v1/podvisor_pb2_grpc.py",
]


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: nothing may come from the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def run(*argv: str | Path, cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def copy_of_the_tree(dest: Path) -> Path:
    """The files git knows or would add (no .venv, build/ or generated modules), as a fresh clone has."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    assert not (dest / "agent" / "api" / "gen").exists()
    return dest


@dataclass
class Built:
    wheel: Path
    sdist: Path
    wheel_from_sdist: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    top = tmp_path_factory.mktemp("packaging")
    src = copy_of_the_tree(top / "src")
    run(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", top / "dist", cwd=src)
    run(sys.executable, "-m", "build", "--sdist", "--outdir", top / "dist", ".", cwd=src)
    (sdist,) = (top / "dist").glob("podvisor-*.tar.gz")
    run(sys.executable, "-m", "pip", "wheel", sdist, "--no-deps", "-w", top / "from-sdist", cwd=top)
    (wheel,) = (top / "dist").glob("podvisor-*.whl")
    (wheel_from_sdist,) = (top / "from-sdist").glob("podvisor-*.whl")
    return Built(wheel, sdist, wheel_from_sdist)


@pytest.fixture(scope="module")
def venv(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment with the wheel and its dependencies from the package index."""
    path = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", path, cwd=path)
    run(path / "bin" / "python", "-m", "pip", "install", "-q", built.wheel, cwd=path, timeout=900)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_wheel_carries_the_generated_modules(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as wheel:
        names = set(wheel.namelist())
        grpc_module = wheel.read("agent/api/gen/runtime/v1/api_pb2_grpc.py").decode()
    assert set(GENERATED) <= names
    assert "from agent.api.gen.runtime.v1 import api_pb2" in grpc_module
    assert {"agent/__main__.py", "agent/cli/main.py", "agent/daemon.py"} <= names
    assert not any(n.startswith(("tests/", "bench/", "scripts/", "proto/")) for n in names)


def test_the_sdist_carries_the_protos_and_their_generator_but_no_generated_code(built: Built) -> None:
    with tarfile.open(built.sdist) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"proto/runtime/v1/api.proto", "proto/podvisor/v1/podvisor.proto", "proto/runtime/v1/wire.json",
            "scripts/gen_proto.py", "setup.py", "pyproject.toml", "agent/__main__.py"} <= names
    assert not any(n.startswith("agent/api/gen") for n in names)


def test_a_wheel_built_from_the_sdist_has_the_same_files(built: Built) -> None:
    def contents(path: Path) -> dict[str, bytes]:
        with zipfile.ZipFile(path) as wheel:
            return {n: wheel.read(n) for n in wheel.namelist() if n.startswith("agent/")}

    assert contents(built.wheel_from_sdist) == contents(built.wheel)


def test_the_installed_agent_serves_the_cri(venv: Path, agent_factory: Any, tmp_path: Path) -> None:
    where = run(venv / "bin" / "python", "-c",
                "import agent, agent.api.gen.runtime.v1.api_pb2_grpc as g; print(agent.__file__); print(g.__file__)",
                cwd=tmp_path)
    assert all(line.startswith(str(venv)) for line in where.split()), where
    assert run(venv / "bin" / "podvisor-agent", "--version", cwd=tmp_path).strip().endswith(__version__)

    agent = agent_factory(command=[str(venv / "bin" / "podvisor-agent")], env={"PYTHONPATH": ""}).start()
    reply = agent.runtime.Version(api_pb2.VersionRequest(), timeout=10)
    assert (reply.runtime_name, reply.runtime_version, reply.runtime_api_version) == ("podvisor", __version__, "v1")
    agent.stop()
    assert agent.proc is not None and agent.proc.returncode == 0, agent.log()
