"""The pod volumes' pure rules: share entries, the guest's report, the termination message."""

from __future__ import annotations

import pytest

from agent.domain.volumes import (
    FALLBACK_TO_LOGS,
    TERMINATION_PATH_ANNOTATION,
    TERMINATION_POLICY_ANNOTATION,
    Mount,
    Share,
    falls_back_to_logs,
    log_tail,
    shares,
    termination_mount,
    volumes_problem,
)

A = Mount("/etc/config", "/h/config", readonly=True)
B = Mount("/dev/termination-log", "/h/termlog")


def test_entries_are_numbered_in_mount_order() -> None:
    assert shares((A, B), (True, False)) == (Share(A, "0", True), Share(B, "1", False))
    with pytest.raises(ValueError):
        shares((A, B), (True,))


@pytest.mark.parametrize(("report", "problem"), [
    (b"", ""),
    (b"ok\n", ""),
    (b"error: cannot mount the pod volumes\n", "cannot mount the pod volumes"),
    (b"error: old\nok\n", ""),  # a later boot mounted them
    (b"ok\nerror: cannot mount the pod volumes at: /x\n", "cannot mount the pod volumes at: /x"),
    (b"\xff\xfe noise\n", ""),
])
def test_the_guests_last_report_counts(report: bytes, problem: str) -> None:
    assert volumes_problem(report) == problem


@pytest.mark.parametrize(("annotations", "expected"), [
    ({}, B),
    ({TERMINATION_PATH_ANNOTATION: ""}, B),
    ({TERMINATION_PATH_ANNOTATION: "/etc/config"}, A),
    ({TERMINATION_PATH_ANNOTATION: "/etc//config/"}, A),
    ({TERMINATION_PATH_ANNOTATION: "/elsewhere"}, None),
])
def test_the_termination_mount(annotations: dict[str, str], expected: Mount | None) -> None:
    assert termination_mount(shares((A, B), (True, False)), annotations) == expected


def test_fallback_only_with_the_policy_and_a_failure() -> None:
    policy = {TERMINATION_POLICY_ANNOTATION: FALLBACK_TO_LOGS}
    assert falls_back_to_logs(policy, 1)
    assert not falls_back_to_logs(policy, 0)
    assert not falls_back_to_logs({}, 1)
    assert not falls_back_to_logs({TERMINATION_POLICY_ANNOTATION: "File"}, 1)


def test_log_tail_is_kubelets_80_lines_and_2048_bytes() -> None:
    text = b"".join(f"{i}\n".encode() for i in range(200))
    assert log_tail(text) == "".join(f"{i}\n" for i in range(120, 200))
    long = b"".join(b"x" * 99 + b"\n" for _ in range(50))
    # 50 lines of 100 bytes: all within 80 lines, cut to the last 2048 bytes.
    assert log_tail(long) == "x" * 47 + "\n" + ("x" * 99 + "\n") * 20
