"""agent.config: the [images] section, [registries.hosts."<name>"] tables and
[[registries.rewrite]] rules, loaded from real TOML text."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from agent import config
from agent.config import AgentConfig, ConfigError, ImagesConfig, RegistriesConfig, RegistryHost, Rewrite

FULL = """
[images]
max_virtual_size_bytes = 21474836480
pull_parallelism = 2
registry_timeout_seconds = 12.5
registry_min_bytes_per_second = 1048576

[registries.hosts."docker.io"]
mirrors = ["mirror.example:5000", "https://mirror2.example", "http://127.0.0.1:5001"]

[registries.hosts."127.0.0.1:5000"]
insecure = true

[registries.hosts."registry.example"]
ca_file = "/etc/podvisor/registry-ca.pem"
username = "puller"
password = "s3cret"

[[registries.rewrite]]
prefix = "docker.io/kubevirt/"
replacement = "127.0.0.1:5000/kubevirt/"

[[registries.rewrite]]
prefix = "quay.io/containerdisks"
replacement = "registry.example/mirror/containerdisks"
"""

EXPECTED_IMAGES = ImagesConfig(max_virtual_size_bytes=20 << 30, pull_parallelism=2, registry_timeout_seconds=12.5,
                               registry_min_bytes_per_second=1 << 20)
EXPECTED_REGISTRIES = RegistriesConfig(
    hosts=(
        ("docker.io", RegistryHost(mirrors=("mirror.example:5000", "https://mirror2.example",
                                            "http://127.0.0.1:5001"))),
        ("127.0.0.1:5000", RegistryHost(insecure=True)),
        ("registry.example", RegistryHost(ca_file="/etc/podvisor/registry-ca.pem", username="puller",
                                          password="s3cret")),
    ),
    rewrites=(
        Rewrite("docker.io/kubevirt/", "127.0.0.1:5000/kubevirt/"),
        Rewrite("quay.io/containerdisks", "registry.example/mirror/containerdisks"),
    ),
)


def load(tmp_path: Path, text: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return config.load(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return str(caught.value)


def as_mapping(cfg: AgentConfig) -> dict[str, Any]:
    """The TOML-shaped mapping that describes ``cfg``'s images and registries."""
    return {
        "images": dataclasses.asdict(cfg.images),
        "registries": {
            "hosts": {name: {**dataclasses.asdict(host), "mirrors": list(host.mirrors)}
                      for name, host in cfg.registries.hosts},
            "rewrite": [dataclasses.asdict(rule) for rule in cfg.registries.rewrites],
        },
    }


# Valid configurations ------------------------------------------------------------


def test_full_images_and_registries_config(tmp_path: Path) -> None:
    cfg = load(tmp_path, FULL)
    assert cfg.images == EXPECTED_IMAGES
    assert cfg.registries == EXPECTED_REGISTRIES
    assert cfg == dataclasses.replace(AgentConfig(), images=EXPECTED_IMAGES, registries=EXPECTED_REGISTRIES)


def test_round_trip_through_a_mapping(tmp_path: Path) -> None:
    cfg = load(tmp_path, FULL)
    assert config.from_mapping(as_mapping(cfg)) == cfg
    assert config.from_mapping(as_mapping(AgentConfig())) == AgentConfig()


def test_defaults() -> None:
    cfg = AgentConfig()
    assert cfg.images == ImagesConfig(max_virtual_size_bytes=1 << 40, pull_parallelism=4,
                                      registry_timeout_seconds=60.0, registry_min_bytes_per_second=65536)
    assert cfg.registries == RegistriesConfig(hosts=(), rewrites=())
    assert cfg.images_dir == Path("/var/lib/podvisor/images")


def test_empty_sections_give_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, "[images]\n[registries]\n[registries.hosts]\n")
    assert cfg == AgentConfig()


def test_host_table_with_defaults_only(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[registries.hosts."quay.io"]\n')
    assert cfg.registries.hosts == (("quay.io", RegistryHost()),)


def test_empty_mirror_list_is_allowed(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[registries.hosts."docker.io"]\nmirrors = []\n')
    assert cfg.registries.hosts == (("docker.io", RegistryHost(mirrors=())),)


def test_integer_timeout_becomes_float(tmp_path: Path) -> None:
    cfg = load(tmp_path, "[images]\nregistry_timeout_seconds = 5\n")
    assert cfg.images.registry_timeout_seconds == 5.0
    assert isinstance(cfg.images.registry_timeout_seconds, float)


def test_images_dir_follows_state_dir(tmp_path: Path) -> None:
    assert load(tmp_path, 'state_dir = "/srv/pv"\n').images_dir == Path("/srv/pv/images")


# Unknown keys -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[images]\nmax_size = 1\n",
         "[images] max_size: unknown setting (known: max_pull_bytes, max_virtual_size_bytes, "
         "min_free_bytes, pull_parallelism, registry_min_bytes_per_second, registry_timeout_seconds)"),
        ("[registries]\nmirrors = []\n", "[registries] mirrors: unknown setting (known: hosts, rewrite)"),
        ("[registries.host.\"docker.io\"]\n", "[registries] host: unknown setting (known: hosts, rewrite)"),
        ("[[registries.rewrites]]\nprefix = \"a.io/x\"\nreplacement = \"b.io/x\"\n",
         "[registries] rewrites: unknown setting (known: hosts, rewrite)"),
        ('[registries.hosts."docker.io"]\nmirror = ["m.example"]\n',
         '[registries.hosts."docker.io"] mirror: unknown setting '
         "(known: ca_file, insecure, mirrors, password, username)"),
        ('[registries.hosts."docker.io"]\ntls_verify = false\n',
         '[registries.hosts."docker.io"] tls_verify: unknown setting '
         "(known: ca_file, insecure, mirrors, password, username)"),
        ("[registry]\n",
         "registry: unknown setting "
         "(known: state_dir, runtime_dir, registries, cni, exec, images, libvirt, log, metrics, mtls, server, "
         "streaming, vm)"),
    ],
)
def test_unknown_keys_are_errors(tmp_path: Path, text: str, message: str) -> None:
    assert error(tmp_path, text) == message


# Bad values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[images]\npull_parallelism = 0\n", "[images] pull_parallelism: expected a positive integer"),
        ("[images]\npull_parallelism = -1\n", "[images] pull_parallelism: expected a positive integer"),
        ("[images]\npull_parallelism = true\n", "[images] pull_parallelism: expected a positive integer"),
        ("[images]\npull_parallelism = \"4\"\n", "[images] pull_parallelism: expected a positive integer"),
        ("[images]\npull_parallelism = 2.0\n", "[images] pull_parallelism: expected a positive integer"),
        ("[images]\nmax_virtual_size_bytes = 0\n", "[images] max_virtual_size_bytes: expected a positive integer"),
        ("[images]\nmax_virtual_size_bytes = \"1T\"\n",
         "[images] max_virtual_size_bytes: expected a positive integer"),
        ("[images]\nregistry_timeout_seconds = -1\n",
         "[images] registry_timeout_seconds: expected a non-negative number"),
        ("[images]\nregistry_timeout_seconds = \"60s\"\n",
         "[images] registry_timeout_seconds: expected a non-negative number"),
        ("images = 1\n", "[images]: expected a table"),
        ("registries = 1\n", "[registries]: expected a table"),
        ("[registries]\nhosts = 1\n", "[registries.hosts]: expected a table of registries"),
        ("[registries]\nhosts = [\"docker.io\"]\n", "[registries.hosts]: expected a table of registries"),
        ("[registries.hosts]\n\"docker.io\" = 1\n", '[registries.hosts."docker.io"]: expected a table'),
        ('[registries.hosts."x.io"]\ninsecure = "yes"\n', '[registries.hosts."x.io"] insecure: expected true or false'),
        ('[registries.hosts."x.io"]\nusername = 1\n', '[registries.hosts."x.io"] username: expected a string'),
        ('[registries.hosts."x.io"]\nca_file = "certs/ca.pem"\n',
         '[registries.hosts."x.io"] ca_file: must be an absolute path'),
    ],
)
def test_bad_values_are_errors(tmp_path: Path, text: str, message: str) -> None:
    assert error(tmp_path, text) == message


@pytest.mark.parametrize(
    "mirrors",
    ['"mirror.example"', "1", "true", '{ url = "m.example" }', '[1]', '[""]', '["m.example", 2]',
     '[["m.example"]]'],
)
def test_mirrors_not_a_list_of_endpoints(tmp_path: Path, mirrors: str) -> None:
    assert error(tmp_path, f'[registries.hosts."docker.io"]\nmirrors = {mirrors}\n') == (
        '[registries.hosts."docker.io"] mirrors: expected a list of endpoints'
    )


@pytest.mark.parametrize("endpoint", ["ftp://m.example", "https://", "m.example/path", "m example"])
def test_malformed_mirror_endpoint(tmp_path: Path, endpoint: str) -> None:
    message = error(tmp_path, f'[registries.hosts."docker.io"]\nmirrors = ["{endpoint}"]\n')
    assert message.startswith('[registries.hosts."docker.io"] mirrors: ')
    assert endpoint in message


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ('[[registries.rewrite]]\nprefix = "docker.io/kubevirt/"\n',
         "[registries.rewrite[0]]: needs exactly the keys prefix and replacement"),
        ('[[registries.rewrite]]\nreplacement = "127.0.0.1:5000/x/"\n',
         "[registries.rewrite[0]]: needs exactly the keys prefix and replacement"),
        ('[[registries.rewrite]]\nprefix = "a.io/x"\nreplacement = "b.io/x"\nmirror = true\n',
         "[registries.rewrite[0]]: needs exactly the keys prefix and replacement"),
        ('[[registries.rewrite]]\nprefix = "a.io/x"\nreplacement = "b.io/x"\n'
         '[[registries.rewrite]]\nprefix = "c.io/x"\n',
         "[registries.rewrite[1]]: needs exactly the keys prefix and replacement"),
        ('[[registries.rewrite]]\nprefix = ""\nreplacement = "b.io/x"\n',
         "[registries.rewrite[0]]: prefix and replacement must be non-empty strings"),
        ('[[registries.rewrite]]\nprefix = "a.io/x"\nreplacement = 5\n',
         "[registries.rewrite[0]]: prefix and replacement must be non-empty strings"),
        ('[registries.rewrite]\nprefix = "a.io/x"\nreplacement = "b.io/x"\n',
         "[[registries.rewrite]]: expected an array of tables"),
        ('[registries]\nrewrite = "a.io/x=b.io/x"\n', "[[registries.rewrite]]: expected an array of tables"),
        ('[registries]\nrewrite = ["a.io/x"]\n',
         "[registries.rewrite[0]]: needs exactly the keys prefix and replacement"),
    ],
)
def test_bad_rewrite_tables(tmp_path: Path, rules: str, message: str) -> None:
    assert error(tmp_path, rules) == message


@pytest.mark.parametrize(
    ("prefix", "replacement", "label", "bad"),
    [
        ("https://docker.io/kubevirt/", "127.0.0.1:5000/kubevirt/", "prefix", "https://docker.io/kubevirt/"),
        ("docker.io/kubevirt/", "127.0.0.1:5000/x@sha256:" + "a" * 64, "replacement",
         "127.0.0.1:5000/x@sha256:" + "a" * 64),
        (" docker.io/kubevirt/", "127.0.0.1:5000/kubevirt/", "prefix", " docker.io/kubevirt/"),
        ("/kubevirt/", "127.0.0.1:5000/kubevirt/", "prefix", "/kubevirt/"),
    ],
)
def test_rewrite_rule_that_is_not_host_path(tmp_path: Path, prefix: str, replacement: str, label: str,
                                            bad: str) -> None:
    message = error(tmp_path, f'[[registries.rewrite]]\nprefix = "{prefix}"\nreplacement = "{replacement}"\n')
    assert message.startswith(f"[[registries.rewrite]] #0: registry rewrite {label} {bad!r} ")


@pytest.mark.parametrize("value", ["0", "0.0"])
def test_zero_registry_timeout_is_refused(tmp_path: Path, value: str) -> None:
    assert error(tmp_path, f"[images]\nregistry_timeout_seconds = {value}\n") == (
        "[images] registry_timeout_seconds: must be greater than 0"
    )


@pytest.mark.parametrize("value", ["0", "-1"])
def test_zero_registry_min_rate_is_refused(tmp_path: Path, value: str) -> None:
    assert error(tmp_path, f"[images]\nregistry_min_bytes_per_second = {value}\n") == (
        "[images] registry_min_bytes_per_second: expected a positive integer"
    )


def test_registry_password_is_not_in_the_config_repr() -> None:
    host = RegistryHost(username="puller", password="s3cret-pw")
    assert "s3cret-pw" not in repr(host) and "puller" in repr(host)
    assert "s3cret-pw" not in repr(AgentConfig(registries=RegistriesConfig(hosts=(("r.example", host),))))
