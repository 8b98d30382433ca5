"""Agent settings: dataclasses with built-in defaults, loaded from TOML.

Every setting has a default, so the agent runs with no file at all (`make run`).
A file only names what differs. Unknown sections or keys are an error at start,
because a misspelt key silently ignored is a production incident later.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.domain import imageref
from agent.domain.tls_identity import parse_allow_entry, split_listen
from agent.domain.vmrequest import VMDefaults

DEFAULT_SOCKET = Path("/run/podvisor/podvisor.sock")
DEFAULT_STATE_DIR = Path("/var/lib/podvisor")
DEFAULT_RUNTIME_DIR = Path("/run/podvisor")
VIRT_TYPES = ("auto", "kvm", "qemu")
LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """The configuration file or a flag is invalid; the message names the key."""


@dataclass(frozen=True)
class ServerConfig:
    socket: Path = DEFAULT_SOCKET
    # Group that owns the socket (mode 0660); empty keeps root's group.
    socket_group: str = ""
    # Threads serving calls; every call the server accepts gets one at once.
    workers: int = 64
    # Calls in progress at most (0: as many as workers); beyond, RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 0
    # GetContainerEvents streams open at most (each holds a thread); beyond, RESOURCE_EXHAUSTED.
    max_event_streams: int = 16
    # StopContainer calls in progress at most (each may wait for a guest); beyond, RESOURCE_EXHAUSTED.
    max_concurrent_stops: int = 16
    # Longest a StopContainer waits for the guest's ACPI shutdown before the hard stop.
    max_stop_timeout_seconds: int = 300
    # SIGTERM waits this long for in-flight calls before cancelling them.
    shutdown_grace_seconds: float = 10.0

    @property
    def rpc_limit(self) -> int:
        """The effective ``max_concurrent_rpcs``."""
        return self.max_concurrent_rpcs or self.workers


@dataclass(frozen=True)
class LibvirtConfig:
    uri: str = "qemu:///system"
    # "auto" picks kvm only where guests really run on /dev/kvm, else qemu (TCG).
    virt_type: str = "auto"
    # How often the connection is checked and re-opened after libvirtd restarts.
    reconnect_interval_seconds: float = 2.0


@dataclass(frozen=True)
class CNIConfig:
    # false: sandboxes get no network namespace and VMs no NIC (hosts or tests
    # that do not want pod networking).
    enabled: bool = True
    conf_dirs: tuple[Path, ...] = (Path("/etc/cni/net.d"),)
    bin_dirs: tuple[Path, ...] = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
    # The network used when conf_dirs hold no configuration.
    builtin_bridge: str = "podvisor0"
    builtin_subnet: str = "10.85.0.0/16"


@dataclass(frozen=True)
class ImagesConfig:
    # Largest virtual size a containerDisk may declare (default 1 TiB).
    max_virtual_size_bytes: int = 1 << 40
    # Parallel blob downloads within one pull.
    pull_parallelism: int = 4
    # Per-request timeout towards registries.
    registry_timeout_seconds: float = 60.0
    # Bytes one pull may unpack from its layers; 0: max_virtual_size_bytes
    # plus 64 MiB (one disk of the largest size allowed).
    max_pull_bytes: int = 0
    # Free space kept on the filesystem of <state_dir>/images (which also
    # holds the state database): a pull that would eat into it fails.
    min_free_bytes: int = 1 << 30
    # Slowest transfer a registry request may make: each request must finish within
    # registry_timeout_seconds + its bytes / this rate (slow-loris bound).
    registry_min_bytes_per_second: int = 65536


@dataclass(frozen=True)
class RegistryHost:
    """Settings for one registry, keyed by its name (``docker.io``, ``127.0.0.1:5000``)."""

    mirrors: tuple[str, ...] = ()
    insecure: bool = False
    ca_file: str = ""
    username: str = ""
    password: str = field(default="", repr=False)  # a secret: never in a log line


@dataclass(frozen=True)
class Rewrite:
    prefix: str
    replacement: str


@dataclass(frozen=True)
class RegistriesConfig:
    hosts: tuple[tuple[str, RegistryHost], ...] = ()
    rewrites: tuple[Rewrite, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    # "auto": human-readable on a terminal, JSON lines otherwise.
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True)
class StreamingConfig:
    """The CRI streaming server behind Exec, Attach and PortForward URLs."""

    address: str = "127.0.0.1"
    # 0: an ephemeral port, chosen at start (the URLs carry it).
    port: int = 0
    # Both set: HTTPS (PEM files); both empty: plain HTTP.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # A session in which nothing moves for this long is closed.
    idle_timeout_seconds: float = 4 * 3600.0
    # Streaming connections at once; beyond, HTTP 429.
    max_sessions: int = 64


# Not among the ports of common exporters (node_exporter 9100, Prometheus 9090-9093, ...).
DEFAULT_METRICS_PORT = 9847


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (http://<address>:<port>/metrics)."""

    enabled: bool = True
    # Loopback by default: the series name pods and images.
    address: str = "127.0.0.1"
    # 0: an ephemeral port chosen at start (logged as "metrics serving").
    port: int = DEFAULT_METRICS_PORT


@dataclass(frozen=True)
class MTLSConfig:
    """The control-plane endpoint: gRPC over mutual TLS 1.3 on TCP (docs/security.md)."""

    # HOST:PORT ("[::]:10010" for IPv6); empty: no TCP listener, the unix socket only.
    listen: str = ""
    # PEM files: the server's certificate (chain) and key, the CA bundle client certificates must chain to.
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    # Client identities let in: "dns:NAME", "uri:URI", "ip:ADDRESS", "cn:NAME", or "*" (any
    # certificate the CA signed). Must not be empty when listen is set.
    allowed_clients: tuple[str, ...] = ()
    # How often the three files are checked for changes (then re-read); 0: only on SIGHUP.
    reload_interval_seconds: float = 2.0
    handshake_timeout_seconds: float = 10.0
    # The HTTPS streaming server behind the Exec/Attach/PortForward URLs of calls made over
    # this endpoint: address (empty: the host of listen), port (0: ephemeral) and the host
    # written into the URLs (empty: the address; required when the address is a wildcard).
    streaming_address: str = ""
    streaming_port: int = 0
    streaming_url_host: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.listen)


@dataclass(frozen=True)
class ExecConfig:
    # How long Exec and ExecSync without a timeout of their own wait for a
    # booting guest's agent (or SSH server) to answer.
    guest_ready_timeout_seconds: float = 120.0


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    # Short-lived files: VM console sockets (unix socket paths must stay short).
    runtime_dir: Path = DEFAULT_RUNTIME_DIR
    server: ServerConfig = field(default_factory=ServerConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    cni: CNIConfig = field(default_factory=CNIConfig)
    log: LogConfig = field(default_factory=LogConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    # [vm]: sizes for what neither the CRI request nor annotations state; the
    # domain's own defaults type, checked when built.
    vm: VMDefaults = field(default_factory=VMDefaults)
    registries: RegistriesConfig = field(default_factory=RegistriesConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    exec: ExecConfig = field(default_factory=ExecConfig)
    mtls: MTLSConfig = field(default_factory=MTLSConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "podvisor.db"

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_dir / "sandboxes"


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "libvirt": LibvirtConfig,
    "cni": CNIConfig,
    "log": LogConfig,
    "images": ImagesConfig,
    "vm": VMDefaults,
    "streaming": StreamingConfig,
    "exec": ExecConfig,
    "mtls": MTLSConfig,
    "metrics": MetricsConfig,
}


def _coerce(where: str, default: Any, value: Any) -> Any:
    """Convert a TOML value to the type of the field's default, or explain why not."""
    if isinstance(default, Path):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a non-empty path string")
        path = Path(value)
        if not path.is_absolute():
            raise ConfigError(f"{where}: {value!r} must be an absolute path")
        return path
    if isinstance(default, tuple) and where.endswith("allowed_clients"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: expected a list of identities (dns:NAME, uri:URI, ip:ADDRESS, cn:NAME, *)")
        return tuple(value)
    if isinstance(default, tuple) and where.endswith("mirrors"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: expected a list of endpoints")
        return tuple(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}: expected a non-empty list of absolute paths")
        return tuple(_coerce(f"{where}[{i}]", Path("/"), v) for i, v in enumerate(value))
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{where}: expected a non-negative number")
        return float(value)
    if isinstance(default, int):
        # A default of 0 means "0 allowed" (e.g. no headroom); so does a reserve.
        zero_ok = default == 0 or where.endswith("min_free_bytes") or where == "[metrics] port"
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
            raise ConfigError(f"{where}: expected a {'non-negative' if zero_ok else 'positive'} integer")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string")
        return value
    raise ConfigError(f"{where}: unsupported setting type")  # pragma: no cover


def _section(name: str, cls: type[Any], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}]: expected a table")
    base = cls()
    values = {}
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"[{name}] {key}: unknown setting (known: {', '.join(sorted(known))})")
        values[key] = _coerce(f"[{name}] {key}", getattr(base, key), value)
    try:
        return dataclasses.replace(base, **values)
    except ValueError as exc:  # the section type's own checks (e.g. [vm])
        raise ConfigError(f"[{name}] {exc}") from None


def _registries(data: Any) -> RegistriesConfig:
    """``[registries.hosts."<name>"]`` tables and ``[[registries.rewrite]]`` rules."""
    if not isinstance(data, dict):
        raise ConfigError("[registries]: expected a table")
    hosts = []
    rewrites = []
    for key, value in data.items():
        if key == "hosts":
            if not isinstance(value, dict):
                raise ConfigError("[registries.hosts]: expected a table of registries")
            for name, table in value.items():
                where = f'registries.hosts."{name}"'
                host = _section(where, RegistryHost, table)
                if isinstance(table, dict) and "mirrors" in table:
                    mirrors = table["mirrors"]
                    if not isinstance(mirrors, list) or not all(isinstance(m, str) and m for m in mirrors):
                        raise ConfigError(f"[{where}] mirrors: expected a list of endpoints")
                hosts.append((name, host))
        elif key == "rewrite":
            if not isinstance(value, list):
                raise ConfigError("[[registries.rewrite]]: expected an array of tables")
            for i, rule in enumerate(value):
                where = f"registries.rewrite[{i}]"
                if not isinstance(rule, dict) or set(rule) != {"prefix", "replacement"}:
                    raise ConfigError(f"[{where}]: needs exactly the keys prefix and replacement")
                if not all(isinstance(rule[k], str) and rule[k] for k in rule):
                    raise ConfigError(f"[{where}]: prefix and replacement must be non-empty strings")
                rewrites.append(Rewrite(rule["prefix"], rule["replacement"]))
        else:
            raise ConfigError(f"[registries] {key}: unknown setting (known: hosts, rewrite)")
    return RegistriesConfig(hosts=tuple(hosts), rewrites=tuple(rewrites))


def from_mapping(data: dict[str, Any]) -> AgentConfig:
    """Build and validate a config from parsed TOML."""
    cfg = AgentConfig()
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("state_dir", "runtime_dir"):
            changes[key] = _coerce(key, DEFAULT_STATE_DIR, value)
        elif key in _SECTIONS:
            changes[key] = _section(key, _SECTIONS[key], value)
        elif key == "registries":
            changes[key] = _registries(value)
        else:
            raise ConfigError(
                f"{key}: unknown setting (known: state_dir, runtime_dir, registries, {', '.join(sorted(_SECTIONS))})"
            )
    cfg = dataclasses.replace(cfg, **changes)
    validate(cfg)
    return cfg


def load(path: Path | None) -> AgentConfig:
    """Read a TOML file; no path means the built-in defaults."""
    if path is None:
        return AgentConfig()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return from_mapping(data)


def override(
    cfg: AgentConfig,
    *,
    socket: Path | None = None,
    state_dir: Path | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
) -> AgentConfig:
    """Apply command-line flags, which win over the file."""
    if socket is not None:
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, socket=socket))
    if state_dir is not None:
        cfg = dataclasses.replace(cfg, state_dir=state_dir)
    if log_format is not None or log_level is not None:
        cfg = dataclasses.replace(
            cfg,
            log=LogConfig(
                format=log_format or cfg.log.format, level=log_level or cfg.log.level
            ),
        )
    validate(cfg)
    return cfg


# Calls always left free for kubelet's quick ones (Version, List*, Status)
# when every event stream and every stop is held.
RPC_HEADROOM = 8


def _validate_server(server: ServerConfig) -> None:
    long_held = server.max_event_streams + server.max_concurrent_stops
    if server.rpc_limit < long_held + RPC_HEADROOM:
        key = "max_concurrent_rpcs" if server.max_concurrent_rpcs else "workers"
        raise ConfigError(
            f"[server] {key}: {server.rpc_limit} calls at once must be at least max_event_streams + "
            f"max_concurrent_stops + {RPC_HEADROOM} = {long_held + RPC_HEADROOM}, so streams and stops "
            "cannot hold every thread")
    if server.rpc_limit > server.workers:
        raise ConfigError(
            f"[server] max_concurrent_rpcs: {server.rpc_limit} exceeds workers ({server.workers}); "
            "calls beyond the threads would wait in line behind held ones")


def _validate_metrics(m: MetricsConfig) -> None:
    try:
        ipaddress.ip_address(m.address)
    except ValueError:
        raise ConfigError(f"[metrics] address: {m.address!r} is not an IP address") from None
    if m.port > 65535:
        raise ConfigError("[metrics] port: must be 0 (ephemeral) to 65535")


def _validate_streaming(st: StreamingConfig) -> None:
    try:
        ipaddress.ip_address(st.address)
    except ValueError:
        raise ConfigError(f"[streaming] address: {st.address!r} is not an IP address") from None
    if st.port > 65535:
        raise ConfigError("[streaming] port: must be 0 (ephemeral) to 65535")
    if bool(st.tls_cert_file) != bool(st.tls_key_file):
        raise ConfigError("[streaming] tls_cert_file, tls_key_file: set both (HTTPS) or neither (HTTP)")
    for key in ("tls_cert_file", "tls_key_file"):
        value = getattr(st, key)
        if value and not Path(value).is_absolute():
            raise ConfigError(f"[streaming] {key}: must be an absolute path")
    if st.idle_timeout_seconds <= 0:
        raise ConfigError("[streaming] idle_timeout_seconds: must be greater than 0")


def _validate_mtls(m: MTLSConfig) -> None:
    """Syntax only: whether the files exist and fit is checked when the agent starts."""
    if not m.listen:
        return
    try:
        host, _ = split_listen(m.listen)
    except ValueError as exc:
        raise ConfigError(f"[mtls] listen: {exc} (HOST:PORT with an IP address, e.g. 0.0.0.0:10010)") from None
    for key in ("cert_file", "key_file", "client_ca_file"):
        value = getattr(m, key)
        if not value:
            raise ConfigError(f"[mtls] {key}: required when listen is set")
        if not Path(value).is_absolute():
            raise ConfigError(f"[mtls] {key}: must be an absolute path")
    if not m.allowed_clients:
        raise ConfigError('[mtls] allowed_clients: empty, so every client would be refused; list the '
                          'identities to let in (dns:NAME, uri:URI, ip:ADDRESS, cn:NAME), or "*" for any '
                          "certificate client_ca_file signed")
    for entry in m.allowed_clients:
        try:
            parse_allow_entry(entry)
        except ValueError as exc:
            raise ConfigError(f"[mtls] allowed_clients: {exc}") from None
    address = m.streaming_address or host
    try:
        wildcard = ipaddress.ip_address(address).is_unspecified
    except ValueError:
        raise ConfigError(f"[mtls] streaming_address: {address!r} is not an IP address") from None
    if wildcard and not m.streaming_url_host:
        raise ConfigError(f"[mtls] streaming_url_host: required when the streaming server listens on {address} "
                          "(the host name or address clients reach it by, written into the URLs)")
    if m.streaming_port > 65535:
        raise ConfigError("[mtls] streaming_port: must be 0 (ephemeral) to 65535")
    if m.handshake_timeout_seconds <= 0:
        raise ConfigError("[mtls] handshake_timeout_seconds: must be greater than 0")


def validate(cfg: AgentConfig) -> None:
    """Cross-field and enumerated-value checks."""
    _validate_server(cfg.server)
    for name, path in (("state_dir", cfg.state_dir), ("[server] socket", cfg.server.socket)):
        if not path.is_absolute():
            raise ConfigError(f"{name}: {str(path)!r} must be an absolute path")
    if cfg.libvirt.reconnect_interval_seconds <= 0:
        raise ConfigError("[libvirt] reconnect_interval_seconds: must be greater than 0")
    if cfg.server.shutdown_grace_seconds <= 0:
        raise ConfigError("[server] shutdown_grace_seconds: must be greater than 0")
    if cfg.images.registry_timeout_seconds <= 0:
        # httpx treats a zero timeout as "fail at once": every pull would fail.
        raise ConfigError("[images] registry_timeout_seconds: must be greater than 0")
    for i, rule in enumerate(cfg.registries.rewrites):
        try:
            imageref.RewriteRule(rule.prefix, rule.replacement)
        except ValueError as exc:
            raise ConfigError(f"[[registries.rewrite]] #{i}: {exc}") from None
    for name, host in cfg.registries.hosts:
        try:
            imageref.Mirror(name, host.mirrors)
        except ValueError as exc:
            raise ConfigError(f'[registries.hosts."{name}"] mirrors: {exc}') from None
        if host.ca_file and not Path(host.ca_file).is_absolute():
            raise ConfigError(f'[registries.hosts."{name}"] ca_file: must be an absolute path')
    if len(str(cfg.runtime_dir)) > 60:
        raise ConfigError("runtime_dir: keep it under 60 characters (VM console socket paths must fit 107 bytes)")
    if cfg.libvirt.virt_type not in VIRT_TYPES:
        raise ConfigError(
            f"[libvirt] virt_type: {cfg.libvirt.virt_type!r} is not one of {', '.join(VIRT_TYPES)}"
        )
    if cfg.log.format not in LOG_FORMATS:
        raise ConfigError(
            f"[log] format: {cfg.log.format!r} is not one of {', '.join(LOG_FORMATS)}"
        )
    if cfg.log.level not in LOG_LEVELS:
        raise ConfigError(f"[log] level: {cfg.log.level!r} is not one of {', '.join(LOG_LEVELS)}")
    if cfg.server.socket_group:
        try:
            grp.getgrnam(cfg.server.socket_group)
        except KeyError:
            raise ConfigError(
                f"[server] socket_group: no group named {cfg.server.socket_group!r}"
            ) from None
    _validate_streaming(cfg.streaming)
    _validate_mtls(cfg.mtls)
    _validate_metrics(cfg.metrics)
    if len(str(cfg.server.socket).encode()) > 107:
        raise ConfigError("[server] socket: path longer than a unix socket address allows")
