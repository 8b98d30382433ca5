"""Test tiers are selected by folder: tests/integration and tests/e2e are
marked automatically, so `pytest -m "not integration and not e2e"` runs the
pure and service tests alone.

`--require-integration` (passed by `make test` and `make integration`) turns
every skip of an integration or e2e test into a failure that carries the skip
reason: a host without root, libvirt, docker-registry, CNI plugins or a tool
cannot pass those tiers by skipping them. A test that only applies to some
hosts (`@pytest.mark.host_variant`) keeps its skip, still listed by `-ra`.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

_TIERS = {"integration": pytest.mark.integration, "e2e": pytest.mark.e2e}
REQUIRE_INTEGRATION = "--require-integration"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        REQUIRE_INTEGRATION, action="store_true", default=False,
        help="fail (instead of skip) integration and e2e tests that cannot run on this host",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "host_variant: applies only to some hosts (e.g. a PVM /dev/kvm); its skip is not a failure "
        f"under {REQUIRE_INTEGRATION}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier, mark in _TIERS.items():
            if tier in parts:
                item.add_marker(mark)


def _skip_reason(report: pytest.TestReport) -> str:
    # A skip's longrepr is (file, line, "Skipped: reason").
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if (report.skipped and not hasattr(report, "wasxfail")
            and item.config.getoption(REQUIRE_INTEGRATION)
            and any(item.get_closest_marker(tier) for tier in _TIERS)
            and item.get_closest_marker("host_variant") is None):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} would have been skipped ({_skip_reason(report)}); "
                           f"{REQUIRE_INTEGRATION} makes that a failure: set the host up with `make setup`")
    return report
