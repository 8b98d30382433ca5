"""The seed's pod volumes: a bootcmd that mounts the share at every boot, the user's
user-data kept (merged into a cloud-config, wrapped beside a script)."""

from __future__ import annotations

import email
from typing import Any

import yaml

from agent.domain.vm import CloudInit
from agent.domain.volumes import Mount, Share
from agent.render.cloudinit import VOLUMES_SCRIPT, render_user_data, volumes_bootcmd_args

VOLUMES = (Share(Mount("/etc/config", "/h/cfg", readonly=True), "0", True),
           Share(Mount("/dev/termination-log", "/h/t"), "1", False))
BOOTCMD = ["sh", "-c", VOLUMES_SCRIPT, "podvisor-volumes", "podvisor-volumes", "/run/podvisor/volumes",
           "0", "d", "ro", "/etc/config", "1", "f", "rw", "/dev/termination-log"]


def _doc(data: bytes) -> Any:
    assert data.startswith(b"#cloud-config\n")
    return yaml.safe_load(data)


def test_arguments_name_each_entry_kind_mode_and_path() -> None:
    assert volumes_bootcmd_args(VOLUMES) == BOOTCMD[4:]


def test_mounts_alone_make_a_bootcmd() -> None:
    doc = _doc(render_user_data(CloudInit(volumes=VOLUMES), "vm"))
    assert doc["bootcmd"] == [BOOTCMD]
    assert doc["hostname"] == "vm"


def test_a_users_cloud_config_keeps_its_bootcmd_first() -> None:
    user = b"#cloud-config\nbootcmd:\n  - echo user first\nruncmd:\n  - echo run\n"
    doc = _doc(render_user_data(CloudInit(user_data=user, volumes=VOLUMES), "vm"))
    assert doc["bootcmd"] == ["echo user first", BOOTCMD]
    assert doc["runcmd"] == ["echo run"]


def test_a_users_script_is_kept_and_the_mounts_ride_beside_it() -> None:
    script = b'#!/bin/sh\necho "hello"\n'
    out = render_user_data(CloudInit(user_data=script, volumes=VOLUMES), "vm")
    msg = email.message_from_string(out.decode())
    parts = [p for p in msg.walk() if p.get_content_maintype() != "multipart"]
    assert parts[0].get_payload(decode=True) == script
    payload = parts[1].get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert _doc(payload)["bootcmd"] == [BOOTCMD]


def test_no_mounts_leave_the_users_data_verbatim() -> None:
    user = b"#cloud-config\n# a comment\nruncmd: [echo]\n"
    assert render_user_data(CloudInit(user_data=user), "vm") == user


def test_the_script_always_exits_0_and_reports_on_its_port() -> None:
    assert VOLUMES_SCRIPT.rstrip().endswith("exit 0")
    assert "/dev/virtio-ports/io.podvisor.volumes.0" in VOLUMES_SCRIPT
    assert 'mount -o remount,bind,ro "$path"' in VOLUMES_SCRIPT
