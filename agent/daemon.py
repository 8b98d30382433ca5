"""Composition root: adapters → services → gRPC; lock, socket, signals, sd_notify.

It only wires: every decision lives in a service. Start-up order matters:
the state directory is locked first (two agents on one state would corrupt
it), every service is built and wired before the one recovery
(``agent.services.recovery.recover``) runs, recovery runs before the socket
exists (no client can see a half-recovered state), and READY=1 is sent only
once the server answers.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType

import structlog

from agent import __version__, faults
from agent.adapters import kvm, qemu_access, qemu_img, systemd
from agent.adapters import libvirt as libvirt_adapter
from agent.adapters.block_devices import BlockDevices
from agent.adapters.cgroups import PodCgroups
from agent.adapters.console import ConsoleHub
from agent.adapters.console_log import ConsoleLogs
from agent.adapters.exec_keys import ExecKeys
from agent.adapters.files import SandboxFiles
from agent.adapters.host import Host
from agent.adapters.image_files import ImageFiles
from agent.adapters.layers import DiskExtractor
from agent.adapters.libvirt import Libvirt
from agent.adapters.metrics import PrometheusMetrics, StateSources
from agent.adapters.network.dial import PodDialer
from agent.adapters.network.pod_network import PodNetworkManager, disabled_readiness
from agent.adapters.oci_layout_source import LayoutSource
from agent.adapters.registry import RegistryClient
from agent.adapters.registry.credentials import RegistryCredentials, configured_lookup
from agent.adapters.registry.transport import RegistryHostConfig
from agent.adapters.ssh import GuestSSH
from agent.adapters.store import Store
from agent.adapters.virtiofs import VirtiofsHost
from agent.adapters.vm_files import VMFiles
from agent.adapters.watchdog import GrpcProbe, Watchdog, interval_from_environment
from agent.api import server as api_server
from agent.api.host import HostServicer
from agent.api.image_import import ImagesServicer
from agent.api.images import ImageServicer
from agent.api.runtime_service import RuntimeServicer
from agent.config import AgentConfig
from agent.domain import imageref
from agent.mtls import MTLSEndpoint, MTLSStartupError, sighup_handler
from agent.services.attach import AttachService
from agent.services.containers import ContainerService
from agent.services.exec import ExecService
from agent.services.images import ImageService
from agent.services.port_forward import PortForwardService
from agent.services.ports import ContainerPorts, ImagePorts, Metrics, NoMetrics, Ports, SystemClock
from agent.services.recovery import recover
from agent.services.runtime import RuntimeInfoService, choose_virt
from agent.services.sandboxes import LateMembers, SandboxService
from agent.services.stats import StatsService
from agent.services.streaming import GuestStreams, StreamingService
from agent.services.vm_build import VMBuilder
from agent.streaming.backend import StreamBackend
from agent.streaming.server import Settings as StreamingSettings
from agent.streaming.server import StreamingServer

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


def build_image_service(cfg: AgentConfig, store: Store, metrics: Metrics | None = None) -> ImageService:
    """Registry client, image files and store behind the image use cases."""
    reg = cfg.registries
    client = RegistryClient(
        credentials=configured_lookup({name: RegistryCredentials(username=h.username, password=h.password)
                                       for name, h in reg.hosts if h.username}),
        hosts={name: RegistryHostConfig(ca_file=h.ca_file or None, insecure=h.insecure) for name, h in reg.hosts},
        rewrites=[imageref.RewriteRule(r.prefix, r.replacement) for r in reg.rewrites],
        mirrors=[imageref.Mirror(name, h.mirrors) for name, h in reg.hosts if h.mirrors],
        timeout=cfg.images.registry_timeout_seconds,
        min_rate=cfg.images.registry_min_bytes_per_second,
    )
    ports = ImagePorts(
        registry=client,
        store=store,
        files=ImageFiles(cfg.images_dir),
        new_extractor=DiskExtractor,
        inspect_disk=lambda path, source, limit, fmt: qemu_img.info(
            path, source=source, max_virtual_size=limit, declared_format=fmt),
        clock=SystemClock(),
        metrics=metrics or NoMetrics(),
        open_layout=LayoutSource,
    )
    return ImageService(ports, max_virtual_size=cfg.images.max_virtual_size_bytes,
                        parallelism=cfg.images.pull_parallelism, max_pull_bytes=cfg.images.max_pull_bytes,
                        min_free_bytes=cfg.images.min_free_bytes)


def build_container_service(cfg: AgentConfig, store: Store, libvirt: Libvirt, console: ConsoleLogs,
                            sandbox_files: SandboxFiles, sandboxes: SandboxService, images: ImageService,
                            virt_type: str, network: PodNetworkManager | None, host: Host,
                            metrics: Metrics | None = None) -> ContainerService:
    """VM containers over their adapters; what a VM is made of from ``VMBuilder``."""
    vm_files = VMFiles(cfg.sandboxes_dir, cfg.runtime_dir)
    builder = VMBuilder(defaults=cfg.vm, virt_type=virt_type, files=vm_files, sandbox_files=sandbox_files,
                        network=network, host=host, keys=ExecKeys(), block_devices=BlockDevices())
    return ContainerService(ContainerPorts(
        store=store, hypervisor=libvirt, files=vm_files, console=console, sandboxes=sandboxes, images=images,
        vm=builder, clock=SystemClock(), cgroups=PodCgroups(), metrics=metrics or NoMetrics(),
        volumes=VirtiofsHost(_qemu_owner(cfg)),
    ), max_stop_timeout=cfg.server.max_stop_timeout_seconds)


def _qemu_owner(cfg: AgentConfig) -> tuple[int, int] | None:
    """Who the virtiofsd sockets are handed to: libvirt's QEMU user on a local system libvirtd."""
    who = qemu_access.qemu_identity() if qemu_access.local_system_qemu(cfg.libvirt.uri) else None
    return (who.uid, -1) if who is not None else None


def start_streaming_server(cfg: AgentConfig, backend: StreamBackend) -> StreamingServer:
    """The CRI streaming server (Exec, Attach, PortForward URLs), listening."""
    st = cfg.streaming
    try:
        server = StreamingServer(backend, StreamingSettings(
            address=st.address, port=st.port, tls_cert_file=st.tls_cert_file, tls_key_file=st.tls_key_file,
            idle_timeout_seconds=st.idle_timeout_seconds, max_sessions=st.max_sessions))
        server.start()
    except (OSError, ValueError) as exc:
        raise StartupError(f"[streaming]: cannot serve on {st.address}:{st.port} "
                           f"(TLS {'on' if st.tls_cert_file else 'off'}): {exc}") from None
    return server


def start_metrics(cfg: AgentConfig, metrics: PrometheusMetrics) -> None:
    """The Prometheus endpoint, listening on its own thread."""
    try:
        metrics.serve(cfg.metrics.address, cfg.metrics.port)
    except OSError as exc:
        raise StartupError(f"[metrics]: cannot serve on {cfg.metrics.address}:{cfg.metrics.port}: {exc} "
                           "(another port, or enabled = false)") from None


def start_watchdog(sock: Path, console: ConsoleLogs) -> tuple[Watchdog, GrpcProbe] | None:
    """systemd's watchdog over the agent's loops, when the unit asks for one (WatchdogSec=)."""
    interval = interval_from_environment()
    if interval is None:
        return None
    probe = GrpcProbe(f"unix:{sock}", period=min(1.0, interval / 8))
    probe.start()
    dog = Watchdog(interval, {"grpc": probe.progress, "libvirt-events": libvirt_adapter.event_loop_progress,
                              "console-logs": console.progress}, systemd.notify)
    dog.start()
    return dog, probe


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
        if qemu_access.local_system_qemu(cfg.libvirt.uri):
            problem = qemu_access.traversal_problem({"state_dir": cfg.state_dir, "runtime_dir": cfg.runtime_dir})
            if problem is not None:
                os.close(lock_fd)
                raise StartupError(problem)
        store = Store(cfg.db_path)
        files = SandboxFiles(cfg.sandboxes_dir)
        metrics = PrometheusMetrics(__version__) if cfg.metrics.enabled else None
        network = None
        if cfg.cni.enabled:
            network = PodNetworkManager(cfg.cni.conf_dirs, cfg.cni.bin_dirs, cfg.state_dir / "cni",
                                        cfg.cni.builtin_bridge, cfg.cni.builtin_subnet,
                                        observe_cni=metrics.cni_done if metrics else None)
        host = Host(cfg.state_dir)
        ports = Ports(store=store, files=files, clock=SystemClock(), network=network, host=host)
        # The sandbox service needs its members (the container service) and
        # the container service needs the sandbox service: bound below.
        members = LateMembers()
        sandboxes = SandboxService(ports, members)
        images = build_image_service(cfg, store, metrics)
        qemu_img_problem = qemu_img.version_warning()
        if qemu_img_problem:
            log.warning("qemu-img is not safe for untrusted images", problem=qemu_img_problem)

        libvirt = Libvirt(cfg.libvirt.uri, cfg.libvirt.reconnect_interval_seconds)
        if metrics is not None:
            libvirt.on_connection(metrics.libvirt_connection)
        libvirt.start()
        choice, facts = choose_virt(cfg.libvirt.virt_type, kvm)
        log.info("virtualisation type chosen", virt_type=choice.virt_type, reason=choice.reason)

        console = ConsoleLogs()
        containers = build_container_service(cfg, store, libvirt, console, files, sandboxes, images,
                                             choice.virt_type, network, host, metrics)
        members.bind(containers)
        images.set_in_use(containers.image_ids_in_use)
        libvirt.on_lifecycle(lambda ev: containers.on_domain_event(ev.domain, ev.kind, ev.detail))
        libvirt.on_reconnect(containers.reconcile_all)
        recover(ports, sandboxes, images, containers)
        # Fault-injection tests only: armed after recovery, so a restart
        # with the same environment recovers before it can crash again.
        try:
            faults.arm_from_environment()
            faults.arm_wedge(os.environ.get(faults.WEDGE_ENV))
        except ValueError as exc:  # an unknown crash point: a clear start-up error, not a traceback
            raise StartupError(str(exc)) from None
        if os.environ.get(faults.ENV):
            log.warning("crash point armed: this agent kills itself there (tests only)",
                        crash_at=os.environ[faults.ENV])
        if os.environ.get(faults.WEDGE_ENV):
            log.warning("wedge point armed: a watched loop hangs on its trigger (tests only)",
                        wedge=os.environ[faults.WEDGE_ENV])
        console.start()

        runtime = RuntimeInfoService(
            libvirt=libvirt,
            cni_lookup=network.readiness if network is not None else disabled_readiness,
            host=host,
            virt=choice,
            kvm=facts,
            state_dir=cfg.state_dir,
        )
        # The runtime's ways into a guest, behind the streaming server's URLs.
        execs = ExecService(containers, libvirt, sandboxes=sandboxes, keys=ExecKeys(), shell=GuestSSH(),
                            guest_ready_timeout_s=cfg.exec.guest_ready_timeout_seconds)
        consoles = ConsoleHub()
        guest_streams = GuestStreams(execs, AttachService(containers, consoles),
                                     PortForwardService(sandboxes, PodDialer()))
        streaming = start_streaming_server(cfg, guest_streams)
        mtls = None
        try:  # the control-plane endpoint: files checked now, listening once the socket serves
            mtls = MTLSEndpoint.prepare(cfg.mtls, cfg.streaming, guest_streams, cfg.server.socket) \
                if cfg.mtls.enabled else None
        except MTLSStartupError as exc:
            streaming.stop()
            raise StartupError(str(exc)) from None
        urls = mtls.urls(streaming) if mtls else streaming
        grpc_server, health = api_server.build(
            RuntimeServicer(runtime, sandboxes, str(cfg.sandboxes_dir), containers,
                            StatsService(sandboxes, containers), StreamingService(containers, sandboxes, urls),
                            execs),
            ImageServicer(images, str(cfg.images_dir)),
            HostServicer(runtime),
            cfg.server.workers,
            max_concurrent_rpcs=cfg.server.rpc_limit,
            max_event_streams=cfg.server.max_event_streams,
            max_concurrent_stops=cfg.server.max_concurrent_stops,
            outer_interceptors=mtls.interceptors() if mtls else (),
            metrics=metrics,
            image_import=ImagesServicer(images),
        )
        if metrics is not None:
            metrics.watch(StateSources(sandboxes.state_counts, containers.state_counts, images.usage))
            start_metrics(cfg, metrics)
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
        # Health follows libvirt: NOT_SERVING while libvirtd cannot be reached
        # (set before the server answers, so no client sees an unknown status).
        api_server.set_serving(health, False)
        libvirt.on_connection(lambda up: api_server.set_serving(health, up and not self._stop.is_set()))
        grpc_server.start()
        if mtls is not None:
            try:
                mtls.start()
            except MTLSStartupError as exc:
                grpc_server.stop(0)
                raise StartupError(str(exc)) from None

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        signal.signal(signal.SIGHUP, sighup_handler(mtls))
        systemd.notify(f"READY=1\nSTATUS=serving on {sock}\nMAINPID={os.getpid()}")
        log.info("podvisor-agent serving", version=__version__, socket=str(sock),
                 state_dir=str(cfg.state_dir), virt_type=choice.virt_type)
        watchdog = start_watchdog(sock, console)

        while not self._stop.wait(1.0):
            pass

        systemd.notify("STOPPING=1")
        api_server.set_serving(health, False)
        if watchdog is not None:
            for part in watchdog:
                part.close()
        if metrics is not None:
            metrics.close()
        grace = cfg.server.shutdown_grace_seconds
        containers.close_streams()
        grpc_server.stop(grace).wait(grace + 5)
        if mtls is not None:
            mtls.stop()
        streaming.stop()
        consoles.close()
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
