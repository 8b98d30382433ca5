"""qemu-img info JSON (judging an untrusted image): a DiskInfo or FailedPrecondition."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from agent.domain import disk
from tests.fuzz.properties import Refused, domain_errors_only
from tests.fuzz.strategies import deep_texts, dumps, json_values, mutate_document

INFO: dict[str, Any] = {
    "virtual-size": 1 << 30, "filename": "x.qcow2", "cluster-size": 65536, "format": "qcow2",
    "actual-size": 200704, "dirty-flag": False,
    "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "corrupt": False, "data-file": None}},
}


@given(st.one_of(mutate_document(INFO).map(dumps), json_values.map(dumps), deep_texts),
       st.sampled_from([None, "qcow2", "raw"]))
@example('{"format": "qcow2", "virtual-size": 1, "format-specific": []}', None)
@example('{"format": "qcow2", "virtual-size": 1, "format-specific": {"data": "x"}}', None)
@example("[" * 100_000, None)
def test_qemu_img_json_gives_info_or_failed_precondition(text: str, declared: str | None) -> None:
    info = domain_errors_only(disk.check, text, source="image x", max_virtual_size=1 << 40,
                              declared_format=declared)
    if not isinstance(info, Refused):
        assert info.format in disk.FORMATS and 0 < info.virtual_size <= 1 << 40
