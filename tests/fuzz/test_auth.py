"""WWW-Authenticate challenges (a registry's header): parsed, never an exception."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from agent.adapters.registry.auth import AuthChallenge, parse_www_authenticate, pick_challenge

_PIECES = st.sampled_from(['Bearer ', 'Basic ', 'realm=', '"', '\\', ',', ' ', '\t', '=', 'service=', 'scope=',
                           '"https://auth/token"', 'repository:x:pull', 'abc==', 'Negotiate', '\x00', 'é', ', ,'])
HEADERS = st.one_of(st.text(max_size=60), st.lists(_PIECES, max_size=20).map("".join))


def _render(ch: AuthChallenge) -> str:
    params = ", ".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                       for k, v in ch.params.items())
    return f"{ch.scheme} {params}".rstrip()


@given(HEADERS)
@example('Bearer realm="' + "\\" * 10_000)
@example("Bearer " + "a=b, " * 5000)
def test_any_header_parses_without_error(header: str) -> None:
    challenges = parse_www_authenticate(header)
    for ch in challenges:
        assert ch.scheme == ch.scheme.lower()
    pick_challenge([header])


_NAMES = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=20)


@given(st.lists(st.tuples(st.sampled_from(["basic", "bearer", "digest"]),
                          st.dictionaries(_NAMES, _VALUES, min_size=1, max_size=4)), min_size=1, max_size=3))
def test_rendered_challenges_round_trip(raw: list[tuple[str, dict[str, str]]]) -> None:
    challenges = [AuthChallenge(scheme, params) for scheme, params in raw]
    header = ", ".join(_render(ch) for ch in challenges)
    assert parse_www_authenticate(header) == challenges
