"""CNI network configuration: parsing (pure), and choosing one over the files
found in tmp dirs (the one choice `Status` and ADD share)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.network.cni import find_configs
from agent.domain.network import cni
from agent.domain.network.choice import (
    BUILTIN_SUMMARY,
    CNIFacts,
    ConfigFile,
    NetworkChoice,
    NetworkSettings,
    choose,
)
from agent.domain.network.cni import NetworkConfig, builtin_default_config, parse

BRIDGE_CONFLIST: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "name": "podvisor",
    "plugins": [
        {"type": "bridge", "bridge": "pv0", "ipam": {"type": "host-local"}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# parse() -------------------------------------------------------------------------


def test_parse_conflist() -> None:
    assert parse(_json(BRIDGE_CONFLIST)) == NetworkConfig(
        name="podvisor", cni_version="1.0.0", plugin_types=("bridge", "portmap"))


def test_parse_single_plugin_conf() -> None:
    doc = {"cniVersion": "0.4.0", "name": "mynet", "type": "bridge",
           "ipam": {"type": "host-local"}}
    assert parse(_json(doc)) == NetworkConfig("mynet", "0.4.0", ("bridge",))


def test_parse_without_cni_version() -> None:
    assert parse(_json({"name": "n", "type": "loopback"})).cni_version == ""


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'"a string"', "not a JSON object"),
        (_json({"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}), "missing network name"),
        (_json({"name": "", "plugins": [{"type": "bridge"}]}), "missing network name"),
        (_json({"name": 5, "plugins": [{"type": "bridge"}]}), "missing network name"),
        (_json({"name": "n", "plugins": []}), "'plugins' must be a non-empty list"),
        (_json({"name": "n", "plugins": {"type": "bridge"}}), "'plugins' must be a non-empty list"),
        (_json({"name": "n", "plugins": [{"bridge": "x"}]}), "every plugin needs a 'type'"),
        (_json({"name": "n", "plugins": [{"type": "bridge"}, {"type": ""}]}),
         "every plugin needs a 'type'"),
        (_json({"name": "n", "plugins": [{"type": 3}]}), "every plugin needs a 'type'"),
        (_json({"name": "n", "plugins": ["bridge"]}), "every plugin needs a 'type'"),
        (_json({"name": "n", "cniVersion": "0.4.0"}), "every plugin needs a 'type'"),
    ],
)
def test_parse_bad(raw: bytes, problem: str) -> None:
    with pytest.raises(ValueError) as exc_info:
        parse(raw)
    assert problem in str(exc_info.value)


def test_config_suffixes_match_libcni() -> None:
    assert set(cni.CONFIG_SUFFIXES) == {".conflist", ".conf", ".json"}


# choose() over find_configs() --------------------------------------------------------

BUILTIN = "; using the built-in network (bridge podvisor0, subnet 10.85.0.0/16)"


def find_config(conf_dirs: tuple[Path, ...], bin_dirs: tuple[Path, ...]) -> NetworkChoice:
    """What Status and ADD get for these directories."""
    settings = NetworkSettings(True, conf_dirs, bin_dirs, "podvisor0", "10.85.0.0/16")
    return choose(settings, find_configs(conf_dirs, bin_dirs))


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    for plugin in ("bridge", "host-local", "portmap", "loopback"):
        (d / plugin).write_text("#!/bin/sh\n")
        (d / plugin).chmod(0o755)
    return d


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "net.d"
    d.mkdir()
    return d


def _net(name: str, *types: str) -> bytes:
    return _json({"cniVersion": "1.0.0", "name": name,
                  "plugins": [{"type": t} for t in types or ("bridge",)]})


def test_first_file_in_lexical_order_wins(conf_dir: Path, bin_dir: Path) -> None:
    (conf_dir / "20-second.conflist").write_bytes(_net("second"))
    (conf_dir / "10-first.conflist").write_bytes(_net("first"))
    (conf_dir / "99-last.conf").write_bytes(_json({"name": "last", "type": "bridge"}))
    found = find_config((conf_dir,), (bin_dir,))
    assert found.path == conf_dir / "10-first.conflist"
    assert found.config == NetworkConfig("first", "1.0.0", ("bridge",))
    assert found.message == f"using {conf_dir / '10-first.conflist'} (network first)"


def test_conf_and_json_suffixes_are_read(conf_dir: Path, bin_dir: Path) -> None:
    (conf_dir / "50-net.json").write_bytes(_json({"name": "j", "type": "bridge"}))
    assert find_config((conf_dir,), (bin_dir,)).path == conf_dir / "50-net.json"


def test_other_files_are_ignored(conf_dir: Path, bin_dir: Path) -> None:
    (conf_dir / "00-readme.md").write_text("not a config")
    (conf_dir / "01-backup.conflist.bak").write_text("{")
    (conf_dir / "05-net").write_bytes(_net("nosuffix"))
    (conf_dir / "30-real.conf").write_bytes(_json({"name": "real", "type": "bridge"}))
    found = find_config((conf_dir,), (bin_dir,))
    assert found.path == conf_dir / "30-real.conf"
    assert "skipped" not in found.message


def test_invalid_files_are_skipped(conf_dir: Path, bin_dir: Path) -> None:
    (conf_dir / "00-broken.conflist").write_text("{ not json")
    (conf_dir / "05-noname.conflist").write_bytes(_json({"plugins": [{"type": "bridge"}]}))
    (conf_dir / "10-good.conflist").write_bytes(_net("good", "bridge", "portmap"))
    found = find_config((conf_dir,), (bin_dir,))
    assert found.path == conf_dir / "10-good.conflist"
    assert found.config is not None and found.config.name == "good"


def test_missing_plugin_binaries_are_skipped_with_a_message(conf_dir: Path, bin_dir: Path) -> None:
    (conf_dir / "05-calico.conflist").write_bytes(_net("k8s-pod-network", "calico", "portmap",
                                                       "bandwidth"))
    (conf_dir / "10-bridge.conflist").write_bytes(_net("podvisor", "bridge", "portmap"))
    found = find_config((conf_dir,), (bin_dir,))
    assert found.path == conf_dir / "10-bridge.conflist"

    (conf_dir / "10-bridge.conflist").unlink()
    missing = find_config((conf_dir,), (bin_dir,))
    assert missing.path is None
    assert missing.config == BUILTIN_SUMMARY and missing.source == "builtin"
    assert missing.message == (
        f"no valid CNI network configuration in {conf_dir}; skipped "
        f"{conf_dir / '05-calico.conflist'}: plugin binaries not found: calico, bandwidth{BUILTIN}"
    )


def test_a_directory_named_like_a_plugin_is_not_a_binary(conf_dir: Path, bin_dir: Path) -> None:
    (bin_dir / "macvlan").mkdir()
    (conf_dir / "10-macvlan.conflist").write_bytes(_net("mv", "macvlan"))
    found = find_config((conf_dir,), (bin_dir,))
    assert found.path is None
    assert "plugin binaries not found: macvlan" in found.message


def test_plugins_may_come_from_several_bin_dirs(conf_dir: Path, bin_dir: Path,
                                                tmp_path: Path) -> None:
    extra = tmp_path / "extra-bin"
    extra.mkdir()
    (extra / "tuning").write_text("#!/bin/sh\n")
    (conf_dir / "10-net.conflist").write_bytes(_net("net", "bridge", "tuning"))
    assert find_config((conf_dir,), (bin_dir,)).path is None
    assert find_config((conf_dir,), (tmp_path / "absent", bin_dir, extra)).path == (
        conf_dir / "10-net.conflist")


def test_all_skipped_reasons_are_listed(conf_dir: Path, bin_dir: Path) -> None:
    (conf_dir / "00-broken.conflist").write_text("{")
    (conf_dir / "10-empty.conflist").write_bytes(_json({"name": "e", "plugins": []}))
    (conf_dir / "20-missing.conf").write_bytes(_json({"name": "m", "type": "weird"}))
    found = find_config((conf_dir,), (bin_dir,))
    assert found.path is None
    assert found.message.startswith(f"no valid CNI network configuration in {conf_dir}; skipped ")
    assert f"{conf_dir / '00-broken.conflist'}: not JSON" in found.message
    assert f"{conf_dir / '10-empty.conflist'}: 'plugins' must be a non-empty list" in found.message
    assert f"{conf_dir / '20-missing.conf'}: plugin binaries not found: weird" in found.message
    # In the order they were tried.
    assert (found.message.index("00-broken") < found.message.index("10-empty")
            < found.message.index("20-missing"))


def test_unreadable_entry_is_skipped(conf_dir: Path, bin_dir: Path) -> None:
    (conf_dir / "00-dir.conflist").mkdir()  # reading it fails with an OSError
    (conf_dir / "10-ok.conflist").write_bytes(_net("ok"))
    assert find_config((conf_dir,), (bin_dir,)).path == conf_dir / "10-ok.conflist"


def test_empty_dir_message(conf_dir: Path, bin_dir: Path) -> None:
    found = find_config((conf_dir,), (bin_dir,))
    assert found.path is None
    assert found.config == BUILTIN_SUMMARY
    assert found.message == f"no valid CNI network configuration in {conf_dir}{BUILTIN}"


def test_missing_dir_is_like_an_empty_one(tmp_path: Path, bin_dir: Path) -> None:
    absent = tmp_path / "no-such-dir"
    found = find_config((absent,), (bin_dir,))
    assert found.path is None
    assert found.message == f"no valid CNI network configuration in {absent}{BUILTIN}"


def test_conf_dirs_are_searched_in_order(tmp_path: Path, bin_dir: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "99-z.conflist").write_bytes(_net("from-first"))
    (second / "00-a.conflist").write_bytes(_net("from-second"))
    found = find_config((first, second), (bin_dir,))
    assert found.config is not None and found.config.name == "from-first"


def test_later_conf_dir_used_when_the_first_has_nothing_valid(tmp_path: Path,
                                                             bin_dir: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "10-bad.conflist").write_text("[]")
    (second / "10-good.conflist").write_bytes(_net("good"))
    found = find_config((tmp_path / "absent", first, second), (bin_dir,))
    assert found.path == second / "10-good.conflist"


def test_message_names_every_conf_dir(tmp_path: Path, bin_dir: Path) -> None:
    dirs = (tmp_path / "a", tmp_path / "b")
    assert find_config(dirs, (bin_dir,)).message == (
        f"no valid CNI network configuration in {dirs[0]}, {dirs[1]}{BUILTIN}")


def test_the_chosen_file_is_what_add_runs(conf_dir: Path, bin_dir: Path) -> None:
    doc = {"cniVersion": "0.4.0", "name": "single", "type": "bridge", "bridge": "x0"}
    (conf_dir / "10-single.conf").write_bytes(_json(doc))
    found = find_config((conf_dir,), (bin_dir,))
    assert (found.conflist, found.source) == (doc, str(conf_dir / "10-single.conf"))


def test_without_a_file_add_runs_the_builtin_network(conf_dir: Path, bin_dir: Path) -> None:
    settings = NetworkSettings(True, (conf_dir,), (bin_dir,), "pvb0", "10.9.0.0/24", ipam_data_dir=Path("/ipam"))
    found = choose(settings, find_configs((conf_dir,), (bin_dir,)))
    assert found.conflist == builtin_default_config("pvb0", "10.9.0.0/24", ipam_data_dir=Path("/ipam"))
    assert found.source == "builtin" and found.path is None
    assert found.message == (f"no valid CNI network configuration in {conf_dir}; "
                             "using the built-in network (bridge pvb0, subnet 10.9.0.0/24)")


def test_disabled_networking_looks_at_nothing() -> None:
    settings = NetworkSettings(False, (Path("/nowhere"),), (), "podvisor0", "10.85.0.0/16")
    for facts in (None, CNIFacts((ConfigFile(Path("/nowhere/10-x.conflist"), _net("x")),), frozenset({"bridge"}))):
        found = choose(settings, facts)
        assert found.message == "pod networking is disabled ([cni] enabled = false): VMs get no NIC"
        assert (found.config, found.path, found.conflist, found.source) == (
            NetworkConfig("none", "", ()), None, None, "disabled")


def test_an_unreadable_file_is_skipped_with_its_error() -> None:
    facts = CNIFacts((ConfigFile(Path("/d/00-a.conflist"), None, "[Errno 13] Permission denied"),
                      ConfigFile(Path("/d/10-b.conflist"), _net("b"))), frozenset({"bridge"}))
    found = choose(NetworkSettings(True, (Path("/d"),), (), "podvisor0", "10.85.0.0/16"), facts)
    assert found.path == Path("/d/10-b.conflist")
    facts = CNIFacts(facts.files[:1], frozenset())
    assert choose(NetworkSettings(True, (Path("/d"),), (), "podvisor0", "10.85.0.0/16"), facts).message == (
        f"no valid CNI network configuration in /d; skipped /d/00-a.conflist: [Errno 13] Permission denied{BUILTIN}")
