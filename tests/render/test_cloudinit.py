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
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.domain.sandbox import DNSConfig
from agent.domain.vm import CloudInit, GuestAccess
from agent.domain.vmrequest import CRIResources, build_vm_request, check_network_config
from agent.render.cloudinit import (
    DHCLIENT_HOOK,
    DHCLIENT_HOOK_CONTENT,
    MERGE_TYPE,
    RESOLV_CONF_SCRIPT,
    SYSCTL_FILE,
    SYSCTL_SCRIPT,
    WORKLOAD_SCRIPT,
    WORKLOAD_SCRIPT_CONTENT,
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


POD_DNS = DNSConfig(servers=("10.96.0.10", "fd00:96::a"),
                    searches=("shop.svc.cluster.local", "svc.cluster.local", "cluster.local"),
                    options=("ndots:5", "edns0"))
POD_SYSCTLS = {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1",
               "net.ipv4.conf.eth0/100.rp_filter": "2"}
FULL: dict[str, Any] = {"ssh_authorized_keys": (KEY_A, KEY_B), "env": {"GREETING": "hello world", "MODE": "prod"},
        "command": ("/usr/local/bin/app", "--port", "8080"), "dns": POD_DNS, "sysctls": POD_SYSCTLS}
WORKLOAD = ["sh", WORKLOAD_SCRIPT, "start"]


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
        [*WORKLOAD, "env", "GREETING=hello world", "MODE=prod", "/usr/local/bin/app", "--port", "8080"],
    ]
    assert doc["write_files"][0] == {
        "path": "/etc/environment", "append": True, "content": 'GREETING="hello world"\nMODE=prod\n',
    }
    assert [f["path"] for f in doc["write_files"]] == [
        "/etc/environment", DHCLIENT_HOOK, SYSCTL_FILE, WORKLOAD_SCRIPT]


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [("vm", {"hostname": "vm"}), ("web-1.ns.example", {"hostname": "web-1", "fqdn": "web-1.ns.example"})],
)
def test_hostname_and_fqdn(hostname: str, expected: dict[str, str]) -> None:
    assert _cloud_config(render_user_data(CloudInit(), hostname)) == expected


def test_command_without_env_is_a_plain_argv() -> None:
    doc = _cloud_config(render_user_data(CloudInit(command=("sh", "-c", "echo 'a b' > /x")), "vm"))
    assert doc["runcmd"] == [[*WORKLOAD, "sh", "-c", "echo 'a b' > /x"]]
    assert doc["write_files"] == [{"path": WORKLOAD_SCRIPT, "permissions": "0700",
                                   "content": WORKLOAD_SCRIPT_CONTENT}]
    assert "bootcmd" not in doc


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
    assert _cloud_config(_payload(parts[2]))["runcmd"] == [[*WORKLOAD, "reboot"]]


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


# -- the pod's dns_config, sysctls and command ----------------------------------------------


def test_dns_config_becomes_resolv_conf_at_every_boot() -> None:
    user = b"#cloud-config\nbootcmd:\n  - echo user first\n"
    doc = _cloud_config(render_user_data(CloudInit(user_data=user, dns=POD_DNS), "vm"))
    assert doc["bootcmd"] == [
        "echo user first",
        ["sh", "-c", RESOLV_CONF_SCRIPT, "podvisor-resolv-conf",
         "# Written by Podvisor at every boot from the pod's dns_config.",
         "nameserver 10.96.0.10", "nameserver fd00:96::a",
         "search shop.svc.cluster.local svc.cluster.local cluster.local", "options ndots:5 edns0"],
    ]
    assert doc["write_files"] == [{"path": DHCLIENT_HOOK, "content": DHCLIENT_HOOK_CONTENT}]
    assert "runcmd" not in doc


@pytest.mark.parametrize(("dns", "lines"), [
    (DNSConfig(options=("ndots:5",)), ["options ndots:5"]),
    (DNSConfig(searches=("a.example",)), ["search a.example"]),
    (DNSConfig(servers=("10.0.0.10",)), ["nameserver 10.0.0.10"]),
])
def test_each_part_of_dns_config_alone_is_written(dns: DNSConfig, lines: list[str]) -> None:
    doc = _cloud_config(render_user_data(CloudInit(dns=dns), "vm"))
    assert doc["bootcmd"][0][5:] == lines


def test_no_pod_settings_leave_a_users_script_verbatim() -> None:
    ci = CloudInit(user_data=SCRIPT, dns=DNSConfig(), sysctls={})
    assert render_user_data(ci, "vm") == SCRIPT


def test_pod_settings_wrap_a_users_script_in_mime() -> None:
    out = render_user_data(CloudInit(user_data=SCRIPT, sysctls={"kernel.pid_max": "65536"}), "vm")
    parts = _cloud_init_parts(out)
    assert _payload(parts[0]) == SCRIPT
    ours = _cloud_config(_payload(parts[1]))
    assert ours["bootcmd"] == [["sh", "-c", SYSCTL_SCRIPT, "podvisor-sysctl", "/proc/sys/kernel/pid_max", "65536"]]


def test_a_users_bootcmd_that_is_not_a_list_is_refused() -> None:
    with pytest.raises(ValueError, match="'bootcmd' in the #cloud-config document must be a list"):
        render_user_data(CloudInit(user_data=b"#cloud-config\nbootcmd: echo\n", dns=POD_DNS), "vm")


def test_sysctls_go_to_sysctl_d_and_proc_sorted_by_name() -> None:
    doc = _cloud_config(render_user_data(CloudInit(sysctls=POD_SYSCTLS), "vm"))
    assert doc["write_files"] == [{"path": SYSCTL_FILE, "content": (
        "# Podvisor: the pod's linux.sysctls.\n"
        "kernel.shm_rmid_forced = 1\n"
        "net.ipv4.conf.eth0/100.rp_filter = 2\n"
        "net.ipv4.ip_unprivileged_port_start = 0\n")}]
    assert doc["bootcmd"] == [["sh", "-c", SYSCTL_SCRIPT, "podvisor-sysctl",
                               "/proc/sys/kernel/shm_rmid_forced", "1",
                               "/proc/sys/net/ipv4/conf/eth0.100/rp_filter", "2",
                               "/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"]]


# The shell the seed carries, run here with its paths moved into a temporary directory.


def _sh(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script, "test", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


def test_resolv_conf_script_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    target = tmp_path / "stub-resolv.conf"
    target.write_text("nameserver 127.0.0.53\n")
    (etc / "resolv.conf").symlink_to(target)
    script = RESOLV_CONF_SCRIPT.replace("/etc/", f"{etc}/")
    assert script != RESOLV_CONF_SCRIPT
    done = _sh(script, "nameserver 10.96.0.10", "search a.example b.example", "options ndots:5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    resolv = etc / "resolv.conf"
    assert not resolv.is_symlink()
    assert resolv.read_text() == "nameserver 10.96.0.10\nsearch a.example b.example\noptions ndots:5\n"
    assert target.read_text() == "nameserver 127.0.0.53\n"
    assert sorted(p.name for p in etc.iterdir()) == ["resolv.conf"]


def test_sysctl_script_sets_every_value_and_fails_for_one_it_cannot(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("0\n")
    (tmp_path / "b").write_text("0\n")
    done = _sh(SYSCTL_SCRIPT, "a", "1024 65535", "missing/x", "1", "b", "7", cwd=tmp_path)
    assert done.returncode == 1
    assert "podvisor: cannot set missing/x" in done.stderr
    assert ((tmp_path / "a").read_text(), (tmp_path / "b").read_text()) == ("1024 65535\n", "7\n")
    assert _sh(SYSCTL_SCRIPT, "a", "1", cwd=tmp_path).returncode == 0


def _wrapper(tmp_path: Path) -> Path:
    """The workload wrapper with the console, exit port, FIFO and poweroff moved into tmp_path."""
    text = WORKLOAD_SCRIPT_CONTENT
    for old, new in (
        ("port=/dev/virtio-ports/io.podvisor.exit.0", f"port={tmp_path}/port"),
        ("console=/dev/ttyS0\n", f"console={tmp_path}/console\n"),
        ('[ -c "$console" ] || console=/dev/console\n', ""),
        ('[ -c "$port" ]', '[ -f "$port" ]'),
        ("out=/run/podvisor-workload.out", f"out={tmp_path}/out"),
        ("\npoweroff\n", f"\necho powered-off >{tmp_path}/poweroff\n"),
    ):
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "workload"
    path.write_text(text)
    (tmp_path / "port").write_text("")
    return path


@pytest.mark.parametrize(("command", "code"), [
    (["sh", "-c", "echo out; echo err >&2; printf partial"], 0),
    (["sh", "-c", "echo failing; exit 7"], 7),
    (["sh", "-c", 'kill -TERM "$$"'], 143),
    (["/nonexistent/command"], 127),
])
def test_the_workload_wrapper_relays_output_and_reports_the_exit_code(tmp_path: Path, command: list[str],
                                                                     code: int) -> None:
    wrapper = _wrapper(tmp_path)
    done = subprocess.run(["sh", str(wrapper), "run", *command], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "port").read_text() == f"{code}\n"
    assert (tmp_path / "poweroff").read_text() == "powered-off\n"
    console = (tmp_path / "console").read_text()
    if code == 0:
        assert console == "out\nerr\npartial"
    elif code == 7:
        assert console == "failing\n"
    elif code == 127:
        assert "/nonexistent/command" in console


def test_the_workload_wrapper_gives_the_command_no_stdin(tmp_path: Path) -> None:
    wrapper = _wrapper(tmp_path)
    done = subprocess.run(["sh", str(wrapper), "run", "sh", "-c", "cat; echo read-$?"], input=b"secret\n",
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0
    assert (tmp_path / "console").read_text() == "read-0\n"


def test_the_workload_wrapper_refuses_an_unknown_mode(tmp_path: Path) -> None:
    done = subprocess.run(["sh", str(_wrapper(tmp_path)), "bogus"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and "usage" in done.stderr
    assert not (tmp_path / "poweroff").exists()


def test_the_example_in_docs_annotations_md_is_what_the_renderer_writes() -> None:
    out = render_user_data(CloudInit(
        env={"GREETING": "hello world"}, command=("/usr/bin/app", "--port", "8080"),
        dns=DNSConfig(("10.96.0.10",), ("default.svc.cluster.local",), ("ndots:5",)),
        sysctls={"net.ipv4.ip_unprivileged_port_start": "0"}), "demo-vm").decode()
    doc = (Path(__file__).resolve().parents[2] / "docs" / "annotations.md").read_text()
    block = doc[doc.index("no user-data, gets (the wrapper's content shortened):"):]
    block = block[block.index("```yaml\n") + len("```yaml\n"):]
    block = block[:block.index("```\n")]
    head, cut, tail = block.partition("    …\n")
    assert cut and out.startswith(head) and out.endswith(tail)
