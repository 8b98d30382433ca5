"""Wire-level helpers: cached encodings of repeated fields, JSON rendering."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


class EncodedCache:
    """Encodes frozen domain values as one repeated message field, with caching.

    A value is re-encoded only when the service replaced it (identity check),
    so a relist of unchanged sandboxes is a bytes join. The output is exactly
    what protobuf produces for ``repeated Msg items = field_number``.
    """

    def __init__(self, to_pb: Any, field_number: int) -> None:
        self._to_pb = to_pb
        self._tag = _varint(field_number << 3 | 2)  # wire type 2: length-delimited
        self._cache: dict[str, tuple[Any, bytes]] = {}

    def encode(self, values: list[Any], complete: bool = True) -> bytes:
        """``complete``: ``values`` holds every live value (no filter applied)."""
        cache = self._cache
        parts = []
        for value in values:
            hit = cache.get(value.id)
            if hit is None or hit[0] is not value:
                body = self._to_pb(value).SerializeToString(deterministic=True)
                hit = (value, self._tag + _varint(len(body)) + body)
                cache[value.id] = hit
            parts.append(hit[1])
        if complete and len(cache) > len(values):
            # Forget values that no longer exist.
            live = {v.id for v in values}
            # list(cache) is one atomic copy: other RPC threads may be adding.
            for key in [k for k in list(cache) if k not in live]:
                cache.pop(key, None)
        return b"".join(parts)


def message_to_json(msg: Any) -> str:
    """A message as JSON with the .proto field names (as grpcurl and crictl show them)."""
    return str(json_format.MessageToJson(msg, preserving_proto_field_name=True))
