"""KubeVirt VM/VMI documents: any document → a VMISpec or InvalidArgument naming a field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from agent.domain.kubevirt import DEFAULT_FIELD, parse_vmi, vmi_from_document
from tests.fuzz.properties import Refused, domain_errors_only
from tests.fuzz.strategies import dumps, json_values, mutate_document, nested_texts

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TESTVM = yaml.safe_load((EXAMPLES / "testvm.yaml").read_text())
FULL_SPEC: dict[str, Any] = {
    "hostname": "vm1",
    "domain": {
        "cpu": {"cores": 2, "sockets": 1, "threads": 1, "maxSockets": 4},
        "memory": {"guest": "1Gi", "maxGuest": "4Gi"},
        "resources": {"requests": {"memory": "1Gi", "cpu": "1500m"}, "limits": {"memory": "2Gi", "cpu": 2}},
        "firmware": {"bootloader": {"efi": {"secureBoot": False}}},
        "devices": {
            "disks": [{"name": "root", "disk": {"bus": "virtio"}}, {"name": "ci", "cdrom": {"bus": "sata"}}],
            "interfaces": [{"name": "default", "masquerade": {}, "model": "e1000", "macAddress": "02:00:00:00:00:01"}],
            "autoattachPodInterface": True,
        },
    },
    "networks": [{"name": "default", "pod": {}}],
    "volumes": [
        {"name": "root", "containerDisk": {"image": "registry.example/vm/debian:12", "path": "/disk/x.qcow2"}},
        {"name": "ci", "cloudInitNoCloud": {"userData": "#cloud-config\n{}", "networkData": "version: 2\n"}},
    ],
}
DOCUMENTS = st.one_of(mutate_document(TESTVM), mutate_document(FULL_SPEC),
                      mutate_document({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                                       "spec": FULL_SPEC}),
                      json_values)


@given(DOCUMENTS)
def test_documents_give_a_spec_or_a_named_field(doc: Any) -> None:
    if not isinstance(doc, dict):
        return
    result = domain_errors_only(vmi_from_document, doc, DEFAULT_FIELD)
    if isinstance(result, Refused):
        assert result.error.field.startswith(DEFAULT_FIELD)  # type: ignore[attr-defined]


@given(st.one_of(DOCUMENTS.map(dumps), DOCUMENTS.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), nested_texts))
def test_annotation_text_gives_a_spec_or_a_named_field(text: str) -> None:
    domain_errors_only(parse_vmi, text, DEFAULT_FIELD)


@given(mutate_document(FULL_SPEC))
def test_accepted_spec_round_trips_through_json_and_yaml(doc: Any) -> None:
    if not isinstance(doc, dict):
        return
    first = domain_errors_only(vmi_from_document, doc, DEFAULT_FIELD)
    if isinstance(first, Refused):
        return
    assert parse_vmi(json.dumps(doc), DEFAULT_FIELD) == first
