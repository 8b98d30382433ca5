"""CRI devices (raw block volumes) through the real VMBuilder and the
container service on fakes: host paths checked before anything is written,
raw virtio disks with stable serials after the VM's own, links in the seed
(docs/volumes.md "Block devices")."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from agent.domain.errors import FailedPrecondition, InvalidArgument, NotFound, PodvisorError
from agent.domain.vmrequest import VMDefaults
from agent.domain.volumes import MAX_DEVICES, Device, HostPath, HostPathKind, device_by_id, device_serial
from agent.render.cloudinit import DEVICE_LINK_SCRIPT
from agent.services.containers import ContainerService
from agent.services.vm_build import VMBuilder
from tests.services.container_fakes import REQUEST, STATE_ROOT, ContainerFakes, FakeFiles, MiB, cspec, sandbox
from tests.services.service_fakes import Journal, RecordingFiles
from tests.services.test_vm_build import FakeHost, _container, _seed_files


class FakeBlockDevices:
    """HostBlockDevices: a node with two block devices, one reached through a symlink."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.nodes = {
            "/dev/loop7": HostPath(HostPathKind.BLOCK, "/dev/loop7"),
            "/var/lib/kubelet/pods/u/volumeDevices/pv-a": HostPath(HostPathKind.BLOCK, "/dev/sdb"),
            "/etc/hostname": HostPath(HostPathKind.OTHER, "/etc/hostname", "a regular file"),
        }

    def lookup(self, path: str) -> HostPath:
        self.journal.record("block_devices.lookup", path)
        return self.nodes.get(path, HostPath(HostPathKind.MISSING))


def _builder(journal: Journal, files: FakeFiles, *, block_devices: bool = True) -> VMBuilder:
    return VMBuilder(defaults=VMDefaults(vcpus=1, memory_bytes=256 * MiB), virt_type="qemu", files=files,
                     sandbox_files=RecordingFiles(journal, STATE_ROOT), network=None, host=FakeHost(),
                     block_devices=FakeBlockDevices(journal) if block_devices else None)


RW = Device(container_path="/dev/xvda", host_path="/var/lib/kubelet/pods/u/volumeDevices/pv-a", permissions="rwm")
RO = Device(container_path="/data/ro", host_path="/dev/loop7", permissions="r")


def test_the_request_carries_the_devices_resolved_and_their_container_paths() -> None:
    journal = Journal()
    req = _builder(journal, FakeFiles(journal)).request(cspec(devices=(RW, RO)), sandbox())
    assert req.devices == (dataclasses.replace(RW, host_path="/dev/sdb"), RO)
    assert req.cloud_init.device_paths == ("/dev/xvda", "/data/ro")
    assert journal.of("block_devices.") == [("block_devices.lookup", RW.host_path),
                                            ("block_devices.lookup", RO.host_path)]


@pytest.mark.parametrize(("disk_bus", "targets"), [
    ("virtio", ["vda", "vdb", "vdc", "vdd"]),  # boot disk, seed, then the devices
    ("sata", ["sda", "vda", "vdb", "vdc"]),  # the seed takes vda; the devices follow it
])
def test_devices_become_raw_block_disks_after_the_vms_own(disk_bus: str, targets: list[str]) -> None:
    journal = Journal()
    files = FakeFiles(journal)
    builder = _builder(journal, files)
    req = dataclasses.replace(builder.request(cspec(devices=(RW, RO)), sandbox()), disk_bus=disk_bus)
    c = _container()
    spec = builder.domain_spec(c, sandbox(), req, files.container_paths(c.sandbox_id, c.id))
    assert [d.target for d in spec.disks] == targets
    assert [(d.kind, d.source, d.format, d.bus, d.readonly, d.serial, d.boot_order) for d in spec.disks[2:]] == [
        ("block", "/dev/sdb", "raw", "virtio", False, device_serial("/dev/xvda"), None),
        ("block", "/dev/loop7", "raw", "virtio", True, device_serial("/data/ro"), None),
    ]
    xml = builder.domain_xml(c, sandbox(), req, files.container_paths(c.sandbox_id, c.id))
    assert '<source dev="/dev/sdb" />' in xml and f"<serial>{device_serial('/data/ro')}</serial>" in xml


def test_a_vm_without_devices_has_only_its_own_disks() -> None:
    journal = Journal()
    files = FakeFiles(journal)
    c = _container()
    spec = _builder(journal, files).domain_spec(c, sandbox(), REQUEST, files.container_paths(c.sandbox_id, c.id))
    assert [d.kind for d in spec.disks] == ["file", "file"]


def test_the_seed_links_each_container_path_to_its_by_id_name() -> None:
    journal = Journal()
    builder = _builder(journal, FakeFiles(journal))
    req = builder.request(cspec(devices=(RW, RO)), sandbox())
    user_data = yaml.safe_load(_seed_files(builder.seed(req, _container(), sandbox()))["user-data"])
    [link] = user_data["bootcmd"]
    assert link == ["sh", "-c", DEVICE_LINK_SCRIPT, "podvisor-devices",
                    "/dev/xvda", device_by_id("/dev/xvda"), "/data/ro", device_by_id("/data/ro")]


def _refused(devices: tuple[Device, ...], error: type[PodvisorError], words: str,
             *, block_devices: bool = True) -> None:
    fakes = ContainerFakes()
    builder = _builder(fakes.journal, fakes.files, block_devices=block_devices)
    service = ContainerService(dataclasses.replace(fakes.ports, vm=builder))
    with pytest.raises(error) as exc:
        service.create(cspec(devices=devices))
    assert words in exc.value.message
    # Checked before anything is written: no record, folder, overlay, seed or domain.
    assert fakes.journal.of("store.") == []
    assert fakes.journal.of("files.") == []
    assert fakes.journal.of("libvirt.") == []
    assert fakes.store.rows == {} and fakes.files.dirs == set() and fakes.libvirt.xml == {}


def test_a_missing_host_path_is_not_found_naming_the_field() -> None:
    gone = Device(container_path="/dev/xvdb", host_path="/dev/gone")
    _refused((RW, gone), NotFound, "config.devices[1].host_path: '/dev/gone' does not exist")


def test_a_host_path_that_is_not_a_block_device_is_an_invalid_argument() -> None:
    fake = Device(container_path="/dev/xvdb", host_path="/etc/hostname")
    _refused((fake,), InvalidArgument, "config.devices[0].host_path: '/etc/hostname' is a regular file")


def test_too_many_devices_are_refused() -> None:
    many = tuple(Device(container_path=f"/dev/xvd{i}", host_path="/dev/loop7") for i in range(MAX_DEVICES + 1))
    _refused(many, InvalidArgument, f"at most {MAX_DEVICES}")


def test_a_builder_without_the_port_refuses_devices() -> None:
    _refused((RO,), FailedPrecondition, "attaches no block devices", block_devices=False)


def test_the_service_defines_the_domain_with_the_devices() -> None:
    fakes = ContainerFakes()
    service = ContainerService(dataclasses.replace(fakes.ports, vm=_builder(fakes.journal, fakes.files)))
    c = service.create(cspec(devices=(RW, RO)))
    xml = fakes.libvirt.xml[c.domain_name]
    assert xml.count('<disk type="block" device="disk">') == 2
    assert xml.count("<readonly />") == 2  # the seed and the read-only device


def test_a_kubevirt_manifest_vm_gets_the_devices_after_its_own_disks() -> None:
    # The VMI spec's own disks (a SATA boot disk here) come first; CRI devices
    # come from the container, not from the manifest, and need nothing in it.
    vmi = ('{"domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "sata"}}]}}, '
           '"volumes": [{"name": "root", "containerDisk": {"image": "x"}}]}')
    journal = Journal()
    files = FakeFiles(journal)
    builder = _builder(journal, files)
    req = builder.request(cspec(devices=(RW,), annotations={"podvisor.io/vm": vmi}), sandbox())
    assert req.disk_bus == "sata"
    c = _container()
    spec = builder.domain_spec(c, sandbox(), req, files.container_paths(c.sandbox_id, c.id))
    assert [(d.target, d.kind, d.serial) for d in spec.disks] == [
        ("sda", "file", "containerdisk"), ("vda", "file", "cloudinit"),
        ("vdb", "block", device_serial("/dev/xvda"))]


def test_one_block_device_twice_is_refused() -> None:
    # Both host paths lead to /dev/sdb (kubelet's map of one volume, twice).
    again = Device(container_path="/dev/xvdc", host_path=RW.host_path, permissions="r")
    _refused((RW, again), InvalidArgument, "config.devices[1].host_path: leads to /dev/sdb, as config.devices[0]")


def test_one_block_device_twice_read_only_is_attached_twice() -> None:
    journal = Journal()
    twice = (RO, dataclasses.replace(RO, container_path="/data/ro-again"))
    req = _builder(journal, FakeFiles(journal)).request(cspec(devices=twice), sandbox())
    assert [d.host_path for d in req.devices] == ["/dev/loop7", "/dev/loop7"]
