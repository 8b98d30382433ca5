"""Stock Debian 12 (images/debian) through the gRPC API under TCG: the guest's
own cloud-init reads Podvisor's NoCloud seed.

One VM pod for the module, on a private pod network. Everything the pod asks
for (hostname, user-data runcmd + write_files, SSH keys, env, command + args,
network-config) is read back from inside the guest: a user-data script prints
the facts on the serial console (the container log), one ``PVFACT name=value``
line each, values base64-encoded; ``cloud-init status --wait --long`` runs in
a transient unit and prints its result once cloud-init is done. The guest
agent is asked through libvirt (``virsh qemu-agent-command``).
"""

from __future__ import annotations

import base64
import re
import secrets

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import DebianVM, DebianVMSpec

pytestmark = pytest.mark.e2e

TOKEN = secrets.token_hex(6)
SSH_KEY = Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + f" e2e-{TOKEN}@podvisor"
HOSTNAME = f"deb-{TOKEN[:6]}"

# Printed by the user-data script: one line per fact, value base64 (no spaces,
# survives the console). The names are built at run time ("PV" "FACT") so
# that the user-data itself, if echoed anywhere, never matches.
FACTS_SCRIPT = r"""#!/bin/sh
exec >/dev/ttyS0 2>&1
p=PV; p="${p}FACT"
fact() { printf '%s %s=%s\n' "$p" "$1" "$(printf '%s' "$2" | base64 -w0)"; }
fact hostname "$(hostname)"
fact write_files "$(cat /etc/podvisor-e2e.txt)"
fact authorized_keys "$(cat /home/debian/.ssh/authorized_keys)"
fact environment "$(cat /etc/environment)"
fact addresses "$(ip -o -4 addr show scope global | awk '{print $4}')"
fact eni "$(cat /etc/network/interfaces.d/50-cloud-init 2>&1)"
fact cloud_id "$(cloud-id)"
fact instance_id "$(cloud-init query instance_id)"
fact os "$(. /etc/os-release; echo "$PRETTY_NAME")"
fact warnings "$(grep -E 'WARNING|ERROR|Traceback' /var/log/cloud-init.log)"
fact done yes
"""
STATUS_SCRIPT = r"""#!/bin/sh
out=$(cloud-init status --wait --long 2>&1); rc=$?
p=PV; p="${p}STATUS"
printf '%s rc=%s %s\n' "$p" "$rc" "$(printf '%s' "$out" | base64 -w0)" >/dev/ttyS0
"""
USER_DATA = f"""#cloud-config
write_files:
  - path: /etc/podvisor-e2e.txt
    content: "written-by-user-data {TOKEN}"
  - path: /usr/local/bin/pv-facts
    permissions: '0755'
    content: |
{''.join('      ' + line + chr(10) for line in FACTS_SCRIPT.splitlines())}  - path: /usr/local/bin/pv-status
    permissions: '0755'
    content: |
{''.join('      ' + line + chr(10) for line in STATUS_SCRIPT.splitlines())}runcmd:
  - [/usr/local/bin/pv-facts]
  - [systemd-run, --no-block, --unit=pv-status, /usr/local/bin/pv-status]
"""
ENVS = {"GREETING": "hello world", "PV_TOKEN": TOKEN}
# command + args: the VM's workload (docs/annotations.md), an argv list run
# with the container's env after the user's runcmd; its stdout reaches the
# console. It keeps running so that the VM stays up for the module (the guest
# powers off when the command ends).
COMMAND = ["/bin/sh", "-c"]
ARGS = ['echo "PVCOMMAND greeting=[$GREETING] token=$PV_TOKEN argv=$0,$1"; exec sleep 86400', "first arg", "second"]


@pytest.fixture(scope="module")
def debian_vm_spec() -> DebianVMSpec:
    return DebianVMSpec(
        hostname=HOSTNAME,
        annotations={"podvisor.io/user-data": USER_DATA, "podvisor.io/ssh-authorized-keys": SSH_KEY + "\n"},
        envs=ENVS, command=COMMAND, args=ARGS,
        ready_marker="PVSTATUS rc=",
    )


def facts(vm: DebianVM) -> dict[str, str]:
    text = vm.wait_log("PVFACT done=")
    return {m.group(1): base64.b64decode(m.group(2)).decode()
            for m in re.finditer(r"PVFACT (\w+)=([A-Za-z0-9+/=]*)", text)}


def test_it_is_stock_debian_12_on_the_nocloud_seed(debian_vm: DebianVM) -> None:
    f = facts(debian_vm)
    assert f["os"] == "Debian GNU/Linux 12 (bookworm)"
    assert f["cloud_id"] == "nocloud"
    # meta-data's instance-id is the container's ID.
    assert f["instance_id"] == debian_vm.vm.container_id


def test_cloud_init_finishes_without_errors(debian_vm: DebianVM) -> None:
    m = re.search(r"PVSTATUS rc=(\d+) ([A-Za-z0-9+/=]*)", debian_vm.log())
    assert m is not None
    status = base64.b64decode(m.group(2)).decode()
    assert m.group(1) == "0", status
    assert re.search(r"^status: done$", status, re.M), status
    assert "error" not in status.lower(), status
    # Up to the final stage (runcmd), cloud-init logged no warning: every module worked.
    assert facts(debian_vm)["warnings"] == ""


def test_hostname_comes_from_the_sandbox(debian_vm: DebianVM) -> None:
    assert facts(debian_vm)["hostname"] == HOSTNAME


def test_user_data_write_files_and_runcmd_ran(debian_vm: DebianVM) -> None:
    # runcmd ran the script write_files put in place; it read write_files' file.
    assert facts(debian_vm)["write_files"] == f"written-by-user-data {TOKEN}"


def test_ssh_authorized_keys_reach_the_default_user(debian_vm: DebianVM) -> None:
    assert SSH_KEY in facts(debian_vm)["authorized_keys"].splitlines()


def test_container_envs_land_in_etc_environment(debian_vm: DebianVM) -> None:
    lines = facts(debian_vm)["environment"].splitlines()
    assert 'GREETING="hello world"' in lines
    assert f"PV_TOKEN={TOKEN}" in lines


def test_command_and_args_run_with_the_env(debian_vm: DebianVM) -> None:
    text = debian_vm.wait_log("PVCOMMAND ")
    assert f"PVCOMMAND greeting=[hello world] token={TOKEN} argv=first arg,second" in text
    # The command still runs: the container is running, not exited.
    assert debian_vm.vma.status(debian_vm.vm).status.state == pb.CONTAINER_RUNNING


def test_network_config_gives_the_guest_the_pod_ip(debian_vm: DebianVM) -> None:
    f = facts(debian_vm)
    assert debian_vm.pod_ip
    assert f"{debian_vm.pod_ip}/" in f["addresses"]
    # cloud-init rendered Podvisor's network-config (a static address), not a DHCP fallback.
    assert re.search(rf"^\s*address {re.escape(debian_vm.pod_ip)}(/\d+)?$", f["eni"], re.M), f["eni"]
    assert "inet static" in f["eni"]


def test_the_guest_agent_answers(debian_vm: DebianVM) -> None:
    assert debian_vm.agent_command({"execute": "guest-ping"}) == {}
    assert debian_vm.agent_command({"execute": "guest-get-host-name"})["host-name"] == HOSTNAME
