"""podvisor.io/ annotations: any map of values → accepted or InvalidArgument naming the key."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from agent.domain import annotations as ann
from tests.fuzz.properties import Refused, domain_errors_only, value_errors_only
from tests.fuzz.strategies import dumps, json_values, nested_texts, wire_text

KEYS = st.one_of(st.sampled_from(sorted(ann.KNOWN_KEYS)), wire_text.map(lambda t: ann.PREFIX + t), wire_text)
VALUES = st.one_of(wire_text, nested_texts, json_values.map(dumps),
                   st.sampled_from(["16Mi", "999999Ti", "0", "-1", "1e9", "٣", "²", "uefi", "ssh-rsa AAAA",
                                    "#cloud-config\n", "{}", "[]", "null", "!!python/object:os.system {}",
                                    "&a [*a, *a]", "a: !!binary AAAA"]))


@given(st.dictionaries(KEYS, VALUES, max_size=4))
def test_validate_refuses_with_the_key_named(values: dict[str, str]) -> None:
    result = domain_errors_only(ann.validate, values, "config.annotations")
    if isinstance(result, Refused):
        assert result.error.field.startswith("config.annotations[")  # type: ignore[attr-defined]


@given(st.integers(0, 2**70), st.sampled_from(sorted(ann._UNITS, key=str)))
def test_memory_quantities_round_trip(n: int, unit: str | None) -> None:
    text = f"{n}{unit or ''}"
    result = value_errors_only(ann.parse_memory, text)
    if not isinstance(result, Refused):
        assert result == n * ann._UNITS[unit]


@given(wire_text)
@example("٣")  # a non-ASCII digit: str.isdigit() accepts it, int() may not
@example("²")  # superscript two: isdigit() is True, int() raises
def test_vcpus_only_value_errors(text: str) -> None:
    result = value_errors_only(ann.parse_vcpus, text)
    if not isinstance(result, Refused):
        assert 1 <= result <= ann.MAX_VCPUS
        assert ann.parse_vcpus(str(result)) == result


@given(st.binary(max_size=64))
def test_base64_round_trip(data: bytes) -> None:
    import base64

    assert ann.decode_base64(base64.b64encode(data).decode()) == data


@given(st.one_of(wire_text, nested_texts, json_values.map(dumps)))
def test_structured_only_value_errors(text: str) -> None:
    value_errors_only(ann.parse_structured, text)
