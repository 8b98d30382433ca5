"""Tests for CreateContainer → VMRequest (agent.domain.vmrequest)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from agent.domain.errors import InvalidArgument
from agent.domain.vm import CloudInit, VMRequest
from agent.domain.vmrequest import (
    CRIResources,
    UserDataFormat,
    VMDefaults,
    build_vm_request,
    check_network_config,
    parse_cloud_config,
    resolve_vmi,
    user_data_format,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TESTVM = (EXAMPLES / "testvm.yaml").read_text()
VM_KEY = "podvisor.io/vm"
CONTAINER = "config.annotations"
POD = "sandbox_config.annotations"
GiB = 2**30
MiB = 2**20


def _build(
    *,
    cri: CRIResources | None = None,
    pod: dict[str, str] | None = None,
    container: dict[str, str] | None = None,
    env: Any = (),
    command: tuple[str, ...] = (),
    args: tuple[str, ...] = (),
    defaults: VMDefaults | None = None,
) -> VMRequest:
    return build_vm_request(
        cri_resources=cri or CRIResources(),
        pod_annotations=pod or {},
        container_annotations=container or {},
        env=env,
        command=command,
        args=args,
        defaults=defaults or VMDefaults(),
    )


def _vm(spec: dict[str, Any]) -> str:
    return json.dumps(spec)


def _spec(**domain: Any) -> dict[str, Any]:
    return {"domain": domain}


# -- the classic testvm --------------------------------------------------------


def test_testvm_example_becomes_the_expected_request() -> None:
    request = _build(container={VM_KEY: TESTVM})
    assert request == VMRequest(
        vcpus=1,
        max_vcpus=1,
        memory_bytes=64_000_000,  # 64M, decimal
        max_memory_bytes=64_000_000,
        cpu_shares=None,
        firmware="bios",
        disk_bus="virtio",
        containerdisk_path=None,
        interface_model="virtio",
        pod_network=True,
        cloud_init=CloudInit(user_data=b'#!/bin/sh\necho "Hello from testvm"\n'),
    )


def test_testvm_under_kubelet_resources() -> None:
    # What kubelet sends for a pod with limits cpu: 1500m, memory: 128Mi, requests cpu: 500m.
    cri = CRIResources(memory_limit_in_bytes=128 * MiB, cpu_quota=150_000, cpu_period=100_000, cpu_shares=512)
    request = _build(cri=cri, pod={VM_KEY: TESTVM})
    assert (request.vcpus, request.memory_bytes, request.cpu_shares) == (2, 128 * MiB, 512)


def test_resolve_vmi_returns_the_applicable_spec() -> None:
    vmi = resolve_vmi({VM_KEY: TESTVM}, {})
    assert vmi is not None and vmi.field == f"{POD}['{VM_KEY}'].spec.template.spec"
    assert resolve_vmi({}, {}) is None


# -- sizing precedence ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cri", "pod", "container", "vcpus", "memory"),
    [
        pytest.param(CRIResources(), {}, {}, 1, 512 * MiB, id="defaults"),
        pytest.param(CRIResources(), {}, {VM_KEY: _vm(_spec(cpu={"cores": 3},
                                                             resources={"requests": {"memory": "3Gi"}}))},
                     3, 3 * GiB, id="vmi"),
        pytest.param(CRIResources(), {"podvisor.io/vcpus": "4", "podvisor.io/memory": "4Gi"},
                     {VM_KEY: _vm(_spec(cpu={"cores": 3}, resources={"requests": {"memory": "3Gi"}}))},
                     4, 4 * GiB, id="flat-annotations-beat-vmi"),
        pytest.param(CRIResources(), {"podvisor.io/vcpus": "4", "podvisor.io/memory": "4Gi"},
                     {"podvisor.io/vcpus": "6", "podvisor.io/memory": "6Gi"}, 6, 6 * GiB,
                     id="container-beats-pod"),
        pytest.param(CRIResources(memory_limit_in_bytes=GiB, cpu_quota=200_000, cpu_period=100_000), {},
                     {"podvisor.io/vcpus": "6", "podvisor.io/memory": "6Gi"}, 2, GiB, id="cri-beats-annotations"),
        pytest.param(CRIResources(cpu_quota=150_000, cpu_period=100_000), {}, {}, 2, 512 * MiB,
                     id="quota-rounds-up"),
        pytest.param(CRIResources(cpu_quota=50_000, cpu_period=100_000), {}, {}, 1, 512 * MiB,
                     id="half-a-cpu-is-one"),
        pytest.param(CRIResources(cpu_quota=300_000), {}, {}, 3, 512 * MiB, id="period-unset-means-100ms"),
        pytest.param(CRIResources(cpu_quota=-1, cpu_period=100_000), {"podvisor.io/vcpus": "2"}, {}, 2, 512 * MiB,
                     id="unlimited-quota-is-unset"),
        pytest.param(CRIResources(cpu_shares=2), {}, {}, 1, 512 * MiB, id="shares-do-not-size"),
    ],
)
def test_sizing(cri: CRIResources, pod: dict[str, str], container: dict[str, str], vcpus: int, memory: int) -> None:
    request = _build(cri=cri, pod=pod, container=container)
    assert (request.vcpus, request.memory_bytes) == (vcpus, memory)


def test_cpu_shares_pass_through() -> None:
    assert _build(cri=CRIResources(cpu_shares=1024)).cpu_shares == 1024
    assert _build(cri=CRIResources()).cpu_shares is None


def test_defaults_are_used_when_nothing_is_stated() -> None:
    defaults = VMDefaults(vcpus=2, memory_bytes=GiB, firmware="uefi")
    request = _build(defaults=defaults)
    assert (request.vcpus, request.memory_bytes, request.firmware) == (2, GiB, "uefi")


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        pytest.param({"cri": CRIResources(memory_limit_in_bytes=8 * MiB)},
                     "config.linux.resources.memory_limit_in_bytes", "minimum of 16Mi", id="cri-memory-too-small"),
        pytest.param({"cri": CRIResources(memory_limit_in_bytes=-5)},
                     "config.linux.resources.memory_limit_in_bytes", "negative", id="cri-memory-negative"),
        pytest.param({"cri": CRIResources(cpu_quota=100_000_000, cpu_period=100_000)},
                     "config.linux.resources.cpu_quota", "at most 512", id="too-many-cpus"),
        pytest.param({"cri": CRIResources(cpu_shares=-2)}, "config.linux.resources.cpu_shares", "negative",
                     id="negative-shares"),
        pytest.param({"cri": CRIResources(cpu_period=-1)}, "config.linux.resources.cpu_period", "negative",
                     id="negative-period"),
        pytest.param({"container": {"podvisor.io/memory": "8Mi"}}, f"{CONTAINER}['podvisor.io/memory']",
                     "at least 16Mi", id="annotation-memory-too-small"),
        pytest.param({"pod": {"podvisor.io/vcpus": "many"}}, f"{POD}['podvisor.io/vcpus']", "positive integer",
                     id="pod-annotation-named"),
        pytest.param({"container": {"podvisor.io/cpus": "2"}}, f"{CONTAINER}['podvisor.io/cpus']", "unknown",
                     id="unknown-key"),
        pytest.param({"container": {VM_KEY: _vm(_spec(resources={"requests": {"memory": "1Mi"}}))}},
                     f"{CONTAINER}['{VM_KEY}'].domain.resources.requests.memory", "minimum of 16Mi",
                     id="vmi-memory-too-small"),
        pytest.param({"pod": {VM_KEY: _vm({"volumes": []})}}, f"{POD}['{VM_KEY}']", "domain",
                     id="pod-vmi-named"),
    ],
)
def test_errors_name_the_field(kwargs: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _build(**kwargs)
    assert err.value.field == field
    assert message in err.value.message


# -- maxima ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cri", "vmi", "defaults", "expected"),
    [
        pytest.param(CRIResources(), None, VMDefaults(), (1, 1, 512 * MiB, 512 * MiB), id="no-headroom"),
        pytest.param(CRIResources(), None, VMDefaults(max_vcpus=8, max_memory_bytes=8 * GiB),
                     (1, 8, 512 * MiB, 8 * GiB), id="configured-headroom"),
        pytest.param(CRIResources(memory_limit_in_bytes=16 * GiB, cpu_quota=1_600_000), None,
                     VMDefaults(max_vcpus=8, max_memory_bytes=8 * GiB), (16, 16, 16 * GiB, 16 * GiB),
                     id="size-above-configured-max"),
        pytest.param(CRIResources(), _spec(cpu={"cores": 2, "maxSockets": 3}, memory={"guest": "1Gi",
                                                                                       "maxGuest": "2Gi"}),
                     VMDefaults(max_vcpus=32, max_memory_bytes=64 * GiB), (2, 6, GiB, 2 * GiB),
                     id="vmi-maxima-beat-configured"),
    ],
)
def test_maxima(cri: CRIResources, vmi: dict[str, Any] | None, defaults: VMDefaults,
                expected: tuple[int, int, int, int]) -> None:
    request = _build(cri=cri, container={VM_KEY: _vm(vmi)} if vmi else {}, defaults=defaults)
    assert (request.vcpus, request.max_vcpus, request.memory_bytes, request.max_memory_bytes) == expected


@pytest.mark.parametrize(
    ("cri", "spec", "field"),
    [
        pytest.param(CRIResources(memory_limit_in_bytes=4 * GiB), _spec(memory={"guest": "1Gi", "maxGuest": "2Gi"}),
                     "domain.memory.maxGuest", id="cri-memory-above-max-guest"),
        pytest.param(CRIResources(cpu_quota=800_000), _spec(cpu={"cores": 1, "maxSockets": 4}),
                     "domain.cpu.maxSockets", id="cri-cpus-above-max-sockets"),
    ],
)
def test_a_vmi_maximum_below_the_size_is_refused(cri: CRIResources, spec: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _build(cri=cri, container={VM_KEY: _vm(spec)})
    assert err.value.field == f"{CONTAINER}['{VM_KEY}'].{field}"
    assert "config.linux.resources" in err.value.message


@pytest.mark.parametrize(
    "kwargs",
    [{"vcpus": 0}, {"vcpus": 513}, {"max_vcpus": -1}, {"memory_bytes": MiB}, {"max_memory_bytes": -1},
     {"firmware": "coreboot"}],
)
def test_vm_defaults_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        VMDefaults(**kwargs)


# -- firmware and devices -------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        pytest.param({}, "bios", id="default"),
        pytest.param({VM_KEY: _vm(_spec(firmware={"bootloader": {"efi": {"secureBoot": False}}}))}, "uefi",
                     id="vmi"),
        pytest.param({VM_KEY: _vm(_spec(firmware={"bootloader": {"efi": {}}})), "podvisor.io/firmware": "bios"},
                     "bios", id="annotation-beats-vmi"),
    ],
)
def test_firmware(annotations: dict[str, str], expected: str) -> None:
    assert _build(container=annotations).firmware == expected


def test_devices_come_from_the_vmi() -> None:
    spec = {
        "domain": {"devices": {
            "disks": [{"name": "root", "disk": {"bus": "sata"}}],
            "interfaces": [{"name": "default", "masquerade": {}, "model": "e1000e"}],
        }},
        "networks": [{"name": "default", "pod": {}}],
        "volumes": [{"name": "root", "containerDisk": {"image": "x/y", "path": "/disk/b.qcow2"}}],
    }
    request = _build(container={VM_KEY: _vm(spec)})
    assert (request.disk_bus, request.containerdisk_path, request.interface_model, request.pod_network) == (
        "sata", "/disk/b.qcow2", "e1000e", True,
    )


def test_no_nic_when_the_vmi_turns_autoattach_off() -> None:
    spec = _spec(devices={"autoattachPodInterface": False})
    assert _build(container={VM_KEY: _vm(spec)}).pod_network is False


def test_container_disk_as_cdrom_is_refused() -> None:
    spec = {
        "domain": {"devices": {"disks": [{"name": "iso", "cdrom": {"bus": "sata"}}]}},
        "volumes": [{"name": "iso", "containerDisk": {"image": "x/installer"}}],
    }
    with pytest.raises(InvalidArgument) as err:
        _build(container={VM_KEY: _vm(spec)})
    assert err.value.field == f"{CONTAINER}['{VM_KEY}'].domain.devices.disks[0].cdrom"


def test_container_vmi_replaces_the_pod_vmi_whole() -> None:
    pod_spec = _spec(cpu={"cores": 4}, firmware={"bootloader": {"efi": {"secureBoot": False}}})
    container_spec = _spec(resources={"requests": {"memory": "2Gi"}})
    request = _build(pod={VM_KEY: _vm(pod_spec)}, container={VM_KEY: _vm(container_spec)})
    assert (request.vcpus, request.memory_bytes, request.firmware) == (1, 2 * GiB, "bios")


# -- cloud-init sources -----------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _vmi_cloud_init(**source: str) -> str:
    return _vm({"domain": {}, "volumes": [{"name": "ci", "cloudInitNoCloud": source}]})


@pytest.mark.parametrize(
    ("pod", "container", "expected"),
    [
        pytest.param({}, {}, None, id="none"),
        pytest.param({}, {"podvisor.io/user-data": "#!/bin/sh\nA\n"}, b"#!/bin/sh\nA\n", id="annotation"),
        pytest.param({}, {"podvisor.io/user-data-base64": _b64(b"#!/bin/sh\nB\n")}, b"#!/bin/sh\nB\n",
                     id="annotation-base64"),
        pytest.param({}, {"podvisor.io/user-data": "#!/bin/sh\nA\n",
                          "podvisor.io/user-data-base64": _b64(b"#!/bin/sh\nB\n")}, b"#!/bin/sh\nA\n",
                     id="user-data-wins-over-base64"),
        pytest.param({"podvisor.io/user-data": "#!/bin/sh\nPOD\n"},
                     {"podvisor.io/user-data-base64": _b64(b"#!/bin/sh\nCONTAINER\n")}, b"#!/bin/sh\nCONTAINER\n",
                     id="container-scope-wins-over-pod-whatever-the-spelling"),
        pytest.param({"podvisor.io/user-data": "#!/bin/sh\nPOD\n"}, {}, b"#!/bin/sh\nPOD\n", id="pod"),
        pytest.param({}, {VM_KEY: _vmi_cloud_init(userData="#!/bin/sh\nVMI\n")}, b"#!/bin/sh\nVMI\n", id="vmi"),
        pytest.param({"podvisor.io/user-data": "#!/bin/sh\nPOD\n"},
                     {VM_KEY: _vmi_cloud_init(userData="#!/bin/sh\nVMI\n")}, b"#!/bin/sh\nPOD\n",
                     id="annotation-beats-vmi"),
    ],
)
def test_user_data_sources(pod: dict[str, str], container: dict[str, str], expected: bytes | None) -> None:
    assert _build(pod=pod, container=container).cloud_init.user_data == expected


@pytest.mark.parametrize(
    ("container", "field", "message"),
    [
        pytest.param({"podvisor.io/user-data": "#cloud-config\nruncmd: [unclosed\n"},
                     f"{CONTAINER}['podvisor.io/user-data']", "not valid YAML", id="bad-yaml"),
        pytest.param({"podvisor.io/user-data": "#cloud-config\n- a\n"},
                     f"{CONTAINER}['podvisor.io/user-data']", "mapping", id="list"),
        pytest.param({"podvisor.io/user-data": "#cloud-config\nruncmd: reboot\n"},
                     f"{CONTAINER}['podvisor.io/user-data']", "'runcmd'", id="runcmd-not-a-list"),
        pytest.param({VM_KEY: _vmi_cloud_init(userDataBase64=_b64(b"#cloud-config\nwrite_files: {}\n"))},
                     f"{CONTAINER}['{VM_KEY}'].volumes[0].cloudInitNoCloud.userDataBase64", "'write_files'",
                     id="vmi-field-named"),
    ],
)
def test_cloud_config_user_data_is_checked(container: dict[str, str], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _build(container=container)
    assert err.value.field == field
    assert message in err.value.message


def test_scripts_are_not_parsed() -> None:
    data = "#!/bin/sh\n: [unclosed {\n"
    assert _build(container={"podvisor.io/user-data": data}).cloud_init.user_data == data.encode()


V2 = "version: 2\nethernets:\n  id0:\n    match: {name: 'e*'}\n    dhcp4: true\n"


@pytest.mark.parametrize(
    ("container", "expected"),
    [
        pytest.param({}, None, id="none"),
        pytest.param({"podvisor.io/network-config": V2}, V2.encode(), id="annotation-verbatim"),
        pytest.param({"podvisor.io/network-config": '{"version": 1, "config": []}'},
                     b'{"version": 1, "config": []}', id="json-v1"),
        pytest.param({VM_KEY: _vmi_cloud_init(networkData=V2)}, V2.encode(), id="vmi"),
        pytest.param({VM_KEY: _vmi_cloud_init(networkDataBase64=_b64(V2.encode()))}, V2.encode(), id="vmi-base64"),
        pytest.param({VM_KEY: _vmi_cloud_init(networkData="version: 1\nconfig: []\n"),
                      "podvisor.io/network-config": V2}, V2.encode(), id="annotation-beats-vmi"),
    ],
)
def test_network_config_sources(container: dict[str, str], expected: bytes | None) -> None:
    assert _build(container=container).cloud_init.network_config == expected


@pytest.mark.parametrize(
    ("container", "field", "message"),
    [
        pytest.param({"podvisor.io/network-config": "network:\n  version: 2\n"},
                     f"{CONTAINER}['podvisor.io/network-config']", "top-level 'network:'", id="wrapped"),
        pytest.param({"podvisor.io/network-config": "version: 3\n"},
                     f"{CONTAINER}['podvisor.io/network-config']", "version: 1", id="version-3"),
        pytest.param({"podvisor.io/network-config": "ethernets: {}\n"},
                     f"{CONTAINER}['podvisor.io/network-config']", "got None", id="no-version"),
        pytest.param({VM_KEY: _vmi_cloud_init(networkData="network:\n  version: 1\n  config: []\n")},
                     f"{CONTAINER}['{VM_KEY}'].volumes[0].cloudInitNoCloud.networkData", "top-level 'network:'",
                     id="vmi-wrapped"),
        pytest.param({VM_KEY: _vmi_cloud_init(networkData="network: {version: 1}"),
                      "podvisor.io/network-config": V2},
                     f"{CONTAINER}['{VM_KEY}'].volumes[0].cloudInitNoCloud.networkData", "network",
                     id="a-losing-source-is-checked-too"),
    ],
)
def test_network_config_is_checked(container: dict[str, str], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _build(container=container)
    assert err.value.field == field
    assert message in err.value.message


def test_ssh_keys_env_and_command() -> None:
    keys = "ssh-ed25519 AAAAC3Nza one@example\n\n  ecdsa-sha2-nistp256 AAAAE2Vj two@example  \n"
    request = _build(
        pod={"podvisor.io/ssh-authorized-keys": "ssh-rsa AAAAB3 pod@example"},
        container={"podvisor.io/ssh-authorized-keys": keys},
        env=[("PATH", "/usr/bin"), ("GREETING", "hello world"), ("PATH", "/bin")],
        command=("/usr/bin/app",),
        args=("--port", "8080"),
    )
    ci = request.cloud_init
    assert ci.ssh_authorized_keys == ("ssh-ed25519 AAAAC3Nza one@example", "ecdsa-sha2-nistp256 AAAAE2Vj two@example")
    assert list(ci.env.items()) == [("GREETING", "hello world"), ("PATH", "/bin")]  # the last assignment counts
    assert ci.command == ("/usr/bin/app", "--port", "8080")


def test_env_may_be_a_mapping_and_args_alone_are_the_command() -> None:
    ci = _build(env={"A": "1"}, args=("echo", "hi")).cloud_init
    assert (dict(ci.env), ci.command) == ({"A": "1"}, ("echo", "hi"))


@pytest.mark.parametrize(
    ("env", "field", "message"),
    [
        pytest.param([("OK", "1"), ("my.var", "x")], "config.envs[1].key", "cannot be exported", id="dotted-name"),
        pytest.param([("1ST", "x")], "config.envs[0].key", "cannot be exported", id="leading-digit"),
        # A final newline would add a line to the guest's /etc/environment.
        pytest.param([("OK\n", "x")], "config.envs[0].key", "cannot be exported", id="name-newline"),
        pytest.param([("CERT", "line1\nline2")], "config.envs[0].value", "line break", id="newline"),
    ],
)
def test_env_errors(env: list[tuple[str, str]], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _build(env=env)
    assert err.value.field == field
    assert message in err.value.message


def test_nul_in_args_is_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        _build(command=("sh",), args=("-c", "a\x00b"))
    assert err.value.field == "config.args[1]"


# -- format helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, UserDataFormat.NONE),
        (b"", UserDataFormat.NONE),
        (b"#cloud-config\na: 1\n", UserDataFormat.CLOUD_CONFIG),
        (b"#cloud-config-archive\n- x\n", UserDataFormat.OTHER),
        (b"#cloud-config-jsonp\n[]\n", UserDataFormat.OTHER),
        (b"#!/bin/sh\n", UserDataFormat.OTHER),
        (b"#include\nhttp://x\n", UserDataFormat.OTHER),
        (b"## template: jinja\n#cloud-config\n", UserDataFormat.OTHER),
        (b"\x1f\x8b\x08\x00", UserDataFormat.OTHER),
        (b"Content-Type: multipart/mixed; boundary=x\nMIME-Version: 1.0\n\n--x--\n", UserDataFormat.MIME),
        (b"just text", UserDataFormat.OTHER),
    ],
)
def test_user_data_format(data: bytes | None, expected: UserDataFormat) -> None:
    assert user_data_format(data) is expected


def test_parse_cloud_config() -> None:
    assert parse_cloud_config(b"#cloud-config\n") == {}
    assert parse_cloud_config(b"#cloud-config\nssh_authorized_keys: ssh-rsa A\n") == {
        "ssh_authorized_keys": "ssh-rsa A"
    }
    with pytest.raises(ValueError, match="UTF-8"):
        parse_cloud_config(b"#cloud-config\n\xff")
    with pytest.raises(ValueError, match="ssh_authorized_keys"):
        parse_cloud_config(b"#cloud-config\nssh_authorized_keys: {a: 1}\n")


@pytest.mark.parametrize(
    "data",
    [b"version: 2\n", b"version: 2\nethernets: {}\n", b'{"version": 1, "config": [{"type": "physical"}]}'],
)
def test_check_network_config_accepts(data: bytes) -> None:
    check_network_config(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"network:\n  version: 2\n", "top-level 'network:'"),
        (b"version: true\n", "version: 1"),
        (b"version: '2'\n", "version: 1"),
        (b"version: 1\n", "'config' list"),
        (b"- a\n", "mapping"),
        (b"a: [\n", "neither JSON nor YAML"),
        (b"\xff", "UTF-8"),
    ],
)
def test_check_network_config_refuses(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_network_config(data)
