"""Tests for the KubeVirt VMI spec parser (agent.domain.kubevirt)."""

from __future__ import annotations

import base64
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.domain.errors import InvalidArgument
from agent.domain.imageref import ImageRef
from agent.domain.kubevirt import (
    DEFAULT_FIELD,
    KIND_SPEC,
    KIND_VM,
    KIND_VMI,
    CloudInitNoCloudVolume,
    ContainerDiskVolume,
    Disk,
    Interface,
    parse_quantity,
    parse_vmi,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
F = DEFAULT_FIELD
VM_SPEC = f"{F}.spec.template.spec"
TESTVM_SCRIPT = b'#!/bin/sh\necho "Hello from testvm"\n'


def _spec(**overrides: Any) -> dict[str, Any]:
    """A minimal bare VMI spec with a containerDisk, changed by ``overrides``."""
    spec: dict[str, Any] = {
        "domain": {"devices": {}, "resources": {"requests": {"memory": "1Gi"}}},
        "volumes": [{"name": "root", "containerDisk": {"image": "registry.example/vm/debian:12"}}],
    }
    spec.update(overrides)
    return spec


def _domain(**domain: Any) -> dict[str, Any]:
    return _spec(domain=domain)


def _parse(doc: dict[str, Any]) -> Any:
    return parse_vmi(json.dumps(doc))


# -- the classic testvm --------------------------------------------------------


def test_testvm_example_parses_into_the_expected_spec() -> None:
    vmi = parse_vmi((EXAMPLES / "testvm.yaml").read_text())

    assert vmi.kind == KIND_VM
    assert vmi.name == "testvm"
    assert vmi.field == VM_SPEC
    assert vmi.memory_bytes == 64_000_000  # "M" is decimal in Kubernetes quantities
    assert vmi.memory_field == f"{VM_SPEC}.domain.resources.requests.memory"
    assert (vmi.vcpus, vmi.max_vcpus, vmi.max_memory_bytes, vmi.firmware) == (None, None, None, None)
    assert vmi.disks == (
        Disk("containerdisk", "disk", "virtio", field=f"{VM_SPEC}.domain.devices.disks[0]"),
        Disk("cloudinitdisk", "disk", "virtio", field=f"{VM_SPEC}.domain.devices.disks[1]"),
    )
    assert vmi.interfaces == (Interface("default", "bridge"),)
    assert vmi.networks == ("default",)
    assert vmi.pod_network is True
    assert vmi.container_disk == ContainerDiskVolume(
        name="containerdisk",
        image="kubevirt/cirros-registry-disk-demo",
        image_ref=ImageRef("docker.io", "kubevirt/cirros-registry-disk-demo", tag="latest"),
        path=None,
        field=f"{VM_SPEC}.volumes[0].containerDisk",
    )
    assert vmi.cloud_init == CloudInitNoCloudVolume(
        name="cloudinitdisk",
        user_data=TESTVM_SCRIPT,
        network_data=None,
        field=f"{VM_SPEC}.volumes[1].cloudInitNoCloud",
        user_data_field=f"{VM_SPEC}.volumes[1].cloudInitNoCloud.userDataBase64",
    )
    assert vmi.container_disk_disk == vmi.disks[0]


def test_testvm_example_is_the_classic_kubevirt_shape() -> None:
    doc = yaml.safe_load((EXAMPLES / "testvm.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("kubevirt.io/v1", "VirtualMachine")
    assert doc["spec"]["running"] is False
    assert doc["spec"]["template"]["metadata"]["labels"]
    assert base64.b64decode(
        doc["spec"]["template"]["spec"]["volumes"][1]["cloudInitNoCloud"]["userDataBase64"]
    ).startswith(b"#!")


# -- document shapes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("wrap", "kind", "field"),
    [
        pytest.param(lambda s: s, KIND_SPEC, F, id="bare-spec"),
        pytest.param(
            lambda s: {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                       "metadata": {"name": "vmi1"}, "spec": s},
            KIND_VMI, f"{F}.spec", id="vmi-manifest",
        ),
        pytest.param(
            lambda s: {"apiVersion": "kubevirt.io/v1alpha3", "kind": "VirtualMachine",
                       "metadata": {"name": "vm1"}, "spec": {"runStrategy": "Always", "template": {"spec": s}}},
            KIND_VM, f"{F}.spec.template.spec", id="vm-manifest",
        ),
    ],
)
def test_accepted_shapes(wrap: Any, kind: str, field: str) -> None:
    spec = _spec()
    for text in (json.dumps(wrap(spec)), yaml.safe_dump(wrap(spec))):
        vmi = parse_vmi(text)
        assert (vmi.kind, vmi.field, vmi.memory_bytes) == (kind, field, 2**30)
        assert vmi.container_disk is not None
        assert vmi.container_disk.image == "registry.example/vm/debian:12"


@pytest.mark.parametrize(
    ("doc", "field", "message"),
    [
        pytest.param({"volumes": []}, F, "VirtualMachineInstanceSpec", id="no-domain"),
        pytest.param({"apiVersion": "v1", "kind": "Pod", "spec": {}}, f"{F}.apiVersion", "kubevirt.io/v1",
                     id="other-group"),
        pytest.param({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachinePool", "spec": {}}, f"{F}.kind",
                     "VirtualMachinePool", id="other-kind"),
        pytest.param({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "spec": {}},
                     f"{F}.spec.template", "is required", id="vm-without-template"),
        pytest.param({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                      "spec": {"instancetype": {"name": "u1.small"}, "template": {"spec": _spec()}}},
                     f"{F}.spec.instancetype", "not supported", id="instancetype"),
        pytest.param({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance"},
                     f"{F}.spec", "is required", id="vmi-without-spec"),
        pytest.param({"domain": []}, f"{F}.domain", "expected a mapping", id="domain-not-a-mapping"),
    ],
)
def test_refused_shapes(doc: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _parse(doc)
    assert err.value.field == field
    assert message in err.value.message


@pytest.mark.parametrize("text", ["[1, 2]", "{not: [valid", "just text"])
def test_not_a_mapping_names_the_annotation(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_vmi(text, "sandbox_config.annotations['podvisor.io/vm']")
    assert err.value.field == "sandbox_config.annotations['podvisor.io/vm']"


# -- sizing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "vcpus", "max_vcpus"),
    [
        pytest.param({"cpu": {"cores": 2}}, 2, None, id="cores"),
        pytest.param({"cpu": {"cores": 2, "sockets": 2, "threads": 2}}, 8, None, id="topology"),
        pytest.param({"cpu": {"sockets": 3, "cores": 0}}, 3, None, id="zero-counts-as-unset"),
        pytest.param({"cpu": {"cores": 2, "sockets": 1, "maxSockets": 4}}, 2, 8, id="max-sockets"),
        pytest.param({"resources": {"requests": {"cpu": "2"}}}, 2, None, id="request"),
        pytest.param({"resources": {"requests": {"cpu": "1500m"}}}, 2, None, id="millicores-round-up"),
        pytest.param({"resources": {"requests": {"cpu": "0.5"}}}, 1, None, id="half-cpu"),
        pytest.param({"resources": {"requests": {"cpu": 3}}}, 3, None, id="yaml-number"),
        pytest.param({"resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "3"}}}, 3, None,
                     id="limit-wins-as-in-kubevirt"),
        pytest.param({"cpu": {"cores": 2}, "resources": {"requests": {"cpu": "6"}}}, 2, None,
                     id="topology-wins-over-resources"),
        pytest.param({"cpu": {"model": "host-model"}}, None, None, id="no-topology"),
        pytest.param({}, None, None, id="nothing"),
    ],
)
def test_vcpus(domain: dict[str, Any], vcpus: int | None, max_vcpus: int | None) -> None:
    vmi = _parse(_domain(**domain))
    assert (vmi.vcpus, vmi.max_vcpus) == (vcpus, max_vcpus)


def test_vcpus_field_names_where_the_count_came_from() -> None:
    vmi = _parse(_domain(resources={"requests": {"cpu": "2"}}))
    assert vmi.vcpus_field == f"{F}.domain.resources.requests.cpu"
    vmi = _parse(_domain(cpu={"cores": 2, "maxSockets": 2}))
    assert (vmi.vcpus_field, vmi.max_vcpus_field) == (f"{F}.domain.cpu", f"{F}.domain.cpu.maxSockets")


@pytest.mark.parametrize(
    ("domain", "memory", "max_memory"),
    [
        pytest.param({"resources": {"requests": {"memory": "64M"}}}, 64_000_000, None, id="decimal-M"),
        pytest.param({"resources": {"requests": {"memory": "64Mi"}}}, 64 * 2**20, None, id="binary-Mi"),
        pytest.param({"resources": {"requests": {"memory": "1.5Gi"}}}, 3 * 2**29, None, id="fraction"),
        pytest.param({"resources": {"requests": {"memory": "1e9"}}}, 10**9, None, id="exponent"),
        pytest.param({"resources": {"requests": {"memory": 67108864}}}, 67108864, None, id="yaml-number"),
        pytest.param({"resources": {"limits": {"memory": "2Gi"}}}, 2 * 2**30, None, id="limit-only"),
        pytest.param({"resources": {"requests": {"memory": "1Gi"}, "limits": {"memory": "2Gi"}}}, 2**30, None,
                     id="request-over-limit"),
        pytest.param({"memory": {"guest": "3Gi"}, "resources": {"requests": {"memory": "1Gi"}}}, 3 * 2**30, None,
                     id="guest-wins"),
        pytest.param({"memory": {"guest": "1Gi", "maxGuest": "4Gi"}}, 2**30, 4 * 2**30, id="max-guest"),
        pytest.param({}, None, None, id="nothing"),
    ],
)
def test_memory(domain: dict[str, Any], memory: int | None, max_memory: int | None) -> None:
    vmi = _parse(_domain(**domain))
    assert (vmi.memory_bytes, vmi.max_memory_bytes) == (memory, max_memory)


@pytest.mark.parametrize(
    ("domain", "field", "message"),
    [
        pytest.param({"resources": {"requests": {"memory": "8Mi"}}}, "domain.resources.requests.memory",
                     "minimum of 16Mi", id="too-small"),
        pytest.param({"resources": {"requests": {"memory": "lots"}}}, "domain.resources.requests.memory",
                     "not a Kubernetes quantity", id="not-a-quantity"),
        pytest.param({"resources": {"requests": {"memory": "1GB"}}}, "domain.resources.requests.memory",
                     "not a Kubernetes quantity", id="GB-is-not-a-suffix"),
        pytest.param({"resources": {"requests": {"memory": True}}}, "domain.resources.requests.memory",
                     "quantity", id="bool"),
        pytest.param({"resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}},
                     "domain.resources.requests.memory", "greater than", id="request-above-limit"),
        pytest.param({"memory": {"guest": "2Gi", "maxGuest": "1Gi"}}, "domain.memory.maxGuest",
                     "less than the guest memory", id="max-guest-below-guest"),
        pytest.param({"cpu": {"sockets": 4, "maxSockets": 2}}, "domain.cpu.maxSockets", "less than sockets",
                     id="max-sockets-below-sockets"),
        pytest.param({"cpu": {"cores": -1}}, "domain.cpu.cores", "non-negative integer", id="negative-cores"),
        pytest.param({"cpu": {"cores": "two"}}, "domain.cpu.cores", "non-negative integer", id="cores-text"),
        pytest.param({"cpu": {"cores": 64, "sockets": 16}}, "domain.cpu", "at most 512", id="too-many-vcpus"),
        pytest.param({"resources": {"requests": {"cpu": "0"}}}, "domain.resources.requests.cpu",
                     "more than 0", id="zero-cpu"),
        pytest.param({"resources": {"requests": {"cpu": "-1"}}}, "domain.resources.requests.cpu",
                     "more than 0", id="negative-cpu"),
        pytest.param({"firmware": {"bootloader": {"efi": {}, "bios": {}}}}, "domain.firmware.bootloader",
                     "both", id="efi-and-bios"),
        pytest.param({"firmware": {"kernelBoot": {"container": {"image": "k"}}}}, "domain.firmware.kernelBoot",
                     "not supported", id="kernel-boot"),
        pytest.param({"firmware": {"bootloader": {"efi": {"secureBoot": "yes"}}}},
                     "domain.firmware.bootloader.efi.secureBoot", "true or false", id="secure-boot-text"),
        pytest.param({"devices": {"gpus": [{"name": "g", "deviceName": "nvidia.com/A100"}]}},
                     "domain.devices.gpus", "GPUs", id="gpus"),
        pytest.param({"devices": {"hostDevices": [{"name": "h"}]}}, "domain.devices.hostDevices",
                     "host devices", id="host-devices"),
        pytest.param({"devices": {"filesystems": [{"name": "fs", "virtiofs": {}}]}},
                     "domain.devices.filesystems", "filesystems", id="virtiofs"),
    ],
)
def test_domain_errors_name_the_field(domain: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _parse(_domain(**domain))
    assert err.value.field == f"{F}.{field}"
    assert message in err.value.message


@pytest.mark.parametrize(
    ("firmware", "expected", "secure_boot"),
    [
        pytest.param({"bootloader": {"efi": {}}}, "uefi", True, id="efi-secure-boot-by-default"),
        pytest.param({"bootloader": {"efi": {"secureBoot": False}}}, "uefi", False, id="efi-no-secure-boot"),
        pytest.param({"bootloader": {"bios": {}}}, "bios", None, id="bios"),
        pytest.param({"bootloader": {"efi": None}}, "uefi", True, id="efi-yaml-null"),
        pytest.param({"serial": "abc"}, None, None, id="no-bootloader"),
    ],
)
def test_firmware(firmware: dict[str, Any], expected: str | None, secure_boot: bool | None) -> None:
    vmi = _parse(_domain(firmware=firmware))
    assert (vmi.firmware, vmi.secure_boot) == (expected, secure_boot)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("64M", Fraction(64_000_000)), ("64Mi", Fraction(64 * 2**20)), ("1.5Gi", Fraction(3 * 2**29)),
        ("1500m", Fraction(3, 2)), ("100n", Fraction(1, 10**7)), ("1e3", Fraction(1000)), ("1E-3", Fraction(1, 1000)),
        ("2k", Fraction(2000)), ("1Ei", Fraction(2**60)), (".5", Fraction(1, 2)), ("5.", Fraction(5)),
        ("+7", Fraction(7)), (12, Fraction(12)), (0.25, Fraction(1, 4)), (" 3Ki ", Fraction(3072)),
    ],
)
def test_parse_quantity(value: object, expected: Fraction) -> None:
    assert parse_quantity(value) == expected


@pytest.mark.parametrize("value", ["", "1GB", "1 Gi", "Gi", "1.2.3", "1e", "1e999", "1Kb", None, True, [1]])
def test_parse_quantity_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_quantity(value)


# -- disks and volumes ---------------------------------------------------------------


def test_disks_volumes_and_implicit_disks() -> None:
    spec = _spec(
        domain={"devices": {"disks": [
            {"name": "root", "disk": {"bus": "sata"}, "bootOrder": 1},
            {"name": "seed", "cdrom": {"bus": "sata"}},
        ]}},
        volumes=[
            {"name": "root", "containerDisk": {"image": "quay.io/x/y@sha256:" + "a" * 64, "path": "/disk/os.qcow2"}},
            {"name": "seed", "cloudInitNoCloud": {"userData": "#cloud-config\n"}},
        ],
    )
    vmi = _parse(spec)
    assert vmi.disks == (
        Disk("root", "disk", "sata", boot_order=1, field=f"{F}.domain.devices.disks[0]"),
        Disk("seed", "cdrom", "sata", field=f"{F}.domain.devices.disks[1]"),
    )
    assert vmi.container_disk is not None
    assert vmi.container_disk.path == "/disk/os.qcow2"
    assert vmi.container_disk.image_ref.digest == "sha256:" + "a" * 64

    # A volume without a disk gets one, as KubeVirt's defaulting does.
    vmi = _parse(_spec())
    assert vmi.disks == (Disk("root", "disk", None, implicit=True, field=f"{F}.volumes[0].containerDisk"),)


def test_no_container_disk_is_allowed() -> None:
    vmi = _parse(_spec(volumes=[]))
    assert vmi.container_disk is None
    assert vmi.container_disk_disk is None
    assert vmi.disks == ()


@pytest.mark.parametrize(
    ("volume", "field", "message"),
    [
        pytest.param({"name": "data", "persistentVolumeClaim": {"claimName": "pvc"}},
                     "volumes[1].persistentVolumeClaim", "persistentVolumeClaim", id="pvc"),
        pytest.param({"name": "data", "dataVolume": {"name": "dv"}}, "volumes[1].dataVolume", "dataVolume",
                     id="data-volume"),
        pytest.param({"name": "data", "emptyDisk": {"capacity": "1Gi"}}, "volumes[1].emptyDisk", "lose this disk",
                     id="empty-disk"),
        pytest.param({"name": "cfg", "cloudInitConfigDrive": {"userData": "x"}}, "volumes[1].cloudInitConfigDrive",
                     "cloudInitConfigDrive", id="config-drive"),
        pytest.param({"name": "data", "fancyDisk": {}}, "volumes[1].fancyDisk", "unknown fancyDisk", id="unknown"),
        pytest.param({"name": "data"}, "volumes[1]", "exactly one source", id="no-source"),
        pytest.param({"name": "data", "containerDisk": {"image": "a"}, "emptyDisk": {}}, "volumes[1]",
                     "exactly one source", id="two-sources"),
        pytest.param({"name": "root", "containerDisk": {"image": "a"}}, "volumes[1].name", "used twice",
                     id="duplicate-name"),
        pytest.param({"containerDisk": {"image": "a"}}, "volumes[1].name", "is required", id="no-name"),
        pytest.param({"name": "d2", "containerDisk": {"image": "b"}}, "volumes", "exactly one",
                     id="two-container-disks"),
        pytest.param({"name": "ci", "cloudInitNoCloud": {"secretRef": {"name": "s"}}},
                     "volumes[1].cloudInitNoCloud.secretRef", "Secrets", id="secret-ref"),
        pytest.param({"name": "ci", "cloudInitNoCloud": {"networkDataSecretRef": {"name": "s"}}},
                     "volumes[1].cloudInitNoCloud.networkDataSecretRef", "Secrets", id="network-secret-ref"),
        pytest.param({"name": "ci", "cloudInitNoCloud": {"userDataBase64": "%%%"}},
                     "volumes[1].cloudInitNoCloud.userDataBase64", "base64", id="bad-base64"),
        pytest.param({"name": "ci", "cloudInitNoCloud": {"userData": "x", "userDataBase64": "%%%"}},
                     "volumes[1].cloudInitNoCloud.userDataBase64", "base64", id="bad-base64-that-would-lose"),
        pytest.param({"name": "ci", "cloudInitNoCloud": {"userData": 5}},
                     "volumes[1].cloudInitNoCloud.userData", "expected a string", id="user-data-number"),
        pytest.param({"name": "d2", "containerDisk": {}}, "volumes[1].containerDisk.image", "is required",
                     id="no-image"),
        pytest.param({"name": "d2", "containerDisk": {"image": "UPPER/Case::"}}, "volumes[1].containerDisk.image",
                     "", id="bad-image"),
        pytest.param({"name": "d2", "containerDisk": {"image": "a", "path": "disk/x"}},
                     "volumes[1].containerDisk.path", "absolute", id="relative-path"),
        pytest.param({"name": "d2", "containerDisk": {"image": "a", "path": "/disk/../x"}},
                     "volumes[1].containerDisk.path", "normalised", id="dotdot-path"),
    ],
)
def test_volume_errors(volume: dict[str, Any], field: str, message: str) -> None:
    spec = _spec()
    if volume.get("name") in ("d2",):
        spec["volumes"] = [{"name": "root", "containerDisk": {"image": "a"}}, volume]
    else:
        spec["volumes"].append(volume)
    with pytest.raises(InvalidArgument) as err:
        _parse(spec)
    assert err.value.field == f"{F}.{field}"
    assert message in err.value.message


def test_two_cloud_init_volumes_are_refused() -> None:
    spec = _spec()
    spec["volumes"] += [{"name": "a", "cloudInitNoCloud": {}}, {"name": "b", "cloudInitNoCloud": {}}]
    with pytest.raises(InvalidArgument, match="more than one cloudInitNoCloud"):
        _parse(spec)


@pytest.mark.parametrize(
    ("disk", "field", "message"),
    [
        pytest.param({"name": "nope", "disk": {}}, "domain.devices.disks[0].name", "names no volume",
                     id="no-such-volume"),
        pytest.param({"name": "root", "disk": {"bus": "usb"}}, "domain.devices.disks[0].disk.bus", "usb",
                     id="usb-bus"),
        pytest.param({"name": "root", "disk": {"bus": "ide"}}, "domain.devices.disks[0].disk.bus", "ide",
                     id="ide-bus"),
        pytest.param({"name": "root", "cdrom": {"bus": "virtio"}}, "domain.devices.disks[0].cdrom.bus",
                     "virtio", id="virtio-cdrom"),
        pytest.param({"name": "root", "lun": {}}, "domain.devices.disks[0].lun", "not supported", id="lun"),
        pytest.param({"name": "root", "disk": {}, "cdrom": {}}, "domain.devices.disks[0]", "several",
                     id="disk-and-cdrom"),
        pytest.param({"name": "root", "bootOrder": "first"}, "domain.devices.disks[0].bootOrder", "integer",
                     id="boot-order-text"),
    ],
)
def test_disk_errors(disk: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _parse(_domain(devices={"disks": [disk]}))
    assert err.value.field == f"{F}.{field}"
    assert message in err.value.message


def test_duplicate_disk_is_refused() -> None:
    disks = [{"name": "root", "disk": {}}, {"name": "root", "disk": {}}]
    with pytest.raises(InvalidArgument) as err:
        _parse(_domain(devices={"disks": disks}))
    assert err.value.field == f"{F}.domain.devices.disks[1].name"


# -- cloud-init ------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("source", "user_data", "user_field", "network_data", "network_field"),
    [
        pytest.param({"userData": "#cloud-config\na: 1\n"}, b"#cloud-config\na: 1\n", "userData", None, "",
                     id="user-data"),
        pytest.param({"userDataBase64": _b64(b"#!/bin/sh\n\xff")}, b"#!/bin/sh\n\xff", "userDataBase64", None, "",
                     id="user-data-base64-binary"),
        pytest.param({"userData": "#!/bin/sh\nplain\n", "userDataBase64": _b64(b"#!/bin/sh\nencoded\n")},
                     b"#!/bin/sh\nplain\n", "userData", None, "", id="user-data-wins-over-base64"),
        pytest.param({"userDataBase64": "IyEvYmluL3No\nCmVjaG8K\n"}, b"#!/bin/sh\necho\n", "userDataBase64", None,
                     "", id="base64-with-line-breaks-as-go-accepts"),
        pytest.param({"networkData": "network:\n  version: 1\n"}, None, "", b"network:\n  version: 1\n",
                     "networkData", id="network-data-verbatim"),
        pytest.param({"networkDataBase64": _b64(b"version: 2\n")}, None, "", b"version: 2\n", "networkDataBase64",
                     id="network-data-base64"),
        pytest.param({"networkData": "version: 2\n", "networkDataBase64": _b64(b"version: 1\n")}, None, "",
                     b"version: 2\n", "networkData", id="network-data-wins-over-base64"),
        pytest.param({}, None, "", None, "", id="empty"),
    ],
)
def test_cloud_init_no_cloud(
    source: dict[str, str], user_data: bytes | None, user_field: str, network_data: bytes | None, network_field: str
) -> None:
    spec = _spec()
    spec["volumes"].append({"name": "cloudinitdisk", "cloudInitNoCloud": source})
    vmi = _parse(spec)
    where = f"{F}.volumes[1].cloudInitNoCloud"
    assert vmi.cloud_init == CloudInitNoCloudVolume(
        name="cloudinitdisk",
        user_data=user_data,
        network_data=network_data,
        field=where,
        user_data_field=f"{where}.{user_field}" if user_field else "",
        network_data_field=f"{where}.{network_field}" if network_field else "",
    )


def test_access_credentials_are_refused() -> None:
    spec = _spec(accessCredentials=[{"sshPublicKey": {"source": {"secret": {"secretName": "k"}}}}])
    with pytest.raises(InvalidArgument) as err:
        _parse(spec)
    assert err.value.field == f"{F}.accessCredentials"


# -- network -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interfaces", "networks", "autoattach", "expected_interfaces", "pod_network"),
    [
        pytest.param([{"name": "default", "masquerade": {}}], [{"name": "default", "pod": {}}], None,
                     (Interface("default", "masquerade"),), True, id="masquerade"),
        pytest.param([{"name": "n", "bridge": {}, "model": "e1000", "macAddress": "02:00:00:00:00:01"}],
                     [{"name": "n", "pod": None}], None,
                     (Interface("n", "bridge", "e1000", "02:00:00:00:00:01"),), True, id="model-mac-yaml-null"),
        pytest.param([], [], None, (), True, id="none-listed-autoattach"),
        pytest.param([], [], False, (), False, id="autoattach-off"),
        pytest.param([], [], True, (), True, id="autoattach-on"),
    ],
)
def test_interfaces_and_networks(
    interfaces: list[Any], networks: list[Any], autoattach: bool | None,
    expected_interfaces: tuple[Interface, ...], pod_network: bool,
) -> None:
    devices: dict[str, Any] = {"interfaces": interfaces}
    if autoattach is not None:
        devices["autoattachPodInterface"] = autoattach
    vmi = _parse(_spec(domain={"devices": devices}, networks=networks))
    assert vmi.interfaces == expected_interfaces
    assert vmi.pod_network is pod_network
    assert vmi.interface == (expected_interfaces[0] if expected_interfaces else None)


@pytest.mark.parametrize(
    ("interfaces", "networks", "field", "message"),
    [
        pytest.param([{"name": "n", "sriov": {}}], [{"name": "n", "pod": {}}], "domain.devices.interfaces[0]",
                     "sriov", id="sriov"),
        pytest.param([{"name": "n", "binding": {"name": "passt"}}], [{"name": "n", "pod": {}}],
                     "domain.devices.interfaces[0]", "binding", id="binding-plugin"),
        pytest.param([{"name": "n"}], [{"name": "n", "pod": {}}], "domain.devices.interfaces[0]", "none",
                     id="no-binding"),
        pytest.param([{"name": "n", "bridge": {}, "model": "virtio-net"}], [{"name": "n", "pod": {}}],
                     "domain.devices.interfaces[0].model", "virtio-net", id="bad-model"),
        pytest.param([{"name": "n", "bridge": {}, "macAddress": "zz"}], [{"name": "n", "pod": {}}],
                     "domain.devices.interfaces[0].macAddress", "MAC", id="bad-mac"),
        pytest.param([{"name": "n", "bridge": {}, "macAddress": "02:00:00:00:00:01\n"}], [{"name": "n", "pod": {}}],
                     "domain.devices.interfaces[0].macAddress", "MAC", id="mac-newline"),
        pytest.param([{"name": "x", "bridge": {}}], [{"name": "n", "pod": {}}],
                     "domain.devices.interfaces[0].name", "names no network", id="interface-without-network"),
        pytest.param([], [{"name": "n", "pod": {}}], "networks", "has no interface", id="network-without-interface"),
        pytest.param([], [{"name": "n", "multus": {"networkName": "m"}}], "networks[0]", "multus", id="multus"),
        pytest.param([], [{"name": "a", "pod": {}}, {"name": "b", "pod": {}}], "networks", "at most one",
                     id="two-pod-networks"),
        pytest.param([], [{"name": "a", "pod": {}}, {"name": "a", "pod": {}}], "networks[1].name", "used twice",
                     id="duplicate-network"),
    ],
)
def test_network_errors(interfaces: list[Any], networks: list[Any], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _parse(_spec(domain={"devices": {"interfaces": interfaces}}, networks=networks))
    assert err.value.field == f"{F}.{field}"
    assert message in err.value.message


def test_hostname_and_unimplemented_fields_are_read_or_ignored() -> None:
    spec = _spec(hostname="web-1", terminationGracePeriodSeconds=0)
    spec["domain"].update(machine={"type": "q35"}, features={"acpi": {}}, clock={"utc": {}})
    vmi = _parse(spec)
    assert vmi.hostname == "web-1"
