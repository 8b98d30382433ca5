"""Request validation for sandboxes: required fields and size bounds.

Errors name the field path as the CRI message spells it
(``config.metadata.name``), so a client can tell what to fix.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping

from agent.domain import annotations as podvisor_annotations
from agent.domain.errors import InvalidArgument
from agent.domain.sandbox import SandboxSpec

MAX_NAME = 253
MAX_UID = 128
MAX_LABEL_KEY = 317  # 253-char DNS prefix + "/" + 63-char name
MAX_LABEL_VALUE = 1024
MAX_LABELS_TOTAL = 64 * 1024
# Kubernetes caps all annotations of an object at 256 KiB.
MAX_ANNOTATIONS_TOTAL = 256 * 1024
MAX_ENTRIES = 1024
MAX_DNS_ENTRIES = 32
MAX_PORT_MAPPINGS = 256
MAX_PATH = 4096

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _text(value: str, field_name: str, *, required: bool, limit: int) -> None:
    if required and not value:
        raise InvalidArgument(field_name, "is required")
    if len(value.encode()) > limit:
        raise InvalidArgument(field_name, f"longer than {limit} bytes")
    if "\x00" in value or "/" in value and field_name.endswith((".name", ".namespace")):
        raise InvalidArgument(field_name, "must not contain '/' or NUL characters")
    if any(ord(c) < 0x20 for c in value):
        raise InvalidArgument(field_name, "must not contain control characters")


def validate_string_map(
    values: Mapping[str, str], field_name: str, *, total_limit: int, value_limit: int
) -> None:
    """Bound the number and size of labels/annotations."""
    if len(values) > MAX_ENTRIES:
        raise InvalidArgument(field_name, f"more than {MAX_ENTRIES} entries")
    total = 0
    for key, value in values.items():
        if not key:
            raise InvalidArgument(field_name, "keys must not be empty")
        if len(key.encode()) > MAX_LABEL_KEY:
            raise InvalidArgument(f"{field_name}[{key[:40]!r}...]", f"key longer than {MAX_LABEL_KEY} bytes")
        if "\x00" in key or "\x00" in value:
            raise InvalidArgument(f"{field_name}[{key!r}]", "must not contain NUL characters")
        if len(value.encode()) > value_limit:
            raise InvalidArgument(f"{field_name}[{key!r}]", f"value longer than {value_limit} bytes")
        total += len(key.encode()) + len(value.encode())
    if total > total_limit:
        raise InvalidArgument(field_name, f"total size {total} bytes exceeds {total_limit} bytes")


def validate_host_path(value: str, field_name: str) -> None:
    """A path the CRI hands the runtime (log directory): absolute and normalised."""
    if not value:
        return
    if len(value) > MAX_PATH or "\x00" in value:
        raise InvalidArgument(field_name, "not a valid path")
    if not value.startswith("/"):
        raise InvalidArgument(field_name, f"{value!r} must be an absolute path")
    if "//" in value or (os.path.normpath(value) != value.rstrip("/") and value != "/"):
        raise InvalidArgument(field_name, f"{value!r} must be a normalised path (no '..', '//')")
    if ".." in value.split("/"):
        raise InvalidArgument(field_name, f"{value!r} must not contain '..'")


_SLICE = re.compile(r"^[A-Za-z0-9_.:-]+\.slice$")


def validate_cgroup_parent(value: str) -> None:
    """cgroupfs driver: a cgroup path; systemd driver: a slice name (kubepods-...slice)."""
    if not value or _SLICE.fullmatch(value):
        return
    validate_host_path(value, "config.linux.cgroup_parent")


def validate_sandbox_spec(spec: SandboxSpec) -> None:
    """Everything RunPodSandbox checks before touching any state."""
    md = spec.metadata
    _text(md.name, "config.metadata.name", required=True, limit=MAX_NAME)
    _text(md.namespace, "config.metadata.namespace", required=True, limit=MAX_NAME)
    _text(md.uid, "config.metadata.uid", required=True, limit=MAX_UID)
    if md.attempt < 0:
        raise InvalidArgument("config.metadata.attempt", "must not be negative")
    if spec.hostname and (len(spec.hostname) > 253 or not _HOSTNAME.fullmatch(spec.hostname)):
        raise InvalidArgument("config.hostname", f"{spec.hostname[:64]!r} is not a valid hostname")
    validate_host_path(spec.log_directory, "config.log_directory")
    validate_string_map(
        spec.labels, "config.labels", total_limit=MAX_LABELS_TOTAL, value_limit=MAX_LABEL_VALUE
    )
    validate_string_map(
        spec.annotations,
        "config.annotations",
        total_limit=MAX_ANNOTATIONS_TOTAL,
        value_limit=MAX_ANNOTATIONS_TOTAL,
    )
    podvisor_annotations.validate(spec.annotations, "config.annotations")
    dns = spec.dns
    for name, items in (("servers", dns.servers), ("searches", dns.searches),
                        ("options", dns.options)):
        if len(items) > MAX_DNS_ENTRIES:
            raise InvalidArgument(f"config.dns_config.{name}", f"more than {MAX_DNS_ENTRIES} entries")
        for item in items:
            _text(item, f"config.dns_config.{name}", required=True, limit=MAX_NAME)
    for server in dns.servers:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise InvalidArgument("config.dns_config.servers", f"{server!r} is not an IP address") from None
    if len(spec.port_mappings) > MAX_PORT_MAPPINGS:
        raise InvalidArgument("config.port_mappings", f"more than {MAX_PORT_MAPPINGS} entries")
    for i, pm in enumerate(spec.port_mappings):
        where = f"config.port_mappings[{i}]"
        if not 1 <= pm.container_port <= 65535:
            raise InvalidArgument(f"{where}.container_port", "must be between 1 and 65535")
        if not 0 <= pm.host_port <= 65535:
            raise InvalidArgument(f"{where}.host_port", "must be between 0 and 65535")
        if pm.host_ip:
            try:
                ipaddress.ip_address(pm.host_ip)
            except ValueError:
                raise InvalidArgument(f"{where}.host_ip", f"{pm.host_ip!r} is not an IP address") from None
    validate_cgroup_parent(spec.cgroup_parent)
    _text(spec.runtime_handler, "runtime_handler", required=False, limit=MAX_NAME)


def validate_id(value: str, field_name: str) -> None:
    """An id or id prefix from a client: present, bounded, printable.

    A well-formed id that matches nothing is not an error here: Stop/Remove of
    an unknown id succeed and Status answers NOT_FOUND (CRI rules).
    """
    if not value:
        raise InvalidArgument(field_name, "is required")
    if len(value) > 128 or not value.isprintable() or "/" in value:
        raise InvalidArgument(field_name, f"{value[:80]!r} is not a valid id")
