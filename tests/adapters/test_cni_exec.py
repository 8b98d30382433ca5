"""The CNI protocol as CNIExec speaks it, against fake plugins (no root, no netns).

The fakes are small Python scripts in a tmp bin dir that record their
environment and stdin, and answer as the configuration tells them to.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.network.cni import CacheEntry, CNIError, CNIExec
from agent.domain.errors import FailedPrecondition, InvalidArgument
from agent.domain.network.cni import Attachment, builtin_default_config, normalize_config, plugin_stdin, runtime_config
from agent.domain.sandbox import DNSConfig, PortMapping

FAKE_PLUGIN = """#!{python}
import json, os, sys
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
with open(conf["log"], "a") as f:
    f.write(json.dumps({{"type": conf["type"], "cmd": cmd,
                         "env": {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}},
                         "path": os.environ.get("PATH", ""), "stdin": conf}}) + "\\n")
if cmd in conf.get("failOn", []):
    if conf.get("garbage"):
        print("panic: something broke", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({{"cniVersion": conf["cniVersion"], "code": 7, "msg": conf["msg"], "details": "fake"}}))
    sys.exit(1)
if conf.get("sleep") and cmd == "ADD":
    import time
    time.sleep(conf["sleep"])
if cmd == "ADD":
    prev = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "interfaces": [
        {{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": os.environ["CNI_NETNS"]}}],
        "ips": [{{"address": "10.9.0.2/24", "gateway": "10.9.0.1", "interface": 0}}],
        "routes": [{{"dst": "0.0.0.0/0"}}]}}
    prev.setdefault("dns", {{}})
    prev["dns"].setdefault("search", []).append(conf["type"])
    print(json.dumps(prev))
"""


def _plugin(bin_dir: Path, name: str) -> None:
    path = bin_dir / name
    path.write_text(FAKE_PLUGIN.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("fa", "fb", "fc"):
        _plugin(bin_dir, name)
    return {"bin": bin_dir, "cache": tmp_path / "cache", "log": tmp_path / "calls.jsonl",
            "netns": tmp_path / "netns-that-is-no-mount"}


def _conflist(log: Path, *plugins: dict[str, Any], version: str = "1.0.0") -> dict[str, Any]:
    return {"cniVersion": version, "name": "fakenet",
            "plugins": [{"log": str(log), **p} for p in plugins]}


def _calls(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def _attachment(env: dict[str, Path], cid: str = "abc123") -> Attachment:
    return Attachment(container_id=cid, netns=env["netns"], pod_name="web", pod_namespace="default",
                      pod_uid="u-1")


def test_add_runs_plugins_in_order_chaining_prev_result(env: dict[str, Path]) -> None:
    cni = CNIExec([env["bin"]], env["cache"])
    conf = _conflist(env["log"], {"type": "fa"}, {"type": "fb", "capabilities": {"portMappings": True}},
                     {"type": "fc", "capabilities": {"dns": True, "other": True}})
    rc = runtime_config([PortMapping("tcp", 80, 8080), PortMapping("udp", 53, 0)],
                        DNSConfig(servers=("10.96.0.10",)))
    result = cni.add(conf, _attachment(env), rc)

    assert result.dns.search == ("fa", "fb", "fc")
    assert str(result.ips[0].address) == "10.9.0.2/24"
    calls = _calls(env["log"])
    assert [(c["type"], c["cmd"]) for c in calls] == [("fa", "ADD"), ("fb", "ADD"), ("fc", "ADD")]
    first, second, third = (c["stdin"] for c in calls)
    assert "prevResult" not in first
    assert second["prevResult"]["dns"]["search"] == ["fa"]
    assert third["prevResult"]["dns"]["search"] == ["fa", "fb"]
    for s in (first, second, third):
        assert (s["name"], s["cniVersion"]) == ("fakenet", "1.0.0")
    # runtimeConfig only for declared capabilities; the zero host port is dropped.
    assert "runtimeConfig" not in first
    assert second["runtimeConfig"] == {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
    assert third["runtimeConfig"] == {"dns": {"servers": ["10.96.0.10"], "searches": [], "options": []}}
    e = calls[0]["env"]
    assert e == {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": str(env["netns"]),
                 "CNI_IFNAME": "eth0", "CNI_PATH": str(env["bin"]),
                 "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;"
                             "K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1"}
    assert calls[0]["path"] == os.environ.get("PATH", "")  # plugins find iptables & co.

    cached = cni.cached("abc123")
    assert cached is not None and cached.result is not None
    assert cached.result["dns"]["search"] == ["fa", "fb", "fc"]
    assert cached.runtime_config == rc
    assert cni.cached_ids() == ["abc123"]
    assert (env["cache"] / "abc123.json").stat().st_mode & 0o077 == 0


def test_delete_runs_in_reverse_with_the_cached_config_and_result(env: dict[str, Path]) -> None:
    cni = CNIExec([env["bin"]], env["cache"])
    conf = _conflist(env["log"], {"type": "fa"}, {"type": "fb", "capabilities": {"portMappings": True}})
    rc = runtime_config([PortMapping("tcp", 80, 8080)], None)
    cni.add(conf, _attachment(env), rc)
    env["log"].unlink()

    # A new object (an agent restart) only has the cache to go on.
    assert CNIExec([env["bin"]], env["cache"]).delete("abc123") is True
    calls = _calls(env["log"])
    assert [(c["type"], c["cmd"]) for c in calls] == [("fb", "DEL"), ("fa", "DEL")]
    for c in calls:
        assert c["stdin"]["prevResult"]["dns"]["search"] == ["fa", "fb"]
        # The namespace does not exist: DEL runs without it, as the spec allows.
        assert c["env"]["CNI_NETNS"] == ""
    assert calls[0]["stdin"]["runtimeConfig"] == rc
    assert cni.cached("abc123") is None
    # Idempotent: nothing left to delete.
    assert cni.delete("abc123") is False
    assert len(_calls(env["log"])) == 2


def test_failing_plugin_raises_its_message_and_undoes_the_others(env: dict[str, Path]) -> None:
    cni = CNIExec([env["bin"]], env["cache"])
    conf = _conflist(env["log"], {"type": "fa"}, {"type": "fb", "failOn": ["ADD"], "msg": "no luck today"},
                     {"type": "fc"})
    with pytest.raises(CNIError) as info:
        cni.add(conf, _attachment(env), {})
    err = info.value
    assert "no luck today" in err.message and "fb" in err.message
    assert (err.plugin, err.command, err.code, err.details) == ("fb", "ADD", 7, "fake")
    assert err.code_name == "UNAVAILABLE"
    calls = [(c["type"], c["cmd"]) for c in _calls(env["log"])]
    # The undo is a DEL of the whole list, in reverse, as the spec asks after a failed ADD.
    assert calls == [("fa", "ADD"), ("fb", "ADD"), ("fc", "DEL"), ("fb", "DEL"), ("fa", "DEL")]
    assert cni.cached("abc123") is None


def test_undo_failure_keeps_the_cache_for_a_later_delete(env: dict[str, Path]) -> None:
    cni = CNIExec([env["bin"]], env["cache"])
    conf = _conflist(env["log"], {"type": "fa", "failOn": ["DEL"], "msg": "del broke"},
                     {"type": "fb", "failOn": ["ADD"], "msg": "add broke"})
    with pytest.raises(CNIError, match="add broke"):
        cni.add(conf, _attachment(env), {})
    entry = cni.cached("abc123")
    assert entry is not None and entry.result is not None  # fa's result, for its DEL
    with pytest.raises(CNIError, match="del broke"):
        cni.delete("abc123")
    assert cni.cached("abc123") is not None


def test_plugin_crash_without_error_object_reports_stderr(env: dict[str, Path]) -> None:
    cni = CNIExec([env["bin"]], env["cache"])
    conf = _conflist(env["log"], {"type": "fa", "failOn": ["ADD"], "garbage": True, "msg": ""})
    with pytest.raises(CNIError, match="panic: something broke") as info:
        cni.add(conf, _attachment(env), {})
    assert info.value.code == 0


def test_plugin_timeout(env: dict[str, Path]) -> None:
    cni = CNIExec([env["bin"]], env["cache"], timeout=0.5)
    with pytest.raises(CNIError, match="took longer than"):
        cni.add(_conflist(env["log"], {"type": "fa", "sleep": 5}), _attachment(env), {})
    assert cni.cached("abc123") is None


def test_missing_plugin_fails_before_anything_runs(env: dict[str, Path]) -> None:
    cni = CNIExec([env["bin"]], env["cache"])
    with pytest.raises(CNIError, match="CNI plugin nope not found in"):
        cni.add(_conflist(env["log"], {"type": "fa"}, {"type": "nope"}), _attachment(env), {})
    assert _calls(env["log"]) == []
    assert cni.cached("abc123") is None


def test_check_uses_cached_result_in_order(env: dict[str, Path]) -> None:
    cni = CNIExec([env["bin"]], env["cache"])
    cni.add(_conflist(env["log"], {"type": "fa"}, {"type": "fb"}), _attachment(env), {})
    env["log"].unlink()
    cni.check("abc123")
    calls = _calls(env["log"])
    assert [(c["type"], c["cmd"]) for c in calls] == [("fa", "CHECK"), ("fb", "CHECK")]
    assert calls[0]["stdin"]["prevResult"]["dns"]["search"] == ["fa", "fb"]
    with pytest.raises(FailedPrecondition):
        cni.check("other")


def test_check_is_skipped_for_0_3_networks(env: dict[str, Path]) -> None:
    cni = CNIExec([env["bin"]], env["cache"])
    cni.add(_conflist(env["log"], {"type": "fa"}, version="0.3.1"), _attachment(env), {})
    env["log"].unlink()
    cni.check("abc123")
    assert _calls(env["log"]) == []


def test_bin_dirs_are_searched_in_order(env: dict[str, Path], tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.mkdir()
    cni = CNIExec([first, env["bin"]], env["cache"])
    cni.add(_conflist(env["log"], {"type": "fa"}), _attachment(env), {})
    assert _calls(env["log"])[0]["env"]["CNI_PATH"] == f"{first}:{env['bin']}"


def test_unreadable_cache_is_an_error_not_nothing(env: dict[str, Path]) -> None:
    env["cache"].mkdir()
    (env["cache"] / "abc123.json").write_text("{garbage")
    cni = CNIExec([env["bin"]], env["cache"])
    with pytest.raises(Exception, match="unreadable"):
        cni.cached("abc123")
    assert cni.cache_exists("abc123")


def test_unreadable_cache_never_wedges_del(env: dict[str, Path]) -> None:
    """A torn cache entry: DEL runs with the fallback (the configuration in
    use now), the entry is dropped, and a second DEL has nothing to do."""
    env["cache"].mkdir()
    (env["cache"] / "abc123.json").write_text('{"kind": "podvisor.io/cni-ca')
    cni = CNIExec([env["bin"]], env["cache"])
    fallback = CacheEntry(attachment=_attachment(env), config=normalize_config(
        _conflist(env["log"], {"type": "fa"}, {"type": "fb"})), runtime_config={}, result=None)
    assert cni.delete("abc123", fallback=lambda: fallback) is True
    assert [(c["type"], c["cmd"]) for c in _calls(env["log"])] == [("fb", "DEL"), ("fa", "DEL")]
    assert not cni.cache_exists("abc123")
    assert cni.delete("abc123") is False


def test_cache_is_written_durably_with_the_atomic_helper(env: dict[str, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    cni = CNIExec([env["bin"]], env["cache"])
    cni.add(_conflist(env["log"], {"type": "fa"}), _attachment(env), {})
    # Both writes (before ADD, with the result): the file and the directory, each time.
    assert synced.count(str(env["cache"])) == 2
    assert len([p for p in synced if p.startswith(str(env["cache"] / ".abc123.json."))]) == 2
    assert sorted(p.name for p in env["cache"].iterdir()) == ["abc123.json"]
    assert stat.S_IMODE((env["cache"] / "abc123.json").stat().st_mode) == 0o600


@pytest.mark.parametrize("cid", ["", "../x", "a/b", "a;b", "-x"])
def test_container_ids_are_checked(env: dict[str, Path], cid: str) -> None:
    with pytest.raises(InvalidArgument):
        CNIExec([env["bin"]], env["cache"]).add(_conflist(env["log"], {"type": "fa"}),
                                                _attachment(env, cid), {})


def test_pod_names_cannot_break_cni_args(env: dict[str, Path]) -> None:
    att = Attachment(container_id="abc", netns=env["netns"], pod_name="a;K8S_POD_UID=x")
    with pytest.raises(InvalidArgument, match="metadata.name"):
        att.validate()


# Pure helpers ---------------------------------------------------------------------------


def test_normalize_single_plugin_conf() -> None:
    conf = {"cniVersion": "0.4.0", "name": "n", "type": "bridge", "bridge": "br0"}
    assert normalize_config(conf) == {"cniVersion": "0.4.0", "name": "n", "plugins": [conf]}


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}, "no network name"),
        ({"name": "n", "plugins": [{"type": "bridge"}]}, "has no cniVersion"),
        ({"name": "n", "cniVersion": "1.0.0", "plugins": []}, "'plugins' must be a non-empty list"),
        ({"name": "n", "cniVersion": "1.0.0", "plugins": ["bridge"]}, "plugins[0] is not an object"),
        ({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "../../bin/sh"}]}, "no valid 'type'"),
        ({"name": "n", "cniVersion": "1.0.0", "plugins": [{}]}, "no valid 'type'"),
    ],
)
def test_normalize_rejects(doc: dict[str, Any], problem: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        normalize_config(doc)
    assert problem in info.value.message


def test_plugin_stdin_replaces_stale_runtime_config_and_prev_result() -> None:
    conflist = {"name": "n", "cniVersion": "1.0.0"}
    plugin = {"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False},
              "runtimeConfig": {"stale": 1}, "prevResult": {"stale": 1}}
    rc = {"portMappings": [{"hostPort": 1}], "bandwidth": {"x": 1}}
    assert plugin_stdin(conflist, plugin, rc, None) == {
        "type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False}, "name": "n",
        "cniVersion": "1.0.0", "runtimeConfig": {"portMappings": [{"hostPort": 1}]}}
    assert plugin_stdin(conflist, {"type": "x"}, rc, {"cniVersion": "1.0.0"})["prevResult"] == {"cniVersion": "1.0.0"}


def test_runtime_config_port_mappings_and_dns() -> None:
    rc = runtime_config([PortMapping("TCP", 80, 8080, "127.0.0.1"), PortMapping("", 53, 5353)],
                        DNSConfig(("1.1.1.1",), ("a.example",), ("ndots:2",)))
    assert rc == {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"},
                                   {"hostPort": 5353, "containerPort": 53, "protocol": "tcp"}],
                  "dns": {"servers": ["1.1.1.1"], "searches": ["a.example"], "options": ["ndots:2"]}}
    assert runtime_config([], DNSConfig()) == {}


def test_builtin_default_config(tmp_path: Path) -> None:
    conf = builtin_default_config("pv0", "10.88.0.0/16", ipam_data_dir=tmp_path)
    assert normalize_config(conf) == conf
    bridge, portmap = conf["plugins"]
    assert (bridge["type"], bridge["bridge"], bridge["isGateway"], bridge["ipMasq"]) == ("bridge", "pv0", True, True)
    assert bridge["ipam"] == {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]],
                              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(tmp_path)}
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
    assert "dataDir" not in builtin_default_config("pv0", "fd00:88::/64")["plugins"][0]["ipam"]
    assert builtin_default_config("pv0", "fd00:88::/64")["plugins"][0]["ipam"]["routes"] == [{"dst": "::/0"}]


@pytest.mark.parametrize(("bridge", "subnet"), [("a-very-long-bridge", "10.0.0.0/16"), ("pv/0", "10.0.0.0/16"),
                                                ("pv0", "10.0.0.1/16"), ("pv0", "nope")])
def test_builtin_default_config_rejects(bridge: str, subnet: str) -> None:
    with pytest.raises(FailedPrecondition):
        builtin_default_config(bridge, subnet)
