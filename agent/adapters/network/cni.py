"""CNI on the host: finding the configurations and plugins, running plugins
(the CNI 1.0 protocol over subprocesses), and the on-disk ADD cache.

:func:`find_configs` gathers the facts the choice of a configuration needs
(``agent/domain/network/choice.py`` makes it). A network configuration list
is executed plugin by plugin (ADD and CHECK in order, DEL in reverse), each
plugin getting the network's name and version, the previous plugin's result
(``prevResult``) and the runtime values for the capabilities it declares
(``runtimeConfig``: port mappings, DNS). Every call has a timeout and a
checked exit status; a failing plugin's CNI error object becomes a
:class:`CNIError` carrying the plugin's own message.

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

import errno
import json
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.adapters.atomic import write_atomic
from agent.adapters.network import netns
from agent.domain.errors import FailedPrecondition, Internal, InvalidArgument, ResourceExhausted, Unavailable
from agent.domain.network import cni_result
from agent.domain.network.choice import CNIFacts, ConfigFile
from agent.domain.network.cni import CONFIG_SUFFIXES, CONTAINER_ID, Attachment, normalize_config, plugin_stdin
from agent.domain.network.cni_result import CNIResult

log = structlog.get_logger(__name__)

PLUGIN_TIMEOUT = 60.0
CACHE_KIND = "podvisor.io/cni-cache"
CACHE_VERSION = 1
# Versions whose plugins implement CHECK and get prevResult on DEL (0.4.0 on).
_CHECK_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
_PREV_RESULT_ON_DEL = _CHECK_VERSIONS


def find_configs(conf_dirs: Sequence[Path], bin_dirs: Sequence[Path]) -> CNIFacts:
    """The candidate configuration files, in the order libcni tries them
    (directory by directory, file names in lexical order), each with its
    bytes or why it could not be read, and the plugin binaries present."""
    files: list[ConfigFile] = []
    for conf_dir in conf_dirs:
        try:
            entries = sorted(p for p in conf_dir.iterdir() if p.suffix in CONFIG_SUFFIXES)
        except OSError:
            continue  # a directory that does not exist is like an empty one
        for path in entries:
            try:
                files.append(ConfigFile(path, path.read_bytes()))
            except OSError as exc:
                files.append(ConfigFile(path, None, str(exc)))
    plugins: set[str] = set()
    for bin_dir in bin_dirs:
        try:
            with os.scandir(bin_dir) as it:
                plugins.update(entry.name for entry in it if entry.is_file())
        except OSError:
            continue
    return CNIFacts(tuple(files), frozenset(plugins))


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
class CacheEntry:
    """What the cache file of one sandbox holds."""

    attachment: Attachment
    config: dict[str, Any]
    runtime_config: dict[str, Any]
    # None while ADD has not finished (or failed and could not be undone).
    result: dict[str, Any] | None


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
        if not CONTAINER_ID.match(container_id):
            raise InvalidArgument("pod_sandbox_id", f"{container_id!r} is not a valid CNI container id")
        return self.cache_dir / f"{container_id}.json"

    def _write_cache(self, entry: CacheEntry) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            doc = {"kind": CACHE_KIND, "version": CACHE_VERSION, "attachment": entry.attachment.to_json(),
                   "config": entry.config, "runtimeConfig": entry.runtime_config, "result": entry.result}
            # Synced: DEL after a crash or a power cut needs what ADD used.
            write_atomic(self._cache_path(entry.attachment.container_id),
                         json.dumps(doc, indent=1, sort_keys=True).encode())
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ResourceExhausted(f"cannot write the CNI cache in {self.cache_dir}: {exc.strerror}") from None
            raise Internal(f"cannot write the CNI cache in {self.cache_dir}: {exc.strerror}") from None

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

    def cache_exists(self, container_id: str) -> bool:
        """Whether a cache entry is there, readable or not."""
        return self._cache_path(container_id).exists()

    def cached_ids(self) -> list[str]:
        """Container ids with a cache entry (for start-up reconciliation)."""
        try:
            names = sorted(p.stem for p in self.cache_dir.glob("*.json"))
        except OSError:
            return []
        return [n for n in names if CONTAINER_ID.match(n)]

    def _delete_unreadable(self, container_id: str, exc: Internal,
                           fallback: Callable[[], CacheEntry | None] | None) -> None:
        log.error("CNI cache unreadable; DEL with the current network configuration", sandbox_id=container_id,
                  error=exc.message)
        substitute = fallback() if fallback is not None else None
        if substitute is not None:
            for err in self._del_all(substitute):
                log.warning("CNI DEL without a cache failed", sandbox_id=container_id, error=err.message)
        self._drop_cache(container_id)

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
        self._write_cache(CacheEntry(attachment=attachment, config=conflist, runtime_config=dict(rc), result=prev))
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

    def delete(self, container_id: str, *, fallback: Callable[[], CacheEntry | None] | None = None) -> bool:
        """DEL with what the cache says was added; idempotent.

        False when there is nothing to delete (no cache entry: ADD never
        started, or DEL already completed). A failing plugin raises CNIError
        and keeps the cache entry so that the call can be retried. An
        unreadable entry never wedges teardown: DEL runs, best effort, with
        ``fallback()``'s entry (the network configuration in use now, as
        libcni does without a cache) and the entry is dropped.
        """
        try:
            entry = self.cached(container_id)
        except Internal as exc:
            self._delete_unreadable(container_id, exc, fallback)
            return True
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
