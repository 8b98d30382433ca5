"""Random protobuf messages from their descriptors: every field, any value.

Strings are odd (NUL, controls, bidi, non-BMP) or oversized, maps get many or
large entries, annotation values may be deeply nested JSON/YAML, integers
reach their type's limits, enums take values no .proto lists, and nested
messages recurse to a bounded depth.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from tests.fuzz.strategies import dumps, json_values, nested_texts, wire_text

_INT_LIMITS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_PODVISOR_KEYS = ["podvisor.io/vm", "podvisor.io/user-data", "podvisor.io/user-data-base64",
                  "podvisor.io/network-config", "podvisor.io/ssh-authorized-keys", "podvisor.io/vcpus",
                  "podvisor.io/memory", "podvisor.io/firmware", "podvisor.io/unknown"]
# Plausible values keep some requests on the paths past the first check.
_PLAUSIBLE = ["", "a", "pod", "default", "0", "-1", "vm", "busybox", "docker.io/library/busybox:latest",
              "127.0.0.1:1/x:y", "/var/log/pods/x", "/tmp/../etc", "16Mi", "999999Ti", "uefi",
              "#cloud-config\nruncmd: [[a]]\n", "{\"domain\": {}}", "0\x00.log", "vm\x01", "ssh-rsa AAAA"]


def oversized(n: int) -> str:
    return "x" * n


strings = st.one_of(wire_text, st.sampled_from(_PLAUSIBLE),
                    st.builds(oversized, st.sampled_from([256, 4097, 70_000, 300_000])))
annotation_values = st.one_of(strings, nested_texts, json_values.map(dumps),
                              nested_texts.map(lambda t: "#cloud-config\n" + t))
map_keys = st.one_of(wire_text, st.sampled_from(_PODVISOR_KEYS))


def _int(field: FieldDescriptor) -> st.SearchStrategy[int]:
    lo, hi = _INT_LIMITS[field.type]
    return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, 1, -1 if lo < 0 else 0]))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_LIMITS:
        return _int(field)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_STRING:
        return strings
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), strings.map(lambda s: s.encode("utf-8")))
    if t == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 1000))
    raise AssertionError(f"unhandled field type {t}")


def _is_map(field: FieldDescriptor) -> bool:
    return (field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry)


@st.composite
def message(draw: st.DrawFn, descriptor: Descriptor, cls: type[Message], depth: int = 3) -> Message:
    msg = cls()
    _fill(draw, msg, descriptor, depth)
    return msg


def _fill(draw: st.DrawFn, msg: Message, descriptor: Descriptor, depth: int) -> None:
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        repeated = field.is_repeated
        if _is_map(field):
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            keys = map_keys if key_field.type == FieldDescriptor.TYPE_STRING else _scalar(key_field)
            count = draw(st.sampled_from([1, 2, 3, 1025]))
            target = getattr(msg, field.name)
            for i in range(count):
                key = draw(keys) if count < 10 else f"k{i}"
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    if depth > 0 and count < 10:
                        _fill(draw, target[key], value_field.message_type, depth - 1)
                elif count >= 10:
                    target[key] = "v" if value_field.type == FieldDescriptor.TYPE_STRING else 1
                else:
                    target[key] = (draw(annotation_values) if value_field.type == FieldDescriptor.TYPE_STRING
                                   else draw(_scalar(value_field)))
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth <= 0:
                continue
            if repeated:
                for _ in range(draw(st.integers(1, 3))):
                    _fill(draw, getattr(msg, field.name).add(), field.message_type, depth - 1)
            else:
                sub = getattr(msg, field.name)
                sub.SetInParent()
                _fill(draw, sub, field.message_type, depth - 1)
            continue
        values = _scalar(field)
        if repeated:
            getattr(msg, field.name).extend(draw(st.lists(values, min_size=1, max_size=4)))
        else:
            setattr(msg, field.name, draw(values))


def request(cls: type[Message], depth: int = 4) -> st.SearchStrategy[Message]:
    return message(cls.DESCRIPTOR, cls, depth)
