"""`podvisor.io/` annotations: the closed set of keys and their value checks.

Unknown keys under the prefix and malformed values are rejected with the key
named, never replaced by a silent default (docs/annotations.md).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping

from agent.domain import documents
from agent.domain.errors import InvalidArgument

PREFIX = "podvisor.io/"

VM = PREFIX + "vm"
USER_DATA = PREFIX + "user-data"
USER_DATA_BASE64 = PREFIX + "user-data-base64"
NETWORK_CONFIG = PREFIX + "network-config"
SSH_AUTHORIZED_KEYS = PREFIX + "ssh-authorized-keys"
VCPUS = PREFIX + "vcpus"
MEMORY = PREFIX + "memory"
FIRMWARE = PREFIX + "firmware"
GUEST_AGENT = PREFIX + "guest-agent"

MAX_VCPUS = 512
# cloud-init payloads end up on an ISO attached to the guest; keep them sane.
MAX_USER_DATA_BYTES = 512 * 1024

_QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|K|M|G|T|k)?$")
_UNITS = {
    None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}


def parse_memory(value: str) -> int:
    """A Kubernetes quantity ("64Mi", "1G", "1073741824") → bytes."""
    m = _QUANTITY.match(value.strip())
    if not m:
        raise ValueError("expected a Kubernetes memory quantity such as 512Mi or 2Gi")
    n = int(m.group(1)) * _UNITS[m.group(2)]
    if n < 16 * 2**20:
        raise ValueError("must be at least 16Mi")
    return n


def parse_vcpus(value: str) -> int:
    if not value.strip().isdigit():
        raise ValueError("expected a positive integer")
    n = int(value)
    if not 1 <= n <= MAX_VCPUS:
        raise ValueError(f"must be between 1 and {MAX_VCPUS}")
    return n


def parse_firmware(value: str) -> str:
    if value not in ("bios", "uefi"):
        raise ValueError("expected bios or uefi")
    return value


def parse_bool(value: str) -> bool:
    """``"true"`` or ``"false"`` (as Kubernetes writes booleans in annotations)."""
    if value not in ("true", "false"):
        raise ValueError('expected "true" or "false"')
    return value == "true"


def _check_size(value: str) -> str:
    if len(value.encode()) > MAX_USER_DATA_BYTES:
        raise ValueError(f"larger than {MAX_USER_DATA_BYTES} bytes")
    return value


def decode_base64(value: str) -> bytes:
    try:
        data = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(data) > MAX_USER_DATA_BYTES:
        raise ValueError(f"decodes to more than {MAX_USER_DATA_BYTES} bytes")
    return data


def parse_structured(value: str) -> object:
    """JSON or YAML document that must be a mapping (VMI spec, network-config), bounded
    in size and nesting (``agent.domain.documents``)."""
    doc = documents.load_json_or_yaml(value, max_bytes=MAX_USER_DATA_BYTES)
    if not isinstance(doc, dict):
        raise ValueError("must be a JSON or YAML mapping")
    return doc


def _parse_keys(value: str) -> list[str]:
    _check_size(value)
    keys = [line.strip() for line in value.splitlines() if line.strip()]
    for key in keys:
        if not key.startswith(("ssh-", "ecdsa-", "sk-")):
            raise ValueError("expected one OpenSSH public key per line")
    return keys


_VALIDATORS: dict[str, Callable[[str], object]] = {
    VM: parse_structured,
    USER_DATA: _check_size,
    USER_DATA_BASE64: decode_base64,
    NETWORK_CONFIG: parse_structured,
    SSH_AUTHORIZED_KEYS: _parse_keys,
    VCPUS: parse_vcpus,
    MEMORY: parse_memory,
    FIRMWARE: parse_firmware,
    GUEST_AGENT: parse_bool,
}

KNOWN_KEYS = frozenset(_VALIDATORS)


def validate(annotations: Mapping[str, str], field_name: str) -> None:
    """Reject unknown `podvisor.io/` keys and malformed values, naming the key."""
    for key, value in annotations.items():
        if not key.startswith(PREFIX):
            continue
        where = f"{field_name}[{key!r}]"
        check = _VALIDATORS.get(key)
        if check is None:
            raise InvalidArgument(
                where, f"unknown Podvisor annotation (known: {', '.join(sorted(KNOWN_KEYS))})"
            )
        try:
            check(value)
        except ValueError as exc:
            raise InvalidArgument(where, str(exc)) from None
