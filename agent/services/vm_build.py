"""What a VM is made of, decided at CreateContainer: its request, the pod
network it joins, its NoCloud seed and its domain XML.

The request merges the CRI fields, the ``podvisor.io/`` annotations and the
KubeVirt VMI spec over the configured defaults (``domain/vmrequest``). The
pod network's wiring, as the pod network adapter stored it in the sandbox's
folder, gives the NIC (host bridge and MAC) and the seed's default
network-config, so a guest comes up on the pod network even without DHCP;
the sandbox's DHCP server is started for the VM here too. A hostNetwork
(NODE) sandbox's VM gets a QEMU user-mode NIC instead, and no network-config.
CRI devices (raw block volumes), their host paths checked through the
``HostBlockDevices`` port, become raw virtio disks after the VM's own, and
the seed links their container paths (docs/volumes.md).

The container service calls this through its ``VMBuild`` port, so the
lifecycle (records, files, libvirt, rollback) and the VM's shape are tested
apart.
"""

from __future__ import annotations

import dataclasses
import uuid

from agent.domain import vmrequest
from agent.domain.cgroups import pod_cgroup
from agent.domain.errors import FailedPrecondition, InvalidArgument
from agent.domain.network.wiring import PodWiring
from agent.domain.sandbox import NetworkMode, Sandbox
from agent.domain.vm import (
    Container,
    ContainerPaths,
    ContainerSpec,
    DiskSpec,
    DomainSpec,
    InterfaceSpec,
    VMRequest,
)
from agent.domain.vmrequest import VMDefaults
from agent.domain.volumes import MAX_DEVICES, Device, attachable_device, check_distinct_devices, device_serial
from agent.render import cloudinit, domain_xml, nocloud
from agent.services.ports import ExecKeyStore, HostBlockDevices, HostSize, SandboxFiles, VMFiles, VMNetwork


class VMBuilder:
    """The ``VMBuild`` port: ``network`` is None when pod networking is off;
    ``keys`` None leaves Exec's SSH access out of the seed."""

    def __init__(self, *, defaults: VMDefaults, virt_type: str, files: VMFiles, sandbox_files: SandboxFiles,
                 network: VMNetwork | None, host: HostSize, keys: ExecKeyStore | None = None,
                 block_devices: HostBlockDevices | None = None) -> None:
        self._defaults = defaults
        self._block_devices = block_devices
        self._keys = keys
        self._host = host
        self._virt_type = virt_type
        self._files = files
        self._sandbox_files = sandbox_files
        self._network = network

    def request(self, spec: ContainerSpec, sandbox: Sandbox) -> VMRequest:
        """CreateContainer → VMRequest (InvalidArgument naming the field at fault).

        Sizes are bounded by ``[vm] largest_*`` or, where those are 0, by the
        host's CPU count and memory, read now.
        """
        capacity = self._host.capacity()
        request = vmrequest.build_vm_request(
            cri_resources=vmrequest.CRIResources(
                memory_limit_in_bytes=spec.memory_limit_in_bytes, cpu_quota=spec.cpu_quota,
                cpu_period=spec.cpu_period, cpu_shares=spec.cpu_shares),
            pod_annotations=sandbox.spec.annotations, container_annotations=spec.annotations,
            env=spec.env, command=spec.command, args=spec.args, defaults=self._defaults,
            ceiling=self._defaults.ceiling(capacity.cpus, capacity.memory_bytes))
        devices = self._devices(spec)
        # The pod's resolver and kernel settings reach the guest through its
        # seed, and so do the links to its block devices.
        return dataclasses.replace(request, devices=devices, cloud_init=dataclasses.replace(
            request.cloud_init, dns=sandbox.spec.dns, sysctls=dict(sandbox.spec.sysctls),
            device_paths=tuple(d.container_path for d in devices)))

    def _devices(self, spec: ContainerSpec) -> tuple[Device, ...]:
        """The CRI devices, each host path checked to be (or lead to) a block device here."""
        if not spec.devices:
            return ()
        if len(spec.devices) > MAX_DEVICES:
            raise InvalidArgument("config.devices", f"{len(spec.devices)} devices; a VM takes at most {MAX_DEVICES}")
        if self._block_devices is None:
            raise FailedPrecondition("config.devices: this agent attaches no block devices")
        devices = tuple(attachable_device(f"config.devices[{i}]", d, self._block_devices.lookup(d.host_path))
                        for i, d in enumerate(spec.devices))
        check_distinct_devices(devices)
        return devices

    def _wiring(self, sandbox: Sandbox) -> PodWiring | None:
        if self._network is None or sandbox.spec.network_mode is not NetworkMode.POD:
            return None
        status = self._network.status(sandbox.id, self._sandbox_files.sandbox_dir(sandbox.id))
        return status.wiring if status is not None else None

    def prepare_network(self, sandbox: Sandbox) -> None:
        """Start the sandbox's DHCP server for its VM (pod network only)."""
        if self._network is not None and sandbox.spec.network_mode is NetworkMode.POD:
            self._network.ensure_dhcp(sandbox.id, self._sandbox_files.sandbox_dir(sandbox.id))

    def seed(self, request: VMRequest, container: Container, sandbox: Sandbox) -> bytes:
        """The NoCloud seed ISO: meta-data, user-data, on a pod network network-config, and
        Exec's SSH keys (meta-data, vendor-data). The container's directory must exist."""
        # Default network-config: what CNI assigned, so guests come up on the
        # pod network even without DHCP.
        w = self._wiring(sandbox) if request.pod_network else None
        pod_net = None
        if w is not None:
            pod_net = cloudinit.PodNetwork(
                mac=w.vm_mac, addresses=(f"{w.ip}/{w.prefix}",), gateways=(w.gateway,) if w.gateway else (),
                routes=tuple(cloudinit.Route(to=r.dst, via=r.gw) for r in w.routes),
                dns_servers=tuple(w.dns_servers), dns_searches=tuple(w.dns_searches), mtu=w.mtu)
        # Exec's SSH way in: keys made now, kept in the container's directory.
        access = self._keys.create(container.directory) if self._keys is not None else None
        # instance-id: the container id, stable for the VM's life, new for a new VM.
        files = cloudinit.seed_files(instance_id=container.id,
                                     hostname=sandbox.spec.hostname or sandbox.spec.metadata.name,
                                     cloud_init=request.cloud_init, network=pod_net, access=access)
        return nocloud.build_seed_iso(files["meta-data"], files["user-data"], files.get("network-config"),
                                      files.get("vendor-data"))

    def domain_spec(self, c: Container, sandbox: Sandbox, request: VMRequest, paths: ContainerPaths) -> DomainSpec:
        """Everything the domain XML says: sizes, disks, NIC, firmware, Podvisor metadata."""
        disks = [
            DiskSpec(source=c.overlay_path, format="qcow2", target=_target(request.disk_bus, 0),
                     bus=request.disk_bus, boot_order=1, serial="containerdisk"),
            # KubeVirt attaches the NoCloud seed as a disk; any block device
            # labelled cidata is found by cloud-init.
            DiskSpec(source=c.seed_path, format="raw",
                     target=_target("virtio", 1 if request.disk_bus == "virtio" else 0),
                     bus="virtio", readonly=True, serial="cloudinit"),
        ]
        disks += _device_disks(request.devices, {d.target for d in disks})
        interfaces: list[InterfaceSpec] = []
        if request.pod_network and sandbox.spec.network_mode is NetworkMode.NODE:
            # hostNetwork: QEMU's user-mode stack, outbound through the node.
            mac = "52:54:00:" + ":".join(c.id[i:i + 2] for i in (0, 2, 4))
            interfaces.append(InterfaceSpec(bridge="", mac=mac, model=request.interface_model, kind="user"))
        else:
            w = self._wiring(sandbox) if request.pod_network else None
            if w is not None:
                interfaces.append(InterfaceSpec(bridge=w.host_bridge, mac=w.vm_mac, model=request.interface_model))
        firmware = self._files.firmware(request.firmware, paths)
        pc = pod_cgroup(sandbox.spec.cgroup_parent)
        return DomainSpec(
            name=c.domain_name, uuid=str(uuid.UUID(c.id[:32])), virt_type=self._virt_type,
            vcpus=c.vcpus, max_vcpus=c.max_vcpus, memory_bytes=c.memory_bytes,
            max_memory_bytes=c.max_memory_bytes, disks=tuple(disks), serial_socket=c.serial_socket,
            console_log=c.console_log, sandbox_id=c.sandbox_id, container_id=c.id,
            pod_name=sandbox.spec.metadata.name, pod_namespace=sandbox.spec.metadata.namespace,
            container_name=c.name, cpu_shares=c.cpu_shares, firmware=request.firmware,
            uefi_loader=firmware.get("loader", ""), uefi_vars_template=firmware.get("vars_template", ""),
            uefi_nvram=firmware.get("nvram", ""), interfaces=tuple(interfaces),
            partition=pc.partition if pc is not None else "",
            # A command is the VM's workload: its wrapper reports the exit code on this port.
            workload_exit=paths.workload_exit if request.cloud_init.command else "",
            guest_agent_socket=paths.guest_agent_socket if request.guest_agent else "",
            # Pod volumes: the agent's virtiofsd socket and the guest's mount report port.
            virtiofs_socket=paths.virtiofs_socket if request.cloud_init.volumes else "",
            volumes_status=paths.volumes_status if request.cloud_init.volumes else "",
        )

    def domain_xml(self, container: Container, sandbox: Sandbox, request: VMRequest, paths: ContainerPaths) -> str:
        """The libvirt domain XML of ``domain_spec``."""
        return domain_xml.render(self.domain_spec(container, sandbox, request, paths))

    def is_podvisor_domain(self, xml: str) -> bool:
        """Whether a domain carries Podvisor's metadata (made by a Podvisor agent)."""
        return domain_xml.parse_metadata(xml) is not None


def _device_disks(devices: tuple[Device, ...], taken: set[str]) -> list[DiskSpec]:
    """CRI devices as raw virtio disks on the next free vdX, found in the guest by their serial."""
    free = (t for t in (_target("virtio", i) for i in range(26)) if t not in taken)
    return [DiskSpec(source=d.host_path, format="raw", target=next(free), bus="virtio", readonly=d.readonly,
                     serial=device_serial(d.container_path), kind="block") for d in devices]


def _target(bus: str, index: int) -> str:
    prefix = {"virtio": "vd", "sata": "sd", "scsi": "sd", "ide": "hd"}.get(bus, "vd")
    return prefix + "abcdefghijklmnopqrstuvwxyz"[index]
