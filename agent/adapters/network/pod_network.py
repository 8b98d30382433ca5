"""The pod network of a sandbox, end to end: namespace, CNI, VM wiring.

:class:`PodNetworkManager` is what the services call: ``add`` on
RunPodSandbox, ``remove`` on StopPodSandbox/RemovePodSandbox, ``ensure_dhcp``
when the VM is created, ``recover`` at start, ``readiness`` for `Status`.
Everything it creates is named after the sandbox id or recorded on disk (the
CNI cache, the wiring's state file in the sandbox directory), so ``remove``
works with nothing in memory: after an agent crash, from a new object.

An ADD reads: choose the configuration (pure, over what is on disk), make
the namespace, build the VM's links *while* the CNI plugins run (they need
only the namespace), then, in the pod namespace, plan the hand-over once
(pure, from the CNI result and what ``eth0`` is now), record it, and carry
it out with a few ioctls. No process is started after ADD returns; the DHCP
server starts later, for the VM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import structlog

from agent import faults
from agent.adapters.network import dhcp, firewall, links, netns, state
from agent.adapters.network.cni import CacheEntry, CNIExec, find_configs
from agent.domain.errors import FailedPrecondition, Internal, PodvisorError, Unavailable
from agent.domain.network import cni_result
from agent.domain.network.choice import NetworkChoice, NetworkSettings, choose
from agent.domain.network.cni import Attachment, builtin_default_config, normalize_config, runtime_config
from agent.domain.network.cni_result import CNIResult
from agent.domain.network.wiring import (
    DEFAULT_MTU,
    LinkNames,
    PodNetworkStatus,
    PodWiring,
    plan_hand_over,
    restore_target,
)
from agent.domain.sandbox import DNSConfig, PortMapping

log = structlog.get_logger(__name__)

NETNS_PREFIX = "podvisor-"
IFNAME = "eth0"


def netns_name(sandbox_id: str) -> str:
    """The network namespace of a sandbox (`ip netns list` shows it)."""
    return f"{NETNS_PREFIX}{sandbox_id}"


def disabled_readiness() -> NetworkChoice:
    """What NetworkReady reports when pod networking is disabled
    (``[cni] enabled = false``: there is no PodNetworkManager then)."""
    return choose(NetworkSettings(enabled=False, conf_dirs=(), bin_dirs=(), builtin_bridge="", builtin_subnet=""),
                  None)


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
                 plugin_timeout: float = 60.0,
                 observe_cni: Callable[[str, float, bool], None] | None = None) -> None:
        # (command, seconds, ok) after each CNI ADD and DEL (the agent's metrics).
        self._observe_cni = observe_cni or (lambda _command, _seconds, _ok: None)
        self.settings = NetworkSettings(enabled=True, conf_dirs=tuple(Path(d) for d in conf_dirs),
                                        bin_dirs=tuple(Path(d) for d in bin_dirs), builtin_bridge=builtin_bridge,
                                        builtin_subnet=builtin_subnet, ipam_data_dir=ipam_data_dir)
        self.cni = CNIExec(self.settings.bin_dirs, cache_dir, timeout=plugin_timeout)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Validate the fallback now: a typo in the agent's config should stop
        # the start, not the first sandbox.
        builtin_default_config(builtin_bridge, builtin_subnet, ipam_data_dir=ipam_data_dir)

    def readiness(self) -> NetworkChoice:
        """The configuration ADD would use now, with NetworkReady's message."""
        return choose(self.settings, find_configs(self.settings.conf_dirs, self.settings.bin_dirs))

    # ADD

    def add(self, sandbox_id: str, name: str, namespace: str, uid: str,
            port_mappings: Sequence[PortMapping], dns: DNSConfig, hostname: str,
            workdir: Path) -> PodNetworkStatus:
        """Namespace → CNI ADD → VM wiring. On any failure everything done so
        far is undone and the error (a CNIError with the plugin's message for
        a plugin failure) is raised."""
        ns_name = netns_name(sandbox_id)
        names = LinkNames.for_sandbox(sandbox_id, IFNAME)
        # Checked before anything exists that would need undoing.
        attachment = Attachment(container_id=sandbox_id, netns=netns.path(ns_name), ifname=IFNAME, pod_name=name,
                                pod_namespace=namespace, pod_uid=uid)
        attachment.validate()
        if self.cni.cache_exists(sandbox_id) or state.exists(workdir):
            # Leftovers of an earlier attempt (a crash mid-add): start clean.
            self.remove(sandbox_id, workdir)
        try:
            ns_path = netns.create(ns_name, exist_ok=True)
            faults.point("podnet.add.netns")
            choice = self.readiness()
            if choice.conflist is None:  # only when disabled, and then there is no manager
                raise FailedPrecondition(choice.message)
            # The VM's side of the wiring needs only the namespace: it is
            # built while the plugins run (a thread started here, so it is in
            # the caller's network namespace too), eth0 joins it afterwards.
            with ThreadPoolExecutor(1, thread_name_prefix="podnet-prepare") as pool:
                prepared = pool.submit(_prepare, sandbox_id, names, ns_name, workdir)
                begun = time.monotonic()
                try:
                    result = self.cni.add(choice.conflist, attachment, runtime_config(port_mappings, dns))
                except BaseException:
                    self._observe_cni("ADD", time.monotonic() - begun, False)
                    wait([prepared])  # the plugin's error is the one to report
                    raise
                self._observe_cni("ADD", time.monotonic() - begun, True)
                prepared.result()
            faults.point("podnet.add.cni")
            wiring = _hand_over(sandbox_id, names, ns_name, result, hostname, dns, workdir)
        except BaseException as exc:
            log.warning("pod network setup failed, rolling back", sandbox_id=sandbox_id,
                        error=exc.message if isinstance(exc, PodvisorError) else repr(exc))
            try:
                self.remove(sandbox_id, workdir)
            except Exception as undo_exc:  # the original error is the one to report
                log.error("pod network rollback failed", sandbox_id=sandbox_id, error=str(undo_exc))
            raise
        network_name = str(choice.conflist.get("name"))
        log.info("pod network ready", sandbox_id=sandbox_id, ip=wiring.ip, network=network_name,
                 config=choice.source)
        return PodNetworkStatus.of(netns_name=ns_name, netns_path=ns_path, network_name=network_name,
                                   config_source=choice.source, wiring=wiring, result=result, ifname=IFNAME)

    # reading back

    def status(self, sandbox_id: str, workdir: Path) -> PodNetworkStatus | None:
        """The pod network of a sandbox from what is on disk (None if it has none)."""
        try:
            entry = self.cni.cached(sandbox_id)
            wiring = state.load(workdir)
        except Internal as exc:
            log.warning("pod network records unreadable; reported as none", sandbox_id=sandbox_id,
                        error=exc.message)
            return None
        if entry is None or entry.result is None or wiring is None:
            return None
        return PodNetworkStatus.of(netns_name=netns_name(sandbox_id), netns_path=entry.attachment.netns,
                                   network_name=str(entry.config["name"]), config_source="cache", wiring=wiring,
                                   result=cni_result.parse_result(entry.result), ifname=IFNAME)

    def cached_sandbox_ids(self) -> list[str]:
        """Sandboxes with a CNI attachment on disk (to find orphans at start)."""
        return self.cni.cached_ids()

    # the DHCP server

    def ensure_dhcp(self, sandbox_id: str, workdir: Path) -> bool:
        """Start the sandbox's DHCP server for its VM unless it runs (True if
        it was started); a sandbox without pod network wiring has none."""
        with self._lock_for(sandbox_id):
            return _ensure_dhcp(sandbox_id, workdir, only_if_started=False)

    def recover(self, sandbox_id: str, workdir: Path) -> None:
        """At agent start, for a sandbox that should have its pod network:
        raises Unavailable when it is gone (a host reboot empties /run/netns),
        and restarts a DHCP server that was running and died since."""
        ns_name = netns_name(sandbox_id)
        if not state.exists(workdir) and not self.cni.cache_exists(sandbox_id):
            return  # made while pod networking was off: it never had one
        if not netns.exists(ns_name):
            raise Unavailable(f"the pod network namespace {ns_name} is gone (host rebooted?)")
        with self._lock_for(sandbox_id):
            _ensure_dhcp(sandbox_id, workdir, only_if_started=True)

    @contextlib.contextmanager
    def _lock_for(self, sandbox_id: str) -> Iterator[None]:
        """Serialises the DHCP server's start with the sandbox's teardown (a
        dnsmasq started while the namespace goes would outlive it)."""
        with self._locks_guard:
            lock = self._locks.setdefault(sandbox_id, threading.Lock())
        with lock:
            yield

    # DEL

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

    def _uncached_entry(self, sandbox_id: str) -> CacheEntry | None:
        """What DEL can use when the cache entry is unreadable: the network
        configuration ADD would use now, for the sandbox's namespace."""
        conflist = self.readiness().conflist
        if conflist is None:
            return None
        try:
            config = normalize_config(conflist)
        except PodvisorError:
            return None
        attachment = Attachment(container_id=sandbox_id, netns=netns.path(netns_name(sandbox_id)), ifname=IFNAME)
        return CacheEntry(attachment=attachment, config=config, runtime_config={}, result=None)

    def _remove(self, sandbox_id: str, workdir: Path) -> None:
        ns_name = netns_name(sandbox_id)
        names = LinkNames.for_sandbox(sandbox_id, IFNAME)
        errors: list[PodvisorError] = []
        unusable = False
        try:
            entry = self.cni.cached(sandbox_id)
            result = cni_result.parse_result(entry.result) if entry and entry.result else None
        except (PodvisorError, ValueError) as exc:
            log.warning("CNI cache unusable for restoring eth0", sandbox_id=sandbox_id, error=str(exc))
            entry, result, unusable = None, None, True
        if entry is None and not unusable and not state.exists(workdir) and not netns.exists(ns_name) \
                and not links.host_links_exist(names):
            # A completed teardown (RemovePodSandbox after StopPodSandbox):
            # each step below cleans up after the one before it, so with no
            # cache entry, state file, namespace or link nothing is left.
            return
        restored = False
        try:
            restored = _teardown_pod(names, ns_name, workdir, result)
        except PodvisorError as exc:
            errors.append(exc)
        faults.point("podnet.remove.pod")
        cni_ok = True
        # The host side of the wiring has nothing to do with CNI DEL: both at once.
        with ThreadPoolExecutor(1, thread_name_prefix="podnet-teardown") as pool:
            host = pool.submit(_teardown_host, sandbox_id, names)
            begun = time.monotonic()
            try:
                self.cni.delete(sandbox_id, fallback=lambda: self._uncached_entry(sandbox_id))
            except PodvisorError as exc:
                errors.append(exc)
                cni_ok = False
            finally:
                self._observe_cni("DEL", time.monotonic() - begun, cni_ok)
                wait([host])
            try:
                host.result()
            except PodvisorError as exc:
                errors.append(exc)
        faults.point("podnet.remove.cni")
        if cni_ok:
            try:
                netns.delete(ns_name)
            except PodvisorError as exc:
                errors.append(exc)
            faults.point("podnet.remove.netns")
        if cni_ok and not restored:
            # DEL could not see the pod's addresses (no namespace, or eth0
            # not restored): the bridge plugin's masquerade rule may be left.
            try:
                firewall.remove_masquerade_leftovers(sandbox_id)
            except PodvisorError as exc:
                errors.append(exc)
        if errors:
            log.error("pod network teardown incomplete", sandbox_id=sandbox_id,
                      errors=[e.message for e in errors])
            raise errors[0]
        state.forget(workdir)
        log.info("pod network removed", sandbox_id=sandbox_id)


# The steps, each on what is on disk and the names derived from the id ------------------


def _prepare(sandbox_id: str, names: LinkNames, ns_name: str, workdir: Path) -> None:
    """The part of the wiring that does not depend on the CNI result, meant
    to run while CNI ADD runs: the VM's links and the VM bridge's conntrack
    exemption. Safe to retry; on failure ``remove`` undoes whatever was done."""
    workdir.mkdir(parents=True, exist_ok=True)
    fresh = links.build(names, sandbox_id, ns_name, what=f"wire sandbox {sandbox_id[:12]}")
    firewall.add_notrack(names, sandbox_id, fresh=fresh)


def _hand_over(sandbox_id: str, names: LinkNames, ns_name: str, result: CNIResult, hostname: str,
               dns: DNSConfig, workdir: Path) -> PodWiring:
    """After CNI ADD (and :func:`_prepare`): plan the hand-over of ``eth0``
    to the VM, record the plan, carry it out. Safe to retry; on failure
    ``remove`` undoes whatever was done."""
    what = f"wire sandbox {sandbox_id[:12]}"

    def pod_side() -> PodWiring:
        found = links.iface(IFNAME)
        if found is None:
            raise FailedPrecondition(f"the pod network namespace {ns_name} has no {IFNAME} after CNI ADD")
        mtu, current_mac = found
        try:
            planned = plan_hand_over(sandbox_id, result, ifname=IFNAME, eth0_mtu=mtu, eth0_mac=current_mac,
                                     previous=state.load_state(workdir), hostname=hostname,
                                     dns_servers=dns.servers, dns_searches=dns.searches)
        except ValueError as exc:
            raise FailedPrecondition(str(exc)) from None
        # Recorded before anything changes, so the VM's MAC survives a crash
        # after eth0 got its new one, and teardown knows what to put back.
        state.save(planned, workdir)
        faults.point("podnet.add.plan_saved")
        links.hand_over(IFNAME, names, planned.wiring.mtu, netns_name=ns_name, what=what)
        return planned.wiring

    wiring = netns.run_in(ns_name, pod_side)
    if wiring.mtu != DEFAULT_MTU:
        links.set_host_mtu(names, wiring.mtu, what=what)
    faults.point("podnet.add.handed_over")
    log.info("pod wired for the VM", sandbox_id=sandbox_id, bridge=names.host_bridge, ip=wiring.ip,
             mac=wiring.vm_mac)
    return wiring


def _ensure_dhcp(sandbox_id: str, workdir: Path, *, only_if_started: bool) -> bool:
    """Start the sandbox's DHCP server unless it runs; True if it had to be
    started. With ``only_if_started`` (recovery) only one that was started
    before and died since is restarted. No wiring: nothing to serve, False."""
    recorded = state.load_state(workdir)
    if recorded is None or dhcp.running(workdir) or (only_if_started and not recorded.dhcp):
        return False
    if not recorded.dhcp:
        # Recorded first: a crash while it starts still has it restarted.
        state.save(dataclasses.replace(recorded, dhcp=True), workdir)
        faults.point("podnet.dhcp.recorded")
    interface = LinkNames.for_sandbox(sandbox_id, IFNAME).inner_bridge
    netns.run_in(netns_name(sandbox_id), lambda: dhcp.start(recorded.wiring, interface, workdir))
    faults.point("podnet.dhcp.started")
    return True


def _teardown_pod(names: LinkNames, ns_name: str, workdir: Path, cached: CNIResult | None) -> bool:
    """What must happen before CNI DEL: stop the DHCP server (a live process
    would keep the namespace alive after its deletion) and give ``eth0``
    back its MAC and addresses, out of the pod-side bridge. Idempotent, and
    works with nothing in memory (dnsmasq is found by its pid file, eth0's
    MAC and addresses are in the state file; ``cached``, the cached ADD
    result, stands in for a lost state file).

    True when ``eth0`` got its addresses back (then CNI DEL can clean up
    after them itself).
    """
    recorded = state.load_for_teardown(workdir)
    # Without a state file (lost with the sandbox directory) a dnsmasq may
    # still run: only then is /proc searched for it.
    dhcp.stop(workdir, scan=recorded is None or recorded.dhcp)
    mac, addresses = restore_target(recorded, cached, IFNAME)
    if not (mac or addresses) or not netns.exists(ns_name):
        return False
    return links.restore(IFNAME, names, mac, addresses, netns_name=ns_name)


def _teardown_host(sandbox_id: str, names: LinkNames) -> None:
    """The host side, independent of CNI DEL (it may run meanwhile): the
    conntrack exemption, the veth pair (its pod end goes with it) and the
    VM's bridge. Idempotent. The VM must be stopped first: its tap leaves
    the bridge being deleted."""
    foreign = links.foreign_owner(names, sandbox_id)
    if foreign is not None:
        # _prepare refused to take that bridge over: its links and rule are not ours.
        log.warning("VM bridge belongs to another sandbox, left alone", sandbox_id=sandbox_id,
                    bridge=names.host_bridge, alias=foreign)
        return
    firewall.remove_notrack(names, sandbox_id)
    links.delete_host_links(names)
    log.info("pod wiring removed", sandbox_id=sandbox_id, bridge=names.host_bridge)
