"""Image references: any text → an ImageRef that re-parses to itself, or InvalidArgument."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from agent.domain.imageref import Mirror, RewriteRule, parse_endpoint, parse_image_ref, pull_candidates
from tests.fuzz.properties import Refused, domain_errors_only, value_errors_only
from tests.fuzz.strategies import wire_text

_PARTS = st.sampled_from(["docker.io", "localhost", "127.0.0.1:5000", "Reg.Example:1", "[::1]:5000", "a", "b-c",
                          "x__y", "lib", "/", ":", "@", "sha256:" + "a" * 64, "sha512:" + "b" * 128, "latest",
                          ".", "-", "_", "1", "index.docker.io", "A", "://", "\x00", "é"])
REFS = st.one_of(wire_text, st.lists(_PARTS, max_size=8).map("".join),
                 st.builds(lambda n: "a/" * n + "b", st.integers(0, 200)))


@given(REFS)
@example("a" * 300)
@example("localhost:99999999999999999999/x")
def test_refs_parse_and_round_trip(text: str) -> None:
    ref = domain_errors_only(parse_image_ref, text, "image.image")
    if isinstance(ref, Refused):
        assert ref.error.field == "image.image"  # type: ignore[attr-defined]
        return
    assert parse_image_ref(str(ref)) == ref
    assert parse_image_ref(ref.reference if "@" in ref.reference else str(ref)) == ref


@given(REFS, st.lists(st.tuples(REFS, REFS), max_size=3), st.lists(REFS, max_size=3))
def test_pull_candidates_only_domain_errors(text: str, rules: list[tuple[str, str]], endpoints: list[str]) -> None:
    ref = domain_errors_only(parse_image_ref, text)
    if isinstance(ref, Refused):
        return
    good_rules = [r for r in (value_errors_only(RewriteRule, p, q) for p, q in rules) if not isinstance(r, Refused)]
    mirror = value_errors_only(Mirror, ref.registry, tuple(endpoints))
    mirrors = [] if isinstance(mirror, Refused) else [mirror]
    candidates = domain_errors_only(pull_candidates, ref, good_rules, mirrors)
    if not isinstance(candidates, Refused):
        assert candidates, "no place to pull from"


@given(REFS)
def test_endpoints_only_value_errors(text: str) -> None:
    value_errors_only(parse_endpoint, text)
