"""Registry auth: ``WWW-Authenticate`` challenges, token scopes, and a pull's
credentials from CRI's ``AuthConfig`` to the registry they belong to (pure)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from agent.adapters.registry.auth import (
    AuthChallenge,
    parse_www_authenticate,
    pick_challenge,
    pull_scope,
    push_scope,
    scopes_for,
)
from agent.adapters.registry.credentials import (
    RegistryCredentials,
    configured_lookup,
    credentials_for,
    request_lookup,
)
from agent.api.convert.images import registry_auth_from_pb
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.registry import RegistryAuth

# --- WWW-Authenticate ----------------------------------------------------------------

DOCKER_HUB = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/cirros:pull"'
)

CHALLENGE_CASES = [
    (
        DOCKER_HUB,
        [
            AuthChallenge(
                "bearer",
                {
                    "realm": "https://auth.docker.io/token",
                    "service": "registry.docker.io",
                    "scope": "repository:library/cirros:pull",
                },
            )
        ],
    ),
    ('Basic realm="Registry Realm"', [AuthChallenge("basic", {"realm": "Registry Realm"})]),
    ("basic realm=unquoted", [AuthChallenge("basic", {"realm": "unquoted"})]),
    ("Basic", [AuthChallenge("basic", {})]),
    (
        # Commas inside quoted strings; spaces around '='; parameter names folded.
        'Bearer Realm = "https://a/token" , scope="repository:a:pull,push",error="insufficient_scope"',
        [
            AuthChallenge(
                "bearer",
                {
                    "realm": "https://a/token",
                    "scope": "repository:a:pull,push",
                    "error": "insufficient_scope",
                },
            )
        ],
    ),
    (
        'Basic realm="a", Bearer realm="https://t",service="s"',
        [
            AuthChallenge("basic", {"realm": "a"}),
            AuthChallenge("bearer", {"realm": "https://t", "service": "s"}),
        ],
    ),
    (
        'Bearer realm="with \\"escaped\\" quotes\\\\"',
        [AuthChallenge("bearer", {"realm": 'with "escaped" quotes\\'})],
    ),
    (
        "Negotiate abc+/==, Basic realm=x",
        [AuthChallenge("negotiate", {}, "abc+/=="), AuthChallenge("basic", {"realm": "x"})],
    ),
    ('Bearer realm="unterminated', [AuthChallenge("bearer", {"realm": "unterminated"})]),
    ("Bearer realm=a,,  , service=b", [AuthChallenge("bearer", {"realm": "a", "service": "b"})]),
    ('Bearer realm="first", realm="second"', [AuthChallenge("bearer", {"realm": "first"})]),
    ("", []),
    ("   ", []),
    (',"garbage', []),
]


@pytest.mark.parametrize("header,expected", CHALLENGE_CASES)
def test_parse_www_authenticate(header: str, expected: list[AuthChallenge]) -> None:
    assert parse_www_authenticate(header) == expected


def test_challenge_properties() -> None:
    (challenge,) = parse_www_authenticate(DOCKER_HUB)
    assert challenge.realm == "https://auth.docker.io/token"
    assert challenge.service == "registry.docker.io"
    assert challenge.scope == "repository:library/cirros:pull"


@pytest.mark.parametrize(
    "function,repository,scope",
    [
        (pull_scope, "library/cirros", "repository:library/cirros:pull"),
        (push_scope, "kubevirt/x", "repository:kubevirt/x:pull,push"),
    ],
)
def test_scopes(function: Any, repository: str, scope: str) -> None:
    assert function(repository) == scope
    assert scopes_for("a/b", ["pull", "delete"]) == "repository:a/b:pull,delete"


def test_pick_challenge_prefers_bearer_then_basic() -> None:
    assert pick_challenge(['Negotiate abc, Basic realm="a"', 'Bearer realm="https://t"']) == AuthChallenge(
        "bearer", {"realm": "https://t"}
    )
    assert pick_challenge(["Negotiate abc", 'Basic realm="a"']) == AuthChallenge("basic", {"realm": "a"})
    assert pick_challenge(["Negotiate abc"]) == AuthChallenge("negotiate", {}, "abc")
    assert pick_challenge([]) is None


# --- credentials ------------------------------------------------------------------------


def test_credentials_from_a_pull_s_auth() -> None:
    encoded = base64.b64encode(b"user:pa:ss").decode()
    assert RegistryCredentials.from_auth(RegistryAuth(auth=encoded)).basic() == ("user", "pa:ss")
    explicit = RegistryCredentials.from_auth(RegistryAuth("u", "p", auth=encoded))
    assert explicit.basic() == ("u", "p")
    token_only = RegistryCredentials.from_auth(RegistryAuth(identity_token="t"))
    assert token_only.basic() is None and not token_only.is_empty()
    assert RegistryCredentials(auth="!!notbase64").basic() is None
    assert RegistryCredentials().is_empty()
    assert "secret" not in repr(RegistryCredentials("u", "secret", "secret", "secret", "secret"))
    assert "secret" not in repr(RegistryAuth("u", "secret", "secret", "r", "secret", "secret"))


def test_credentials_for_matches_only_its_registry() -> None:
    creds = RegistryCredentials("u", "p")
    hub = credentials_for("https://index.docker.io/v1/", creds)
    assert hub("docker.io") is creds and hub("registry-1.docker.io") is creds
    assert hub("mirror.gcr.io") is None
    local = credentials_for("127.0.0.1:5000", creds)
    assert local("127.0.0.1:5000") is creds and local("127.0.0.1:5001") is None
    with pytest.raises(ValueError):
        credentials_for("", creds)


def test_configured_lookup_finds_each_registry_s_own() -> None:
    hub, local = RegistryCredentials("hub", "p"), RegistryCredentials("local", "p")
    lookup = configured_lookup({"docker.io": hub, "127.0.0.1:5000": local})
    assert lookup("registry-1.docker.io") is hub
    assert lookup("127.0.0.1:5000") is local
    assert lookup("quay.io") is None
    assert configured_lookup({})("docker.io") is None


def test_cri_auth_config_reaches_only_the_image_s_registry() -> None:
    """AuthConfig → RegistryAuth (API) → scoped to the image (service) → lookup (adapter)."""
    message = pb.AuthConfig(username="u", password="p", identity_token="i", registry_token="r")
    auth = registry_auth_from_pb(message)
    assert auth == RegistryAuth(username="u", password="p", identity_token="i", registry_token="r")
    scoped = auth.scoped_to("docker.io")
    assert scoped.server_address == "docker.io"
    lookup = request_lookup(scoped)
    assert lookup is not None
    assert lookup("registry-1.docker.io") == RegistryCredentials("u", "p", "", "i", "r")
    assert lookup("mirror.example") is None

    # A server_address the client names wins over the image's registry.
    named = registry_auth_from_pb(pb.AuthConfig(auth="dTpw", server_address="https://quay.io/v1/"))
    assert named.scoped_to("docker.io") is named
    lookup = request_lookup(named)
    assert lookup is not None and lookup("quay.io") is not None and lookup("docker.io") is None


@pytest.mark.parametrize("auth", [None, RegistryAuth(server_address="docker.io"),
                                  RegistryAuth(auth="!!notbase64", server_address="docker.io")])
def test_empty_auth_leaves_the_configured_credentials(auth: Any) -> None:
    assert request_lookup(auth) is None
