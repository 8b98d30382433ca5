"""Pure conversions of host information into podvisor.v1 messages."""

from __future__ import annotations

from agent.api.gen.podvisor.v1 import podvisor_pb2
from agent.services.runtime import HostInfo


def host_info_to_pb(h: HostInfo) -> podvisor_pb2.HostInfoResponse:
    """Host/Info's answer: virt type, libvirt and QEMU versions, host figures."""
    return podvisor_pb2.HostInfoResponse(
        virt_type=h.virt.virt_type,
        virt_type_reason=h.virt.reason,
        libvirt_version=h.libvirt_library,
        libvirtd_version=h.libvirt_daemon,
        qemu_version=h.qemu,
        libvirt_uri=h.libvirt_uri,
        libvirt_connected=h.libvirt_connected,
        hostname=h.host.hostname,
        kernel_release=h.host.kernel_release,
        cpu_model=h.host.cpu_model,
        cpus=h.host.cpus,
        memory_total_bytes=h.host.memory_total_bytes,
        memory_available_bytes=h.host.memory_available_bytes,
        state_dir=str(h.state_dir),
        state_disk_total_bytes=h.host.disk_total_bytes,
        state_disk_free_bytes=h.host.disk_free_bytes,
        agent_version=h.agent_version,
        kvm_device_present=h.kvm.device_present,
        kvm_pvm=h.kvm.pvm,
    )
