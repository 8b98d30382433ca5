"""Tests for agent.config: defaults, TOML loading, validation, flag overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.config import AgentConfig, ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def _load_text(tmp_path: Path, text: str) -> AgentConfig:
    return config.load(_write(tmp_path, text))


# Defaults -----------------------------------------------------------------


def test_no_file_gives_builtin_defaults() -> None:
    cfg = config.load(None)
    assert cfg == AgentConfig()
    assert cfg.state_dir == Path("/var/lib/podvisor")
    assert cfg.server.socket == Path("/run/podvisor/podvisor.sock")
    assert cfg.server.socket_group == ""
    assert cfg.server.workers == 64
    assert cfg.server.rpc_limit == 64
    assert (cfg.server.max_event_streams, cfg.server.max_concurrent_stops) == (16, 16)
    assert cfg.server.max_stop_timeout_seconds == 300
    assert cfg.server.shutdown_grace_seconds == 10.0
    assert cfg.libvirt.uri == "qemu:///system"
    assert cfg.libvirt.virt_type == "auto"
    assert cfg.libvirt.reconnect_interval_seconds == 2.0
    assert cfg.cni.conf_dirs == (Path("/etc/cni/net.d"),)
    assert cfg.cni.bin_dirs == (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
    assert cfg.log.format == "auto"
    assert cfg.log.level == "info"


def test_defaults_pass_validation() -> None:
    config.validate(AgentConfig())


def test_derived_paths_follow_state_dir() -> None:
    cfg = config.from_mapping({"state_dir": "/srv/pv"})
    assert cfg.db_path == Path("/srv/pv/podvisor.db")
    assert cfg.sandboxes_dir == Path("/srv/pv/sandboxes")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert _load_text(tmp_path, "") == AgentConfig()


# Loading ------------------------------------------------------------------


def test_full_file_is_loaded(tmp_path: Path) -> None:
    cfg = _load_text(
        tmp_path,
        """
state_dir = "/srv/podvisor"

[server]
socket = "/run/pv/agent.sock"
socket_group = "root"
workers = 20
max_concurrent_rpcs = 18
max_event_streams = 4
max_concurrent_stops = 6
max_stop_timeout_seconds = 60
shutdown_grace_seconds = 3

[libvirt]
uri = "qemu+tcp://host/system"
virt_type = "qemu"
reconnect_interval_seconds = 0.5

[cni]
conf_dirs = ["/etc/cni/net.d", "/opt/cni/conf"]
bin_dirs = ["/opt/cni/bin"]

[log]
format = "json"
level = "debug"
""",
    )
    assert cfg.state_dir == Path("/srv/podvisor")
    assert cfg.server.socket == Path("/run/pv/agent.sock")
    assert cfg.server.socket_group == "root"
    assert cfg.server.workers == 20
    assert cfg.server.rpc_limit == 18
    assert (cfg.server.max_event_streams, cfg.server.max_concurrent_stops) == (4, 6)
    assert cfg.server.max_stop_timeout_seconds == 60
    # An integer where a number of seconds is expected becomes a float.
    assert cfg.server.shutdown_grace_seconds == 3.0
    assert isinstance(cfg.server.shutdown_grace_seconds, float)
    assert cfg.libvirt.uri == "qemu+tcp://host/system"
    assert cfg.libvirt.virt_type == "qemu"
    assert cfg.libvirt.reconnect_interval_seconds == 0.5
    assert cfg.cni.conf_dirs == (Path("/etc/cni/net.d"), Path("/opt/cni/conf"))
    assert cfg.cni.bin_dirs == (Path("/opt/cni/bin"),)
    assert cfg.log.format == "json"
    assert cfg.log.level == "debug"
    assert cfg.db_path == Path("/srv/podvisor/podvisor.db")


def test_partial_section_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = _load_text(tmp_path, '[libvirt]\nvirt_type = "kvm"\n')
    assert cfg.libvirt.virt_type == "kvm"
    assert cfg.libvirt.uri == "qemu:///system"
    assert cfg.server == AgentConfig().server
    assert cfg.state_dir == AgentConfig().state_dir


@pytest.mark.parametrize("virt_type", ["auto", "kvm", "qemu"])
def test_every_virt_type_is_accepted(tmp_path: Path, virt_type: str) -> None:
    assert _load_text(tmp_path, f'[libvirt]\nvirt_type = "{virt_type}"\n').libvirt.virt_type == (
        virt_type
    )


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        # Unknown keys and sections.
        ("foo = 1\n", "foo"),
        ("[bogus]\nx = 1\n", "bogus"),
        ('[server]\nsockett = "/run/x.sock"\n', "[server] sockett"),
        ('[libvirt]\nvirt = "kvm"\n', "[libvirt] virt"),
        ('[cni]\nconf_dir = ["/etc/cni/net.d"]\n', "[cni] conf_dir"),
        ('[log]\nlevels = "info"\n', "[log] levels"),
        # A section that is not a table.
        ("server = 1\n", "[server]"),
        ('log = "json"\n', "[log]"),
        # state_dir
        ('state_dir = "var/lib/podvisor"\n', "state_dir"),
        ('state_dir = ""\n', "state_dir"),
        ("state_dir = 5\n", "state_dir"),
        ('state_dir = ["/var/lib/podvisor"]\n', "state_dir"),
        # [server]
        ('[server]\nsocket = "podvisor.sock"\n', "[server] socket"),
        ("[server]\nsocket = 1\n", "[server] socket"),
        ('[server]\nsocket = ""\n', "[server] socket"),
        ("[server]\nsocket_group = 5\n", "[server] socket_group"),
        ('[server]\nsocket_group = "no-such-group-podvisor"\n', "[server] socket_group"),
        ("[server]\nworkers = 0\n", "[server] workers"),
        ("[server]\nworkers = -4\n", "[server] workers"),
        ("[server]\nworkers = 1.5\n", "[server] workers"),
        ('[server]\nworkers = "8"\n', "[server] workers"),
        ("[server]\nworkers = true\n", "[server] workers"),
        ("[server]\nshutdown_grace_seconds = -1\n", "[server] shutdown_grace_seconds"),
        # Streams and stops must leave threads for every other call (#10 item 12).
        ("[server]\nworkers = 39\n", "[server] workers"),
        ("[server]\nmax_event_streams = 50\n", "[server] workers"),
        ("[server]\nmax_concurrent_rpcs = 39\n", "[server] max_concurrent_rpcs"),
        ("[server]\nmax_concurrent_rpcs = 65\n", "[server] max_concurrent_rpcs"),
        ("[server]\nmax_event_streams = 0\n", "[server] max_event_streams"),
        ("[server]\nmax_concurrent_stops = -1\n", "[server] max_concurrent_stops"),
        ("[server]\nmax_stop_timeout_seconds = 0\n", "[server] max_stop_timeout_seconds"),
        ("[server]\nmax_stop_timeout_seconds = 1.5\n", "[server] max_stop_timeout_seconds"),
        ('[server]\nshutdown_grace_seconds = "10s"\n', "[server] shutdown_grace_seconds"),
        ("[server]\nshutdown_grace_seconds = true\n", "[server] shutdown_grace_seconds"),
        # [libvirt]
        ("[libvirt]\nuri = 1\n", "[libvirt] uri"),
        ('[libvirt]\nvirt_type = "xen"\n', "[libvirt] virt_type"),
        ('[libvirt]\nvirt_type = "KVM"\n', "[libvirt] virt_type"),
        ("[libvirt]\nreconnect_interval_seconds = -0.5\n", "[libvirt] reconnect_interval_seconds"),
        # [cni]
        ("[cni]\nconf_dirs = []\n", "[cni] conf_dirs"),
        ('[cni]\nconf_dirs = "/etc/cni/net.d"\n', "[cni] conf_dirs"),
        ('[cni]\nconf_dirs = ["etc/cni"]\n', "[cni] conf_dirs[0]"),
        ('[cni]\nbin_dirs = ["/opt/cni/bin", 3]\n', "[cni] bin_dirs[1]"),
        ('[cni]\nbin_dirs = ["/opt/cni/bin", ""]\n', "[cni] bin_dirs[1]"),
        # [log]
        ('[log]\nformat = "xml"\n', "[log] format"),
        ('[log]\nlevel = "trace"\n', "[log] level"),
        ("[log]\nlevel = 10\n", "[log] level"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc_info:
        _load_text(tmp_path, toml)
    message = str(exc_info.value)
    assert message.startswith(f"{key}:"), message


def test_unknown_key_lists_known_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc_info:
        _load_text(tmp_path, '[server]\nsockett = "/x.sock"\n')
    message = str(exc_info.value)
    for known in ("socket", "socket_group", "workers", "shutdown_grace_seconds"):
        assert known in message


def test_unknown_section_lists_known_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc_info:
        _load_text(tmp_path, "[network]\nx = 1\n")
    message = str(exc_info.value)
    assert message.startswith("network:")
    for known in ("state_dir", "server", "libvirt", "cni", "log"):
        assert known in message


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server\nsocket = \n")
    with pytest.raises(ConfigError) as exc_info:
        config.load(path)
    assert str(path) in str(exc_info.value)
    assert "not valid TOML" in str(exc_info.value)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'state_dir = "/var/\xff"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as exc_info:
        config.load(path)
    assert str(exc_info.value).startswith(f"cannot read config file {path}")


# Socket path length ---------------------------------------------------------


def test_socket_path_at_the_unix_limit_is_accepted() -> None:
    path = "/" + "a" * 106  # 107 bytes: sun_path holds 108 with the NUL
    cfg = config.from_mapping({"server": {"socket": path}})
    assert str(cfg.server.socket) == path


def test_socket_path_too_long_is_refused() -> None:
    path = "/" + "a" * 107
    with pytest.raises(ConfigError) as exc_info:
        config.from_mapping({"server": {"socket": path}})
    assert str(exc_info.value).startswith("[server] socket:")
    assert "longer" in str(exc_info.value)


def test_socket_path_length_counts_bytes_not_characters() -> None:
    path = "/" + "é" * 60  # 61 characters, 121 bytes
    with pytest.raises(ConfigError, match=r"^\[server\] socket:"):
        config.from_mapping({"server": {"socket": path}})


# Flags ----------------------------------------------------------------------


def test_override_flags_win_over_the_file(tmp_path: Path) -> None:
    cfg = _load_text(
        tmp_path,
        'state_dir = "/srv/file"\n[server]\nsocket = "/run/file.sock"\n'
        '[log]\nformat = "json"\nlevel = "warning"\n',
    )
    out = config.override(
        cfg,
        socket=Path("/run/flag.sock"),
        state_dir=Path("/srv/flag"),
        log_format="console",
        log_level="debug",
    )
    assert out.server.socket == Path("/run/flag.sock")
    assert out.state_dir == Path("/srv/flag")
    assert out.log.format == "console"
    assert out.log.level == "debug"
    # Settings without a flag keep the file's value.
    assert out.server.workers == cfg.server.workers


def test_override_without_flags_changes_nothing() -> None:
    cfg = config.from_mapping({"log": {"format": "json", "level": "error"}})
    assert config.override(cfg) == cfg


def test_override_of_one_log_field_keeps_the_other() -> None:
    cfg = config.from_mapping({"log": {"format": "json", "level": "error"}})
    assert config.override(cfg, log_level="debug").log == config.LogConfig("json", "debug")
    assert config.override(cfg, log_format="console").log == config.LogConfig("console", "error")


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        ({"socket": Path("relative.sock")}, "[server] socket"),
        ({"state_dir": Path("var/lib/podvisor")}, "state_dir"),
        ({"socket": Path("/" + "s" * 200)}, "[server] socket"),
        ({"log_format": "xml"}, "[log] format"),
        ({"log_level": "verbose"}, "[log] level"),
    ],
)
def test_bad_override_flags_name_the_key(flags: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as exc_info:
        config.override(AgentConfig(), **flags)  # type: ignore[arg-type]
    assert str(exc_info.value).startswith(f"{key}:"), str(exc_info.value)


def test_rpc_budgets_at_their_smallest_legal_sizes(tmp_path: Path) -> None:
    # 16 streams + 16 stops + 8 free calls: the least that keeps quick calls answered.
    cfg = _load_text(tmp_path, "[server]\nworkers = 40\n")
    assert cfg.server.rpc_limit == 40
    cfg = _load_text(tmp_path, "[server]\nworkers = 12\nmax_event_streams = 2\nmax_concurrent_stops = 2\n")
    assert cfg.server.rpc_limit == 12
