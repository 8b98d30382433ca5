"""Table tests for image reference parsing and pull-candidate rules."""

from __future__ import annotations

import pytest

from agent.domain.errors import InvalidArgument
from agent.domain.imageref import (
    DOCKER_HUB_ENDPOINT,
    ImageRef,
    Mirror,
    RemoteRepository,
    RewriteRule,
    parse_endpoint,
    parse_image_ref,
    pull_candidates,
    registry_endpoint,
    rewrite,
    upstream_repository,
)

DIGEST = "sha256:" + "0123456789abcdef" * 4

# (input, registry, repository, tag, digest, canonical string)
PARSE_CASES = [
    ("cirros", "docker.io", "library/cirros", "latest", None, "docker.io/library/cirros:latest"),
    ("cirros:0.6.2", "docker.io", "library/cirros", "0.6.2", None, None),
    ("kubevirt/x", "docker.io", "kubevirt/x", "latest", None, "docker.io/kubevirt/x:latest"),
    ("docker.io/cirros", "docker.io", "library/cirros", "latest", None, None),
    ("docker.io/library/cirros", "docker.io", "library/cirros", "latest", None, None),
    ("index.docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None, None),
    ("registry-1.docker.io/a/b", "docker.io", "a/b", "latest", None, None),
    ("quay.io/kubevirt/fedora", "quay.io", "kubevirt/fedora", "latest", None, None),
    ("localhost/x", "localhost", "x", "latest", None, "localhost/x:latest"),
    ("localhost:5000/a/b/c:t", "localhost:5000", "a/b/c", "t", None, None),
    ("127.0.0.1:5000/kubevirt/cirros:v1", "127.0.0.1:5000", "kubevirt/cirros", "v1", None, None),
    ("[::1]:5000/x", "[::1]:5000", "x", "latest", None, None),
    ("Registry.Example.COM/x", "Registry.Example.COM", "x", "latest", None, None),
    ("DOCKER.IO/x", "docker.io", "library/x", "latest", None, None),
    ("MyHost/x", "MyHost", "x", "latest", None, None),  # upper case ⇒ a host, like docker
    ("localhost:5000", "docker.io", "library/localhost", "5000", None, None),  # as docker does
    (
        f"cirros@{DIGEST}",
        "docker.io",
        "library/cirros",
        None,
        DIGEST,
        f"docker.io/library/cirros@{DIGEST}",
    ),
    (f"q.io/a:v1@{DIGEST}", "q.io", "a", "v1", DIGEST, f"q.io/a:v1@{DIGEST}"),
    ("a.b/c__d/e-f/g.h_i--j:T_a.g-1", "a.b", "c__d/e-f/g.h_i--j", "T_a.g-1", None, None),
    ("x:" + "a" * 128, "docker.io", "library/x", "a" * 128, None, None),
]


@pytest.mark.parametrize("text,registry,repository,tag,digest,canonical", PARSE_CASES)
def test_parse_image_ref(
    text: str,
    registry: str,
    repository: str,
    tag: str | None,
    digest: str | None,
    canonical: str | None,
) -> None:
    ref = parse_image_ref(text)
    assert ref == ImageRef(registry, repository, tag, digest)
    if canonical is not None:
        assert str(ref) == canonical
    # Normalisation is idempotent.
    assert parse_image_ref(str(ref)) == ref


# (input, fragment the message must contain)
INVALID_CASES = [
    ("", "empty"),
    (" cirros", "whitespace"),
    ("https://quay.io/x", "scheme"),
    ("Cirros", "lowercase"),
    ("quay.io/Kubevirt/x", "lowercase"),
    ("cirros:", "invalid tag"),
    ("cirros:.bad", "invalid tag"),
    ("cirros:-bad", "invalid tag"),
    ("x:" + "a" * 129, "invalid tag"),
    ("cirros@sha256:abc", "invalid digest"),
    ("cirros@sha256:" + "A" * 64, "invalid digest"),
    ("cirros@sha512:" + "a" * 128, "not supported"),
    ("cirros@", "invalid digest"),
    ("a//b", "invalid repository"),
    ("a/b/", "invalid repository"),
    ("quay.io/", "invalid repository"),
    ("-a/b", "invalid repository"),
    ("a_-b", "invalid repository"),
    ("bad_host.io/x", "invalid registry"),
    ("host.io:port/x", "invalid"),
    ("q.io/" + "a" * 260, "longer than 255"),
]


@pytest.mark.parametrize("text,fragment", INVALID_CASES)
def test_parse_image_ref_rejects(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_image_ref(text)
    assert caught.value.field == "image.image"
    assert fragment in caught.value.message
    assert caught.value.message.startswith("image.image: ")


def test_parse_image_ref_custom_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_image_ref("UPPER", field="image")
    assert caught.value.field == "image"


def test_reference_prefers_digest() -> None:
    assert parse_image_ref("a:1").reference == "1"
    assert parse_image_ref(f"a:1@{DIGEST}").reference == DIGEST
    assert parse_image_ref("a:1").with_digest(DIGEST) == ImageRef("docker.io", "library/a", None, DIGEST)


@pytest.mark.parametrize(
    "registry,endpoint",
    [
        ("docker.io", DOCKER_HUB_ENDPOINT),
        ("index.docker.io", DOCKER_HUB_ENDPOINT),
        ("quay.io", "quay.io"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
    ],
)
def test_registry_endpoint(registry: str, endpoint: str) -> None:
    assert registry_endpoint(registry) == endpoint


def test_upstream_repository_for_docker_hub() -> None:
    assert upstream_repository(parse_image_ref("cirros")) == RemoteRepository(
        registry="docker.io", host="registry-1.docker.io", name="library/cirros"
    )


# --- rewrites ---------------------------------------------------------------------

LOCAL_KUBEVIRT = RewriteRule("docker.io/kubevirt/", "127.0.0.1:5000/kubevirt/")

# (rules, input, rewritten canonical)
REWRITE_CASES = [
    (
        [],
        "kubevirt/cirros-container-disk-demo",
        "docker.io/kubevirt/cirros-container-disk-demo:latest",
    ),
    (
        [LOCAL_KUBEVIRT],
        "kubevirt/cirros-container-disk-demo:v1",
        "127.0.0.1:5000/kubevirt/cirros-container-disk-demo:v1",
    ),
    ([LOCAL_KUBEVIRT], f"kubevirt/x@{DIGEST}", f"127.0.0.1:5000/kubevirt/x@{DIGEST}"),
    ([LOCAL_KUBEVIRT], "kubevirtx/y", "docker.io/kubevirtx/y:latest"),
    ([LOCAL_KUBEVIRT], "cirros", "docker.io/library/cirros:latest"),
    # Without a trailing slash only whole components match.
    ([RewriteRule("docker.io/kubevirt", "r.io/kv")], "kubevirt/x", "r.io/kv/x:latest"),
    ([RewriteRule("docker.io/kubevirt", "r.io/kv")], "kubevirtx/y", "docker.io/kubevirtx/y:latest"),
    # Whole-registry rewrite.
    (
        [RewriteRule("docker.io/", "mirror.local:5000/hub/")],
        "cirros",
        "mirror.local:5000/hub/library/cirros:latest",
    ),
    # The most specific prefix wins whatever the order.
    (
        [RewriteRule("docker.io/", "a.io/"), LOCAL_KUBEVIRT],
        "kubevirt/x:1",
        "127.0.0.1:5000/kubevirt/x:1",
    ),
    (
        [LOCAL_KUBEVIRT, RewriteRule("docker.io/", "a.io/")],
        "library/busybox",
        "a.io/library/busybox:latest",
    ),
    # An exact image rename.
    (
        [RewriteRule("quay.io/old/name", "quay.io/new/name")],
        "quay.io/old/name:3",
        "quay.io/new/name:3",
    ),
    # Rewriting to Docker Hub's alias is normalised.
    ([RewriteRule("q.io/a/", "index.docker.io/b/")], "q.io/a/c", "docker.io/b/c:latest"),
]


@pytest.mark.parametrize("rules,text,expected", REWRITE_CASES)
def test_rewrite(rules: list[RewriteRule], text: str, expected: str) -> None:
    assert str(rewrite(parse_image_ref(text), rules)) == expected


def test_rewrite_to_invalid_name_names_the_rule() -> None:
    rule = RewriteRule("docker.io/kubevirt/", "127.0.0.1:5000/Bad/")
    with pytest.raises(InvalidArgument) as caught:
        rewrite(parse_image_ref("kubevirt/x"), [rule])
    assert "127.0.0.1:5000/Bad/" in caught.value.message
    assert "docker.io/kubevirt/x:latest" in caught.value.message


@pytest.mark.parametrize(
    "prefix,replacement",
    [
        ("", "a.io/"),
        ("https://docker.io/", "a.io/"),
        ("docker.io/", "a.io/x@sha256"),
        ("docker.io/", " a.io/"),
        ("bad_host/", "a.io/"),
    ],
)
def test_rewrite_rule_validation(prefix: str, replacement: str) -> None:
    with pytest.raises(ValueError):
        RewriteRule(prefix, replacement)


# --- mirrors and candidates -------------------------------------------------------------


def test_candidates_without_rules_is_the_upstream() -> None:
    assert pull_candidates(parse_image_ref("quay.io/a/b")) == [RemoteRepository("quay.io", "quay.io", "a/b")]


def test_candidates_mirrors_first_in_order_then_upstream() -> None:
    mirrors = [
        Mirror("docker.io", ("https://mirror.gcr.io", "127.0.0.1:5001", "http://127.0.0.1:5002/v2/")),
        Mirror("quay.io", ("q-mirror:5000",)),
    ]
    assert pull_candidates(parse_image_ref("cirros"), mirrors=mirrors) == [
        RemoteRepository("mirror.gcr.io", "mirror.gcr.io", "library/cirros", "https", True),
        RemoteRepository("127.0.0.1:5001", "127.0.0.1:5001", "library/cirros", None, True),
        RemoteRepository("127.0.0.1:5002", "127.0.0.1:5002", "library/cirros", "http", True),
        RemoteRepository("docker.io", "registry-1.docker.io", "library/cirros"),
    ]


def test_candidates_rewrite_then_mirrors_of_the_new_registry() -> None:
    rules = [LOCAL_KUBEVIRT]
    mirrors = [
        Mirror("docker.io", ("mirror.gcr.io",)),  # no longer applies after the rewrite
        Mirror("127.0.0.1:5000", ("http://127.0.0.1:6000",)),
    ]
    candidates = pull_candidates(parse_image_ref("kubevirt/cirros-container-disk-demo"), rules, mirrors)
    assert [(str(c), c.scheme) for c in candidates] == [
        ("127.0.0.1:6000/kubevirt/cirros-container-disk-demo", "http"),
        ("127.0.0.1:5000/kubevirt/cirros-container-disk-demo", None),
    ]


def test_candidates_are_deduplicated() -> None:
    mirrors = [Mirror("quay.io", ("quay.io", "quay.io"))]
    candidates = pull_candidates(parse_image_ref("quay.io/a"), mirrors=mirrors)
    assert [str(c) for c in candidates] == ["quay.io/a", "quay.io/a"]
    assert candidates[0].mirror and not candidates[1].mirror
    assert len(candidates) == 2


def test_mirror_registry_alias_matches() -> None:
    mirrors = [Mirror("index.docker.io", ("m.io",))]
    assert pull_candidates(parse_image_ref("cirros"), mirrors=mirrors)[0].host == "m.io"


@pytest.mark.parametrize(
    "endpoint,expected",
    [
        ("m.io", (None, "m.io")),
        ("M.IO:5000/", (None, "m.io:5000")),
        ("http://127.0.0.1:5000", ("http", "127.0.0.1:5000")),
        ("https://m.io/v2", ("https", "m.io")),
    ],
)
def test_parse_endpoint(endpoint: str, expected: tuple[str | None, str]) -> None:
    assert parse_endpoint(endpoint) == expected


@pytest.mark.parametrize("endpoint", ["ftp://m.io", "m.io/some/path", "", "https://"])
def test_parse_endpoint_rejects(endpoint: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(endpoint)
    with pytest.raises(ValueError):
        Mirror("docker.io", (endpoint,))
