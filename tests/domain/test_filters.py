"""The CRI list-filter rule (agent.domain.filters), and its two users."""

from __future__ import annotations

import pytest

from agent.domain.filters import selected
from agent.domain.sandbox import Metadata, Sandbox, SandboxFilter, SandboxSpec, SandboxState, matches
from agent.domain.vm import ContainerState

LABELS = {"app": "web", "tier": "front"}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, True),  # an empty filter selects everything
        ({"id_prefix": "abc123"}, True),  # the full id
        ({"id_prefix": "abc"}, True),  # a prefix, as crictl sends
        ({"id_prefix": "bc"}, False),  # not a substring
        ({"id_prefix": "abc1234"}, False),
        ({"wanted_state": ContainerState.RUNNING}, True),
        ({"wanted_state": ContainerState.EXITED}, False),
        ({"label_selector": {}}, True),
        ({"label_selector": {"app": "web"}}, True),
        ({"label_selector": {"app": "web", "tier": "front"}}, True),
        ({"label_selector": {"app": "web", "tier": "back"}}, False),
        ({"label_selector": {"zone": ""}}, False),  # a missing label is not an empty one
        ({"id_prefix": "abc", "wanted_state": ContainerState.RUNNING, "label_selector": {"app": "db"}}, False),
    ],
)
def test_selected(kwargs: dict[str, object], expected: bool) -> None:
    assert selected("abc123", LABELS, ContainerState.RUNNING, **kwargs) is expected  # type: ignore[arg-type]


def test_a_false_wanted_state_is_a_filter() -> None:
    # Sandboxes filter on CRI readiness, a bool: False must not read as "no filter".
    assert selected("x", {}, True, wanted_state=False) is False
    assert selected("x", {}, False, wanted_state=False) is True


@pytest.mark.parametrize(("state", "ready", "expected"), [
    (SandboxState.READY, True, True), (SandboxState.READY, False, False),
    (SandboxState.NOTREADY, False, True), (SandboxState.REMOVING, False, True),
    (SandboxState.NOTREADY, None, True),
])
def test_sandbox_filter_on_readiness(state: SandboxState, ready: bool | None, expected: bool) -> None:
    sb = Sandbox("abc", SandboxSpec(Metadata("n", "ns", "u"), labels=LABELS), state, 1)
    assert matches(sb, SandboxFilter(id="ab", ready=ready, label_selector={"app": "web"})) is expected
