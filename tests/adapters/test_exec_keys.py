"""Exec's per-VM SSH keys: written private (0600), read back, usable by paramiko."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import paramiko
import pytest

from agent.adapters.exec_keys import CLIENT_KEY, HOST_PUBLIC_KEY, ExecKeys
from agent.domain.errors import FailedPrecondition


def test_keys_are_made_private_and_read_back(tmp_path: Path) -> None:
    access = ExecKeys().create(str(tmp_path))
    for name in (CLIENT_KEY, HOST_PUBLIC_KEY):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    creds = ExecKeys().load(str(tmp_path))
    assert creds.host_public_key == access.host_public_key
    client = paramiko.Ed25519Key.from_private_key(io.StringIO(creds.client_private_key.decode()))
    assert access.client_public_key.split()[:2] == [client.get_name(), client.get_base64()]
    host = paramiko.Ed25519Key.from_private_key(io.StringIO(access.host_private_key))
    assert access.host_public_key.split()[:2] == ["ssh-ed25519", host.get_base64()]
    # The host's private key goes to the seed only; it is not kept here.
    assert access.host_private_key.encode() not in b"".join(p.read_bytes() for p in tmp_path.iterdir())


def test_every_vm_gets_its_own_keys(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ka, kb = ExecKeys().create(str(a)), ExecKeys().create(str(b))
    assert ka.client_public_key != kb.client_public_key and ka.host_public_key != kb.host_public_key


def test_secrets_stay_out_of_reprs(tmp_path: Path) -> None:
    access = ExecKeys().create(str(tmp_path))
    creds = ExecKeys().load(str(tmp_path))
    assert "PRIVATE" not in repr(access) and "PRIVATE" not in repr(creds)


def test_a_vm_without_keys_is_a_clear_failed_precondition(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="no exec keys"):
        ExecKeys().load(str(tmp_path))
