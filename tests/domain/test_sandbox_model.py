"""Tests for the pure sandbox model: filters, id resolution, CRI visibility."""

from __future__ import annotations

import pytest

from agent.domain.errors import InvalidArgument
from agent.domain.sandbox import (
    Metadata,
    Sandbox,
    SandboxFilter,
    SandboxSpec,
    SandboxState,
    cri_visible,
    matches,
    resolve_id,
)


def make_sandbox(
    sandbox_id: str,
    state: SandboxState = SandboxState.READY,
    labels: dict[str, str] | None = None,
    name: str = "vm",
) -> Sandbox:
    spec = SandboxSpec(metadata=Metadata(name, "default", f"uid-{sandbox_id}"),
                       labels=labels or {})
    return Sandbox(id=sandbox_id, spec=spec, state=state, created_at_ns=1)


def test_reservation_key_is_containerd_style() -> None:
    assert Metadata("web", "prod", "u-1", 3).reservation_key == "web_prod_u-1_3"
    assert Metadata("web", "prod", "u-1").reservation_key == "web_prod_u-1_0"


@pytest.mark.parametrize(
    ("state", "ready"),
    [
        (SandboxState.CREATING, False),
        (SandboxState.READY, True),
        (SandboxState.NOTREADY, False),
        (SandboxState.REMOVING, False),
    ],
)
def test_only_ready_is_cri_ready(state: SandboxState, ready: bool) -> None:
    assert state.cri_ready is ready


# matches() -------------------------------------------------------------------

SB = make_sandbox("abcdef0123", labels={"app": "web", "tier": "front"})
SB_STOPPED = make_sandbox("abcdef0123", SandboxState.NOTREADY, labels={"app": "web"})


@pytest.mark.parametrize(
    ("sandbox", "flt", "expected"),
    [
        (SB, SandboxFilter(), True),
        (SB, SandboxFilter(id="abcdef0123"), True),
        (SB, SandboxFilter(id="abc"), True),
        (SB, SandboxFilter(id="abd"), False),
        (SB, SandboxFilter(id="bcdef"), False),  # a prefix, not a substring
        (SB, SandboxFilter(id="abcdef01234"), False),
        (SB, SandboxFilter(ready=True), True),
        (SB, SandboxFilter(ready=False), False),
        (SB_STOPPED, SandboxFilter(ready=True), False),
        (SB_STOPPED, SandboxFilter(ready=False), True),
        (SB_STOPPED, SandboxFilter(ready=None), True),
        (make_sandbox("x", SandboxState.REMOVING), SandboxFilter(ready=False), True),
        (SB, SandboxFilter(label_selector={"app": "web"}), True),
        (SB, SandboxFilter(label_selector={"app": "web", "tier": "front"}), True),
        (SB, SandboxFilter(label_selector={"app": "db"}), False),
        (SB, SandboxFilter(label_selector={"app": "web", "tier": "back"}), False),
        (SB, SandboxFilter(label_selector={"zone": "a"}), False),
        (SB, SandboxFilter(label_selector={"app": ""}), False),
        (SB, SandboxFilter(id="abc", ready=True, label_selector={"tier": "front"}), True),
        (SB, SandboxFilter(id="abc", ready=False, label_selector={"tier": "front"}), False),
        (SB, SandboxFilter(id="zzz", ready=True, label_selector={"tier": "front"}), False),
    ],
)
def test_matches(sandbox: Sandbox, flt: SandboxFilter, expected: bool) -> None:
    assert matches(sandbox, flt) is expected


# resolve_id() ------------------------------------------------------------------

IDS = ["abc123", "abd456", "ff00", "ff00aa"]


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        ("abc123", "abc123"),  # exact
        ("abc", "abc123"),  # unique prefix
        ("abd", "abd456"),
        ("ff00", "ff00"),  # exact wins even though it also prefixes another id
        ("ff00a", "ff00aa"),
        ("zz", None),  # nothing
        ("abc1234", None),  # longer than any id
    ],
)
def test_resolve_id(wanted: str, expected: str | None) -> None:
    assert resolve_id(wanted, IDS, "pod_sandbox_id") == expected


@pytest.mark.parametrize("wanted", ["ab", "a", "f", "ff"])
def test_resolve_id_ambiguous_prefix_is_invalid(wanted: str) -> None:
    with pytest.raises(InvalidArgument) as exc_info:
        resolve_id(wanted, IDS, "pod_sandbox_id")
    assert exc_info.value.field == "pod_sandbox_id"
    assert "ambiguous" in exc_info.value.message
    assert repr(wanted) in exc_info.value.message


def test_resolve_id_empty_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as exc_info:
        resolve_id("", IDS, "container_id")
    assert exc_info.value.field == "container_id"


def test_resolve_id_accepts_any_iterable_once() -> None:
    assert resolve_id("abd", iter(IDS), "pod_sandbox_id") == "abd456"


def test_resolve_id_with_no_ids() -> None:
    assert resolve_id("abc", [], "pod_sandbox_id") is None


# cri_visible() ---------------------------------------------------------------------


def test_cri_visible_hides_only_creating() -> None:
    sandboxes = [
        make_sandbox("1", SandboxState.CREATING),
        make_sandbox("2", SandboxState.READY),
        make_sandbox("3", SandboxState.NOTREADY),
        make_sandbox("4", SandboxState.REMOVING),
        make_sandbox("5", SandboxState.CREATING),
    ]
    assert [s.id for s in cri_visible(sandboxes)] == ["2", "3", "4"]


def test_cri_visible_of_nothing() -> None:
    assert cri_visible([]) == []
