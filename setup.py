"""Build hook: generate agent/api/gen from proto/ whenever the package is built.

Everything else about the package is in pyproject.toml. The generated modules
are not in git; `pip install .`, `pip wheel .` and a build from the sdist run
scripts/gen_proto.py here, with grpcio-tools from build-system.requires.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _generator() -> ModuleType:
    """scripts/gen_proto.py, loaded by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_proto", HERE / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):  # type: ignore[misc]  # setuptools is untyped here
    """build_py that also writes the generated protobuf/gRPC modules."""

    def run(self) -> None:
        if not self.editable_mode:
            # setuptools reuses build/lib between builds: a module moved or deleted
            # since the last one would otherwise still ship in the wheel.
            shutil.rmtree(Path(self.build_lib) / "agent", ignore_errors=True)
        super().run()
        # An editable install imports from the checkout, so generate there (as `make proto` does).
        base = HERE if self.editable_mode else Path(self.build_lib)
        _generator().generate(HERE / "proto", base / "agent" / "api" / "gen")


setup(cmdclass={"build_py": BuildPyWithProtos})
