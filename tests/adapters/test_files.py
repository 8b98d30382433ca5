"""Ids become directory names under the state directory: anything that is not
an agent-made id (64 hex characters) is refused before it names a path, so
no request can reach outside the sandboxes' root."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.adapters.files import SandboxFiles
from agent.adapters.vm_files import VMFiles
from agent.domain.errors import InvalidArgument
from agent.domain.vm import WorkloadExit

GOOD = "a" * 64
BAD = ["../" + "a" * 61, "a" * 64 + "\n", "/etc", "", "A" * 64, "a" * 63, "a" * 64 + "/..", "a" * 63 + "\x00"]


@pytest.mark.parametrize("bad", BAD)
def test_sandbox_dir_refuses_anything_but_an_id(tmp_path: Path, bad: str) -> None:
    files = SandboxFiles(tmp_path / "sandboxes")
    with pytest.raises(InvalidArgument) as err:
        files.sandbox_dir(bad)
    assert err.value.field == "pod_sandbox_id"
    with pytest.raises(InvalidArgument):
        files.remove_sandbox_dir(bad)


def test_sandbox_dir_of_an_id_is_under_the_root(tmp_path: Path) -> None:
    assert SandboxFiles(tmp_path / "sandboxes").sandbox_dir(GOOD) == tmp_path / "sandboxes" / GOOD


@pytest.mark.parametrize("bad", BAD)
def test_container_paths_refuse_anything_but_ids(tmp_path: Path, bad: str) -> None:
    files = VMFiles(tmp_path / "sandboxes", tmp_path / "run")
    with pytest.raises(InvalidArgument):
        files.container_paths(bad, GOOD)
    with pytest.raises(InvalidArgument):
        files.container_paths(GOOD, bad)


@pytest.mark.parametrize("path", ["/etc", "/var/lib/podvisor/sandboxes", f"/x/containers/{'a' * 63}",
                                  f"/x/other/{GOOD}"])
def test_container_dir_removal_refuses_an_unexpected_path(tmp_path: Path, path: str) -> None:
    files = VMFiles(tmp_path / "sandboxes", tmp_path / "run")
    with pytest.raises(InvalidArgument):
        files.remove_container_dir(path)


def test_workload_exit_reads_what_the_guest_reported(tmp_path: Path) -> None:
    files = VMFiles(tmp_path / "sandboxes", tmp_path / "run")
    paths = files.container_paths("a" * 64, "b" * 64)
    files.create_container_dir(paths)
    assert paths.workload_exit == f"{paths.directory}/workload.exit"
    # No file: the VM has no command (libvirt makes the file when the VM starts).
    assert files.workload_exit(paths.directory) is None
    exit_file = Path(paths.workload_exit)
    exit_file.write_bytes(b"")
    assert files.workload_exit(paths.directory) == WorkloadExit(code=None)
    exit_file.write_bytes(b"0\n")
    assert files.workload_exit(paths.directory) == WorkloadExit(code=0)
    # Noise from the guest before the wrapper's line: only the end is read, the last number counts.
    exit_file.write_bytes(b"x" * 100_000 + b"\n42\n")
    assert files.workload_exit(paths.directory) == WorkloadExit(code=42)


def test_container_dir_removal_takes_the_vm_sockets_with_it(tmp_path: Path) -> None:
    files = VMFiles(tmp_path / "sandboxes", tmp_path / "run")
    paths = files.container_paths(GOOD, "b" * 64)
    directory = Path(paths.directory)
    directory.mkdir(parents=True)
    sockets = Path(paths.serial_socket).parent
    sockets.mkdir(parents=True, exist_ok=True)
    mine = [sockets / ("b" * 32 + ".serial"), sockets / ("b" * 32 + ".qga")]
    other = sockets / ("c" * 32 + ".qga")
    for f in [*mine, other]:
        f.touch()
    files.remove_container_dir(str(directory))
    assert not directory.exists()
    assert [f for f in mine if f.exists()] == []
    assert other.exists()
