"""Bounded loading of request documents (agent/domain/documents.py)."""

from __future__ import annotations

import pytest

from agent.domain.documents import MAX_ALIASES, MAX_DEPTH, DocumentTooComplex, load_json_or_yaml, load_yaml

LIMIT = 512 * 1024


def _nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def _nested_block_yaml(depth: int) -> str:
    return "".join("  " * i + "-\n" for i in range(depth - 1)) + "  " * (depth - 1) + "- x\n"


@pytest.mark.parametrize("text", [
    "[" * 100000, "{" * 3000, "#cloud-config\n" + "[" * 3000, _nested_json(MAX_DEPTH + 1),
    _nested_json(5000), _nested_block_yaml(MAX_DEPTH + 1), "a: " + "{b: " * 200 + "c" + "}" * 200,
])
def test_documents_nested_beyond_the_limit_are_refused(text: str) -> None:
    with pytest.raises(DocumentTooComplex, match=f"nested deeper than {MAX_DEPTH} levels"):
        load_json_or_yaml(text, max_bytes=LIMIT)


@pytest.mark.parametrize("text", [_nested_json(MAX_DEPTH), _nested_block_yaml(MAX_DEPTH)])
def test_documents_at_the_limit_load(text: str) -> None:
    doc = load_json_or_yaml(text, max_bytes=LIMIT)
    depth = 0
    while isinstance(doc, list) and doc:
        doc, depth = doc[0], depth + 1
    assert depth in (MAX_DEPTH - 1, MAX_DEPTH)


def test_recursive_aliases_are_refused() -> None:
    with pytest.raises(DocumentTooComplex, match=r"\*a refers to a node that contains it"):
        load_yaml("x: &a [1, *a]\n", max_bytes=LIMIT)
    with pytest.raises(DocumentTooComplex, match=r"\*m refers"):
        load_yaml("&m {k: *m}\n", max_bytes=LIMIT)


def test_aliases_are_counted() -> None:
    anchors = "base: &b [1, 2]\n"
    many = anchors + "uses: [" + ", ".join(["*b"] * MAX_ALIASES) + "]\n"
    assert load_yaml(many, max_bytes=LIMIT)["uses"][0] == [1, 2]
    laughs = anchors + "uses: [" + ", ".join(["*b"] * (MAX_ALIASES + 1)) + "]\n"
    with pytest.raises(DocumentTooComplex, match="aliases"):
        load_yaml(laughs, max_bytes=LIMIT)


def test_size_is_checked_before_parsing() -> None:
    with pytest.raises(DocumentTooComplex, match="larger than 10 bytes"):
        load_json_or_yaml("a: " + "b" * 20, max_bytes=10)
    with pytest.raises(DocumentTooComplex, match="larger than 10 bytes"):
        load_yaml("a: " + "é" * 5, max_bytes=10)  # bytes, not characters


def test_ordinary_documents_load_and_errors_say_what_they_are() -> None:
    assert load_json_or_yaml('{"a": [1, {"b": 2}]}', max_bytes=LIMIT) == {"a": [1, {"b": 2}]}
    assert load_json_or_yaml("a:\n  - 1\n  - b: 2\n", max_bytes=LIMIT) == {"a": [1, {"b": 2}]}
    assert load_yaml("base: &b {x: 1}\nother: *b\n", max_bytes=LIMIT) == {"base": {"x": 1}, "other": {"x": 1}}
    with pytest.raises(ValueError, match="neither JSON nor YAML"):
        load_json_or_yaml("a: [", max_bytes=LIMIT)
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml("a: [", max_bytes=LIMIT)
