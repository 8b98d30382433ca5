"""CreateContainer with hostile values, through the container service and the
real VMBuilder on fakes (issue #10, items 5 and 8): every refusal is
INVALID_ARGUMENT naming the field, and nothing is recorded, written or
defined before it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from agent.domain.errors import InvalidArgument
from agent.domain.vmrequest import VMDefaults
from agent.services.containers import ContainerService
from agent.services.vm_build import VMBuilder
from tests.services.container_fakes import STATE_ROOT, ContainerFakes, MiB, cspec
from tests.services.service_fakes import RecordingFiles
from tests.services.test_vm_build import FakeHost

ANN = "config.annotations"


def _service(fakes: ContainerFakes, defaults: VMDefaults | None = None,
             host: FakeHost | None = None) -> ContainerService:
    builder = VMBuilder(defaults=defaults or VMDefaults(), virt_type="qemu", files=fakes.files,
                        sandbox_files=RecordingFiles(fakes.journal, STATE_ROOT), network=None,
                        host=host or FakeHost(cpus=4, memory_bytes=8192 * MiB))
    return ContainerService(dataclasses.replace(fakes.ports, vm=builder))


def _refused(overrides: dict[str, Any], field: str, problem: str, *, defaults: VMDefaults | None = None,
             host: FakeHost | None = None) -> None:
    fakes = ContainerFakes()
    service = _service(fakes, defaults, host)
    with pytest.raises(InvalidArgument) as exc:
        service.create(cspec(**overrides))
    assert exc.value.field == field
    assert problem in exc.value.message
    # Nothing recorded, no folder, overlay, seed or domain.
    assert fakes.journal.of("store.") == []
    assert fakes.journal.of("files.") == []
    assert fakes.journal.of("libvirt.") == []
    assert fakes.store.rows == {} and fakes.files.dirs == set() and fakes.libvirt.xml == {}


@pytest.mark.parametrize(("annotations", "key"), [
    pytest.param({"podvisor.io/vm": "[" * 100000}, "podvisor.io/vm", id="vm-deep-json"),
    pytest.param({"podvisor.io/network-config": "{" * 3000}, "podvisor.io/network-config", id="network-config"),
    pytest.param({"podvisor.io/user-data": "#cloud-config\n" + "[" * 3000}, "podvisor.io/user-data",
                 id="user-data"),
    pytest.param({"podvisor.io/vm": "domain:\n" + "".join("  " * i + "- \n" for i in range(200))},
                 "podvisor.io/vm", id="vm-deep-block-yaml"),
    pytest.param({"podvisor.io/user-data": "#cloud-config\nwrite_files: &a [*a]\n"}, "podvisor.io/user-data",
                 id="user-data-recursive-alias"),
])
def test_deeply_nested_documents_are_invalid_arguments(annotations: dict[str, str], key: str) -> None:
    _refused({"annotations": annotations}, f"{ANN}[{key!r}]", "")


def test_nesting_is_refused_with_its_depth_named() -> None:
    _refused({"annotations": {"podvisor.io/network-config": "{" * 3000}},
             f"{ANN}['podvisor.io/network-config']", "nested deeper than 64 levels")


@pytest.mark.parametrize(("overrides", "field"), [
    pytest.param({"name": "vm\u0001"}, "config.metadata.name", id="name-control"),
    pytest.param({"name": "vm\u0085"}, "config.metadata.name", id="name-c1-control"),
    pytest.param({"name": "vm\ufffe"}, "config.metadata.name", id="name-non-character"),
    pytest.param({"labels": {"app": "web\u0007"}}, "config.labels['app']", id="label-value"),
    pytest.param({"labels": {"a\u0001": "web"}}, "config.labels['a\\x01']", id="label-key"),
    pytest.param({"annotations": {"note": "a\u000bb"}}, f"{ANN}['note']", id="annotation-value"),
    pytest.param({"env": {"GREETING": "hi\u0002"}}, "config.envs[0].value", id="env-value"),
    pytest.param({"command": ("/bin/echo", "a\u001bb")}, "config.command[1]", id="command"),
    pytest.param({"args": ("\u0008",)}, "config.args[0]", id="args"),
    pytest.param({"image": "quay.io/x\u0001:1"}, "config.image.image", id="image"),
])
def test_characters_xml_cannot_carry_are_refused_before_anything_is_written(
        overrides: dict[str, Any], field: str) -> None:
    _refused(overrides, field, "control characters")


def test_tabs_and_line_breaks_stay_allowed_where_values_span_lines() -> None:
    fakes = ContainerFakes()
    c = _service(fakes).create(cspec(annotations={"note": "line one\n\tline two\r\n"}, command=("a\tb",)))
    assert c.annotations["note"] == "line one\n\tline two\r\n"


# -- item 5: sizes beyond the node --------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "field"), [
    pytest.param({"annotations": {"podvisor.io/memory": "999999Ti"}}, f"{ANN}['podvisor.io/memory']",
                 id="memory-annotation"),
    pytest.param({"annotations": {"podvisor.io/vm": '{"domain": {"resources": {"requests": {"memory": "8Ei"}}}}'}},
                 f"{ANN}['podvisor.io/vm'].domain.resources.requests.memory", id="vmi-requests-memory"),
    pytest.param({"annotations": {"podvisor.io/vm": '{"domain": {"memory": {"guest": "8Ei"}}}'}},
                 f"{ANN}['podvisor.io/vm'].domain.memory.guest", id="vmi-guest"),
    pytest.param({"memory_limit_in_bytes": 2**63 - 1}, "config.linux.resources.memory_limit_in_bytes",
                 id="cri-memory"),
    pytest.param({"annotations": {"podvisor.io/vcpus": "512"}}, f"{ANN}['podvisor.io/vcpus']", id="vcpus"),
    pytest.param({"cpu_quota": 6_400_000, "cpu_period": 100_000}, "config.linux.resources.cpu_quota",
                 id="cri-quota"),
    pytest.param({"annotations": {"podvisor.io/vm": '{"domain": {"cpu": {"cores": 1, "maxSockets": 64}}}'}},
                 f"{ANN}['podvisor.io/vm'].domain.cpu.maxSockets", id="vmi-max-sockets"),
])
def test_sizes_beyond_the_host_are_refused(overrides: dict[str, Any], field: str) -> None:
    _refused(overrides, field, "on this node (the host's")


def test_the_configured_ceiling_wins_over_the_host() -> None:
    defaults = VMDefaults(largest_vcpus=2, largest_memory_bytes=1024 * MiB)
    _refused({"annotations": {"podvisor.io/memory": "2Gi"}}, f"{ANN}['podvisor.io/memory']",
             "([vm] largest_memory_bytes)", defaults=defaults)
    _refused({"annotations": {"podvisor.io/vcpus": "3"}}, f"{ANN}['podvisor.io/vcpus']",
             "([vm] largest_vcpus)", defaults=defaults)


def test_configured_headroom_stops_at_the_ceiling() -> None:
    fakes = ContainerFakes()
    service = _service(fakes, VMDefaults(max_vcpus=64, max_memory_bytes=1 << 40), FakeHost(2, 4096 * MiB))
    c = service.create(cspec(annotations={"podvisor.io/memory": "1Gi", "podvisor.io/vcpus": "1"}))
    assert (c.vcpus, c.max_vcpus, c.memory_bytes, c.max_memory_bytes) == (1, 2, 1024 * MiB, 4096 * MiB)


def test_a_size_at_the_ceiling_is_accepted() -> None:
    fakes = ContainerFakes()
    c = _service(fakes, host=FakeHost(2, 4096 * MiB)).create(
        cspec(annotations={"podvisor.io/memory": "4Gi", "podvisor.io/vcpus": "2"}))
    assert (c.vcpus, c.memory_bytes) == (2, 4096 * MiB)
