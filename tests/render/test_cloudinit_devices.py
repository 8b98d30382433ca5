"""CRI devices in the NoCloud seed (agent.render.cloudinit): a bootcmd links
each device's container path to its /dev/disk/by-id name at every boot,
merged into the user's user-data like the pod's DNS and sysctls; and the
link script itself, run here on a temporary tree."""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent.domain.vm import CloudInit
from agent.domain.volumes import device_by_id
from agent.render.cloudinit import DEVICE_LINK_SCRIPT, DEVICE_LINK_WAIT_S, render_user_data
from tests.render.test_cloudinit import SCRIPT, _cloud_config, _cloud_init_parts, _golden, _payload

PATHS = ("/dev/xvda", "/srv/volumes/data")
USER_CLOUD_CONFIG = (b"#cloud-config\n# the user's own\nbootcmd:\n  - [echo, first]\n"
                     b"runcmd:\n  - echo user\n")


def test_devices_merge_into_a_users_cloud_config_after_its_own_bootcmd() -> None:
    out = render_user_data(CloudInit(user_data=USER_CLOUD_CONFIG, device_paths=PATHS), "vm-1")
    _golden("devices-merged.user-data", out)
    doc = _cloud_config(out)
    assert doc["bootcmd"] == [
        ["echo", "first"],
        ["sh", "-c", DEVICE_LINK_SCRIPT, "podvisor-devices",
         "/dev/xvda", device_by_id("/dev/xvda"), "/srv/volumes/data", device_by_id("/srv/volumes/data")],
    ]
    assert doc["runcmd"] == ["echo user"]


def test_devices_wrap_a_users_script_in_mime_and_keep_it_byte_for_byte() -> None:
    out = render_user_data(CloudInit(user_data=SCRIPT, device_paths=PATHS[:1]), "vm-1")
    first, ours = _cloud_init_parts(out)
    assert _payload(first) == SCRIPT
    assert _cloud_config(_payload(ours))["bootcmd"] == [
        ["sh", "-c", DEVICE_LINK_SCRIPT, "podvisor-devices", "/dev/xvda", device_by_id("/dev/xvda")]]


def test_no_devices_no_bootcmd() -> None:
    assert "bootcmd" not in _cloud_config(render_user_data(CloudInit(), "vm-1"))


def _link(tmp_path: Path, *pairs: Path) -> subprocess.CompletedProcess[str]:
    script = DEVICE_LINK_SCRIPT.replace(f"-lt {DEVICE_LINK_WAIT_S} ", "-lt 1 ")
    assert script != DEVICE_LINK_SCRIPT
    return subprocess.run(["sh", "-c", script, "test", *map(str, pairs)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)


def test_the_link_script_makes_parents_and_replaces_old_links(tmp_path: Path) -> None:
    dev_a, dev_b = tmp_path / "virtio-a", tmp_path / "virtio-b"
    dev_a.write_text("a")
    dev_b.write_text("b")
    stale = tmp_path / "dev" / "xvdb"
    stale.parent.mkdir()
    stale.symlink_to(tmp_path / "gone")
    new = tmp_path / "srv" / "volumes" / "data"
    done = _link(tmp_path, new, dev_a, stale, dev_b)
    assert done.returncode == 0, done.stderr
    assert (new.readlink(), stale.readlink()) == (dev_a, dev_b)
    # Every boot: running it again changes nothing.
    assert _link(tmp_path, new, dev_a, stale, dev_b).returncode == 0
    assert (new.readlink(), stale.readlink()) == (dev_a, dev_b)


def test_the_link_script_leaves_other_files_alone_and_says_why(tmp_path: Path) -> None:
    dev = tmp_path / "virtio-a"
    dev.write_text("a")
    taken = tmp_path / "taken"
    taken.mkdir()
    ok = tmp_path / "ok"
    done = _link(tmp_path, taken, dev, tmp_path / "x", tmp_path / "virtio-missing", ok, dev)
    assert done.returncode == 1
    assert f"podvisor: {taken} exists and is not a symlink; the device is {dev}" in done.stderr
    assert f"podvisor: device {tmp_path}/virtio-missing for {tmp_path}/x did not appear" in done.stderr
    assert taken.is_dir() and not taken.is_symlink() and list(taken.iterdir()) == []
    assert ok.readlink() == dev  # the others are linked all the same


def test_the_link_script_accepts_the_device_itself_at_its_path(tmp_path: Path) -> None:
    dev = tmp_path / "vdc"
    dev.write_text("a")
    by_id = tmp_path / "virtio-a"
    by_id.symlink_to(dev)
    done = _link(tmp_path, dev, by_id)
    assert done.returncode == 0, done.stderr
    assert not dev.is_symlink()
