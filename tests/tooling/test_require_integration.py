"""tests/conftest.py: under --require-integration a skipped integration/e2e test fails with its reason."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

SKIPPING = '''
import pytest

@pytest.fixture
def tool():
    pytest.skip("frobnicator is missing")

@pytest.mark.skipif(True, reason="needs root")
def test_marked():
    pass

def test_fixture(tool):
    pass

def test_body():
    pytest.skip("no registry here")

@pytest.mark.host_variant
@pytest.mark.skipif(True, reason="needs a PVM /dev/kvm")
def test_variant():
    pass

def test_runs():
    pass
'''


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the suite's conftest with skipping tests in the unit, integration and e2e tiers."""
    root = tmp_path / "suite"
    (root / "tests").mkdir(parents=True)
    shutil.copy(CONFTEST, root / "tests" / "conftest.py")
    (root / "pytest.ini").write_text("[pytest]\n")
    for tier in ("unit", "integration", "e2e"):
        (root / "tests" / tier).mkdir()
        (root / "tests" / tier / f"test_{tier}_skips.py").write_text(SKIPPING)
    return root


def outcomes(root: Path, *args: str) -> tuple[dict[str, str], str]:
    """{"<tier>:<test>": "PASSED" | "FAILED" | "ERROR" | "SKIPPED"} from a verbose run, and its output."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rN", *args, "tests"],
        cwd=root, capture_output=True, text=True, timeout=120)
    found: dict[str, str] = {}
    for line in run.stdout.splitlines():
        match = re.match(r"tests/(\w+)/\S+::(\w+) (PASSED|FAILED|ERROR|SKIPPED)", line)
        if match:
            found[f"{match[1]}:{match[2]}"] = match[3]
    assert len(found) == 15, run.stdout + run.stderr
    return found, run.stdout


def test_without_the_switch_skips_stay_skips(tree: Path) -> None:
    got, _ = outcomes(tree)
    assert {k: v for k, v in got.items() if v != "SKIPPED"} == {
        "unit:test_runs": "PASSED", "integration:test_runs": "PASSED", "e2e:test_runs": "PASSED"}


def test_with_the_switch_integration_and_e2e_skips_fail(tree: Path) -> None:
    got, output = outcomes(tree, "--require-integration")
    for tier in ("integration", "e2e"):
        assert got[f"{tier}:test_marked"] == "ERROR"  # skipif is decided in setup
        assert got[f"{tier}:test_fixture"] == "ERROR"
        assert got[f"{tier}:test_body"] == "FAILED"
        assert got[f"{tier}:test_variant"] == "SKIPPED"  # a host_variant test keeps its skip
        assert got[f"{tier}:test_runs"] == "PASSED"
    assert got["unit:test_marked"] == got["unit:test_fixture"] == got["unit:test_body"] == "SKIPPED"

    for reason in ("needs root", "frobnicator is missing", "no registry here"):
        assert f"would have been skipped ({reason}); --require-integration makes that a failure" in output
