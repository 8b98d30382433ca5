"""Test tiers are selected by folder: tests/integration and tests/e2e are
marked automatically, so `pytest -m "not integration and not e2e"` runs the
pure and service tests alone."""

from __future__ import annotations

from pathlib import Path

import pytest

_TIERS = {"integration": pytest.mark.integration, "e2e": pytest.mark.e2e}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier, mark in _TIERS.items():
            if tier in parts:
                item.add_marker(mark)
