"""Composition root: adapters → services → gRPC; signals; sd_notify.

Start-up order matters: the state directory is locked first (two agents on
one state would corrupt it), recovery runs before the socket exists (no client
can see a half-recovered state), and READY=1 is sent only once the server
answers.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from agent import __version__
from agent.adapters import cni, host, kvm, qemu_img, systemd
from agent.adapters.console_log import ConsoleLogs
from agent.adapters.files import SandboxFiles
from agent.adapters.image_files import ImageFiles
from agent.adapters.layers import DiskExtractor
from agent.adapters.libvirt import Libvirt
from agent.adapters.pod_network import PodNetworkManager
from agent.adapters.registry import RegistryClient
from agent.adapters.registry.credentials import RegistryCredentials, configured_lookup
from agent.adapters.registry.transport import RegistryHostConfig
from agent.adapters.store import Store
from agent.adapters.vm_files import VMFiles
from agent.api import server as api_server
from agent.api.podvisor_service import HostServicer
from agent.api.runtime_service import ImageServicer, RuntimeServicer
from agent.config import AgentConfig
from agent.domain import imageref, virt, vmrequest
from agent.domain.cni import ConfigLookup, NetworkConfig
from agent.domain.sandbox import NetworkMode, Sandbox
from agent.domain.vm import Container, VMRequest
from agent.render import cloudinit, domain_xml, nocloud
from agent.services.containers import ContainerPorts, ContainerService, ContainerSpec
from agent.services.images import ImageService
from agent.services.ports import ImagePorts, Ports, SystemClock
from agent.services.recovery import recover
from agent.services.runtime import RuntimeInfoService
from agent.services.sandboxes import SandboxService

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """The agent cannot start; the message says why and what to do."""


def _lock_state_dir(state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
    fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupError(
                f"another podvisor-agent is using the state directory {state_dir}"
            ) from None
        raise
    return fd


def _prepare_socket(path: Path) -> None:
    """Create the socket's directory and clear a stale socket left by a crash."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: a leftover from a killed agent
        return
    finally:
        probe.close()
    raise StartupError(f"another process is already serving on {path}")


def _choose_virt(configured: str) -> tuple[virt.VirtChoice, virt.KvmFacts]:
    facts = kvm.gather()
    if virt.needs_probe(configured, facts):
        ok, detail = kvm.probe()
        facts = virt.KvmFacts(facts.device_present, facts.device_usable, facts.pvm, ok, detail)
    choice = virt.choose(configured, facts)
    if configured == "kvm" and (facts.pvm or not facts.device_usable):
        log.warning("virt_type = kvm is configured, but guests may not run on this /dev/kvm",
                    pvm=facts.pvm, usable=facts.device_usable)
    return choice, facts


def network_readiness(cfg: AgentConfig) -> ConfigLookup:
    """What NetworkReady reports: the CNI configuration in use, the built-in
    fallback, or that pod networking is switched off."""
    if not cfg.cni.enabled:
        return ConfigLookup(None, NetworkConfig("none", "", ()),
                            "pod networking is disabled ([cni] enabled = false): VMs get no NIC")
    lookup = cni.find_config(cfg.cni.conf_dirs, cfg.cni.bin_dirs)
    if lookup.config is not None:
        return lookup
    return ConfigLookup(None, NetworkConfig("podvisor", "1.0.0", ("bridge", "host-local", "portmap")),
                        f"{lookup.message}; using the built-in network (bridge {cfg.cni.builtin_bridge}, "
                        f"subnet {cfg.cni.builtin_subnet})")


def build_image_service(cfg: AgentConfig, store: Store) -> ImageService:
    """Registry client, image files and store behind the image use cases."""
    reg = cfg.registries
    client = RegistryClient(
        credentials=configured_lookup({name: RegistryCredentials(username=h.username, password=h.password)
                                       for name, h in reg.hosts if h.username}),
        hosts={name: RegistryHostConfig(ca_file=h.ca_file or None, insecure=h.insecure) for name, h in reg.hosts},
        rewrites=[imageref.RewriteRule(r.prefix, r.replacement) for r in reg.rewrites],
        mirrors=[imageref.Mirror(name, h.mirrors) for name, h in reg.hosts if h.mirrors],
        timeout=cfg.images.registry_timeout_seconds,
    )
    ports = ImagePorts(
        registry=client,
        store=store,
        files=ImageFiles(cfg.images_dir),
        new_extractor=DiskExtractor,
        inspect_disk=lambda path, source, limit: qemu_img.info(path, source=source, max_virtual_size=limit),
        now_ns=time.time_ns,
    )
    return ImageService(ports, max_virtual_size=cfg.images.max_virtual_size_bytes,
                        parallelism=cfg.images.pull_parallelism)


def build_container_service(cfg: AgentConfig, store: Store, libvirt: Libvirt, console: ConsoleLogs,
                            sandboxes: SandboxService, images: ImageService, virt_type: str,
                            network: PodNetworkManager | None) -> ContainerService:
    """VM containers: request merging, seeds and domain XML behind the use cases."""
    defaults = cfg.vm

    def build_request(spec: ContainerSpec, sandbox: Sandbox) -> VMRequest:
        return vmrequest.build_vm_request(
            cri_resources=vmrequest.CRIResources(
                memory_limit_in_bytes=spec.memory_limit_in_bytes, cpu_quota=spec.cpu_quota,
                cpu_period=spec.cpu_period, cpu_shares=spec.cpu_shares),
            pod_annotations=sandbox.spec.annotations, container_annotations=spec.annotations,
            env=spec.env, command=spec.command, args=spec.args, defaults=defaults)

    def wiring(sandbox: Sandbox) -> Any:
        if network is None or sandbox.spec.network_mode is not NetworkMode.POD:
            return None
        status = network.status(sandbox.id, cfg.sandboxes_dir / sandbox.id)
        return status.wiring if status is not None else None

    def start_dhcp(sandbox: Sandbox) -> None:
        if network is not None and sandbox.spec.network_mode is NetworkMode.POD:
            network.ensure_dhcp(sandbox.id, cfg.sandboxes_dir / sandbox.id)

    def nic(sandbox: Sandbox) -> tuple[str, str] | None:
        w = wiring(sandbox)
        return (w.host_bridge, w.vm_mac) if w is not None else None

    def build_seed(request: VMRequest, container: Container, sandbox: Sandbox) -> bytes:
        # Default network-config: what CNI assigned, so guests come up on the
        # pod network even without DHCP.
        w = wiring(sandbox) if request.pod_network else None
        pod_net = None
        if w is not None:
            pod_net = cloudinit.PodNetwork(
                mac=w.vm_mac, addresses=(f"{w.ip}/{w.prefix}",), gateways=(w.gateway,) if w.gateway else (),
                routes=tuple(cloudinit.Route(to=r.dst, via=r.gw) for r in w.routes),
                dns_servers=tuple(w.dns_servers), dns_searches=tuple(w.dns_searches), mtu=w.mtu)
        # instance-id: the container id, stable for the VM's life, new for a new VM.
        files = cloudinit.seed_files(instance_id=container.id,
                                     hostname=sandbox.spec.hostname or sandbox.spec.metadata.name,
                                     cloud_init=request.cloud_init, network=pod_net)
        return nocloud.build_seed_iso(files["meta-data"], files["user-data"], files.get("network-config"))

    return ContainerService(ContainerPorts(
        store=store, libvirt=libvirt, files=VMFiles(cfg.sandboxes_dir, cfg.runtime_dir, nic), console=console,
        sandboxes=sandboxes, images=images, build_request=build_request, build_seed=build_seed,
        render_domain=domain_xml.render, parse_metadata=domain_xml.parse_metadata,
        virt_type=lambda: virt_type, start_dhcp=start_dhcp,
    ))


class Daemon:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self._stop = threading.Event()

    def request_stop(self, signum: int = 0, _frame: FrameType | None = None) -> None:
        if signum:
            log.info("signal received, draining", signal=signal.Signals(signum).name)
        self._stop.set()

    def run(self) -> int:
        cfg = self.cfg
        lock_fd = _lock_state_dir(cfg.state_dir)
        store = Store(cfg.db_path)
        files = SandboxFiles(cfg.sandboxes_dir)
        network = None
        if cfg.cni.enabled:
            network = PodNetworkManager(cfg.cni.conf_dirs, cfg.cni.bin_dirs, cfg.state_dir / "cni",
                                        cfg.cni.builtin_bridge, cfg.cni.builtin_subnet)
        ports = Ports(store=store, files=files, clock=SystemClock(), network=network, node_ip=host.node_ipv4)
        sandboxes = SandboxService(ports)
        recover(ports, sandboxes)

        images = build_image_service(cfg, store)
        images.recover()

        libvirt = Libvirt(cfg.libvirt.uri, cfg.libvirt.reconnect_interval_seconds)
        libvirt.start()
        choice, facts = _choose_virt(cfg.libvirt.virt_type)
        log.info("virtualisation type chosen", virt_type=choice.virt_type, reason=choice.reason)

        console = ConsoleLogs()
        containers = build_container_service(cfg, store, libvirt, console, sandboxes, images, choice.virt_type,
                                             network)
        images.set_in_use(containers.image_ids_in_use)
        sandboxes.stop_members = containers.stop_in_sandbox
        sandboxes.remove_members = containers.remove_in_sandbox
        libvirt.on_lifecycle(lambda ev: containers.on_domain_event(ev.domain, ev.kind, ev.detail))
        libvirt.on_reconnect(containers.reconcile_all)
        containers.recover()
        console.start()

        runtime = RuntimeInfoService(
            libvirt=libvirt,
            cni_lookup=lambda: network_readiness(cfg),
            host_facts=lambda: host.gather(cfg.state_dir),
            virt=choice,
            kvm=facts,
            state_dir=cfg.state_dir,
        )
        grpc_server, health = api_server.build(
            RuntimeServicer(runtime, sandboxes, str(cfg.sandboxes_dir), containers),
            ImageServicer(images, str(cfg.images_dir)),
            HostServicer(runtime),
            cfg.server.workers,
        )
        sock = cfg.server.socket
        _prepare_socket(sock)
        old_umask = os.umask(0o117)  # the socket is born 0660, never wider
        try:
            grpc_server.add_insecure_port(f"unix:{sock}")
        finally:
            os.umask(old_umask)
        if cfg.server.socket_group:
            os.chown(sock, 0, grp.getgrnam(cfg.server.socket_group).gr_gid)
        os.chmod(sock, 0o660)
        grpc_server.start()
        api_server.set_serving(health, True)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        systemd.notify(f"READY=1\nSTATUS=serving on {sock}\nMAINPID={os.getpid()}")
        log.info("podvisor-agent serving", version=__version__, socket=str(sock),
                 state_dir=str(cfg.state_dir), virt_type=choice.virt_type)

        while not self._stop.wait(1.0):
            pass

        systemd.notify("STOPPING=1")
        api_server.set_serving(health, False)
        grace = cfg.server.shutdown_grace_seconds
        containers.close_streams()
        grpc_server.stop(grace).wait(grace + 5)
        console.close()
        libvirt.close()
        store.close()
        try:
            sock.unlink()
        except FileNotFoundError:
            pass
        os.close(lock_fd)
        log.info("podvisor-agent stopped")
        return 0
