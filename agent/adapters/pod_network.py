"""The pod network of a sandbox, end to end: namespace, CNI, VM wiring.

:class:`PodNetworkManager` is what the sandbox service calls:
``add`` on RunPodSandbox, ``remove`` on StopPodSandbox/RemovePodSandbox.
Everything it creates is named after the sandbox id or recorded on disk (the
CNI cache, the wiring's state file in the sandbox directory), so ``remove``
works with nothing in memory: after an agent crash, from a new object.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.adapters import cni as cni_config
from agent.adapters import netns, podnet
from agent.adapters.cni_exec import Attachment, CNIExec, builtin_default_config, runtime_config
from agent.adapters.podnet import PodWiring
from agent.domain import cni_result
from agent.domain.cni_result import CNIResult
from agent.domain.errors import FailedPrecondition, PodvisorError, Unavailable
from agent.domain.sandbox import DNSConfig, PortMapping

log = structlog.get_logger(__name__)

NETNS_PREFIX = "podvisor-"
IFNAME = "eth0"
BUILTIN_SOURCE = "builtin"


@dataclass(frozen=True)
class PodNetworkStatus:
    """The pod network as the sandbox (and its VM) will use it."""

    netns_name: str
    netns_path: Path
    network_name: str
    # The configuration file used, "builtin", or "cache" when read back by status().
    config_source: str
    # The VM's address (PodSandboxStatus.network.ip) and any others CNI gave.
    ip: str
    additional_ips: tuple[str, ...]
    wiring: PodWiring
    result: CNIResult


def _remove_masquerade_leftovers(sandbox_id: str) -> None:
    """The bridge plugin's ipMasq rule, when its DEL could not see the pod.

    Its DEL finds the pod's addresses inside the namespace; when the namespace
    is already gone (a reboot, a crash mid-teardown) it leaves the
    POSTROUTING rule and its chain behind. They carry the sandbox id in their
    comment (`id: "<sandbox id>"`), which is how they are found here.
    """
    try:
        saved = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True, timeout=30,
                               check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return  # no iptables here: nothing can be left
    marker = f'id: \\"{sandbox_id}\\"'
    for line in saved.splitlines():
        if not line.startswith("-A POSTROUTING ") or marker not in line:
            continue
        chain = line.rsplit(" ", 1)[-1]
        rule = shlex.split(line)[2:]
        for args in (["-D", "POSTROUTING", *rule], ["-F", chain], ["-X", chain]):
            done = subprocess.run(["iptables", "-w", "-t", "nat", *args], capture_output=True, text=True, timeout=30)
            if done.returncode != 0 and args[0] == "-D":
                raise Unavailable(f"cannot remove the masquerade rule of sandbox {sandbox_id}: {done.stderr.strip()}")


def netns_name(sandbox_id: str) -> str:
    """The network namespace of a sandbox (`ip netns list` shows it)."""
    return f"{NETNS_PREFIX}{sandbox_id}"


class PodNetworkManager:
    """Sets up and tears down pod networks.

    ``conf_dirs``/``bin_dirs`` are searched as libcni does (first valid
    configuration in lexical order); without one the built-in bridge network
    ``builtin_bridge``/``builtin_subnet`` is used. ``cache_dir`` keeps what
    each ADD used, for DEL. ``ipam_data_dir`` overrides host-local's lease
    directory for the built-in network only (default /var/lib/cni/networks).
    """

    def __init__(self, conf_dirs: Sequence[Path], bin_dirs: Sequence[Path], cache_dir: Path,
                 builtin_bridge: str, builtin_subnet: str, *, ipam_data_dir: Path | None = None,
                 plugin_timeout: float = 60.0) -> None:
        self.conf_dirs = tuple(Path(d) for d in conf_dirs)
        self.bin_dirs = tuple(Path(d) for d in bin_dirs)
        self.builtin_bridge = builtin_bridge
        self.builtin_subnet = builtin_subnet
        self.ipam_data_dir = ipam_data_dir
        self.cni = CNIExec(self.bin_dirs, cache_dir, timeout=plugin_timeout)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Validate the fallback now: a typo in the agent's config should stop
        # the start, not the first sandbox.
        builtin_default_config(builtin_bridge, builtin_subnet, ipam_data_dir=ipam_data_dir)

    def network_config(self) -> tuple[dict[str, Any], str]:
        """The configuration list ADD would use now, and where it came from."""
        lookup = cni_config.find_config(self.conf_dirs, self.bin_dirs)
        if lookup.path is None:
            return (builtin_default_config(self.builtin_bridge, self.builtin_subnet,
                                           ipam_data_dir=self.ipam_data_dir), BUILTIN_SOURCE)
        try:
            doc = json.loads(lookup.path.read_bytes())
        except (OSError, ValueError) as exc:
            # find_config just read it: a file replaced in between.
            raise FailedPrecondition(f"CNI configuration {lookup.path} became unreadable: {exc}") from None
        return doc, str(lookup.path)

    def add(self, sandbox_id: str, name: str, namespace: str, uid: str,
            port_mappings: Sequence[PortMapping], dns: DNSConfig, hostname: str,
            workdir: Path) -> PodNetworkStatus:
        """Namespace → CNI ADD → VM wiring. On any failure everything done so
        far is undone and the error (a CNIError with the plugin's message for
        a plugin failure) is raised."""
        ns_name = netns_name(sandbox_id)
        # Checked before anything exists that would need undoing.
        attachment = Attachment(container_id=sandbox_id, netns=netns.path(ns_name), ifname=IFNAME, pod_name=name,
                                pod_namespace=namespace, pod_uid=uid)
        attachment.validate()
        if self.cni.cached(sandbox_id) is not None or podnet.load(workdir) is not None:
            # Leftovers of an earlier attempt (a crash mid-add): start clean.
            self.remove(sandbox_id, workdir)
        try:
            ns_path = netns.create(ns_name, exist_ok=True)
            config, source = self.network_config()
            # The VM's side of the wiring needs only the namespace: it is
            # built while the plugins run (a thread started here, so it is in
            # the caller's network namespace too), eth0 joins it afterwards.
            with ThreadPoolExecutor(1, thread_name_prefix="podnet-prepare") as pool:
                prepared = pool.submit(podnet.prepare, sandbox_id, ns_name, workdir, ifname=IFNAME)
                try:
                    result = self.cni.add(config, attachment, runtime_config(port_mappings, dns))
                except BaseException:
                    wait([prepared])  # the plugin's error is the one to report
                    raise
                prepared.result()
            wiring = podnet.setup(sandbox_id, ns_name, result, hostname, dns.servers, dns.searches, workdir,
                                  ifname=IFNAME)
        except BaseException as exc:
            log.warning("pod network setup failed, rolling back", sandbox_id=sandbox_id,
                        error=exc.message if isinstance(exc, PodvisorError) else repr(exc))
            try:
                self.remove(sandbox_id, workdir)
            except Exception as undo_exc:  # the original error is the one to report
                log.error("pod network rollback failed", sandbox_id=sandbox_id, error=str(undo_exc))
            raise
        others = tuple(str(ipc.address.ip) for ipc in result.ips_for(IFNAME) if str(ipc.address.ip) != wiring.ip)
        log.info("pod network ready", sandbox_id=sandbox_id, ip=wiring.ip, network=str(config.get("name")),
                 config=source)
        return PodNetworkStatus(netns_name=ns_name, netns_path=ns_path, network_name=str(config.get("name")),
                                config_source=source, ip=wiring.ip, additional_ips=others, wiring=wiring,
                                result=result)

    def status(self, sandbox_id: str, workdir: Path) -> PodNetworkStatus | None:
        """The pod network of a sandbox from what is on disk (None if it has none)."""
        entry = self.cni.cached(sandbox_id)
        wiring = podnet.load(workdir)
        if entry is None or entry.result is None or wiring is None:
            return None
        result = cni_result.parse_result(entry.result)
        others = tuple(str(ipc.address.ip) for ipc in result.ips_for(IFNAME) if str(ipc.address.ip) != wiring.ip)
        return PodNetworkStatus(netns_name=netns_name(sandbox_id), netns_path=entry.attachment.netns,
                                network_name=str(entry.config["name"]), config_source="cache", ip=wiring.ip,
                                additional_ips=others, wiring=wiring, result=result)

    def ensure_dhcp(self, sandbox_id: str, workdir: Path) -> bool:
        """Start the sandbox's DHCP server for its VM unless it runs (True if
        it was started); a sandbox without pod network wiring has none."""
        with self._lock_for(sandbox_id):
            return podnet.ensure_dhcp(sandbox_id, netns_name(sandbox_id), workdir, ifname=IFNAME)

    def recover(self, sandbox_id: str, workdir: Path) -> None:
        """At agent start, for a sandbox that should have its pod network:
        raises Unavailable when it is gone (a host reboot empties /run/netns),
        and restarts a DHCP server that was running and died since."""
        ns_name = netns_name(sandbox_id)
        if podnet.load(workdir) is None and self.cni.cached(sandbox_id) is None:
            return  # made while pod networking was off: it never had one
        if not netns.exists(ns_name):
            raise Unavailable(f"the pod network namespace {ns_name} is gone (host rebooted?)")
        with self._lock_for(sandbox_id):
            podnet.ensure_dhcp(sandbox_id, ns_name, workdir, ifname=IFNAME, only_if_started=True)

    @contextlib.contextmanager
    def _lock_for(self, sandbox_id: str) -> Iterator[None]:
        """Serialises the DHCP server's start with the sandbox's teardown (a
        dnsmasq started while the namespace goes would outlive it)."""
        with self._locks_guard:
            lock = self._locks.setdefault(sandbox_id, threading.Lock())
        with lock:
            yield

    def cached_sandbox_ids(self) -> list[str]:
        """Sandboxes with a CNI attachment on disk (to find orphans at start)."""
        return self.cni.cached_ids()

    def remove(self, sandbox_id: str, workdir: Path) -> None:
        """VM wiring → CNI DEL (from the cache) → namespace. Idempotent.

        Every step runs even if an earlier one failed, except that the
        namespace is kept while CNI DEL has not succeeded (a retry then runs
        DEL with the namespace, as ADD had it); the first error is raised,
        all of them are logged.
        """
        with self._lock_for(sandbox_id):
            self._remove(sandbox_id, workdir)
        with self._locks_guard:
            self._locks.pop(sandbox_id, None)

    def _remove(self, sandbox_id: str, workdir: Path) -> None:
        ns_name = netns_name(sandbox_id)
        errors: list[PodvisorError] = []
        unusable = False
        try:
            entry = self.cni.cached(sandbox_id)
            result = cni_result.parse_result(entry.result) if entry and entry.result else None
        except (PodvisorError, ValueError) as exc:
            log.warning("CNI cache unusable for restoring eth0", sandbox_id=sandbox_id, error=str(exc))
            entry, result, unusable = None, None, True
        if entry is None and not unusable and podnet.load(workdir) is None and not netns.exists(ns_name) \
                and not podnet.host_links_exist(sandbox_id, ifname=IFNAME):
            # A completed teardown (RemovePodSandbox after StopPodSandbox):
            # each step below cleans up after the one before it, so with no
            # cache entry, state file, namespace or link nothing is left.
            return
        restored = False
        try:
            restored = podnet.teardown_pod(sandbox_id, ns_name, workdir, ifname=IFNAME, cni_result=result)
        except PodvisorError as exc:
            errors.append(exc)
        cni_ok = True
        # The host side of the wiring has nothing to do with CNI DEL: both at once.
        with ThreadPoolExecutor(1, thread_name_prefix="podnet-teardown") as pool:
            host = pool.submit(podnet.teardown_host, sandbox_id, ifname=IFNAME)
            try:
                self.cni.delete(sandbox_id)
            except PodvisorError as exc:
                errors.append(exc)
                cni_ok = False
            finally:
                wait([host])
            try:
                host.result()
            except PodvisorError as exc:
                errors.append(exc)
        if cni_ok:
            try:
                netns.delete(ns_name)
            except PodvisorError as exc:
                errors.append(exc)
        if cni_ok and not restored:
            # DEL could not see the pod's addresses (no namespace, or eth0
            # not restored): the bridge plugin's masquerade rule may be left.
            try:
                _remove_masquerade_leftovers(sandbox_id)
            except PodvisorError as exc:
                errors.append(exc)
        if not errors:
            podnet.forget(workdir)
        if errors:
            log.error("pod network teardown incomplete", sandbox_id=sandbox_id,
                      errors=[e.message for e in errors])
            raise errors[0]
        log.info("pod network removed", sandbox_id=sandbox_id)

