"""Tests for the cloud-init seed files (agent.render.cloudinit).

Merged outputs are compared with golden files under golden/cloudinit/;
regenerate them with ``UPDATE_GOLDEN=1 pytest tests/render/test_cloudinit.py``
and review the diff.
"""

from __future__ import annotations

import base64
import email
import email.message
import gzip
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.domain.vm import CloudInit, GuestAccess
from agent.domain.vmrequest import CRIResources, build_vm_request, check_network_config
from agent.render.cloudinit import (
    MERGE_TYPE,
    PodNetwork,
    Route,
    render_network_config,
    render_user_data,
    seed_files,
)
from agent.render.nocloud import build_seed_iso

GOLDEN_DIR = Path(__file__).parent / "golden" / "cloudinit"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE9o7Cq4bP0pV3Qd1oQ2r8Xk0nGm3yU5fJtQeWc7hZ9s ops@example"
KEY_B = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 backup@example"
SCRIPT = b'#!/bin/sh\necho "hello from the user"\n'
USER_MIME = (
    b'Content-Type: multipart/mixed; boundary="===user==="\n'
    b"MIME-Version: 1.0\n"
    b"\n"
    b"--===user===\n"
    b'Content-Type: text/cloud-config; charset="us-ascii"\n'
    b"\n"
    b"#cloud-config\n"
    b"runcmd:\n"
    b"  - echo user\n"
    b"--===user===\n"
    b'Content-Type: text/x-shellscript; charset="us-ascii"\n'
    b"\n"
    b"#!/bin/sh\n"
    b"echo part two\n"
    b"--===user===--\n"
)
POD_NET = PodNetwork(
    mac="52:54:00:AB:CD:EF",
    addresses=("10.88.0.7/16",),
    gateways=("10.88.0.1",),
    routes=(Route("0.0.0.0/0"),),
    dns_servers=("10.96.0.10",),
    dns_searches=("default.svc.cluster.local", "svc.cluster.local", "cluster.local"),
)


def _golden(name: str, actual: bytes) -> None:
    path = GOLDEN_DIR / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(actual)
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1"
    assert actual == path.read_bytes(), f"{name} differs from its golden file; rerun with UPDATE_GOLDEN=1 to review"


def _cloud_config(data: bytes) -> Any:
    assert data.startswith(b"#cloud-config\n")
    return yaml.safe_load(data)


def _cloud_init_parts(user_data: bytes) -> list[email.message.Message]:
    """The parts cloud-init's UserDataProcessor sees (convert_string + walk)."""
    text = user_data.decode("utf-8")
    assert "mime-version:" in text[:4096].lower()
    msg = email.message_from_string(text)
    assert not msg.defects
    return [p for p in msg.walk() if p.get_content_maintype() != "multipart"]


def _payload(part: email.message.Message) -> bytes:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data


# -- golden files -------------------------------------------------------------------


FULL: dict[str, Any] = {"ssh_authorized_keys": (KEY_A, KEY_B), "env": {"GREETING": "hello world", "MODE": "prod"},
        "command": ("/usr/local/bin/app", "--port", "8080")}


@pytest.mark.parametrize(
    ("name", "ci", "hostname"),
    [
        pytest.param("empty.user-data", CloudInit(), "vm-one", id="empty"),
        pytest.param("additions-only.user-data", CloudInit(**FULL), "web-1.example.internal",
                     id="additions-only"),
        pytest.param(
            "merged-cloud-config.user-data",
            CloudInit(
                user_data=b"#cloud-config\n# the user's own\nhostname: custom\npackages: [nginx]\n"
                          b"ssh_authorized_keys:\n  - " + KEY_B.encode() + b"\n"
                          b"write_files:\n  - path: /etc/motd\n    content: |\n      hi\n"
                          b"runcmd:\n  - systemctl enable --now nginx\n",
                **FULL,
            ),
            "web-1",
            id="merged-cloud-config",
        ),
        pytest.param("script-plus-additions.user-data", CloudInit(user_data=SCRIPT, **FULL), "web-1",
                     id="script-plus-additions"),
        pytest.param("mime-plus-keys.user-data",
                     CloudInit(user_data=USER_MIME, ssh_authorized_keys=(KEY_A,)), "web-1", id="mime-plus-keys"),
    ],
)
def test_user_data_golden(name: str, ci: CloudInit, hostname: str) -> None:
    out = render_user_data(ci, hostname)
    _golden(name, out)
    assert render_user_data(ci, hostname) == out  # deterministic


def test_network_config_golden() -> None:
    net = PodNetwork(
        mac="52:54:00:12:34:56",
        addresses=("10.88.0.7/16", "fd00:88::7/64"),
        gateways=("10.88.0.1", "fd00:88::1"),
        routes=(Route("0.0.0.0/0"), Route("::/0"), Route("10.96.0.0/12", via="10.88.0.254", metric=100)),
        dns_servers=("10.96.0.10",),
        dns_searches=("default.svc.cluster.local",),
        mtu=1450,
    )
    out = render_network_config(CloudInit(), net)
    assert out is not None
    _golden("dual-stack.network-config", out)
    check_network_config(out)


def test_testvm_seed_golden() -> None:
    request = build_vm_request(
        cri_resources=CRIResources(),
        pod_annotations={},
        container_annotations={"podvisor.io/vm": (EXAMPLES / "testvm.yaml").read_text()},
        env=(), command=(), args=(), defaults=None,
    )
    files = seed_files(instance_id="0f6c9a1e-testvm", hostname="testvm", cloud_init=request.cloud_init,
                       network=POD_NET)
    assert sorted(files) == ["meta-data", "network-config", "user-data"]
    # Nothing to add: the user's script reaches the guest byte for byte.
    assert files["user-data"] == b'#!/bin/sh\necho "Hello from testvm"\n'
    for name, data in files.items():
        _golden(f"testvm.{name}", data)
    iso = build_seed_iso(files["meta-data"], files["user-data"], files.get("network-config"))
    assert iso[0x8001:0x8006] == b"CD001"


# -- Exec's SSH access ---------------------------------------------------------------------

# Fixed test keys (made once for these tests, used nowhere else).
ACCESS = GuestAccess(
    client_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPodvisorExecClientKeyForGoldenTests0000000 podvisor-exec",
    host_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPodvisorGuestHostKeyForGoldenTests00000000 podvisor-host",
    host_private_key="-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
                     "-----END OPENSSH PRIVATE KEY-----\n",
)


def test_access_goes_to_vendor_data_and_meta_data_and_leaves_the_user_data_alone() -> None:
    ci = CloudInit(user_data=SCRIPT, ssh_authorized_keys=(KEY_A,))
    with_access = seed_files(instance_id="i-1", hostname="web-1", cloud_init=ci, access=ACCESS)
    without = seed_files(instance_id="i-1", hostname="web-1", cloud_init=ci)
    assert with_access["user-data"] == without["user-data"]
    _golden("access.vendor-data", with_access["vendor-data"])
    _golden("access.meta-data", with_access["meta-data"])
    vendor = _cloud_config(with_access["vendor-data"])
    assert vendor == {"disable_root": False, "ssh_keys": {"ed25519_private": ACCESS.host_private_key,
                                                           "ed25519_public": ACCESS.host_public_key}}
    meta = yaml.safe_load(with_access["meta-data"])
    assert meta["public-keys"] == [ACCESS.client_public_key]
    assert "vendor-data" not in without and "public-keys" not in yaml.safe_load(without["meta-data"])


def test_access_never_shows_the_private_key_in_its_repr() -> None:
    assert "PRIVATE KEY" not in repr(ACCESS)


# -- #cloud-config merging ----------------------------------------------------------------


def test_merge_keeps_user_values_and_appends_ours() -> None:
    user = (b"#cloud-config\nfqdn: db.example\nssh_authorized_keys: " + KEY_B.encode() + b"\n"
            b"runcmd:\n  - echo first\nwrite_files: []\n")
    doc = _cloud_config(render_user_data(CloudInit(user_data=user, **FULL), "ignored"))
    assert "hostname" not in doc and doc["fqdn"] == "db.example"  # the user named the host
    assert doc["ssh_authorized_keys"] == [KEY_B, KEY_A]  # a single string is a list of one; no duplicates
    assert doc["runcmd"] == [
        "echo first",
        ["env", "GREETING=hello world", "MODE=prod", "/usr/local/bin/app", "--port", "8080"],
    ]
    assert doc["write_files"] == [{
        "path": "/etc/environment", "append": True, "content": 'GREETING="hello world"\nMODE=prod\n',
    }]


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [("vm", {"hostname": "vm"}), ("web-1.ns.example", {"hostname": "web-1", "fqdn": "web-1.ns.example"})],
)
def test_hostname_and_fqdn(hostname: str, expected: dict[str, str]) -> None:
    assert _cloud_config(render_user_data(CloudInit(), hostname)) == expected


def test_command_without_env_is_a_plain_argv() -> None:
    doc = _cloud_config(render_user_data(CloudInit(command=("sh", "-c", "echo 'a b' > /x")), "vm"))
    assert doc["runcmd"] == [["sh", "-c", "echo 'a b' > /x"]]
    assert "write_files" not in doc


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("plain", "V=plain"),
        ("/usr/bin:/bin", "V=/usr/bin:/bin"),
        ("", 'V=""'),
        ("two words", 'V="two words"'),
        ('say "hi"', "V='say \"hi\"'"),
        ("$HOME#x", 'V="$HOME#x"'),
        ("héllo", 'V="héllo"'),
    ],
)
def test_environment_lines(value: str, line: str) -> None:
    doc = _cloud_config(render_user_data(CloudInit(env={"V": value}), "vm"))
    assert doc["write_files"][0]["content"] == line + "\n"


def test_user_document_is_not_mutated_and_cloud_config_without_additions_is_verbatim() -> None:
    user = b"#cloud-config\n# keep this comment\nruncmd: [a]\n"
    assert render_user_data(CloudInit(user_data=user), "vm") == user
    ci = CloudInit(user_data=user, command=("b",))
    render_user_data(ci, "vm")
    assert ci.user_data == user


@pytest.mark.parametrize(
    "user_data",
    [SCRIPT, b"#include\nhttps://example.com/ud\n", b"#cloud-boothook\n#!/bin/sh\n", USER_MIME,
     gzip.compress(b"#cloud-config\n", mtime=0), b"## template: jinja\n#cloud-config\nhostname: {{ v1.x }}\n"],
)
def test_other_formats_without_additions_are_verbatim(user_data: bytes) -> None:
    assert render_user_data(CloudInit(user_data=user_data, network_config=b"version: 2\n"), "vm") == user_data


# -- MIME multipart --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_data", "content_type"),
    [
        (SCRIPT, "text/x-shellscript"),
        (b"#include\nhttps://example.com/ud\n", "text/x-include-url"),
        (b"#include-once\nhttps://example.com/ud\n", "text/x-include-once-url"),
        (b"#cloud-boothook\n#!/bin/sh\necho early\n", "text/cloud-boothook"),
        (b"#cloud-config-archive\n- type: text/cloud-config\n  content: a: 1\n", "text/cloud-config-archive"),
        (b"## template: jinja\n#cloud-config\nhostname: {{ ds.meta_data.x }}\n", "text/jinja2"),
        (gzip.compress(b"#cloud-config\nruncmd: [x]\n", mtime=0), "application/x-gzip"),
        (b"no header at all\r\nwith CRLF\r\n\xff\xfe binary tail", "text/x-not-multipart"),
    ],
)
def test_other_formats_are_wrapped_byte_for_byte(user_data: bytes, content_type: str) -> None:
    out = render_user_data(CloudInit(user_data=user_data, ssh_authorized_keys=(KEY_A,), env={"A": "1"}), "vm")
    first, second = _cloud_init_parts(out)
    assert first.get_content_type() == content_type
    assert _payload(first) == user_data
    assert second.get_content_type() == "text/cloud-config"
    assert second["Merge-Type"] == MERGE_TYPE
    doc = _cloud_config(_payload(second))
    assert doc["ssh_authorized_keys"] == [KEY_A]
    assert doc["hostname"] == "vm"


def test_user_mime_is_nested_verbatim() -> None:
    out = render_user_data(CloudInit(user_data=USER_MIME, command=("reboot",)), "vm")
    assert USER_MIME in out
    parts = _cloud_init_parts(out)
    assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/x-shellscript", "text/cloud-config"]
    assert _payload(parts[0]) == b"#cloud-config\nruncmd:\n  - echo user"
    assert _payload(parts[1]) == b"#!/bin/sh\necho part two"
    assert _cloud_config(_payload(parts[2]))["runcmd"] == [["reboot"]]


def test_non_ascii_additions_are_base64_in_mime() -> None:
    out = render_user_data(CloudInit(user_data=SCRIPT, env={"NAME": "Zoë"}), "vm")
    assert out.isascii()
    _, ours = _cloud_init_parts(out)
    assert ours["Content-Transfer-Encoding"] == "base64"
    assert _cloud_config(_payload(ours))["write_files"][0]["content"] == 'NAME="Zoë"\n'


def test_boundary_is_deterministic_and_absent_from_the_content() -> None:
    a = render_user_data(CloudInit(user_data=SCRIPT, command=("x",)), "vm")
    b = render_user_data(CloudInit(user_data=SCRIPT, command=("y",)), "vm")
    boundary_a = a.split(b'boundary="', 1)[1].split(b'"', 1)[0]
    boundary_b = b.split(b'boundary="', 1)[1].split(b'"', 1)[0]
    assert boundary_a.startswith(b"podvisor-") and boundary_a != boundary_b
    assert a.count(b"--" + boundary_a) == 3  # two parts and the close delimiter


# -- network-config --------------------------------------------------------------------------


def test_network_config_verbatim_wins_and_none_when_nothing() -> None:
    given = b"network:\n  this is not even checked here\n"
    assert render_network_config(CloudInit(network_config=given), POD_NET) == given
    assert render_network_config(CloudInit(), None) is None


def test_pod_network_config() -> None:
    out = render_network_config(CloudInit(), POD_NET)
    assert out is not None
    assert b'macaddress: "52:54:00:ab:cd:ef"' in out  # lower case, always quoted
    assert yaml.safe_load(out) == {
        "version": 2,
        "ethernets": {"eth0": {
            "match": {"macaddress": "52:54:00:ab:cd:ef"},
            "addresses": ["10.88.0.7/16"],
            "routes": [{"to": "0.0.0.0/0", "via": "10.88.0.1"}],
            "nameservers": {"addresses": ["10.96.0.10"],
                            "search": ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]},
        }},
    }


def test_route_without_any_gateway_is_on_link() -> None:
    net = PodNetwork(mac="02:00:00:00:00:01", addresses=("192.168.5.2/24",), routes=(Route("192.168.6.0/24"),))
    out = render_network_config(CloudInit(), net)
    assert out is not None
    assert yaml.safe_load(out)["ethernets"]["eth0"]["routes"] == [{"to": "192.168.6.0/24", "scope": "link"}]


@pytest.mark.parametrize(
    "net",
    [
        PodNetwork(mac="not-a-mac", addresses=("10.0.0.2/24",)),
        PodNetwork(mac="02:00:00:00:00:01\n", addresses=("10.0.0.2/24",)),
        PodNetwork(mac="02:00:00:00:00:01", addresses=()),
        PodNetwork(mac="02:00:00:00:00:01", addresses=("10.0.0.300/24",)),
        PodNetwork(mac="02:00:00:00:00:01", addresses=("10.0.0.2/24",), gateways=("10.0.0.1", "10.0.0.254")),
        PodNetwork(mac="02:00:00:00:00:01", addresses=("10.0.0.2/24",), dns_servers=("dns.example",)),
    ],
)
def test_bad_pod_network_is_a_programming_error(net: PodNetwork) -> None:
    with pytest.raises(ValueError):
        render_network_config(CloudInit(), net)


# -- seed files ---------------------------------------------------------------------------------


def test_seed_files_without_network() -> None:
    files = seed_files(instance_id="iid-1", hostname="vm", cloud_init=CloudInit(user_data=SCRIPT))
    assert files == {
        "meta-data": b'instance-id: "iid-1"\nlocal-hostname: "vm"\n',
        "user-data": SCRIPT,
    }


def test_seed_files_carry_the_given_network_config() -> None:
    v2 = b"version: 2\nethernets: {}\n"
    files = seed_files(instance_id="iid-1", hostname="vm", cloud_init=CloudInit(network_config=v2), network=POD_NET)
    assert files["network-config"] == v2


def test_base64_parts_use_76_column_lines() -> None:
    big = b"#!/bin/sh\n" + b"echo " + b"x" * 300 + b"\n"
    out = render_user_data(CloudInit(user_data=big, command=("true",)), "vm")
    encoded = base64.encodebytes(big)
    assert encoded in out
    assert max(len(line) for line in out.splitlines()) <= 100
