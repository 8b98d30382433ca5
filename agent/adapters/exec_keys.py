"""Exec's SSH keys, per VM: made at CreateContainer, kept in the container's
directory, read at each Exec (docs/exec.md).

Two ed25519 key pairs from ``cryptography``: the client key the agent logs
into the guest with as root, and the guest's SSH host key, which cloud-init
installs (``ssh_keys``) so the agent can check it is talking to that VM.
Private keys are written 0600, root only; the host's private key is also in
the NoCloud seed (0600 too) and nowhere else. No key is ever logged.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.atomic import write_atomic
from agent.adapters.nospace import no_space_is_exhausted
from agent.domain.errors import FailedPrecondition
from agent.domain.vm import ExecCredentials, GuestAccess

CLIENT_KEY = "exec_ssh_key"  # the agent's private key (OpenSSH PEM)
HOST_PUBLIC_KEY = "exec_ssh_host_key.pub"  # the guest's host key, public part


def _pair(comment: str) -> tuple[bytes, str]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode("ascii")
    return private, f"{public} {comment}"


class ExecKeys:
    """The ``ExecKeyStore`` port."""

    def create(self, directory: str) -> GuestAccess:
        """New keys for the VM whose files live in ``directory``; → what its seed carries."""
        client_private, client_public = _pair("podvisor-exec")
        host_private, host_public = _pair("podvisor-guest")
        d = Path(directory)
        with no_space_is_exhausted("writing the VM's exec keys", d):
            write_atomic(d / CLIENT_KEY, client_private, mode=0o600)
            write_atomic(d / HOST_PUBLIC_KEY, (host_public + "\n").encode("ascii"), mode=0o600)
        return GuestAccess(client_public_key=client_public, host_public_key=host_public,
                           host_private_key=host_private.decode("ascii"))

    def load(self, directory: str) -> ExecCredentials:
        """The keys ``create`` wrote (FailedPrecondition for a VM made before there were any)."""
        d = Path(directory)
        try:
            client = (d / CLIENT_KEY).read_bytes()
            host = (d / HOST_PUBLIC_KEY).read_text("ascii").strip()
        except (OSError, UnicodeDecodeError):
            raise FailedPrecondition(
                "this VM has no exec keys (it was created by a Podvisor without SSH exec); "
                "recreate the container for interactive exec") from None
        return ExecCredentials(client_private_key=client, host_public_key=host)
