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
from agent.domain import guest_settings
from agent.domain.cgroups import pod_cgroup
from agent.domain.errors import InvalidArgument
from agent.domain.sandbox import SandboxSpec
from agent.domain.vm import ContainerSpec

MAX_NAME = 253
MAX_UID = 128
MAX_LABEL_KEY = 317  # 253-char DNS prefix + "/" + 63-char name
MAX_LABEL_VALUE = 1024
MAX_LABELS_TOTAL = 64 * 1024
# Kubernetes caps all annotations of an object at 256 KiB.
MAX_ANNOTATIONS_TOTAL = 256 * 1024
MAX_ENTRIES = 1024
MAX_PORT_MAPPINGS = 256
MAX_PATH = 4096

# What a one-line value (a name, a key, a label) may not hold: the C0 and C1
# controls and DEL, lone surrogates and the two non-characters XML 1.0 excludes.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
# What no value may hold, one that spans lines included: the characters XML 1.0
# cannot carry (tab, LF and CR are fine). Names and metadata reach the domain
# XML, env and commands reach the seed's YAML.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _text(value: str, field_name: str, *, required: bool, limit: int) -> None:
    if required and not value:
        raise InvalidArgument(field_name, "is required")
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise InvalidArgument(field_name, f"longer than {limit} bytes")
    if "\x00" in value or "/" in value and field_name.endswith((".name", ".namespace")):
        raise InvalidArgument(field_name, "must not contain '/' or NUL characters")
    check_characters(value, field_name)


def check_characters(value: str, field_name: str, *, multiline: bool = False) -> None:
    """Refuse control characters (one-line values) or characters XML cannot carry (``multiline``)."""
    bad = (_NOT_XML if multiline else _CONTROL).search(value)
    if bad:
        raise InvalidArgument(
            field_name, f"must not contain control characters (found U+{ord(bad.group()):04X})")


def validate_string_map(
    values: Mapping[str, str], field_name: str, *, total_limit: int, value_limit: int,
    multiline_values: bool = False,
) -> None:
    """Bound the number and size of labels/annotations; refuse control characters
    (in keys always, in values unless ``multiline_values``: then only what XML cannot carry)."""
    if len(values) > MAX_ENTRIES:
        raise InvalidArgument(field_name, f"more than {MAX_ENTRIES} entries")
    total = 0
    for key, value in values.items():
        if not key:
            raise InvalidArgument(field_name, "keys must not be empty")
        if len(key.encode("utf-8", "surrogatepass")) > MAX_LABEL_KEY:
            raise InvalidArgument(f"{field_name}[{key[:40]!r}...]", f"key longer than {MAX_LABEL_KEY} bytes")
        if "\x00" in key or "\x00" in value:
            raise InvalidArgument(f"{field_name}[{key!r}]", "must not contain NUL characters")
        if len(value.encode("utf-8", "surrogatepass")) > value_limit:
            raise InvalidArgument(f"{field_name}[{key!r}]", f"value longer than {value_limit} bytes")
        check_characters(key, f"{field_name}[{key!r}]")
        check_characters(value, f"{field_name}[{key!r}]", multiline=multiline_values)
        total += len(key.encode("utf-8", "surrogatepass")) + len(value.encode("utf-8", "surrogatepass"))
    if total > total_limit:
        raise InvalidArgument(field_name, f"total size {total} bytes exceeds {total_limit} bytes")


def validate_host_path(value: str, field_name: str) -> None:
    """A path the CRI hands the runtime (log directory): absolute and normalised."""
    if not value:
        return
    if len(value) > MAX_PATH or "\x00" in value:
        raise InvalidArgument(field_name, "not a valid path")
    check_characters(value, field_name)
    if not value.startswith("/"):
        raise InvalidArgument(field_name, f"{value!r} must be an absolute path")
    if "//" in value or (os.path.normpath(value) != value.rstrip("/") and value != "/"):
        raise InvalidArgument(field_name, f"{value!r} must be a normalised path (no '..', '//')")
    if ".." in value.split("/"):
        raise InvalidArgument(field_name, f"{value!r} must not contain '..'")


def validate_log_path(value: str, field_name: str) -> None:
    """CreateContainer's log path: relative to the sandbox's log directory,
    no '..', no NUL or control characters (it becomes a file name)."""
    if not value:
        return
    if len(value) > MAX_PATH or "\x00" in value:
        raise InvalidArgument(field_name, "must not contain NUL characters")
    check_characters(value, field_name)
    if value.startswith("/") or ".." in value.split("/"):
        raise InvalidArgument(field_name, "must be relative to the sandbox's log directory, without '..'")
    if value.endswith("/"):
        raise InvalidArgument(field_name, "must name a file")


def validate_cgroup_parent(value: str) -> None:
    """cgroupfs driver: a cgroup path; systemd driver: a slice name (kubepods-...slice)."""
    pod_cgroup(value)


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
        multiline_values=True,
    )
    podvisor_annotations.validate(spec.annotations, "config.annotations")
    dns = spec.dns
    for name, items in (("servers", dns.servers), ("searches", dns.searches),
                        ("options", dns.options)):
        for item in items:
            _text(item, f"config.dns_config.{name}", required=True, limit=MAX_NAME + 1)
    guest_settings.validate_dns(dns)
    guest_settings.validate_sysctls(spec.sysctls)
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


MAX_IMAGE = 4096
MAX_CONTAINER_ANNOTATION_VALUE = 256 * 1024


def validate_container_spec(spec: ContainerSpec) -> None:
    """What CreateContainer checks of the request itself before any state is touched.

    Names, labels and annotations end up in the domain XML's metadata and the
    store; command, args and env in the seed: none may carry a character XML
    (or, for one-line values, a terminal) cannot.
    """
    _text(spec.name, "config.metadata.name", required=True, limit=MAX_NAME)
    _text(spec.image, "config.image.image", required=True, limit=MAX_IMAGE)
    validate_log_path(spec.log_path, "config.log_path")
    validate_string_map(spec.labels, "config.labels", total_limit=MAX_LABELS_TOTAL, value_limit=MAX_LABEL_VALUE)
    validate_string_map(spec.annotations, "config.annotations", total_limit=MAX_ANNOTATIONS_TOTAL,
                        value_limit=MAX_CONTAINER_ANNOTATION_VALUE, multiline_values=True)
    for name, words in (("config.command", spec.command), ("config.args", spec.args)):
        for i, word in enumerate(words):
            check_characters(word, f"{name}[{i}]", multiline=True)
    for i, (key, value) in enumerate(spec.env.items()):
        check_characters(key, f"config.envs[{i}].key")
        check_characters(value, f"config.envs[{i}].value", multiline=True)


def validate_id(value: str, field_name: str) -> None:
    """An id or id prefix from a client: present, bounded, printable.

    A well-formed id that matches nothing is not an error here: Stop/Remove of
    an unknown id succeed and Status answers NOT_FOUND (CRI rules).
    """
    if not value:
        raise InvalidArgument(field_name, "is required")
    if len(value) > 128 or not value.isprintable() or "/" in value:
        raise InvalidArgument(field_name, f"{value[:80]!r} is not a valid id")
