"""The one place that runs CNI plugins: the CNI 1.0 protocol over subprocesses.

A network configuration list is executed plugin by plugin (ADD and CHECK in
order, DEL in reverse), each plugin getting the network's name and version,
the previous plugin's result (``prevResult``) and the runtime values for the
capabilities it declares (``runtimeConfig``: port mappings, DNS). Every call
has a timeout and a checked exit status; a failing plugin's CNI error object
becomes a :class:`CNIError` carrying the plugin's own message.

What ADD did is cached on disk, one file per sandbox, *before* the first
plugin runs and again with the final result: DEL then works after an agent
crash at any point, with the configuration and runtime values that were used
for ADD even if /etc/cni/net.d changed since (libcni keeps the same cache for
the same reason).

Callers serialise operations on one sandbox; different sandboxes run in
parallel (the plugins lock their own shared state: host-local's lease
directory, iptables' xtables lock).
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.adapters import netns
from agent.domain import cni_result
from agent.domain.cni_result import CNIResult
from agent.domain.errors import FailedPrecondition, Internal, InvalidArgument, ResourceExhausted, Unavailable
from agent.domain.sandbox import DNSConfig, PortMapping

log = structlog.get_logger(__name__)

PLUGIN_TIMEOUT = 60.0
CACHE_KIND = "podvisor.io/cni-cache"
CACHE_VERSION = 1
DEFAULT_NETWORK_NAME = "podvisor"
# Versions whose plugins implement CHECK and get prevResult on DEL (0.4.0 on).
_CHECK_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
_PREV_RESULT_ON_DEL = _CHECK_VERSIONS
# A plugin type names a file in a bin dir: a plain file name, nothing more.
_PLUGIN_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
# Container ids and CNI_ARGS values: CNI allows [A-Za-z0-9_.-]; ';' and '='
# would break CNI_ARGS' own syntax.
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_BRIDGE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class CNIError(Unavailable):
    """A CNI plugin failed (or could not be run).

    ``code``/``details`` are the plugin's CNI error object when it printed
    one (code 0 when it did not: a crash, a timeout, a missing binary).
    """

    def __init__(self, message: str, *, plugin: str = "", command: str = "", code: int = 0,
                 details: str = "") -> None:
        super().__init__(message)
        self.plugin = plugin
        self.command = command
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Attachment:
    """Who is being attached: the CNI_* variables of one sandbox."""

    container_id: str
    netns: Path
    ifname: str = "eth0"
    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""

    def validate(self) -> None:
        if not _CONTAINER_ID.match(self.container_id):
            raise InvalidArgument("pod_sandbox_id", f"{self.container_id!r} is not a valid CNI container id")
        if not _IFNAME.match(self.ifname):
            raise InvalidArgument("ifname", f"{self.ifname!r} is not a valid interface name")
        for field_name, value in (("metadata.name", self.pod_name), ("metadata.namespace", self.pod_namespace),
                                  ("metadata.uid", self.pod_uid)):
            if any(c in value for c in ";=\x00") or any(ord(c) < 0x20 for c in value):
                raise InvalidArgument(field_name, "must not contain ';', '=' or control characters")

    def cni_args(self) -> str:
        """CNI_ARGS as kubelet-era runtimes pass them.

        IgnoreUnknown=1 comes first because plugins that parse CNI_ARGS
        strictly (host-local, for one) refuse keys they do not know otherwise.
        """
        pairs = [("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", self.pod_namespace),
                 ("K8S_POD_NAME", self.pod_name), ("K8S_POD_INFRA_CONTAINER_ID", self.container_id),
                 ("K8S_POD_UID", self.pod_uid)]
        return ";".join(f"{k}={v}" for k, v in pairs)

    def to_json(self) -> dict[str, str]:
        return {"containerId": self.container_id, "netns": str(self.netns), "ifName": self.ifname,
                "podName": self.pod_name, "podNamespace": self.pod_namespace, "podUid": self.pod_uid}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Attachment:
        return cls(container_id=str(doc["containerId"]), netns=Path(str(doc["netns"])),
                   ifname=str(doc.get("ifName", "eth0")), pod_name=str(doc.get("podName", "")),
                   pod_namespace=str(doc.get("podNamespace", "")), pod_uid=str(doc.get("podUid", "")))


@dataclass(frozen=True)
class CacheEntry:
    """What the cache file of one sandbox holds."""

    attachment: Attachment
    config: dict[str, Any]
    runtime_config: dict[str, Any]
    # None while ADD has not finished (or failed and could not be undone).
    result: dict[str, Any] | None


# Configuration ----------------------------------------------------------------------


def normalize_config(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A configuration list from a .conflist or a single-plugin .conf document.

    Raises FailedPrecondition naming the problem: a bad host configuration is
    an operator's error, not the request's.
    """
    if not isinstance(doc, Mapping):
        raise FailedPrecondition("CNI configuration is not a JSON object")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise FailedPrecondition("CNI configuration has no network name")
    version = doc.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise FailedPrecondition(f"CNI network {name} has no cniVersion")
    if "plugins" in doc:
        plugins = doc["plugins"]
        if not isinstance(plugins, list) or not plugins:
            raise FailedPrecondition(f"CNI network {name}: 'plugins' must be a non-empty list")
        conflist = copy.deepcopy(dict(doc))
    else:
        # libcni's ConfListFromConf: the whole document is the only plugin.
        conflist = {"cniVersion": version, "name": name, "plugins": [copy.deepcopy(dict(doc))]}
    for i, plugin in enumerate(conflist["plugins"]):
        if not isinstance(plugin, dict):
            raise FailedPrecondition(f"CNI network {name}: plugins[{i}] is not an object")
        ptype = plugin.get("type")
        if not isinstance(ptype, str) or not _PLUGIN_TYPE.match(ptype):
            raise FailedPrecondition(f"CNI network {name}: plugins[{i}] has no valid 'type'")
    return conflist


def builtin_default_config(bridge: str, subnet: str, *, name: str = DEFAULT_NETWORK_NAME,
                           ipam_data_dir: Path | None = None) -> dict[str, Any]:
    """The network the agent uses when /etc/cni/net.d has none.

    bridge + host-local + portmap, as containerd's default template:
    - ``isGateway`` puts the subnet's gateway address on the host bridge (the
      pod's default route and the host's route to the pods); it also turns
      on IP forwarding, which a node needs for pod egress anyway.
    - ``ipMasq`` lets pods reach the outside; ``hairpinMode`` lets a VM reach
      itself through its own host port.
    - portmap serves CRI port mappings (its ``snat`` default covers
      connections to 127.0.0.1:<hostPort>).
    No ``loopback`` network: kubelet-era runtimes attach it as a separate
    network so that containers get a working ``lo``, but here the pod's
    namespace only carries the wiring to the VM, and the VM has its own lo.
    """
    if not _BRIDGE_NAME.match(bridge):
        raise FailedPrecondition(f"CNI bridge name {bridge!r} is not a valid interface name (at most 15 characters)")
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError:
        raise FailedPrecondition(f"CNI subnet {subnet!r} is not a network in CIDR notation") from None
    ipam: dict[str, Any] = {
        "type": "host-local",
        "ranges": [[{"subnet": str(net)}]],
        "routes": [{"dst": "0.0.0.0/0" if net.version == 4 else "::/0"}],
    }
    if ipam_data_dir is not None:
        ipam["dataDir"] = str(ipam_data_dir)
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": True, "hairpinMode": True,
             "ipam": ipam},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def runtime_config(port_mappings: Sequence[PortMapping], dns: DNSConfig | None) -> dict[str, Any]:
    """The runtimeConfig values the runtime offers (CNI CONVENTIONS.md).

    Mappings without a host port are dropped, as containerd does: they
    publish nothing.
    """
    rc: dict[str, Any] = {}
    mappings = []
    for pm in port_mappings:
        if pm.host_port <= 0:
            continue
        entry: dict[str, Any] = {"hostPort": pm.host_port, "containerPort": pm.container_port,
                                 "protocol": pm.protocol.lower() or "tcp"}
        if pm.host_ip:
            entry["hostIP"] = pm.host_ip
        mappings.append(entry)
    if mappings:
        rc["portMappings"] = mappings
    if dns is not None and (dns.servers or dns.searches or dns.options):
        rc["dns"] = {"servers": list(dns.servers), "searches": list(dns.searches), "options": list(dns.options)}
    return rc


def plugin_stdin(conflist: Mapping[str, Any], plugin: Mapping[str, Any], rc: Mapping[str, Any],
                 prev_result: Mapping[str, Any] | None) -> dict[str, Any]:
    """The configuration one plugin reads on stdin (pure; CNI spec section 3)."""
    conf = copy.deepcopy(dict(plugin))
    conf["name"] = conflist["name"]
    conf["cniVersion"] = conflist["cniVersion"]
    capabilities = plugin.get("capabilities")
    # A plugin only sees the runtime values it asked for: unknown keys in
    # runtimeConfig are an error for some plugins.
    conf.pop("runtimeConfig", None)
    if isinstance(capabilities, dict):
        wanted = {k: v for k, v in rc.items() if capabilities.get(k) is True}
        if wanted:
            conf["runtimeConfig"] = wanted
    if prev_result is not None:
        conf["prevResult"] = copy.deepcopy(dict(prev_result))
    else:
        conf.pop("prevResult", None)
    return conf


# Execution --------------------------------------------------------------------------


class CNIExec:
    """Runs configuration lists for sandboxes and keeps the ADD cache.

    ``bin_dirs`` is CNI_PATH (searched in order for a plugin's ``type``);
    ``cache_dir`` holds ``<container id>.json`` per attached sandbox.
    """

    def __init__(self, bin_dirs: Sequence[Path], cache_dir: Path, *, timeout: float = PLUGIN_TIMEOUT) -> None:
        self.bin_dirs = tuple(Path(d) for d in bin_dirs)
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout

    # cache

    def _cache_path(self, container_id: str) -> Path:
        if not _CONTAINER_ID.match(container_id):
            raise InvalidArgument("pod_sandbox_id", f"{container_id!r} is not a valid CNI container id")
        return self.cache_dir / f"{container_id}.json"

    def _write_cache(self, entry: CacheEntry, *, durable: bool = True) -> None:
        try:
            self._write_cache_file(entry, durable)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ResourceExhausted(f"cannot write the CNI cache in {self.cache_dir}: {exc.strerror}") from None
            raise Internal(f"cannot write the CNI cache in {self.cache_dir}: {exc.strerror}") from None

    def _write_cache_file(self, entry: CacheEntry, durable: bool) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {"kind": CACHE_KIND, "version": CACHE_VERSION, "attachment": entry.attachment.to_json(),
               "config": entry.config, "runtimeConfig": entry.runtime_config, "result": entry.result}
        target = self._cache_path(entry.attachment.container_id)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=self.cache_dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if not durable:
            return
        # The rename itself must survive a power cut, or DEL would not know
        # what to undo after a reboot.
        dir_fd = os.open(self.cache_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def cached(self, container_id: str) -> CacheEntry | None:
        """The cache entry of a sandbox, None if there is none.

        An unreadable entry is an error, not "nothing attached": guessing
        would leak whatever ADD set up.
        """
        path = self._cache_path(container_id)
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise Internal(f"CNI cache {path} is unreadable: {exc}") from None
        if not isinstance(doc, dict) or doc.get("kind") != CACHE_KIND or doc.get("version") != CACHE_VERSION:
            raise Internal(f"CNI cache {path} is not a {CACHE_KIND} v{CACHE_VERSION} file")
        try:
            result = doc.get("result")
            return CacheEntry(attachment=Attachment.from_json(doc["attachment"]),
                              config=normalize_config(doc["config"]),
                              runtime_config=dict(doc.get("runtimeConfig") or {}),
                              result=dict(result) if isinstance(result, dict) else None)
        except (KeyError, TypeError, FailedPrecondition) as exc:
            raise Internal(f"CNI cache {path} is malformed: {exc}") from None

    def cached_ids(self) -> list[str]:
        """Container ids with a cache entry (for start-up reconciliation)."""
        try:
            names = sorted(p.stem for p in self.cache_dir.glob("*.json"))
        except OSError:
            return []
        return [n for n in names if _CONTAINER_ID.match(n)]

    def _drop_cache(self, container_id: str) -> None:
        self._cache_path(container_id).unlink(missing_ok=True)

    # plugins

    def _find_plugin(self, ptype: str) -> Path:
        for d in self.bin_dirs:
            candidate = d / ptype
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        dirs = ", ".join(str(d) for d in self.bin_dirs)
        raise CNIError(f"CNI plugin {ptype} not found in {dirs}", plugin=ptype)

    def _invoke(self, command: str, conflist: Mapping[str, Any], plugin: Mapping[str, Any],
                attachment: Attachment, netns_path: str, rc: Mapping[str, Any],
                prev_result: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Run one plugin; its parsed result for ADD, None otherwise."""
        ptype = str(plugin["type"])
        binary = self._find_plugin(ptype)
        stdin = json.dumps(plugin_stdin(conflist, plugin, rc, prev_result)).encode()
        # The agent's environment is passed on (plugins run iptables, ip, ...
        # found through PATH), minus any CNI_* that would confuse them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update({
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": attachment.container_id,
            "CNI_NETNS": netns_path,
            "CNI_IFNAME": attachment.ifname,
            "CNI_ARGS": attachment.cni_args(),
            "CNI_PATH": os.pathsep.join(str(d) for d in self.bin_dirs),
        })
        where = f"CNI plugin {ptype} ({command}, network {conflist['name']})"
        try:
            proc = subprocess.run([str(binary)], input=stdin, env=env, capture_output=True,
                                  timeout=self.timeout, check=False, cwd="/")
        except subprocess.TimeoutExpired:
            raise CNIError(f"{where} took longer than {self.timeout:g}s", plugin=ptype, command=command) from None
        except OSError as exc:
            raise CNIError(f"{where} could not be run: {exc.strerror}", plugin=ptype, command=command) from None
        if proc.returncode != 0:
            info = cni_result.parse_error(proc.stdout)
            if info is not None:
                detail = f" ({info.details})" if info.details else ""
                raise CNIError(f"{where} failed: {info.msg}{detail}", plugin=ptype, command=command,
                               code=info.code, details=info.details)
            stderr = proc.stderr.decode(errors="replace").strip().splitlines()
            tail = stderr[-1] if stderr else f"exit status {proc.returncode}"
            raise CNIError(f"{where} failed: {tail}", plugin=ptype, command=command)
        if command != "ADD":
            return None
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            raise CNIError(f"{where} printed no JSON result", plugin=ptype, command=command) from None
        if not isinstance(doc, dict):
            raise CNIError(f"{where} printed a result that is not a JSON object", plugin=ptype, command=command)
        return doc

    def _netns_for_del(self, attachment: Attachment) -> str:
        # The spec lets DEL run without the namespace (gone after a reboot, or
        # never made); plugins then clean up host-side state only.
        return str(attachment.netns) if netns.is_mounted(attachment.netns) else ""

    def _del_all(self, entry: CacheEntry) -> list[CNIError]:
        """DEL through every plugin in reverse; keeps going past failures so
        that one broken plugin does not leak what the others set up."""
        errors: list[CNIError] = []
        ns = self._netns_for_del(entry.attachment)
        # prevResult on DEL arrived with 0.4.0, like CHECK.
        prev = entry.result if str(entry.config["cniVersion"]) in _PREV_RESULT_ON_DEL else None
        for plugin in reversed(entry.config["plugins"]):
            try:
                self._invoke("DEL", entry.config, plugin, entry.attachment, ns, entry.runtime_config, prev)
            except CNIError as exc:
                errors.append(exc)
        return errors

    def add(self, config: Mapping[str, Any], attachment: Attachment, rc: Mapping[str, Any]) -> CNIResult:
        """ADD the sandbox to the network; on failure everything is undone.

        Raises CNIError with the failing plugin's message. If undoing fails
        too, the cache entry stays so that :meth:`delete` can retry.
        """
        attachment.validate()
        conflist = normalize_config(config)
        for plugin in conflist["plugins"]:
            self._find_plugin(str(plugin["type"]))  # fail before touching anything
        entry = CacheEntry(attachment=attachment, config=conflist, runtime_config=dict(rc), result=None)
        self._write_cache(entry)
        prev: dict[str, Any] | None = None
        try:
            for plugin in conflist["plugins"]:
                prev = self._invoke("ADD", conflist, plugin, attachment, str(attachment.netns), rc, prev)
            if prev is None:
                raise CNIError(f"CNI network {conflist['name']} returned no result", command="ADD")
            try:
                parsed = cni_result.parse_result(prev)
            except ValueError as exc:
                raise CNIError(f"CNI network {conflist['name']} returned an invalid result: {exc}",
                               command="ADD") from None
        except CNIError as exc:
            log.warning("cni add failed, undoing", sandbox_id=attachment.container_id, error=exc.message)
            undo = CacheEntry(attachment=attachment, config=conflist, runtime_config=dict(rc), result=prev)
            errors = self._del_all(undo)
            if errors:
                # Keep the cache with what we know, for a later delete().
                self._write_cache(undo)
                log.error("cni undo failed", sandbox_id=attachment.container_id,
                          errors=[e.message for e in errors])
            else:
                self._drop_cache(attachment.container_id)
            raise
        # Atomic, but not synced: what a power cut could lose is only the
        # result, and DEL after a reboot needs just the synced entry above
        # (the namespace, links and iptables rules do not survive a reboot;
        # IPAM leases are released by container id). libcni syncs neither.
        self._write_cache(CacheEntry(attachment=attachment, config=conflist, runtime_config=dict(rc), result=prev),
                          durable=False)
        return parsed

    def check(self, container_id: str) -> None:
        """CHECK the cached attachment; raises CNIError when a plugin reports a problem."""
        entry = self.cached(container_id)
        if entry is None or entry.result is None:
            raise FailedPrecondition(f"sandbox {container_id} has no completed CNI ADD to check")
        version = str(entry.config["cniVersion"])
        if version not in _CHECK_VERSIONS or entry.config.get("disableCheck") is True:
            return
        for plugin in entry.config["plugins"]:
            self._invoke("CHECK", entry.config, plugin, entry.attachment, str(entry.attachment.netns),
                         entry.runtime_config, entry.result)

    def delete(self, container_id: str) -> bool:
        """DEL with what the cache says was added; idempotent.

        False when there is nothing to delete (no cache entry: ADD never
        started, or DEL already completed). A failing plugin raises CNIError
        and keeps the cache entry so that the call can be retried.
        """
        entry = self.cached(container_id)
        if entry is None:
            return False
        errors = self._del_all(entry)
        if errors:
            first = errors[0]
            if len(errors) > 1:
                rest = "; ".join(e.message for e in errors[1:])
                raise CNIError(f"{first.message}; also: {rest}", plugin=first.plugin, command="DEL",
                               code=first.code, details=first.details)
            raise first
        self._drop_cache(container_id)
        return True
