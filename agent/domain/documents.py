"""Loading the JSON and YAML documents a request carries, with bounds (pure).

A pod author chooses the ``podvisor.io/vm`` spec, the network-config and the
``#cloud-config`` user-data, so their parsers see hostile input. Python's JSON
decoder and PyYAML's composer recurse once per nesting level: ``"[" * 100000``
raised RecursionError, which reached the client as INTERNAL. Every such
document goes through ``load_json_or_yaml`` / ``load_yaml`` here instead:

* its size is checked before parsing;
* YAML is composed by a loader that counts nesting while it composes and
  stops at ``MAX_DEPTH``, long before the interpreter's recursion limit; it
  also refuses an alias inside the node it names (a recursive structure that
  every later walk would follow forever) and more than ``MAX_ALIASES``
  aliases (the "billion laughs" expansion);
* JSON is decoded by the C decoder, whose RecursionError is caught, and the
  result's depth is then measured without recursion;
* RecursionError and MemoryError are caught around both as a last resort.

Every failure is a ValueError with a sentence for the client
(``DocumentTooComplex`` for the bounds); the caller adds the field.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

MAX_DEPTH = 64
MAX_ALIASES = 64

_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"


class DocumentTooComplex(ValueError):
    """Larger, deeper or more aliased than a request's document may be."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts nesting and aliases while it composes the node graph."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._open_anchors: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        anchor = getattr(event, "anchor", None)
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise DocumentTooComplex(f"uses more than {MAX_ALIASES} YAML aliases")
            if anchor in self._open_anchors:
                raise DocumentTooComplex(f"the YAML alias *{anchor} refers to a node that contains it")
            return super().compose_node(parent, index)
        if not isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            return super().compose_node(parent, index)  # a scalar: no nesting, nothing to refer back to
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise DocumentTooComplex(_TOO_DEEP)
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open_anchors.discard(anchor)


def _check_size(text: str, max_bytes: int) -> None:
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise DocumentTooComplex(f"larger than {max_bytes} bytes")


def _depth(doc: object) -> int:
    """Nesting depth of decoded JSON (lists and dicts), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: list[object] = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def _load(text: str) -> Any:
    """Compose and construct one YAML document; YAMLError passes through."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except (RecursionError, MemoryError):
        raise DocumentTooComplex(_TOO_DEEP) from None
    finally:
        loader.dispose()


def load_yaml(text: str, *, max_bytes: int) -> Any:
    """One YAML document, bounded in size, nesting and aliases; ValueError says what is wrong."""
    _check_size(text, max_bytes)
    try:
        return _load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None


def load_json_or_yaml(text: str, *, max_bytes: int) -> Any:
    """JSON, else YAML (JSON first: it is the common case and the faster parser)."""
    _check_size(text, max_bytes)
    try:
        doc = json.loads(text)
    except (RecursionError, MemoryError):
        raise DocumentTooComplex(_TOO_DEEP) from None
    except ValueError:
        try:
            return _load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"neither JSON nor YAML: {exc}") from None
    if _depth(doc) > MAX_DEPTH:
        raise DocumentTooComplex(_TOO_DEEP)
    return doc
