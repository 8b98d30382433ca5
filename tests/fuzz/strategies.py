"""Hostile-input strategies shared by the fuzz tests."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

# Text a client can send over protobuf (valid UTF-8: no lone surrogates), with
# the odd characters kept likely: NUL, controls, line breaks, bidi, non-BMP.
_ODD = st.sampled_from(["\x00", "\x01", "\x1b", "\n", "\r", "\t", "\x7f", "\u0085", "\u2028", "\u202e",
                        "\ufeff", "\uffff", "\U0001f600", "\U0010ffff", "'", '"', "\\", "/", ":", "@", "{",
                        "[", "#", "&", "*", "!", "%", "..", "$"])
_CHAR = st.characters(exclude_categories=("Cs",))
wire_text = st.lists(st.one_of(_CHAR, _ODD), max_size=40).map("".join)
# A string that may also carry lone surrogates (what json.loads yields for "\ud800").
any_text = st.one_of(wire_text, st.text(max_size=20))
huge_ints = st.one_of(st.integers(), st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
                      st.integers(min_value=-(2**64), max_value=-(2**63) + 2), st.just(10**400))
scalars = st.one_of(st.none(), st.booleans(), huge_ints, st.floats(), any_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)),
    max_leaves=20,
)


def deep(depth: int, opener: str = "[") -> str:
    return opener * depth


# Nesting that stays within what the annotation parsers must handle; deeper
# annotation values are the explicit cases of test_regressions.py (their fix
# bounds the depth before parsing).
nested_texts = st.builds(deep, st.integers(1, 60), st.sampled_from(["[", "{", "{\"a\":", "- ", "[{", "{a: "]))

# Deep nesting: what overflows a recursive parser (past Python's recursion limit
# of 1000). Flow mappings ("{") stay shallow: PyYAML's scanner is quadratic in
# their depth, and the deeper inputs are explicit examples.
deep_texts = st.one_of(
    st.builds(deep, st.sampled_from([100, 1100]), st.sampled_from(["[", "{\"a\":", "- ", "[\n"])),
    st.builds(deep, st.just(300), st.sampled_from(["{", "[{", "{a: "])),
)


def dumps(value: Any) -> str:
    """JSON of a generated value (floats like nan allowed, surrogates escaped)."""
    return json.dumps(value, allow_nan=True)


def mutate_document(base: Any) -> st.SearchStrategy[Any]:
    """A valid document with one value somewhere replaced, a key dropped, or a key added."""

    def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        found = [prefix]
        if isinstance(doc, dict):
            for k, v in doc.items():
                found += paths(v, (*prefix, k))
        elif isinstance(doc, list):
            for i, v in enumerate(doc):
                found += paths(v, (*prefix, i))
        return found

    all_paths = paths(base)

    @st.composite
    def mutated(draw: st.DrawFn) -> Any:
        doc = json.loads(json.dumps(base))
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(all_paths))
            action = draw(st.sampled_from(["replace", "drop", "add"]))
            if not path:
                if action == "replace":
                    doc = draw(json_values)
                continue
            parent = doc
            try:
                for key in path[:-1]:
                    parent = parent[key]
                if action == "replace":
                    parent[path[-1]] = draw(json_values)
                elif action == "drop":
                    del parent[path[-1]]
                elif isinstance(parent, dict):
                    parent[draw(any_text)] = draw(json_values)
                elif isinstance(parent, list):
                    parent.append(draw(json_values))
            except (KeyError, IndexError, TypeError):
                continue
        return doc

    return mutated()
