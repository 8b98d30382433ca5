"""cloud-init NoCloud seed: meta-data text and the ``cidata`` ISO 9660 image.

Pure functions of their inputs → bytes. Writing the seed to disk is an
adapter's job.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
import types
from collections.abc import Iterator

import pycdlib
import pycdlib.dates
import pycdlib.headervd
import pycdlib.pycdlib
import pycdlib.utils

SEED_VOLUME_LABEL = "cidata"

# 2000-01-01T00:00:00Z: every timestamp in the seed, so equal inputs give equal bytes.
SEED_EPOCH = 946684800.0

# ISO 9660 level-1 names (8.3, upper case) and the names Rock Ridge / Joliet show.
_SEED_FILES: tuple[tuple[str, str], ...] = (
    ("meta-data", "/METADATA.;1"),
    ("user-data", "/USERDATA.;1"),
    ("network-config", "/NETWORKC.;1"),
    ("vendor-data", "/VENDORDA.;1"),
)

# pycdlib reads the wall clock and the local time zone deep inside; it has no
# option for fixed dates, so its modules see a frozen UTC clock while we build.
# The lock keeps concurrent builds from restoring the real clock under each other.
_PYCDLIB_CLOCK_MODULES = (pycdlib.dates, pycdlib.headervd, pycdlib.pycdlib, pycdlib.utils)
_clock_lock = threading.Lock()


def _frozen_time_module() -> types.SimpleNamespace:
    attrs = {name: value for name, value in vars(time).items() if not name.startswith("__")}
    attrs["time"] = lambda: SEED_EPOCH
    attrs["localtime"] = time.gmtime
    return types.SimpleNamespace(**attrs)


@contextlib.contextmanager
def _frozen_pycdlib_clock() -> Iterator[None]:
    frozen = _frozen_time_module()
    with _clock_lock:
        saved = [(module, vars(module)["time"]) for module in _PYCDLIB_CLOCK_MODULES]
        try:
            for module, _ in saved:
                vars(module)["time"] = frozen
            yield
        finally:
            for module, original in saved:
                vars(module)["time"] = original


def render_meta_data(instance_id: str, hostname: str, public_keys: tuple[str, ...] = ()) -> bytes:
    """Return NoCloud ``meta-data`` with ``instance-id``, ``local-hostname`` and,
    when given, ``public-keys`` (cloud-init gives them to the default user and
    root, on top of any ``ssh_authorized_keys``).

    The text is YAML with one key per line; values are JSON strings (a subset
    of YAML double-quoted scalars), so any character is safely quoted and
    line-oriented readers such as the tiny test guest can parse it too.
    """
    if not instance_id:
        raise ValueError("instance_id must not be empty")
    if not hostname:
        raise ValueError("hostname must not be empty")
    lines = [
        f"instance-id: {json.dumps(instance_id)}",
        f"local-hostname: {json.dumps(hostname)}",
    ]
    if public_keys:
        lines.append(f"public-keys: {json.dumps(list(public_keys))}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def build_seed_iso(meta_data: bytes, user_data: bytes, network_config: bytes | None = None,
                   vendor_data: bytes | None = None) -> bytes:
    """Return a NoCloud seed: an ISO 9660 image labelled ``cidata``.

    It holds ``meta-data``, ``user-data`` and, when given, ``network-config``
    and ``vendor-data``,
    under those lower-case names in both Rock Ridge (Linux) and Joliet
    extensions. All timestamps are fixed at ``SEED_EPOCH`` so the output depends
    only on the inputs.
    """
    contents: dict[str, bytes] = {"meta-data": meta_data, "user-data": user_data}
    if network_config is not None:
        contents["network-config"] = network_config
    if vendor_data is not None:
        contents["vendor-data"] = vendor_data

    with _frozen_pycdlib_clock():
        iso = pycdlib.PyCdlib()
        iso.new(
            interchange_level=1,
            vol_ident=SEED_VOLUME_LABEL,
            sys_ident="LINUX",
            joliet=3,
            rock_ridge="1.09",
        )
        for name, iso_path in _SEED_FILES:
            if name not in contents:
                continue
            data = contents[name]
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                iso_path,
                rr_name=name,
                joliet_path="/" + name,
            )
        out = io.BytesIO()
        iso.write_fp(out)
        iso.close()
    return out.getvalue()
