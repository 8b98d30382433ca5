"""The serial console → CRI log conversion, and its crash-safe bookkeeping."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.adapters import console_log
from agent.adapters.console_log import ConsoleLogs, cri_timestamp, format_lines
from agent.domain.errors import FailedPrecondition

NS = 1_764_000_000_123_456_789


def test_timestamp_is_rfc3339_nano_utc() -> None:
    assert cri_timestamp(NS) == b"2025-11-24T16:00:00.123456789Z"
    assert cri_timestamp(1_000_000_000) == b"1970-01-01T00:00:01.000000000Z"


@pytest.mark.parametrize(
    ("data", "flush", "records", "consumed"),
    [
        (b"hello\r\n", False, [b"F hello"], 7),
        (b"a\nb\n", False, [b"F a", b"F b"], 4),
        (b"a\nunfinished", False, [b"F a"], 2),
        (b"a\nunfinished", True, [b"F a", b"P unfinished"], 12),
        (b"prompt# \r", True, [b"P prompt# "], 9),
        (b"", True, [], 0),
        (b"\n", False, [b"F "], 1),
        (b"x" * console_log.PARTIAL_MAX, False, [b"P " + b"x" * console_log.PARTIAL_MAX],
         console_log.PARTIAL_MAX),
    ],
)
def test_format_lines(data: bytes, flush: bool, records: list[bytes], consumed: int) -> None:
    out, used = format_lines(data, NS, flush_partial=flush)
    stamp = cri_timestamp(NS)
    assert out == b"".join(stamp + b" stdout " + r + b"\n" for r in records)
    assert used == consumed


def _logs(tmp_path: Path) -> tuple[ConsoleLogs, Path, Path, Path]:
    raw, cri, state = tmp_path / "console.raw", tmp_path / "pod" / "0.log", tmp_path / "console.state"
    clock = iter(range(NS, NS + 10**12, 10**9))
    return ConsoleLogs(now_ns=lambda: next(clock)), raw, cri, state


def test_follow_copies_new_output_once(tmp_path: Path) -> None:
    logs, raw, cri, state = _logs(tmp_path)
    raw.write_bytes(b"boot\r\nready\r\n")
    logs.follow("c1", str(raw), str(cri), str(state))
    logs.flush("c1")
    logs.flush("c1")
    assert [line.split(b" ", 3)[3] for line in cri.read_bytes().splitlines()] == [b"boot", b"ready"]
    with open(raw, "ab") as f:
        f.write(b"more\n")
    logs.unfollow("c1")
    assert cri.read_bytes().count(b"more") == 1
    doc = json.loads(state.read_text())
    assert (doc["offset"], doc["log_size"], doc["inode"]) == (
        raw.stat().st_size, cri.stat().st_size, raw.stat().st_ino)


def test_batch_written_but_not_recorded_is_not_duplicated(tmp_path: Path) -> None:
    logs, raw, cri, state = _logs(tmp_path)
    raw.write_bytes(b"one\n")
    logs.follow("c1", str(raw), str(cri), str(state))
    logs.unfollow("c1")
    recorded = state.read_text()
    with open(raw, "ab") as f:
        f.write(b"two\n")
    logs2, *_ = _logs(tmp_path)
    logs2.follow("c1", str(raw), str(cri), str(state))
    logs2.unfollow("c1")
    # A crash after writing "two" but before recording it:
    state.write_text(recorded)
    logs3, *_ = _logs(tmp_path)
    logs3.follow("c1", str(raw), str(cri), str(state))
    logs3.unfollow("c1")
    text = cri.read_bytes()
    assert text.count(b" one\n") == 1 and text.count(b" two\n") == 1


def test_reopen_starts_a_new_file_after_rotation(tmp_path: Path) -> None:
    logs, raw, cri, state = _logs(tmp_path)
    raw.write_bytes(b"before\n")
    logs.follow("c1", str(raw), str(cri), str(state))
    logs.flush("c1")
    cri.rename(cri.with_name("0.log.1"))
    logs.reopen("c1", str(cri))
    assert cri.exists() and cri.stat().st_size == 0
    with open(raw, "ab") as f:
        f.write(b"after\n")
    logs.unfollow("c1")
    assert b"after" in cri.read_bytes() and b"before" not in cri.read_bytes()
    assert b"before" in cri.with_name("0.log.1").read_bytes()


def test_virtlogd_rotation_of_the_raw_file(tmp_path: Path) -> None:
    logs, raw, cri, state = _logs(tmp_path)
    raw.write_bytes(b"first\n")
    logs.follow("c1", str(raw), str(cri), str(state))
    logs.flush("c1")
    with open(raw, "ab") as f:
        f.write(b"tail of old\n")
    raw.rename(raw.with_name("console.raw.0"))
    raw.write_bytes(b"new file\n")
    logs.flush("c1")
    logs.unfollow("c1")
    lines = [line.split(b" ", 3)[3] for line in cri.read_bytes().splitlines()]
    assert lines == [b"first", b"tail of old", b"new file"]


# Hostile log paths (issue #10, item 6): whoever names the log path (anyone
# with the CRI socket) must not make the agent write through a planted link.
# Choice: the call fails clearly (FAILED_PRECONDITION naming the path) and
# the link's target is untouched; the link itself is left as it is.


def test_a_symlink_planted_at_the_log_path_is_not_followed(tmp_path: Path) -> None:
    logs, raw, cri, state = _logs(tmp_path)
    victim = tmp_path / "elsewhere" / "shadow"
    victim.parent.mkdir()
    victim.write_bytes(b"root:x:0:0\n")
    cri.parent.mkdir()
    cri.symlink_to(victim)
    raw.write_bytes(b"boot\n")
    with pytest.raises(FailedPrecondition, match=str(cri)):
        logs.follow("c1", str(raw), str(cri), str(state))
    assert victim.read_bytes() == b"root:x:0:0\n"
    assert cri.is_symlink()


def test_a_symlink_planted_after_start_is_not_followed_and_stop_still_works(tmp_path: Path) -> None:
    logs, raw, cri, state = _logs(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    raw.write_bytes(b"one\n")
    logs.follow("c1", str(raw), str(cri), str(state))
    logs.flush("c1")
    cri.unlink()
    cri.symlink_to(victim)
    with open(raw, "ab") as f:
        f.write(b"two\n")
    with pytest.raises(FailedPrecondition):
        logs.flush("c1")
    logs.unfollow("c1")  # logged, never raised: a bad log must not block StopContainer
    assert victim.read_bytes() == b"keep"


def test_reopen_refuses_a_symlink(tmp_path: Path) -> None:
    logs, raw, cri, state = _logs(tmp_path)
    raw.write_bytes(b"")
    logs.follow("c1", str(raw), str(cri), str(state))
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    cri.unlink()
    cri.symlink_to(victim)
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        logs.reopen("c1", str(cri))
    assert victim.read_bytes() == b"keep"


def test_a_fifo_at_the_log_path_is_refused_without_blocking(tmp_path: Path) -> None:
    logs, raw, cri, state = _logs(tmp_path)
    cri.parent.mkdir()
    os.mkfifo(cri)
    raw.write_bytes(b"x\n")
    with pytest.raises(FailedPrecondition, match=str(cri)):
        logs.follow("c1", str(raw), str(cri), str(state))


def test_a_dangling_symlink_creates_nothing_at_its_target(tmp_path: Path) -> None:
    logs, raw, cri, state = _logs(tmp_path)
    target = tmp_path / "created-through-link"
    cri.parent.mkdir()
    cri.symlink_to(target)
    with pytest.raises(FailedPrecondition):
        logs.follow("c1", str(raw), str(cri), str(state))
    assert not target.exists()


def test_offsets_are_saved_with_the_atomic_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[tuple[Path, bytes]] = []
    real = console_log.write_atomic

    def spy(path: Path | str, data: bytes, *, mode: int = 0o600) -> None:
        saved.append((Path(path), data))
        real(path, data, mode=mode)

    monkeypatch.setattr(console_log, "write_atomic", spy)
    logs, raw, cri, state = _logs(tmp_path)
    raw.write_bytes(b"a\n")
    logs.follow("c1", str(raw), str(cri), str(state))
    logs.unfollow("c1")
    assert saved and all(p == state for p, _ in saved)
    assert json.loads(state.read_text())["offset"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_follow_creates_the_empty_log_before_any_console_output(tmp_path: Path) -> None:
    # StartContainer follows before the domain starts: the CRI log exists,
    # empty, when StartContainer returns (kubelet and `kubectl logs` open it
    # at once), even before virtlogd made the raw file.
    logs, raw, cri, state = _logs(tmp_path)
    assert not raw.exists() and not cri.parent.exists()
    logs.follow("c1", str(raw), str(cri), str(state))
    assert cri.is_file() and cri.stat().st_size == 0
    logs.flush("c1")  # nothing to copy yet
    assert cri.stat().st_size == 0
    raw.write_bytes(b"first\n")
    logs.unfollow("c1")
    assert cri.read_bytes().endswith(b" stdout F first\n")
