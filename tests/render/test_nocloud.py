"""Tests for the NoCloud seed renderer (agent.render.nocloud)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pycdlib
import pytest
import yaml

from agent.render.nocloud import SEED_VOLUME_LABEL, build_seed_iso, render_meta_data

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN_SEED_SHA256 = GOLDEN_DIR / "nocloud_seed_small.iso.sha256"

META = render_meta_data("iid-0001", "vm-one")
USER = b"#cloud-config\nruncmd:\n  - echo hello\n"
NETWORK = b"version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"


def _open_iso(image: bytes) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    return iso


def _read(iso: pycdlib.PyCdlib, **path: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue()


def _rr_names(iso: pycdlib.PyCdlib) -> set[str]:
    return {
        child.rock_ridge.name().decode()
        for child in iso.list_children(rr_path="/")
        if not (child.is_dot() or child.is_dotdot())
    }


@pytest.mark.parametrize(
    ("meta", "user", "network"),
    [
        pytest.param(META, USER, NETWORK, id="all-three"),
        pytest.param(META, USER, None, id="no-network-config"),
        pytest.param(META, b"", None, id="empty-user-data"),
        pytest.param(META, os.urandom(70_000), b"", id="large-binary-and-empty-network"),
    ],
)
def test_seed_files_read_back_through_rock_ridge_and_joliet(meta: bytes, user: bytes, network: bytes | None) -> None:
    iso = _open_iso(build_seed_iso(meta, user, network))
    try:
        assert iso.pvd.volume_identifier.rstrip(b" ") == SEED_VOLUME_LABEL.encode()
        expected = {"meta-data": meta, "user-data": user}
        if network is not None:
            expected["network-config"] = network
        assert _rr_names(iso) == set(expected)
        for name, data in expected.items():
            assert _read(iso, rr_path="/" + name) == data
            assert _read(iso, joliet_path="/" + name) == data
    finally:
        iso.close()


def test_vendor_data_is_carried_when_given() -> None:
    vendor = b"#cloud-config\ndisable_root: false\n"
    iso = _open_iso(build_seed_iso(META, USER, NETWORK, vendor))
    try:
        assert _rr_names(iso) == {"meta-data", "user-data", "network-config", "vendor-data"}
        assert _read(iso, rr_path="/vendor-data") == vendor
        assert _read(iso, joliet_path="/vendor-data") == vendor
    finally:
        iso.close()


def test_meta_data_public_keys_are_a_yaml_list() -> None:
    keys = ("ssh-ed25519 AAAA a@b", 'ssh-rsa BBBB "quoted"')
    assert yaml.safe_load(render_meta_data("i", "h", public_keys=keys))["public-keys"] == list(keys)
    assert b"public-keys" not in render_meta_data("i", "h")


def test_label_is_at_the_offset_blkid_and_guests_read() -> None:
    image = build_seed_iso(META, USER)
    # Primary volume descriptor at sector 16: "CD001" at +1, volume id at +40.
    assert image[32769:32774] == b"CD001"
    assert image[32808:32840].rstrip(b" ") == b"cidata"


def test_same_inputs_give_same_bytes() -> None:
    assert build_seed_iso(META, USER, NETWORK) == build_seed_iso(META, USER, NETWORK)


def test_output_does_not_depend_on_clock_or_time_zone(tmp_path: Path) -> None:
    # A fresh interpreter in another time zone, started later, must agree.
    script = textwrap.dedent(
        """
        import hashlib, sys
        from agent.render.nocloud import build_seed_iso
        sys.stdout.write(hashlib.sha256(build_seed_iso(b"m", b"u", b"n")).hexdigest())
        """
    )
    env = dict(os.environ, TZ="Pacific/Kiritimati")
    other = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert other == hashlib.sha256(build_seed_iso(b"m", b"u", b"n")).hexdigest()


def test_different_inputs_give_different_images() -> None:
    assert build_seed_iso(META, USER) != build_seed_iso(META, USER + b"# more\n")


def test_golden_small_seed() -> None:
    image = build_seed_iso(render_meta_data("iid-golden", "golden-host"), b"#!/bin/sh\necho hi\n")
    digest = hashlib.sha256(image).hexdigest()
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN_SEED_SHA256.write_text(digest + "\n")
    assert digest == GOLDEN_SEED_SHA256.read_text().strip(), (
        "seed ISO bytes changed; if intended, rerun with UPDATE_GOLDEN=1"
    )


def test_meta_data_is_yaml_with_both_keys() -> None:
    text = render_meta_data("iid-7", "web-0")
    assert yaml.safe_load(text) == {"instance-id": "iid-7", "local-hostname": "web-0"}
    assert text == b'instance-id: "iid-7"\nlocal-hostname: "web-0"\n'


@pytest.mark.parametrize("awkward", ['a"b', "x: y", "line\nbreak", "#hash", "ünï"])
def test_meta_data_quotes_awkward_values(awkward: str) -> None:
    text = render_meta_data(awkward, "h")
    assert yaml.safe_load(text)["instance-id"] == awkward
    assert len(text.splitlines()) == 2
    # Values are JSON strings, so a JSON reader agrees with the YAML reader.
    first_value = text.splitlines()[0].split(b": ", 1)[1]
    assert json.loads(first_value) == awkward


@pytest.mark.parametrize(("instance_id", "hostname"), [("", "h"), ("i", "")])
def test_meta_data_rejects_empty_values(instance_id: str, hostname: str) -> None:
    with pytest.raises(ValueError):
        render_meta_data(instance_id, hostname)
